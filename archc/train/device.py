"""Where training runs and in which precision: pure helpers shared by the CPU and GPU paths.

- `resolve_device(text)`: `auto` is the first of CUDA, MPS and the CPU that this machine has;
  `cpu`, `cuda`, `cuda:N` and `mps` name one, and a device that is unknown or not here is a
  `DeviceError` (one line, exit 2).
- `autocast(device, precision)`: `torch.autocast` on the device's type with bfloat16 (`bf16`)
  or float16 (`fp16`), a no-op for `fp32`. Under autocast, matmuls and convolutions run in the
  low precision while reductions such as the loss stay in float32 (torch's autocast op lists).
- `grad_scaler(device, precision)`: `torch.amp.GradScaler` for `fp16`, whose 5-bit exponent
  underflows small gradients unless the loss is multiplied by a scale S before `backward` (the
  gradients are divided by S before the step, and steps with inf/NaN gradients are skipped while S
  halves; Micikevicius et al. 2018, "Mixed Precision Training"). bfloat16 keeps float32's
  exponent range and needs no scaling, so the scaler is disabled for `bf16` and `fp32`. torch
  2.13 has both autocast dtypes and the scaler on the CPU, so fp16 is tested there too.
- `pins_memory(device)`: batches are copied to a CUDA device from page-locked memory with
  `non_blocking=True`, so the copy overlaps the computation; elsewhere they move as they are.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator

import torch

from archc.errors import DeviceError

PRECISIONS = ("fp32", "bf16", "fp16")
DEVICES = "auto, cpu, cuda, cuda:N or mps"
_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def resolve_device(text: str) -> torch.device:
    """The torch device `text` names (`auto`: CUDA, else MPS, else the CPU); `DeviceError` if
    the name is unknown or the device is not on this machine."""
    name = text.strip().lower()
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", torch.cuda.current_device())
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if name == "cpu":
        return torch.device("cpu")
    if name == "mps":
        if not torch.backends.mps.is_available():
            raise DeviceError("--device mps: this machine has no MPS (Apple GPU) device")
        return torch.device("mps")
    match = re.fullmatch(r"cuda(?::(\d+))?", name)
    if match is None:
        raise DeviceError(f"--device {text!r}: unknown device; give {DEVICES}")
    if not torch.cuda.is_available():
        raise DeviceError(f"--device {text}: CUDA is not available on this machine (torch "
                          f"{torch.__version__}); use --device cpu or auto")
    index = int(match.group(1)) if match.group(1) is not None else torch.cuda.current_device()
    if index >= torch.cuda.device_count():
        raise DeviceError(f"--device {text}: this machine has {torch.cuda.device_count()} CUDA "
                          f"devices (cuda:0 to cuda:{torch.cuda.device_count() - 1})")
    return torch.device("cuda", index)


def check_precision(precision: str) -> str:
    if precision not in PRECISIONS:
        raise DeviceError(f"unknown precision {precision!r}; give one of {', '.join(PRECISIONS)}")
    return precision


def autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    """The forward pass's context: autocast to bf16/fp16 on `device`'s type, nothing for fp32."""
    if check_precision(precision) == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=_DTYPES[precision])


def grad_scaler(device: torch.device, precision: str) -> torch.amp.GradScaler:
    """A loss scaler, enabled for fp16 only (module docstring)."""
    return torch.amp.GradScaler(device.type, enabled=check_precision(precision) == "fp16")


def pins_memory(device: torch.device) -> bool:
    """Whether host batches are page-locked and copied asynchronously to `device` (CUDA only)."""
    return device.type == "cuda"


def to_device(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """`tensor` on `device`: through pinned memory, non-blocking, on CUDA; a no-op on the CPU."""
    if pins_memory(device):
        return tensor.pin_memory().to(device, non_blocking=True)
    return tensor.to(device)


@contextlib.contextmanager
def deterministic_algorithms() -> Iterator[None]:
    """Ask torch for deterministic kernels while the block runs (warning, not failing, where an
    op has none on this device), restoring the caller's settings after.

    Without filling uninitialized memory: in deterministic mode torch by default writes NaN into
    every tensor `torch.empty` allocates (`torch.utils.deterministic.fill_uninitialized_memory`),
    which guards against ops that read memory they never wrote; the training loop's ops write
    all of their outputs, so the fill changes no result and only costs a pass over every new
    buffer (measured on a loaded 2-core CPU: 8-17% of a small CNN's CPU time per training step)."""
    import torch.utils.deterministic

    enabled = torch.are_deterministic_algorithms_enabled()
    warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    fill = torch.utils.deterministic.fill_uninitialized_memory
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.utils.deterministic.fill_uninitialized_memory = False
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(enabled, warn_only=warn_only)
        torch.utils.deterministic.fill_uninitialized_memory = fill
