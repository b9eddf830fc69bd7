"""The state of an unfinished training run: written every `--save-every` epochs, read by `--resume`.

A run state holds everything the next epoch depends on, so that a resumed run repeats the
uninterrupted one bit for bit on the CPU: the model's and the EMA's state dicts, the optimizer's
(momentum buffers), the loss scaler's, the global step (the learning-rate schedule is a function
of it), the epochs done with their metrics, and the random states of torch (CPU and every CUDA
device), numpy and Python. The batch order of epoch e is drawn from PCG64(SeedSequence([seed, e]))
(`archc.train.loop`), so the seed and the epoch are the data-order generator's whole state.

It also records what it belongs to (`identity`: the spec and the training configuration); a
resume with a different spec or configuration is refused, naming the first field that differs.
The device may change (a run saved on a GPU resumes on the CPU), at the price of exactness.
"""

from __future__ import annotations

import pickle
import random
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from archc.common.fileio import atomic_output
from archc.errors import CheckpointError

FORMAT = "archc-run-state"
VERSION = 1
MAY_DIFFER = ("device",)  # configuration fields a resumed run may change


def random_states() -> dict[str, Any]:
    """The generators' states in types `torch.load(weights_only=True)` reads: numpy's key array
    travels as a tensor, so loading a run state never unpickles code."""
    name, keys, position, has_gauss, cached_gaussian = np.random.get_state()
    return {"torch": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state_all(),
            "numpy": (name, torch.from_numpy(keys.astype(np.int64)), position, has_gauss,
                      cached_gaussian),
            "python": random.getstate()}


def restore_random_states(states: dict[str, Any]) -> None:
    torch.set_rng_state(states["torch"])
    if len(states["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(states["cuda"])
    name, keys, position, has_gauss, cached_gaussian = states["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), position, has_gauss,
                         cached_gaussian))
    random.setstate(states["python"])


def save_run_state(path: Path, state: dict[str, Any], identity: dict[str, Any]) -> None:
    """Write `state` (Trainer's) with its identity atomically to `path`."""
    with atomic_output(path) as temporary:
        torch.save({"format": FORMAT, "version": VERSION, "identity": identity, **state},
                   temporary)


def load_run_state(path: Path, identity: dict[str, Any]) -> dict[str, Any]:
    """The run state in `path`, checked against `identity`; `CheckpointError` if it is not a run
    state or belongs to another spec or configuration."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise CheckpointError(f"{path}: no such run state") from None
    except (pickle.UnpicklingError, zipfile.BadZipFile, RuntimeError, EOFError,
            ValueError) as exc:
        raise CheckpointError(f"{path}: not a training run state ({type(exc).__name__}: "
                              f"{str(exc).strip().splitlines()[0][:100]})") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise CheckpointError(f"{path}: not a training run state (write one with --save-every; "
                              f"a model checkpoint is fine-tuned by giving it as the model)")
    if state.get("version") != VERSION:
        raise CheckpointError(f"{path}: run state version {state.get('version')}, this archc "
                              f"reads version {VERSION}")
    difference = first_difference(state["identity"], identity)
    if difference is not None:
        field, saved, given = difference
        raise CheckpointError(f"{path}: the run state is for another run: {field} is "
                              f"{_short(saved)} there, {_short(given)} here")
    return state


def first_difference(saved: Any, given: Any, path: str = "") -> tuple[str, Any, Any] | None:
    """(field path, saved value, given value) of the first difference, ignoring MAY_DIFFER at
    the top of `config`; None when they agree."""
    if isinstance(saved, dict) and isinstance(given, dict):
        for key in list(saved) + [k for k in given if k not in saved]:
            if path == "config" and key in MAY_DIFFER:
                continue
            child = f"{path}.{key}" if path else str(key)
            if key not in saved or key not in given:
                return child, saved.get(key, "(absent)"), given.get(key, "(absent)")
            found = first_difference(saved[key], given[key], child)
            if found is not None:
                return found
        return None
    if isinstance(saved, (list, tuple)) and isinstance(given, (list, tuple)):
        if len(saved) != len(given):
            return path, saved, given
        for index, (a, b) in enumerate(zip(saved, given)):
            found = first_difference(a, b, f"{path}[{index}]")
            if found is not None:
                return found
        return None
    return None if saved == given else (path, saved, given)


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."
