"""LayerNorm Scaling (Sun et al. 2025, "The Curse of Depth"): pre-norm whose normalised input to
sub-layer ``l`` is scaled by ``1 / sqrt(l)``, damping the variance growth of deep layers."""

from __future__ import annotations

import math

import torch

from nag_lightning.model.residual.prenorm import PreNorm


class LayerNormScaling(PreNorm):
    def read(self, x: torch.Tensor, layer: int) -> torch.Tensor:
        return self.norms[layer - 1](x) * (1.0 / math.sqrt(layer))
