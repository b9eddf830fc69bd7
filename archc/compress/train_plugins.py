"""Training plugins for compression (`archc.train.loop.Plugin`): network slimming and distillation.

- `Slimming(strength)`: adds strength * sum |gamma| over every BatchNorm's scale (Liu et al.
  2017, "Learning Efficient Convolutional Networks through Network Slimming"); the scales of
  unneeded channels are driven towards 0, and `archc prune --criterion bn-scale --global` then
  removes them.
- `Distillation(teacher, temperature, weight)`: Hinton et al. 2015's soft-label loss,
  weight * T^2 * KL(softmax(teacher / T) || softmax(student / T)), the teacher in eval mode
  without gradients on the same batch; the trainer's cross-entropy is weighted 1 - weight
  (`TrainConfig.task_weight`), so the total is (1 - w) CE + w T^2 KL.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from archc.errors import TrainingError
from archc.train.loop import Plugin, Step


class Slimming(Plugin):
    def __init__(self, strength: float):
        if not strength >= 0:
            raise TrainingError(f"the slimming strength must be >= 0, not {strength}")
        self.strength = strength

    def loss(self, step: Step) -> Tensor | None:
        scales = [m.weight for m in step.model.modules()
                  if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.affine
                  and m.weight.requires_grad]
        if not scales or self.strength == 0:
            return None
        return self.strength * sum(w.abs().sum() for w in scales)


def distillation_loss(student: Tensor, teacher: Tensor, temperature: float) -> Tensor:
    """T^2 * KL(softmax(teacher / T) || softmax(student / T)), averaged over the batch."""
    log_student = F.log_softmax(student / temperature, dim=1)
    log_teacher = F.log_softmax(teacher / temperature, dim=1)
    return temperature ** 2 * F.kl_div(log_student, log_teacher, reduction="batchmean",
                                       log_target=True)


class Distillation(Plugin):
    def __init__(self, teacher: nn.Module, temperature: float, weight: float):
        if not temperature > 0:
            raise TrainingError(f"the distillation temperature must be > 0, not {temperature}")
        if not 0 <= weight <= 1:
            raise TrainingError(f"the distillation weight must be in [0, 1], not {weight}")
        self.teacher = teacher.eval()
        for parameter in self.teacher.parameters():
            parameter.requires_grad_(False)
        self.temperature, self.weight = temperature, weight

    def wrap(self, model: nn.Module) -> nn.Module:
        """Put the teacher on the student's device (the trainer has moved the student)."""
        device = next(model.parameters(), torch.empty(0)).device
        self.teacher.to(device)
        return model

    def loss(self, step: Step) -> Tensor | None:
        with torch.no_grad():
            teacher = self.teacher(step.inputs)
        if teacher.shape != step.logits.shape:
            raise TrainingError(f"the teacher's logits {tuple(teacher.shape)} do not match the "
                                f"student's {tuple(step.logits.shape)}")
        return self.weight * distillation_loss(step.logits, teacher, self.temperature)
