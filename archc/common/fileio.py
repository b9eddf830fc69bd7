"""Atomic file output (a failed run leaves no partial file) and the one way a file's size is
written (torch-free)."""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path


@contextlib.contextmanager
def atomic_output(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside `path`; move it into place only if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(
        prefix=f".{path.name}.", suffix=".partial", dir=path.parent
    )
    os.close(handle)
    os.chmod(temporary, 0o666 & ~_umask())  # mkstemp makes 0600; give what open() would
    try:
        yield Path(temporary)
        os.replace(temporary, path)
    finally:
        if os.path.exists(temporary):
            os.unlink(temporary)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def size_text(count: int) -> str:
    """A size in bytes in the largest decimal unit (B, kB, MB, GB) that keeps the number below
    1000 where it can: `999 B`, `1.0 kB`, `11.8 MB`; one decimal, bytes whole."""
    if count < 1000:
        return f"{count} B"
    value, unit = count / 1000, "kB"
    for larger in ("MB", "GB"):
        if round(value, 1) < 1000:
            break
        value, unit = value / 1000, larger
    return f"{value:,.1f} {unit}"
