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
    """A malformed spec: `file:field.path: what is wrong`."""

    def __init__(self, message: str, path: str = "", source: str | None = None):
        self.message = message
        self.path = path
        self.source = source
        super().__init__(self.format())

    def format(self) -> str:
        where = [part for part in (self.source, self.path) if part]
        return ":".join(where + [" " + self.message]) if where else self.message

    def with_source(self, source: str) -> SpecError:
        return SpecError(self.message, self.path, source)


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


class CheckpointError(ArchcError):
    """A checkpoint is corrupt, truncated, of the wrong format or does not match its spec."""


class VerificationError(ArchcError):
    """Two computations that must agree numerically do not."""
