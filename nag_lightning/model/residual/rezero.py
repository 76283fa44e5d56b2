"""ReZero (Bachlechner et al. 2020): ``x_{l+1} = x_l + alpha_l f_l(x_l)`` with one scalar
``alpha_l`` per sub-layer, initialised to 0, and no normalisation anywhere: each sub-layer starts
as the identity and the network learns how much of it to let in."""

from __future__ import annotations

import torch
from torch import nn

from nag_lightning.model.residual.base import ResidualStrategy, SkipPlan, layer_tag


class ReZero(ResidualStrategy):
    def __init__(self, init_value: float = 0.0) -> None:
        super().__init__()
        self.init_value = init_value

    def init_args(self) -> dict:
        return {"init_value": self.init_value}

    def bind(self, d_model: int, n_sublayers: int, eps: float, kernels: str = "torch") -> None:
        super().bind(d_model, n_sublayers, eps, kernels)
        self.alpha = nn.Parameter(torch.full((n_sublayers,), float(self.init_value)))

    def read(self, x: torch.Tensor, layer: int) -> torch.Tensor:
        return x

    def write(self, x: torch.Tensor, update: torch.Tensor, layer: int, plan: SkipPlan) -> torch.Tensor:
        return x + self.alpha[layer - 1] * update

    def logits(self, x: torch.Tensor, head: nn.Linear) -> torch.Tensor:
        return head(x)

    def parameter_stats(self) -> dict[str, torch.Tensor]:
        return {f"rezero/alpha/{layer_tag(i + 1)}": self.alpha[i].detach() for i in range(self.n_sublayers)}
