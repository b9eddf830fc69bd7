"""One model on several processes: `torchrun --nproc-per-node N -m archc train ...`.

torchrun starts N copies of the command with `RANK`, `WORLD_SIZE` and `LOCAL_RANK` (and
`MASTER_ADDR`/`MASTER_PORT`) in their environment; `from_environment` reads them (None for a
plain run, or a world of one). Each process then:
- trains on `device_for`: `cuda:LOCAL_RANK` when the device is CUDA (one GPU per process), else
  the CPU; a process group joins them (`process_group`: NCCL on CUDA, gloo on the CPU);
- reads its part of every global batch: `--batch-size` B is the global batch, the batch of one
  process run, cut into N contiguous near-equal pieces (`archc.train.data.batch_indices`), so
  the N processes together visit exactly one process's examples in the same order;
- wraps the model in `DistributedDataParallel`, which averages the gradients over the processes
  after every backward pass. Process r's cross-entropy (a mean over its n_r examples) is weighted
  by n_r N / B_t, B_t the global batch of step t, so that the average is the gradient of the mean
  over the whole global batch also when the last batch does not split evenly;
- sums its loss, error and example counts with the others' (`all_sum`) for the metrics, and
  evaluates its share of the validation set with rank 0's BatchNorm statistics
  (`broadcast_buffers`).

BatchNorm normalises over each process's B/N examples, as in Goyal et al. 2017 ("Accurate, large
minibatch SGD", section 2.3: per-worker BN is part of the loss), not over the global batch:
torch's SyncBatchNorm runs on GPUs only, and archc keeps one code path for the CPU and CUDA. A run
of N processes therefore equals the one-process run with the same B exactly (up to float32
summation order) only for a model without BN in training mode; with BN it is the run whose BN
batches have B/N examples. Only rank 0 writes (checkpoint, run state, metrics) and prints.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from archc.errors import DeviceError, TrainingError
from archc.train.device import resolve_device

ENVIRONMENT = ("RANK", "WORLD_SIZE", "LOCAL_RANK")  # what torchrun sets for every process


@dataclass(frozen=True)
class Ranks:
    """This process's place among the processes training one model."""

    rank: int  # 0 .. size - 1; rank 0 writes and prints
    size: int  # number of processes (torchrun's WORLD_SIZE)
    local_rank: int  # index on this machine: the CUDA device of this process

    @property
    def main(self) -> bool:
        return self.rank == 0


def from_environment(environ: dict[str, str] | None = None) -> Ranks | None:
    """The torchrun process this is, or None outside torchrun (or in a world of one)."""
    environ = os.environ if environ is None else environ
    if "WORLD_SIZE" not in environ:
        return None
    try:
        rank, size, local = (int(environ.get(name, "")) for name in ENVIRONMENT)
    except ValueError:
        found = ", ".join(f"{name}={environ.get(name)!r}" for name in ENVIRONMENT)
        raise TrainingError(f"torchrun's environment is incomplete ({found}): start several "
                            f"processes with torchrun --nproc-per-node N -m archc ...") from None
    if not (0 <= rank < size and 0 <= local < size):
        raise TrainingError(f"RANK {rank} and LOCAL_RANK {local} must lie in 0..WORLD_SIZE-1 "
                            f"({size - 1})")
    return None if size == 1 else Ranks(rank, size, local)


def device_for(ranks: Ranks, text: str) -> torch.device:
    """The device process `ranks` trains on for `--device text`: cuda:LOCAL_RANK for a CUDA
    device, the CPU for the CPU; `DeviceError` for MPS or a CUDA index (torchrun assigns it)."""
    device = resolve_device(text)
    if device.type == "mps":
        raise DeviceError("--device mps under torchrun: torch has no process-group backend for "
                          "MPS; use --device cpu")
    if device.type != "cuda":
        return device
    if text.strip().lower() not in ("auto", "cuda"):
        raise DeviceError(f"--device {text} under torchrun: each process trains on "
                          f"cuda:LOCAL_RANK; give --device cuda or auto")
    if ranks.local_rank >= torch.cuda.device_count():
        raise DeviceError(f"LOCAL_RANK {ranks.local_rank}: this machine has "
                          f"{torch.cuda.device_count()} CUDA devices; start at most that many "
                          f"processes per node")
    torch.cuda.set_device(ranks.local_rank)
    return torch.device("cuda", ranks.local_rank)


@contextlib.contextmanager
def process_group(ranks: Ranks, device: torch.device) -> Iterator[None]:
    """Join the other processes (NCCL for CUDA, gloo otherwise) while the block runs."""
    import torch.distributed as dist

    backend = "nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(backend, rank=ranks.rank, world_size=ranks.size)
    try:
        yield
    finally:
        dist.destroy_process_group()


def wrap(model: nn.Module, device: torch.device) -> nn.Module:
    """`model` in DistributedDataParallel (gradients averaged over the processes)."""
    from torch.nn.parallel import DistributedDataParallel

    return DistributedDataParallel(model, device_ids=[device.index]
                                   if device.type == "cuda" else None)


def all_sum(values: Sequence[float], device: torch.device) -> list[float]:
    """The sums over the processes of `values` (float64, on `device` for NCCL's sake)."""
    import torch.distributed as dist

    tensor = torch.tensor(list(values), dtype=torch.float64, device=device)
    dist.all_reduce(tensor)
    return tensor.tolist()


def broadcast_buffers(*models: nn.Module) -> None:
    """Give every process rank 0's buffers (BatchNorm statistics, which each process's last
    forward pass updated from its own examples)."""
    import torch.distributed as dist

    for model in models:
        for buffer in model.buffers():
            dist.broadcast(buffer, 0)


def check_batches(train_size: int, batch_size: int, ranks: int) -> None:
    """Every process gets at least one example of every global batch (`TrainingError`)."""
    tail = train_size % batch_size
    if batch_size < ranks or 0 < tail < ranks:
        smallest = tail if 0 < tail < ranks else batch_size
        raise TrainingError(f"--batch-size {batch_size} is the global batch: a batch of "
                            f"{smallest} examples cannot be split over {ranks} processes "
                            f"({train_size} training examples); choose another batch size")
