"""Optional runtimes (pip extras): whether one is installed, checked without importing it, and the
one wording of the error when it is not (torch-free)."""

from __future__ import annotations

from importlib.util import find_spec


def installed(module: str) -> bool:
    """True if `module` can be imported (found on the path, not imported)."""
    try:
        return find_spec(module) is not None
    except (ImportError, ValueError):  # a parent package missing, or a module without a spec
        return False


def missing_extra(module: str, extra: str, purpose: str) -> str | None:
    """Why `purpose` cannot run: `module` is not installed (install `archc[extra]`); else None."""
    if installed(module):
        return None
    return f"{purpose} needs {module}, which is not installed: pip install 'archc[{extra}]'"
