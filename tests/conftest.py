"""Shared pytest configuration: one intra-op thread per test process, the built-in catalogue."""

from __future__ import annotations

import os

import torch

import archc.passes  # noqa: F401 - the tests run the built-in catalogue

# Under pytest-xdist every core already runs a test process. Two OpenMP threads per process then
# spin against each other and against the other worker, and small convolutions run up to ~100x
# slower (measured: 31 ms instead of 0.08 ms for a 64-channel 16x16 conv). One thread per worker,
# and per subprocess the tests start (the CLI, emitted modules).
if os.environ.get("PYTEST_XDIST_WORKER"):
    torch.set_num_threads(1)
    os.environ["OMP_NUM_THREADS"] = "1"
