"""DeepNorm (Wang et al. 2022, DeepNet): post-norm with the residual up-weighted,
``x_{l+1} = norm(alpha x_l + f_l(x_l))``, and the sub-layers' value, output and MLP weights
initialised down-weighted by ``beta``, so that post-norm trains stably at depth. For a decoder of
``N`` blocks the paper sets ``alpha = (2N) ** 0.25`` and ``beta = (8N) ** -0.25``, with Xavier
initialisation scaled by ``beta`` for those weights (the queries and keys keep gain 1). The norm
is this package's RMSNorm (the paper's LayerNorm without the mean and bias)."""

from __future__ import annotations

import torch
from torch import nn

from nag_lightning.model.residual.base import SkipPlan
from nag_lightning.model.residual.postnorm import PostNorm


class DeepNorm(PostNorm):
    def bind(self, d_model: int, n_sublayers: int, eps: float, kernels: str = "torch") -> None:
        super().bind(d_model, n_sublayers, eps, kernels)
        blocks = n_sublayers // 2
        self.alpha = (2 * blocks) ** 0.25
        self.beta = (8 * blocks) ** -0.25

    def write(self, x: torch.Tensor, update: torch.Tensor, layer: int, plan: SkipPlan) -> torch.Tensor:
        return self.norms[layer - 1](self.alpha * x + update)

    @torch.no_grad()
    def reset_sublayer(self, attention: nn.Module, mlp: nn.Module) -> None:
        nn.init.xavier_normal_(attention.q_proj.weight)
        keys, values = attention.kv_proj.weight.chunk(2, dim=0)
        nn.init.xavier_normal_(keys)
        nn.init.xavier_normal_(values, gain=self.beta)
        for weight in (attention.out_proj.weight, mlp.gate_up_proj.weight, mlp.down_proj.weight):
            nn.init.xavier_normal_(weight, gain=self.beta)
