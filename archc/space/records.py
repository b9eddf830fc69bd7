"""JSON-lines files of samples and results: canonical lines, tolerant reading, safe appends.

A record is one line, `json.dumps(record, sort_keys=True, separators=(",", ":"))`: equal records
give equal bytes on every machine (keys sorted, Python's shortest round-trip float repr, no NaN).
Samples files are written whole and atomically; results files grow by appends of one whole line
each, flushed and fsynced, so a killed run leaves at most one partial last line. Reading skips
such a truncated last line (the line the killed run was writing) and `Appender` cuts it off
before appending; any other unreadable line is an error naming the file and the line.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from archc.common.fileio import atomic_output
from archc.errors import SpaceError


def dumps(record: dict[str, Any]) -> str:
    return json.dumps(record, sort_keys=True, separators=(",", ":"), allow_nan=False)


def write_records(path: str | Path, records: Iterable[dict[str, Any]]) -> int:
    """Write a whole JSON-lines file atomically; return the number of records."""
    count = 0
    with atomic_output(path) as temporary, open(temporary, "w", encoding="utf-8") as stream:
        for record in records:
            stream.write(dumps(record) + "\n")
            count += 1
    return count


def read_records(path: str | Path, what: str = "records") -> tuple[list[dict[str, Any]], bool]:
    """(records, whether a truncated last line was skipped). Raises `SpaceError` for a missing or
    unreadable file or a bad line other than a truncated last one."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise SpaceError(f"no such {what} file", "", str(path)) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise SpaceError(f"cannot read: {exc}", "", str(path)) from None
    lines = text.split("\n")
    truncated = bool(lines[-1])  # no newline after the last line: a write was cut short
    records = []
    for number, line in enumerate(lines[:-1], start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise SpaceError(f"not a JSON line ({exc.msg})", f"line {number}", str(path)) from None
        if not isinstance(record, dict):
            raise SpaceError("not a JSON object", f"line {number}", str(path))
        records.append(record)
    return records, truncated


class Appender:
    """Appends one record per line to a results file, durable line by line."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._cut_partial_line()
        self._stream = open(self.path, "a", encoding="utf-8")  # noqa: SIM115 (closed in close)

    def _cut_partial_line(self) -> None:
        if not self.path.exists():
            return
        data = self.path.read_bytes()
        if data and not data.endswith(b"\n"):
            with open(self.path, "r+b") as stream:
                stream.truncate(data.rfind(b"\n") + 1)

    def append(self, record: dict[str, Any]) -> None:
        self._stream.write(dumps(record) + "\n")
        self._stream.flush()
        os.fsync(self._stream.fileno())

    def close(self) -> None:
        self._stream.close()

    def __enter__(self) -> Appender:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
