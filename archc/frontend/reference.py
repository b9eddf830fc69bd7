"""The reference specs and design spaces that ship with archc, found by name.

In a checkout they are the `specs/` and `spaces/` folders beside `archc/`; in an installed wheel
they are package data in `archc/specs/` and `archc/spaces/` (see `pyproject.toml`). A bare name
such as `regnetx_600mf` (no folder, no extension) that is not a file in the working directory
names one of them.
"""

from __future__ import annotations

from pathlib import Path

from archc.common.suggest import did_you_mean_any
from archc.errors import SpecError

_ARCHC = Path(__file__).resolve().parents[1]  # the archc package (archc/frontend/..)


def shipped_folder(kind: str) -> Path | None:
    """The folder of shipped `kind` files ("specs" or "spaces"), or None if there is none."""
    for folder in (_ARCHC / kind, _ARCHC.parent / kind):
        if folder.is_dir() and any(folder.glob("*.yaml")):
            return folder
    return None


def shipped_names(kind: str = "specs") -> list[str]:
    """The names of the shipped `kind` files, sorted."""
    folder = shipped_folder(kind)
    return sorted(path.stem for path in folder.glob("*.yaml")) if folder else []


def is_bare_name(text: str) -> bool:
    """A name with no folder and no extension: it may name a shipped file."""
    return "/" not in text and "\\" not in text and Path(text).suffix.lower() not in (
        ".yaml", ".yml", ".json")


def resolve(source: str | Path, kind: str = "specs", error: type[SpecError] = SpecError) -> Path:
    """`source` itself if it exists or is not a bare name, else the shipped file it names.

    Raises `error` (with the closest names) for a bare name that names nothing."""
    path = Path(source)
    if path.exists() or not is_bare_name(str(source)):
        return path
    names = shipped_names(kind)
    if str(source) in names:
        return shipped_folder(kind) / f"{source}.yaml"
    hint = did_you_mean_any(source, names) or (
        f"; `archc models` lists the {len(names)} shipped specs" if kind == "specs" else "")
    raise error(f"no such file, and no shipped {kind[:-1]} of that name{hint}", "",
                    str(source))
