"""Norm-agnostic residual (NAG, NAG_SPEC.md section 2): a direction lane and a float32 log-norm lane.

Per sub-layer ``l``: the sub-layer reads the direction ``r`` (RMS 1); a gate computed from ``r``
alone, ``m = (sum_i p_i sigmoid(<r, w_i> + b_i)) ** beta``, sets the step ``a = alpha_l * m``;
``nag_update`` rotates ``r`` by ``arctan(a)`` towards the sub-layer's new direction and adds
``log(1 + a^2) / 2`` to the log-norm ``s``. The full residual ``R = exp(s) r`` is never built
(except for diagnostics). ``alpha_l`` starts at ``l ** -alpha_power`` (Eqs. 23-24). With the
Triton kernels, the update of ``l`` and the gate, step and input of ``l + 1`` run as one fused pass
(``write_ahead``), which the state carries to the next sub-layer (``NAGState.ahead``).

Choices the spec leaves open (all arguments below, documented defaults):
- ``input_gain=True``: each sub-layer scales the direction it reads by a learned per-feature gain
  (the role RMSNorm's weight plays in pre-norm), initialised to 1.
- The embedding is centred over features in the forward pass (centred by construction, so no
  post-step hook is needed) and initialised with std ``embedding_init_std=0.3``, which makes the
  initial inverse temperature ``exp(s_0)`` about 0.3 and the loss at init close to ln(vocab).
- Read-out: a cosine head, ``logits = exp(s_L) * g_dec * <r_L, w_v_hat>``, whose rows ``w_v_hat``
  are the head's rows centred and normalised to unit norm, so the norm lane alone sets the
  logits' scale (their inverse temperature). ``g_dec`` starts at 1, ``g_enc`` at 0.
- Gate: ``C = gate_directions`` preferred directions drawn with std ``gate_init_std / sqrt(d)``
  (``<r, w_i>`` then has std ``gate_init_std``, so ``m`` starts near 0.5), ``b = 0``, uniform
  ``p``, ``beta = softplus(beta_raw)`` with ``beta`` = 1 at init.
- ``alpha_warmup_steps``: ``alpha`` is scaled by ``min(1, step / alpha_warmup_steps)`` during
  the first steps of training (0 = off); the public re-implementation notes that it helps.

Geometric Mixture-of-Depths (NAG_SPEC.md section 3): the step ``a`` is known before the sub-layer
runs (``gated``), so the model's skip policy (``skip_policy.py``, ``ModelConfig.skip``) can skip a
(token, sub-layer) pair, which then leaves both lanes unchanged (``a = 0``).
"""

from __future__ import annotations

import math
from contextlib import nullcontext
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from nag_lightning.kernels import nag_update, nag_update_and_gate
from nag_lightning.model.packing import TokenPacking
from nag_lightning.model.residual.base import ResidualStrategy, SkipPlan, layer_tag

# Skipping options NAG took before they moved to ``ModelConfig.skip`` (old name -> new field);
# ``ModelConfig`` moves values given the old way there, so old configs and checkpoints still work.
# How the direction lane is stored between sub-layers; every update computes in float32 regardless
# (the log-norm lane is always float32).
DIRECTION_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
LEGACY_SKIP_ARGS = {"threshold_scope": "threshold_scope", "skip_mode": "execution", "skip_rule": "rule"}


class NextSubLayer(NamedTuple):
    """The next sub-layer's gate, step and input, computed in the pass that updated the lanes."""

    gate: torch.Tensor  # (B, T)
    step: torch.Tensor  # (B, T)
    sublayer_input: torch.Tensor  # (B, T, d), float32


class NAGState(NamedTuple):
    direction: torch.Tensor  # (B, T, d), RMS 1
    log_norm: torch.Tensor  # (B, T), float32: log(||R|| / sqrt(d))
    ahead: NextSubLayer | None = None  # set by ``write_ahead``; not a lane (``map_lanes`` drops it)


class NAG(ResidualStrategy):
    gated = True
    # Whether ``write_ahead`` may run the fused "update + next gate + next input" kernel
    # (``kernels.nag_update_and_gate``): only where the gate and the update are NAG's own.
    fuses_boundary = True

    def __init__(
        self,
        gate_directions: int = 32,
        alpha_power: float = 0.5,
        gate_init_std: float = 0.5,
        input_gain: bool = True,
        embedding_init_std: float = 0.3,
        alpha_warmup_steps: int = 0,
        eps: float = 1e-4,
        direction_dtype: str = "float32",
        threshold_scope: str | None = None,
        skip_mode: str | None = None,
        skip_rule: str | None = None,
    ) -> None:
        """``threshold_scope``, ``skip_mode``, ``skip_rule``: moved to ``ModelConfig.skip``
        (``threshold_scope``, ``execution``/``mode``, ``rule``); still accepted here, with a warning."""
        super().__init__()
        if gate_directions < 1:
            raise ValueError(f"NAG.gate_directions must be >= 1, got {gate_directions}.")
        if direction_dtype not in DIRECTION_DTYPES:
            raise ValueError(f"NAG.direction_dtype must be one of {', '.join(DIRECTION_DTYPES)}, got {direction_dtype!r}.")
        self._init_args = dict(
            gate_directions=gate_directions, alpha_power=alpha_power, gate_init_std=gate_init_std,
            input_gain=input_gain, embedding_init_std=embedding_init_std,
            alpha_warmup_steps=alpha_warmup_steps, eps=eps, direction_dtype=direction_dtype,
        )
        self.direction_dtype = DIRECTION_DTYPES[direction_dtype]
        self.legacy_skip_args = {name: value for name, value in
                                 (("threshold_scope", threshold_scope), ("skip_mode", skip_mode), ("skip_rule", skip_rule))
                                 if value is not None}
        self.gate_directions, self.alpha_power, self.gate_init_std = gate_directions, alpha_power, gate_init_std
        self.input_gain, self.embedding_init_std = input_gain, embedding_init_std
        self.alpha_warmup_steps, self.eps = alpha_warmup_steps, eps

    def init_args(self) -> dict:
        return dict(self._init_args)

    def bind(self, d_model: int, n_sublayers: int, eps: float, kernels: str = "torch") -> None:
        super().bind(d_model, n_sublayers, eps, kernels)
        n, c = n_sublayers, self.gate_directions
        layers = torch.arange(1, n + 1, dtype=torch.float64)
        self.alpha = nn.Parameter((layers ** -self.alpha_power).float())
        self.gate_w = nn.Parameter(torch.randn(n, c, d_model) * (self.gate_init_std / math.sqrt(d_model)))
        self.gate_b = nn.Parameter(torch.zeros(n, c))
        self.gate_logits = nn.Parameter(torch.zeros(n, c))
        self.beta_raw = nn.Parameter(torch.full((n,), math.log(math.e - 1.0)))  # softplus(beta_raw) = 1
        # Shape (1,), not scalars: FSDP2's fully_shard refuses 0-dimensional parameters.
        self.g_enc = nn.Parameter(torch.zeros(1))
        self.g_dec = nn.Parameter(torch.ones(1))
        self.register_load_state_dict_pre_hook(_reshape_legacy_scalar_gains)
        self.gains = nn.Parameter(torch.ones(n, d_model)) if self.input_gain else None
        self.register_buffer("alpha_scale", torch.tensor(1.0 if self.alpha_warmup_steps <= 0 else 0.0))

    def reset_embedding(self, weight: torch.Tensor) -> None:
        nn.init.normal_(weight, mean=0.0, std=self.embedding_init_std)

    def set_training_step(self, step: int) -> None:
        if self.alpha_warmup_steps > 0:
            self.alpha_scale.fill_(min(1.0, step / self.alpha_warmup_steps))

    # ---- the gate and the step, known before the sub-layer runs ----
    def gate(self, direction: torch.Tensor, layer: int) -> torch.Tensor:
        """``m`` in [0, 1], shape (B, T), from the input direction only (Eq. 13)."""
        i = layer - 1
        # In float32 even under autocast: the gate decides which tokens skip, and bf16's 8-bit
        # mantissa would flip decisions near the threshold (C * d multiply-adds: cheap either way).
        device = direction.device.type
        # (The meta device, used to prove that a step never synchronises, has no autocast.)
        with nullcontext() if device == "meta" else torch.autocast(device, enabled=False):
            scores = F.linear(direction.float(), self.gate_w[i].float(), self.gate_b[i].float())  # (B, T, C)
            mixture = (torch.sigmoid(scores) * torch.softmax(self.gate_logits[i].float(), dim=-1)).sum(-1)
            return mixture.clamp_min(1e-6) ** F.softplus(self.beta_raw[i].float())

    def planned_step(self, state: NAGState, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(gate m, step a = alpha_l * m) of sub-layer ``layer``, from its input direction (or as the
        fused pass before it computed them)."""
        if state.ahead is not None:
            return state.ahead.gate, state.ahead.step
        m = self.gate(state.direction, layer)
        return m, self.alpha[layer - 1] * self.alpha_scale * m

    # ---- the strategy interface ----
    def enter(self, embedded: torch.Tensor) -> NAGState:
        e = embedded.float()
        e = e - e.mean(dim=-1, keepdim=True)
        norm = e.norm(dim=-1).clamp_min(self.eps)
        root_d = math.sqrt(self.d_model)
        direction = (e * (root_d / norm).unsqueeze(-1)).to(self.direction_dtype)
        return NAGState(direction, torch.log(norm / root_d) + self.g_enc)

    def read(self, state: NAGState, layer: int) -> torch.Tensor:
        # In float32 whatever the lane's storage (the gain's product promotes it already): without
        # autocast a bf16 lane would meet float32 weights.
        if state.ahead is not None:
            return state.ahead.sublayer_input
        return state.direction.float() if self.gains is None else state.direction * self.gains[layer - 1]

    def plan_stats(self, layer: int, plan: SkipPlan) -> dict[str, torch.Tensor]:
        tag = layer_tag(layer)
        return {f"nag/gate/{tag}": plan.gate.detach().mean(), f"nag/step/{tag}": plan.step.detach().mean()}

    def write(self, state: NAGState, update: torch.Tensor, layer: int, plan: SkipPlan) -> NAGState:
        return NAGState(*nag_update(state.direction, state.log_norm, update, executed_step(plan), backend=self.kernels,
                                    eps=self.eps))

    def fuses_after(self, layer: int) -> bool:
        """Whether the boundary after sub-layer ``layer`` runs the fused Triton pass."""
        return self.kernels == "triton" and self.fuses_boundary and layer < self.n_sublayers

    def write_ahead(self, state: NAGState, update: torch.Tensor, layer: int, plan: SkipPlan) -> NAGState:
        """With the Triton kernels, the update of ``layer`` and the gate, step and input of
        ``layer + 1`` in one pass over each row (a row read and written once instead of three
        times); otherwise ``write``, and the next sub-layer computes its own (the compiler fuses them)."""
        if not self.fuses_after(layer):
            return self.write(state, update, layer, plan)
        return self._update_and_gate(state, update, layer, plan)

    def write_packed_ahead(self, state: NAGState, update: torch.Tensor, layer: int, plan: SkipPlan,
                           packing: TokenPacking) -> NAGState | None:
        """The same pass after packed rows: each row reads its update through its row number, so
        the scatter back is part of it (the skipped tokens' step is 0: their lanes pass through)."""
        if not self.fuses_after(layer):
            return None
        return self._update_and_gate(state, update, layer, plan,
                                     packing.source_rows(plan.step.numel()).view(plan.step.shape))

    def _update_and_gate(self, state: NAGState, update: torch.Tensor, layer: int, plan: SkipPlan,
                         update_rows: torch.Tensor | None = None) -> NAGState:
        i = layer  # the next sub-layer's row of the per-sub-layer parameters (0-based)
        fused = nag_update_and_gate(
            state.direction, state.log_norm, update, executed_step(plan), self.gate_w[i], self.gate_b[i],
            self.gate_logits[i], F.softplus(self.beta_raw[i]), self.alpha[i] * self.alpha_scale,
            None if self.gains is None else self.gains[i], backend=self.kernels, eps=self.eps, update_rows=update_rows)
        return NAGState(fused.direction, fused.log_norm, NextSubLayer(fused.gate, fused.step, fused.sublayer_input))

    def head_rows(self, weight: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """The cosine head's rows in ``dtype``: ``weight``'s rows centred and normalised to unit norm.

        Without gradients (evaluation, decoding) they are kept until the weight changes: rebuilt
        per forward, the (vocab, d) passes cost more than the rest of a decode step's NAG work
        (5 of 10 ms per token at the quickstart shape on the build machine)."""
        if torch.is_grad_enabled():
            return _centred_unit_rows(weight, self.eps).to(dtype)
        key = (weight.data_ptr(), weight._version, weight.device, dtype)
        if getattr(self, "_head_rows", (None,))[0] != key:
            self._head_rows = (key, _centred_unit_rows(weight, self.eps).to(dtype))
        return self._head_rows[1]

    def logits(self, state: NAGState, head: nn.Linear) -> torch.Tensor:
        # Scaling the (B, T, d) input rather than the (B, T, vocab) logits: the same product, far less memory traffic.
        scaled = state.direction * (state.log_norm.exp() * self.g_dec).unsqueeze(-1)
        device = scaled.device.type
        # The rows in the dtype the product runs in (autocast's), so a kept copy needs no cast per forward.
        autocast = device != "meta" and torch.is_autocast_enabled(device)
        dtype = torch.get_autocast_dtype(device) if autocast else scaled.dtype
        return F.linear(scaled, self.head_rows(head.weight, dtype))

    def full_residual(self, state: NAGState) -> torch.Tensor:
        return state.direction.float() * state.log_norm.exp().unsqueeze(-1)

    def optimizer_special_parameters(self) -> list[nn.Parameter]:
        return [self.alpha, self.beta_raw, self.gate_logits, self.gate_w, self.gate_b, self.g_enc, self.g_dec]

    def parameter_stats(self) -> dict[str, torch.Tensor]:
        alpha = (self.alpha * self.alpha_scale).detach()
        return {f"nag/alpha/{layer_tag(i + 1)}": alpha[i] for i in range(self.n_sublayers)}


def executed_step(plan: SkipPlan) -> torch.Tensor:
    """The planned step, 0 for the tokens that skip: both lanes then come out exactly unchanged."""
    return plan.step if plan.executed is None else torch.where(plan.executed, plan.step, torch.zeros_like(plan.step))


def _centred_unit_rows(weight: torch.Tensor, eps: float) -> torch.Tensor:
    rows = weight - weight.mean(dim=-1, keepdim=True)
    return rows / rows.norm(dim=-1, keepdim=True).clamp_min(eps)


def _reshape_legacy_scalar_gains(module, state_dict, prefix, *args) -> None:
    """Checkpoints before FSDP2 support stored ``g_enc`` and ``g_dec`` as 0-dimensional tensors."""
    for name in ("g_enc", "g_dec"):
        value = state_dict.get(prefix + name)
        if value is not None and value.dim() == 0:
            state_dict[prefix + name] = value.reshape(1)
