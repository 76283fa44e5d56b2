"""Pre-norm, the baseline: ``x_{l+1} = x_l + f_l(norm(x_l))``, final norm before the head."""

from __future__ import annotations

import torch
from torch import nn

from nag_lightning.model.norm import RMSNorm
from nag_lightning.model.residual.base import ResidualStrategy, SkipPlan


class PreNorm(ResidualStrategy):
    def bind(self, d_model: int, n_sublayers: int, eps: float, kernels: str = "torch") -> None:
        super().bind(d_model, n_sublayers, eps, kernels)
        self.norms = nn.ModuleList(RMSNorm(d_model, eps, kernels) for _ in range(n_sublayers))
        self.final_norm = RMSNorm(d_model, eps, kernels)

    def read(self, x: torch.Tensor, layer: int) -> torch.Tensor:
        return self.norms[layer - 1](x)

    def write(self, x: torch.Tensor, update: torch.Tensor, layer: int, plan: SkipPlan) -> torch.Tensor:
        return x + update

    def logits(self, x: torch.Tensor, head: nn.Linear) -> torch.Tensor:
        return head(self.final_norm(x))
