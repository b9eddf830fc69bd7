"""Argument types of the command line: each parses and checks one option when argparse reads it,
so a wrong value is a one-line usage error (exit 2) before any work starts. Torch-free."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path

_UNITS = {"": 1, "k": 2**10, "m": 2**20, "g": 2**30, "t": 2**40}


def _integer(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None


def positive_int(text: str) -> int:
    value = _integer(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} is not a positive integer")
    return value


def seed(text: str) -> int:
    value = _integer(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"a seed is a non-negative integer, got {value}")
    return value


def int_in(low: int, high: int, what: str) -> Callable[[str], int]:
    """An integer in [low, high]; `what` names the range in the message."""
    def parse(text: str) -> int:
        value = _integer(text)
        if not low <= value <= high:
            raise argparse.ArgumentTypeError(f"{value} is outside {low}..{high} ({what})")
        return value

    return parse


def finite_float(text: str) -> float:
    """A float that is neither NaN nor infinite."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if value != value or value in (float("inf"), float("-inf")):
        raise argparse.ArgumentTypeError(f"{text!r} is not a finite number")
    return value


def nonnegative_float(text: str) -> float:
    """A finite float >= 0 (a learning rate, a penalty strength)."""
    value = finite_float(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"{value:g} is negative")
    return value


def positive_float(text: str) -> float:
    """A finite float > 0 (a temperature)."""
    value = finite_float(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"{value:g} is not positive")
    return value


def closed_unit_interval(text: str) -> float:
    """A float in [0, 1] (a loss weight)."""
    value = finite_float(text)
    if not 0 <= value <= 1:
        raise argparse.ArgumentTypeError(f"{value:g} is not in [0, 1]")
    return value


def open_unit_interval(text: str) -> float:
    """A float strictly between 0 and 1 (a relative tolerance, a ratio)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not 0 < value < 1:
        raise argparse.ArgumentTypeError(f"{value:g} is not between 0 and 1 (exclusive)")
    return value


def memory_size(text: str) -> int:
    """Bytes from `512M`, `8G`, `1.5G`, `1000000` (binary units, case-insensitive, optional B)."""
    number = text.strip().lower().removesuffix("b").removesuffix("i")
    unit = number[-1:] if number[-1:] in _UNITS and number[-1:] else ""
    try:
        value = float(number[: len(number) - len(unit)]) * _UNITS[unit]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a memory size like 512M or 8G") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive memory size")
    return int(value)


def output_path(formats: tuple[str, ...]) -> Callable[[str], Path]:
    """A file path whose extension is one of `formats` (it chooses the output format)."""
    def parse(text: str) -> Path:
        path = Path(text)
        if path.suffix.lower() not in formats:
            raise argparse.ArgumentTypeError(
                f"cannot tell the format of {text!r}: use one of {', '.join(formats)}")
        return path

    return parse


def shape(text: str) -> tuple[int, ...]:
    """N,C,H,W (or N,C,L / N,C,D,H,W for 1-D / 3-D convs, N,F for a linear model)."""
    try:
        sizes = tuple(int(part) for part in text.replace("x", ",").split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a shape like 1,3,224,224") from None
    if not 2 <= len(sizes) <= 5:
        raise argparse.ArgumentTypeError(
            f"{text!r} has {len(sizes)} sizes: give N,C,H,W (2 to 5 sizes, batch first)")
    if min(sizes) < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a shape of positive sizes")
    return sizes


def check_output_location(path: Path) -> str | None:
    """Why `path` cannot be written, or None: checked before any work starts."""
    if path.is_dir():
        return f"{path} is a folder; give a file name"
    folder = path.parent
    while not folder.exists():
        folder = folder.parent
    if not folder.is_dir():
        return f"cannot write {path}: {folder} is a file, not a folder"
    import os

    if not os.access(folder, os.W_OK | os.X_OK):
        return f"cannot write {path}: no permission to write in {folder}"
    return None
