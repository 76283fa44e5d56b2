"""Post-norm (the original Transformer): ``x_{l+1} = norm(x_l + f_l(x_l))``."""

from __future__ import annotations

import torch
from torch import nn

from nag_lightning.model.norm import RMSNorm
from nag_lightning.model.residual.base import ResidualStrategy


class PostNorm(ResidualStrategy):
    def bind(self, d_model: int, n_sublayers: int, eps: float, kernel_backend: str = "torch") -> None:
        super().bind(d_model, n_sublayers, eps, kernel_backend)
        self.norms = nn.ModuleList(RMSNorm(d_model, eps, kernel_backend) for _ in range(n_sublayers))

    def read(self, x: torch.Tensor, layer: int) -> torch.Tensor:
        return x

    def write(self, x: torch.Tensor, update: torch.Tensor, layer: int, stats: dict | None = None,
              executed: torch.Tensor | None = None) -> torch.Tensor:
        return self.norms[layer - 1](x + update)

    def logits(self, x: torch.Tensor, head: nn.Linear) -> torch.Tensor:
        return head(x)  # the last sub-layer's norm is the final norm
