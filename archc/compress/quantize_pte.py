"""int8 ExecuTorch programs (`archc build|fuse ... -o model.pte --int8 --calib DATA`): the deploy
graph quantized by XNNPACK's quantizer, lowered to XNNPACK, and measured in ExecuTorch's runtime.

The work is ExecuTorch's and torchao's (`archc.backends.executorch_pte.program_bytes` with
calibration images): `torch.export`, `prepare_pt2e` with the `XNNPACKQuantizer` (symmetric int8
weights per output channel, or per tensor; int8 activations from min/max observers), calibration
on `samples` images of the training split of `DATA` at the program's static batch,
`convert_pt2e`, export again, lower. archc checks and measures the result:

1. Check: the program, loaded by ExecuTorch's runtime, runs the validation split of `DATA`
   (held out from calibration, at the program's static batch; a random input would leave the
   calibrated ranges), and its logits are compared with the fp32 model's run in float64; a
   relative error (max|delta| / max|reference|) beyond `INT8_TOLERANCE` refuses the program and
   writes nothing. int8 keeps 8 bits for every
   activation and weight, so its error is not the fp32 formats' few units of rounding: the bound
   is a tenth of the output's largest magnitude, wide enough for an int8 model that works and
   far below the error of one that is broken (a wrong scale or a lost layer moves the logits
   by their own size).
2. Measurement on the same images: the int8 program's SQNR against the fp32 model
   (`archc.compress.quantize.sqnr_db`), the top-1 agreement, and both top-1 accuracies.

Bad input raises `QuantizationError` (or `DataError` from `archc.train.data`) before anything is
written: data whose images do not fit the model's input, a model with fewer outputs than the
data's classes, an empty calibration or validation split.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.fx import GraphModule

from archc.compress.quantize import QuantizationError, sqnr_db

INT8_TOLERANCE = 0.1


@dataclass
class ProgramReport:
    output: Path
    per_channel: bool
    calibration_samples: int
    held_out_samples: int
    relative_error: float  # held-out logits, int8 program vs the fp32 model in float64
    tolerance: float
    sqnr_db: float  # held-out logits, int8 program vs the fp32 model
    top1_agreement: float  # percent
    fp32_accuracy: float  # percent
    int8_accuracy: float
    delegated: int
    portable: int
    bytes: int = 0

    def document(self) -> dict:
        return {"output": str(self.output), "format": "pte", "runtime": "ExecuTorch (XNNPACK)",
                "per_channel": self.per_channel,
                "calibration_samples": self.calibration_samples,
                "held_out_samples": self.held_out_samples,
                "relative_error": self.relative_error, "tolerance": self.tolerance,
                "sqnr_db": self.sqnr_db, "top1_agreement": self.top1_agreement,
                "fp32_accuracy": self.fp32_accuracy, "int8_accuracy": self.int8_accuracy,
                "xnnpack_delegate_calls": self.delegated, "portable_ops": self.portable,
                "bytes": self.bytes}


def quantize_program(gm: GraphModule, example: torch.Tensor, data: str, output: Path, *,
                     samples: int = 256, per_channel: bool = True,
                     progress: Callable[[str], None] = lambda text: None) -> ProgramReport:
    """Write `output` (.pte): `gm` quantized to int8 for XNNPACK, calibrated on `data`, checked and
    measured in ExecuTorch's runtime (module docstring)."""
    from archc.backends import executorch_pte
    from archc.common.fileio import atomic_output
    from archc.ir.verify import float64_function, relative_error
    from archc.train.data import load_data

    gm = gm.eval()
    dataset = load_data(data, example.shape[1], example.shape[-1])
    calibration = torch.from_numpy(dataset.train_x[:samples])
    if len(calibration) == 0:
        raise QuantizationError(f"{data}: the calibration set is empty")
    if len(dataset.val_x) == 0:
        raise QuantizationError(f"{data}: no held-out images to measure the int8 program on")
    with torch.no_grad():
        classes = gm(example).shape[-1]
    if classes < dataset.classes:
        raise QuantizationError(f"the model has {classes} outputs but {dataset.name} has "
                                f"{dataset.classes} classes")
    progress(f"int8 .pte: calibrating on {len(calibration)} images, lowering to XNNPACK")
    program, delegated, portable = executorch_pte.program_bytes(
        gm, example, calibration=calibration, per_channel=per_channel)
    run = executorch_pte.runner(program)
    progress(f"int8 .pte: comparing on {len(dataset.val_x)} held-out images")
    x, y = torch.from_numpy(dataset.val_x), torch.from_numpy(dataset.val_y)
    batches = executorch_pte.calibration_batches(x, example.shape[0])
    reference, _ = float64_function(gm, example)
    with torch.no_grad():
        fp32 = torch.cat([reference(batch) for batch in batches])[:len(x)]
        int8 = torch.cat([run(batch) for batch in batches])[:len(x)].double()
    error = relative_error(fp32, int8)
    if not error <= INT8_TOLERANCE:
        raise QuantizationError(f"the int8 program in ExecuTorch differs from the fp32 model on "
                                f"the held-out images by a relative error of {error:.3g} > "
                                f"{INT8_TOLERANCE:g}; nothing written")
    report = ProgramReport(
        Path(output), per_channel, len(calibration), len(x), error, INT8_TOLERANCE,
        sqnr_db(fp32.numpy(), int8.numpy()),
        100.0 * float((fp32.argmax(1) == int8.argmax(1)).float().mean()),
        100.0 * float((fp32.argmax(1) == y).float().mean()),
        100.0 * float((int8.argmax(1) == y).float().mean()), delegated, portable)
    with atomic_output(report.output) as temporary:
        temporary.write_bytes(program)
    report.bytes = len(program)
    return report
