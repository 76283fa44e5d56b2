"""Orthogonal residual update (Oh et al. 2025): pre-norm, but only the part of the sub-layer's
output orthogonal to the stream is added, ``x + f_perp`` with ``f_perp = f - (<f, x> / <x, x>) x``."""

from __future__ import annotations

import torch

from nag_lightning.model.residual.base import SkipPlan
from nag_lightning.model.residual.prenorm import PreNorm


class OrthogonalUpdate(PreNorm):
    def __init__(self, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps

    def init_args(self) -> dict:
        return {"eps": self.eps}

    def write(self, x: torch.Tensor, update: torch.Tensor, layer: int, plan: SkipPlan) -> torch.Tensor:
        f, stream = update.float(), x.float()
        along = (f * stream).sum(-1, keepdim=True) / (stream * stream).sum(-1, keepdim=True).clamp_min(self.eps)
        return x + (f - along * stream).to(x.dtype)
