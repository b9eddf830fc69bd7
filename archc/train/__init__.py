"""Training: the shared loop (`loop`) and the data sets it reads (`data`).

`archc.train:train_spec` is the built-in sweep trainer's stable name (results files record it), so
the package exposes it without importing torch until it is called for.
"""

from __future__ import annotations

from typing import Any


def __getattr__(name: str) -> Any:
    if name == "train_spec":
        from archc.train.loop import train_spec

        return train_spec
    raise AttributeError(f"module 'archc.train' has no attribute {name!r}")
