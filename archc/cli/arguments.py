"""Argument types of the command line: each parses and checks one option when argparse reads it,
so a wrong value is a one-line usage error (exit 2) before any work starts. Torch-free."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

# The pass names of the catalogue (archc.passes), written out so that checking `--after` and
# `--dump-after` stays torch-free; tests/cli/test_cli_promises.py holds them to the registry
PASS_NAMES = ("align_channels", "canonicalize", "canonicalize_channel_shuffle",
              "eliminate_dead_code", "fold_bn", "fold_channel_shuffle", "fold_constants",
              "insert_channel_shuffle", "merge_parallel_branches", "merge_sequential_convs",
              "remove_identity")

# The runtimes `archc bench` knows, written out so that parsing `--runtimes` stays torch-free;
# tests/cli/test_bench.py holds them to archc.backends.bench.RUNTIMES
RUNTIME_NAMES = ("ort", "openvino", "torch", "torch-compile", "executorch")

_UNITS = {"": 1, "k": 2**10, "m": 2**20, "g": 2**30, "t": 2**40}


def _integer(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None


def add_device_options(group, precision: bool = True) -> None:
    """`--device` (and `--precision`), checked by archc.train.device when the command runs."""
    group.add_argument("--device", default="auto", metavar="DEVICE",
                       help="auto (CUDA, else MPS, else the CPU), cpu, cuda, cuda:N or mps "
                       "(default auto)")
    if precision:
        group.add_argument("--precision", default="fp32", metavar="P",
                           help="fp32, bf16 or fp16 (torch.autocast; fp16 with a gradient "
                           "scaler; default fp32)")


def resolved_device(args) -> str:
    """The device `--device` names on this machine (and `--precision` checked): DeviceError,
    one line and exit 2, before any data is read."""
    from archc.train.device import check_precision, resolve_device

    if hasattr(args, "precision"):
        check_precision(args.precision)
    return str(resolve_device(args.device))


def positive_int(text: str) -> int:
    value = _integer(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} is not a positive integer")
    return value


def nonnegative_int(text: str) -> int:
    """An integer >= 0 (a count of worker processes)."""
    value = _integer(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"{value} is negative (give 0 or more)")
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


def runtime_list(text: str) -> list[str]:
    """Comma-separated runtime names of `archc bench`, each known, in the order given."""
    from archc.common.suggest import did_you_mean

    names = [part.strip() for part in text.split(",") if part.strip()]
    if not names:
        raise argparse.ArgumentTypeError("name at least one runtime")
    for name in names:
        if name not in RUNTIME_NAMES:
            raise argparse.ArgumentTypeError(
                f"unknown runtime {name!r}{did_you_mean(name, RUNTIME_NAMES)}; one of "
                f"{', '.join(RUNTIME_NAMES)}")
    return list(dict.fromkeys(names))


def output_path(formats: tuple[str, ...]) -> Callable[[str], Path]:
    """A file path whose extension is one of `formats` (it chooses the output format). Its
    location is checked after parsing (`written_locations`), before any work."""
    def parse(text: str) -> Path:
        path = Path(text)
        if path.suffix.lower() not in formats:
            raise argparse.ArgumentTypeError(
                f"cannot tell the format of {text!r}: use one of {', '.join(formats)}")
        return path

    parse.writes = "file"
    return parse


def output_folder(text: str) -> Path:
    """A folder the command writes into (made if missing); checked after parsing."""
    return Path(text)


output_folder.writes = "folder"


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


# The dtypes `--input-shape SIZES:DTYPE` names (torch's names), written out to stay torch-free
INPUT_DTYPES = ("float32", "float64", "float16", "bfloat16", "int64", "int32")


@dataclass(frozen=True)
class InputOption:
    """One model input of `--input-shape SIZES[:DTYPE[:BOUND]]`: its sizes (batch first), its
    dtype's torch name, and for an integer input the exclusive upper bound of its random values
    (None: the `num_embeddings` of the nn.Embedding it feeds)."""
    sizes: tuple[int, ...]
    dtype: str = "float32"
    bound: int | None = None


def input_option(text: str) -> InputOption:
    """`1,3,224,224` (a float32 image), `1,3,32,32:float64`, `1:int64:10` (one class index per
    sample, values in [0, 10)) or `1:int64` (the bound read from the nn.Embedding the input
    feeds). A float input has 2 to 5 sizes, an integer one 1 to 5; the bound is a positive
    integer and only an integer input takes one."""
    parts = text.split(":")
    if len(parts) > 3:
        raise argparse.ArgumentTypeError(
            f"{text!r} has {len(parts) - 1} colons: give SIZES[:DTYPE[:BOUND]], e.g. 1:int64:10")
    dtype = parts[1] if len(parts) > 1 else "float32"
    if dtype not in INPUT_DTYPES:
        raise argparse.ArgumentTypeError(
            f"{text!r}: unknown dtype {dtype!r}; one of {', '.join(INPUT_DTYPES)}")
    integer = dtype.startswith("int")
    try:
        sizes = tuple(int(part) for part in parts[0].replace("x", ",").split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a shape like 1,3,224,224 or "
                                         f"1:int64:10") from None
    if not (1 if integer else 2) <= len(sizes) <= 5:
        raise argparse.ArgumentTypeError(
            f"{text!r} has {len(sizes)} sizes: give {'1' if integer else '2'} to 5 sizes, batch "
            f"first (N,C,H,W for an image, N:int64 for a class index)")
    if min(sizes) < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a shape of positive sizes")
    bound = None
    if len(parts) == 3:
        if not integer:
            raise argparse.ArgumentTypeError(
                f"{text!r}: a bound is for an integer input (int64, int32), not {dtype}")
        try:
            bound = int(parts[2])
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r}: the bound {parts[2]!r} is not an "
                                             f"integer") from None
        if bound < 1:
            raise argparse.ArgumentTypeError(f"{text!r}: the bound {bound} is not positive "
                                             f"(values are drawn from [0, bound))")
    return InputOption(sizes, dtype, bound)


MODEL_SOURCES = ("a spec, an archc checkpoint (.pt), a torch.export program (.pt2) or, with "
                 "--trust-pickle, a whole pickled nn.Module (.pt)")


def add_model_source_options(parser: argparse.ArgumentParser) -> None:
    """--trust-pickle and --input-shape of the commands that read any model
    (archc.backends.trainable)."""
    parser.add_argument("--trust-pickle", action="store_true",
                        help="allow a whole pickled nn.Module (the model and --teacher): "
                        "unpickling runs its code")
    parser.add_argument("--input-shape", type=shape, metavar="N,C,S,S",
                        help="input of a model without a spec (default: a program's example "
                        "input; a pickled module's first conv channels at 224x224); the data "
                        "are resized to SxS")


def unknown_pass(option: str, name: str) -> str | None:
    """Why `name` (given to `option`) is not a pass of the catalogue, with the closest name."""
    if name in PASS_NAMES:
        return None
    from archc.common.suggest import close_matches

    close = close_matches(name, PASS_NAMES)
    hint = f"did you mean {close[0]}?" if close else "`archc passes` lists them"
    return f"{option} {name}: not a pass of the pipeline: no pass has that name ({hint})"


def written_locations(parser: argparse.ArgumentParser,
                      args: argparse.Namespace) -> list[tuple[Path, str]]:
    """(path, "file" or "folder") of every output the parsed command writes: the values of its
    options whose type (`output_path`, `output_folder`) or action (`DumpAfter`) says so."""
    found = []
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            chosen = getattr(args, action.dest, None)
            if chosen in action.choices:
                found += written_locations(action.choices[chosen], args)
            continue
        kind = getattr(action, "writes", None) or getattr(action.type, "writes", None)
        value = getattr(args, action.dest, None)
        if kind and value is not None:
            found.append((Path(value[-1] if isinstance(value, (list, tuple)) else value), kind))
    return found


def check_output_location(path: Path, kind: str = "file") -> str | None:
    """Why `path` cannot be written as a `kind` ("file" or "folder", made if missing), or None:
    checked before any work starts. A name longer than the file system allows (NAME_MAX), an
    existing file where a folder goes or the reverse, and a folder nothing can be created in
    (read-only, /proc, no permission; tried by creating and removing a probe file, since
    permission bits do not bind root) are refused."""
    import os

    folder = path
    while not os.path.lexists(folder) and folder != folder.parent:
        folder = folder.parent  # the deepest part that exists (os.path: long names are False)
    try:
        longest = os.pathconf(folder if folder.is_dir() else folder.parent, "PC_NAME_MAX")
    except (OSError, ValueError):
        longest = 255
    for part in path.parts:
        if len(os.fsencode(part)) > longest:
            return (f"cannot write {path}: the name {part[:24]}... has {len(os.fsencode(part))} "
                    f"bytes, more than the file system allows ({longest})")
    if kind == "folder" and path.exists() and not path.is_dir():
        return f"{path} is a file; give a folder"
    if kind == "file" and path.is_dir():
        return f"{path} is a folder; give a file name"
    if folder == path and kind == "file":
        folder = path.parent
    if not folder.is_dir():
        return f"cannot write {path}: {folder} is a file, not a folder"
    import tempfile

    try:
        handle, probe = tempfile.mkstemp(prefix=".archc-probe-", dir=folder)
    except OSError as exc:
        return f"cannot write {path}: {folder}: {exc.strerror.lower()}"
    os.close(handle)
    os.unlink(probe)
    return None
