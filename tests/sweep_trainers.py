"""Trainers for the sweep tests (`--trainer tests.sweep_trainers:NAME`): cheap and deterministic,
so the sweep machinery is tested without training."""

from __future__ import annotations

import json
import time
import zlib


def fake(spec, *, data, epochs, seed, config):
    """An 'error' per epoch computed from the spec, like a real trainer's metrics."""
    base = zlib.crc32(json.dumps(spec["body"], sort_keys=True).encode()) % 1000 / 10
    errors = [base + 10.0 / (epoch + 1) + seed for epoch in range(epochs)]
    time.sleep(config.get("sleep", 0.0))
    return {"errors": errors, "best_error": min(errors), "data": data}


def slow(spec, *, data, epochs, seed, config):
    return fake(spec, data=data, epochs=epochs, seed=seed, config={"sleep": 0.4})


def no_metrics(spec, **kwargs):
    return {"accuracy": 1.0}


def broken(spec, **kwargs):
    raise RuntimeError("the user's trainer has a bug")


def placement(spec, *, data, epochs, seed, config):
    """`fake`'s metrics with what the trainer was handed and, in a Ray task, what Ray reserved."""
    import ray

    metrics = fake(spec, data=data, epochs=epochs, seed=seed, config={})
    resources = (ray.get_runtime_context().get_assigned_resources() if ray.is_initialized()
                 else None)
    return {**metrics, "config": config, "resources": resources}
