"""The `archc` command line: the top-level parser, the options every command takes (--quiet,
--progress, --debug), dispatch, and the guard that turns failures into exit codes. Each command
group has its own module with `add_commands` (its parsers) and `HANDLERS` (its handlers):
`archc.cli.build` (build, fuse), `archc.cli.bench`, `archc.cli.describe` (info, show, passes,
models, schema), `archc.cli.space`, `archc.cli.compress` and `archc.cli.quant`.

Argument parsing imports nothing heavy: `archc --help` and argument errors never import torch, and
every option is checked as it is parsed (`archc.cli.arguments`). One guard (`main`) turns every
failure into one line on stderr: a user's mistake (`ArchcError`, running out of memory, sizes torch
cannot index) is `error: ...` and exit 2; anything else is an archc bug: `internal error: ...` and
exit 1, with the traceback only under `--debug`. Output locations are checked before any work
starts. Progress goes to stderr (one line per pass) when stderr is a terminal or `--progress` asks
for it, so logs and pipes get only results and errors; `--quiet` keeps only errors, `--json` prints
one machine-readable report on stdout instead of the text.

Before torch is imported, `main` asks OpenMP's idle threads to sleep rather than spin
(`OMP_WAIT_POLICY=PASSIVE`, unless the environment sets it): a command runs thousands of short
ops, and between two of them torch's idle worker threads spin for their next task. On a machine
whose cores are busy with other work, the spinning threads compete with the one doing the work:
measured on 2 shared cores, `archc build mobilenet_v3_large` took 30 s (17 s of CPU) spinning
and 6 s (4 s of CPU) sleeping.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from archc.cli import arguments
from archc.cli import bench as cli_bench
from archc.cli import build as cli_build
from archc.cli import compress as cli_compress
from archc.cli import describe as cli_describe
from archc.cli import quant as cli_quant
from archc.cli import space as cli_space
from archc.errors import first_line

# Failures of the machine rather than of archc: one line and exit 2, like a user error
RESOURCE_MESSAGES = ("can't allocate memory", "DefaultCPUAllocator", "out of memory",
                     "overflowed", "integer multiplication overflow", "numel: integer")


class Parser(argparse.ArgumentParser):
    """argparse with one-line usage errors: `error: archc build: argument --opset: ...`."""

    def error(self, message: str):
        self.exit(2, f"error: {self.prog}: {message} (see `{self.prog} --help`)\n")


def make_parser() -> argparse.ArgumentParser:
    from archc import __version__

    parser = Parser(
        prog="archc",
        description="archc: a graph-rewriting architecture compiler for convolutional networks.",
    )
    parser.add_argument("--version", action="version", version=f"archc {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    cli_build.add_commands(commands)  # build, fuse
    cli_bench.add_commands(commands)  # bench
    cli_describe.add_commands(commands)  # passes, info, models, show, schema
    cli_space.add_commands(commands)  # space sample|sweep|analyze|fit, train, eval
    cli_compress.add_commands(commands)  # prune, lowrank, reduce
    cli_quant.add_commands(commands)  # quantize, qat
    for command in _all_parsers(parser):
        command.add_argument("--quiet", "-q", action="store_true", default=argparse.SUPPRESS,
                             help="print errors only")
        command.add_argument("--progress", action="store_true", default=argparse.SUPPRESS,
                             help="a progress line per step on stderr even when it is not a "
                             "terminal (the default on one)")
        command.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                             help="show the traceback of an internal error")
    return parser


def _all_parsers(parser: argparse.ArgumentParser):
    """`parser` and every (nested) subcommand parser."""
    yield parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for child in dict.fromkeys(action.choices.values()):
                yield from _all_parsers(child)


def idle_threads_sleep() -> None:
    """`OMP_WAIT_POLICY=PASSIVE` unless the environment chose a policy (module docstring); OpenMP
    reads it when torch loads it, so nothing changes once torch is imported."""
    if "torch" not in sys.modules:
        os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


def main(argv: list[str] | None = None) -> int:
    idle_threads_sleep()
    parser = make_parser()
    args = parser.parse_args(argv)
    from archc.errors import ArchcError

    debug = getattr(args, "debug", False)
    try:
        problem = _output_problem(parser, args) or cli_build.option_problem(args)
        if problem:
            raise ArchcError(problem)
        commands = {
            **cli_build.HANDLERS,
            **cli_bench.HANDLERS,
            **cli_describe.HANDLERS,
            **cli_space.HANDLERS,
            **cli_compress.HANDLERS,
            **cli_quant.HANDLERS,
        }
        created = _create_output_folders(parser, args)
        try:
            code = commands[args.command](args)
        except BaseException:
            _remove_empty(created)
            raise
        if code:
            _remove_empty(created)
        else:
            from archc.cli.output import Output

            for folder in created:
                Output(args).note(f"created folder {folder}")
        return code
    except ArchcError as exc:
        for line in exc.lines() if hasattr(exc, "lines") else [str(exc)]:
            print(f"error: {line}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130
    except (MemoryError, OverflowError, RuntimeError) as exc:
        if isinstance(exc, RuntimeError) and not _is_resource_failure(exc):
            return _internal_error(exc, debug)
        if debug:
            import traceback

            traceback.print_exc()
        print(f"error: this machine cannot hold the model ({first_line(exc)}); make it smaller "
              "or use --max-memory to refuse such specs up front", file=sys.stderr)
        return 2
    except Exception as exc:  # an archc bug: one line, the traceback with --debug
        return _internal_error(exc, debug)


def _is_resource_failure(exc: BaseException) -> bool:
    return any(message in str(exc) for message in RESOURCE_MESSAGES)


def _internal_error(exc: BaseException, debug: bool) -> int:
    if debug:
        import traceback

        traceback.print_exc()
    print(f"internal error: {first_line(exc)} (an archc bug; "
          f"{'please report it' if debug else 'rerun with --debug for the traceback'})",
          file=sys.stderr)
    return 1


def _output_problem(parser: argparse.ArgumentParser, args: argparse.Namespace) -> str | None:
    """Why an output of the command cannot be written, checked before any work: every file or
    folder its options name (`arguments.written_locations`) and the `--int8` model."""
    if getattr(args, "int8", None) is not None:  # build / fuse --int8 --calib DATA
        problem = cli_quant.chain_problem(args, Path(getattr(args, "output", None) or ".pt2"))
        if problem:
            return problem
    for path, kind in arguments.written_locations(parser, args):
        problem = arguments.check_output_location(path, kind)
        if problem:
            return problem
    return None


def _create_output_folders(parser: argparse.ArgumentParser,
                           args: argparse.Namespace) -> list[Path]:
    """Create the missing folders the command's outputs go into (a `-o` file's folder, a folder
    output such as `--dump-after`'s DIR), after the checks and before any work; the folders
    created, outermost first. They are said only once the command succeeds (an error stays one
    line) and removed again, if still empty, when it fails."""
    created: list[Path] = []
    for path, kind in arguments.written_locations(parser, args):
        folder = path if kind == "folder" else path.parent
        missing = [f for f in (folder, *folder.parents) if not f.exists()]
        if missing:
            folder.mkdir(parents=True)
            created += [f for f in reversed(missing) if f not in created]
    return created


def _remove_empty(folders: list[Path]) -> None:
    """Remove the folders a failed command created, innermost first, where nothing was written."""
    for folder in reversed(folders):
        if folder.is_dir() and not any(folder.iterdir()):
            folder.rmdir()


if __name__ == "__main__":
    sys.exit(main())
