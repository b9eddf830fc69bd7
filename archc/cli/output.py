"""Where a command's text goes (torch-free): results on stdout, progress on stderr, one --json
document, counts in one unit; shared by every subcommand module."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

SPEC_FORMATS = (".yaml", ".yml", ".json")  # what `write_spec` writes


class Output:
    """Where a command's text goes, one rule for every command: `say` the human-readable result
    to stdout (not with --quiet or --json), `note` an informational line (what was written, a
    summary) to stderr (not with --quiet), `warning` a note that starts with `warning:`,
    `progress` a progress line to stderr (on a terminal or with --progress, never with
    --quiet), `report` the --json document to stdout (whenever --json asks for it, --quiet or
    not). Errors always reach stderr; a command's product written to
    stdout in place of a file (`schema`, `space fit` without -o) is not text about the work and
    is always written (with --json, inside the report)."""

    def __init__(self, args: argparse.Namespace):
        self.quiet = getattr(args, "quiet", False)
        self.json = getattr(args, "json", False)
        self.show_progress = not self.quiet and (getattr(args, "progress", False)
                                                 or sys.stderr.isatty())

    def say(self, text: str) -> None:
        if not (self.quiet or self.json):
            print(text, flush=True)

    def note(self, text: str) -> None:
        if not self.quiet:
            print(text, file=sys.stderr, flush=True)

    def warning(self, text: str) -> None:
        """A `warning:` line on stderr (not with --quiet): legal input that is probably not
        what the user meant; the command goes on."""
        self.note(f"warning: {text}")

    def progress(self, text: str) -> None:
        if self.show_progress:
            print(text, file=sys.stderr, flush=True)

    def report(self, document: dict) -> None:
        if self.json:
            print(json.dumps(document, indent=1))


def count_text(value: int) -> str:
    """A count in M (below 10 G) or G, the one unit per size used throughout the CLI."""
    return f"{value / 1e9:,.2f}G" if value >= 10e9 else f"{value / 1e6:,.1f}M"


def counted(count: int, noun: str) -> str:
    """`count` and `noun`, plural (an added s) unless the count is one: "1 model", "2 models"."""
    return f"{count} {noun}" if count == 1 else f"{count} {noun}s"


def write_spec(spec_dict: dict, output: Path | None, out: Output) -> None:
    """A spec as YAML (JSON for a .json name), written atomically to `output` or to stdout."""
    import yaml

    if output is not None and output.suffix.lower() == ".json":
        text = json.dumps(spec_dict, indent=1) + "\n"
    else:
        text = yaml.safe_dump(spec_dict, sort_keys=False)
    if output is None:
        sys.stdout.write(text)
        return
    from archc.common.fileio import atomic_output

    with atomic_output(output) as temporary:
        temporary.write_text(text)
    out.note(f"wrote {output}")
