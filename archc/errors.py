"""The archc exception tree.

Every error a user can cause derives from `ArchcError`; the CLI prints it as one line
(`error: <message>`) and exits with code 2. Anything else escaping the CLI is an internal bug
(exit code 1).
"""

from __future__ import annotations


class ArchcError(Exception):
    """Base class of every user-facing archc error."""

    exit_code = 2


class SpecError(ArchcError):
    """A malformed spec: `file:field.path: what is wrong`. `also` holds the file's other errors
    `(message, path)`, found in the same validation, and `unlisted` how many more there were;
    the CLI prints one line each."""

    def __init__(self, message: str, path: str = "", source: str | None = None,
                 also: tuple[tuple[str, str], ...] = (), unlisted: int = 0):
        self.message = message
        self.path = path
        self.source = source
        self.also = also
        self.unlisted = unlisted
        super().__init__(self.format())

    def format(self, message: str | None = None, path: str | None = None) -> str:
        where = [part for part in (self.source, self.path if path is None else path) if part]
        text = self.message if message is None else message
        return ":".join(where + [" " + text]) if where else text

    def lines(self) -> list[str]:
        """One line per error: this one, then the others."""
        lines = [self.format(), *(self.format(m, p) for m, p in self.also)]
        if self.unlisted:
            lines.append(f"{self.source or '<spec>'}: {self.unlisted} more errors not shown")
        return lines

    def with_source(self, source: str) -> SpecError:
        return type(self)(self.message, self.path, source, self.also, self.unlisted)


class SpaceError(SpecError):
    """A malformed design-space, samples or results file, or a space nothing can be sampled from:
    `file:field.path: what is wrong` (the path is a line number in a JSON-lines file)."""

    def with_source(self, source: str) -> SpaceError:
        return SpaceError(self.message, self.path, source)


class DataError(ArchcError):
    """A data set that is missing, unreadable or does not fit the model."""


class TrainingError(ArchcError):
    """Training cannot run or failed: a trainer that cannot be imported or returns no metrics, a
    loss that is not finite."""


class PassError(ArchcError):
    """A pass failed or refused the whole model; names the pass and the passes before it."""

    def __init__(self, message: str, pass_name: str = "", preceding: tuple[str, ...] = ()):
        self.pass_name = pass_name
        self.preceding = tuple(preceding)
        prefix = f"pass {pass_name!r}" if pass_name else "pass pipeline"
        if self.preceding:
            prefix += f" (after {', '.join(self.preceding)})"
        super().__init__(f"{prefix}: {message}")


class ExportError(ArchcError):
    """Export to ONNX / torch.export / PyTorch failed or did not verify."""


class ResourceError(ArchcError):
    """The work would not fit this machine (memory, sizes beyond what torch can index)."""


class DeviceError(ArchcError):
    """A device that is unknown or not on this machine, or a precision it cannot train in."""


class CheckpointError(ArchcError):
    """A checkpoint is corrupt, truncated, of the wrong format or does not match its spec."""


def first_line(exc: BaseException) -> str:
    """`Type: the first line of the message` (at most 160 characters), for one-line errors."""
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0][:160]}" if text else type(exc).__name__
