"""NAG with one of its parts switched off, to measure what each contributes (NAG_SPEC.md section 2).

- ``NAGNoGate``: ``m = 1``, so the step is ``alpha_l`` for every token (no gate parameters; under
  Mixture-of-Depths a threshold can then only drop whole sub-layers).
- ``NAGFixedBeta``: the gate's exponent ``beta`` stays 1 (a buffer, not trained).
- ``NAGNoCentring``: the sub-layer output is not centred over features before it is used.
- ``NAGNoOrthogonalisation``: the direction moves towards the whole (centred) output, not only
  its part orthogonal to the current direction; the norm lane still grows by ``log(1 + a^2) / 2``.

The last two replace the lane update, so they run the PyTorch update below (``kernels: torch``).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from nag_lightning.model.residual.base import SkipPlan
from nag_lightning.model.residual.nag import NAG, NAGState, executed_step


class NAGNoGate(NAG):
    fuses_boundary = False  # the fused kernel computes NAG's gate, not m = 1

    def bind(self, d_model: int, n_sublayers: int, eps: float, kernels: str = "torch") -> None:
        super().bind(d_model, n_sublayers, eps, kernels)
        for name in ("gate_w", "gate_b", "gate_logits", "beta_raw"):
            delattr(self, name)
        self.gate_directions = 0  # no gate FLOPs

    def gate(self, direction: torch.Tensor, layer: int) -> torch.Tensor:
        return direction.new_ones(direction.shape[:-1], dtype=torch.float32)

    def optimizer_special_parameters(self) -> list[nn.Parameter]:
        return [self.alpha, self.g_enc, self.g_dec]


class NAGFixedBeta(NAG):
    def bind(self, d_model: int, n_sublayers: int, eps: float, kernels: str = "torch") -> None:
        super().bind(d_model, n_sublayers, eps, kernels)
        beta_raw = self.beta_raw.detach().clone()  # softplus(beta_raw) = 1
        delattr(self, "beta_raw")
        self.register_buffer("beta_raw", beta_raw)

    def optimizer_special_parameters(self) -> list[nn.Parameter]:
        return [p for p in super().optimizer_special_parameters() if isinstance(p, nn.Parameter)]


class _ReplacedUpdate(NAG):
    centre = orthogonalise = True
    fuses_boundary = False  # the fused kernel computes NAG's update, not this one

    def bind(self, d_model: int, n_sublayers: int, eps: float, kernels: str = "torch") -> None:
        if kernels != "torch":
            raise ValueError(f"{type(self).__name__} replaces the NAG update with a PyTorch one: set kernels: torch.")
        super().bind(d_model, n_sublayers, eps, kernels)

    def write(self, state: NAGState, update: torch.Tensor, layer: int, plan: SkipPlan) -> NAGState:
        return NAGState(*ablated_update(state.direction, state.log_norm, update, executed_step(plan), self.eps,
                                        self.centre, self.orthogonalise))


class NAGNoCentring(_ReplacedUpdate):
    centre = False


class NAGNoOrthogonalisation(_ReplacedUpdate):
    orthogonalise = False


def ablated_update(direction: torch.Tensor, log_norm: torch.Tensor, update: torch.Tensor, step: torch.Tensor,
                   eps: float, centre: bool, orthogonalise: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """The NAG lane update (``kernels/nag_update.py``) with centring and/or orthogonalisation left out."""
    compute = torch.float64 if direction.dtype == torch.float64 else torch.float32
    d = direction.shape[-1]
    r, a, f = direction.to(compute), step.to(compute).unsqueeze(-1), update.to(compute)
    if centre:
        f = f - f.mean(dim=-1, keepdim=True)
    moved = f - torch.linalg.vecdot(f, r).unsqueeze(-1) / d * r if orthogonalise else f
    floor = (eps * torch.linalg.vector_norm(f, dim=-1, keepdim=True)).clamp_min(1e-30)
    rotated = r + a * math.sqrt(d) * moved / torch.maximum(torch.linalg.vector_norm(moved, dim=-1, keepdim=True), floor)
    rms = torch.linalg.vector_norm(rotated, dim=-1, keepdim=True) / math.sqrt(d)
    new_direction = torch.where(a == 0, r, rotated / rms).to(direction.dtype)
    return new_direction, log_norm + 0.5 * torch.log1p(step.to(log_norm.dtype) ** 2)
