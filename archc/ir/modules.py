"""Modules of archc's own that a graph can contain beside torch.nn's, so that every layer that
reads graphs (initialisation, analysis, passes) knows them without loading the spec frontend."""

from __future__ import annotations

import torch
from torch import Tensor, nn


class LayerScale(nn.Module):
    """`x * gamma`, a learned per-channel scale of shape (C, 1, 1) (Touvron et al. 2021, CaiT),
    initialized to `init_value` by `archc.ir.init.pycls_init`."""

    def __init__(self, width: int, init_value: float):
        super().__init__()
        self.init_value = init_value
        self.gamma = nn.Parameter(torch.full((width, 1, 1), init_value))

    def forward(self, x: Tensor) -> Tensor:
        return x * self.gamma
