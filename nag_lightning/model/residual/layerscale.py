"""LayerScale (Touvron et al. 2021, CaiT): pre-norm whose sub-layer outputs are scaled per
feature by a learned diagonal ``lambda_l`` initialised small: ``x_{l+1} = x_l + lambda_l *
f_l(norm(x_l))``. The paper initialises ``lambda`` at 0.1 up to 18 blocks and lower for deeper
models; ``init_value`` is that choice (default 0.1)."""

from __future__ import annotations

import torch
from torch import nn

from nag_lightning.model.residual.base import SkipPlan
from nag_lightning.model.residual.prenorm import PreNorm


class LayerScale(PreNorm):
    def __init__(self, init_value: float = 0.1) -> None:
        super().__init__()
        self.init_value = init_value

    def init_args(self) -> dict:
        return {"init_value": self.init_value}

    def bind(self, d_model: int, n_sublayers: int, eps: float, kernels: str = "torch") -> None:
        super().bind(d_model, n_sublayers, eps, kernels)
        self.scales = nn.Parameter(torch.full((n_sublayers, d_model), float(self.init_value)))

    def write(self, x: torch.Tensor, update: torch.Tensor, layer: int, plan: SkipPlan) -> torch.Tensor:
        return x + self.scales[layer - 1] * update
