"""Norm-agnostic residual (NAG, NAG_SPEC.md section 2): a direction lane and a float32 log-norm lane.

Per sub-layer ``l``: the sub-layer reads the direction ``r`` (RMS 1); a gate computed from ``r``
alone, ``m = (sum_i p_i sigmoid(<r, w_i> + b_i)) ** beta``, sets the step ``a = alpha_l * m``;
``nag_update`` rotates ``r`` by ``arctan(a)`` towards the sub-layer's new direction and adds
``log(1 + a^2) / 2`` to the log-norm ``s``. The full residual ``R = exp(s) r`` is never built
(except for diagnostics). ``alpha_l`` starts at ``l ** -alpha_power`` (Eqs. 23-24).

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

Geometric Mixture-of-Depths (NAG_SPEC.md section 3): a (token, sub-layer) pair is skipped when its
planned step ``a`` is below the sub-layer's threshold (buffer ``skip_threshold``: one global value,
or one per sub-layer with ``skip_thresholds="per_layer"``; all zero = no skipping). A skipped pair
leaves both lanes unchanged; the model then runs the sub-layer only on executed tokens
(``skip_mode="gather"``), or on all of them and discards (``"mask"``, the oracle for tests).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from nag_lightning.kernels import nag_update
from nag_lightning.model.residual.base import ResidualStrategy, layer_tag


class NAGState(NamedTuple):
    direction: torch.Tensor  # (B, T, d), RMS 1
    log_norm: torch.Tensor  # (B, T), float32: log(||R|| / sqrt(d))


class NAG(ResidualStrategy):
    def __init__(
        self,
        gate_directions: int = 32,
        alpha_power: float = 0.5,
        gate_init_std: float = 0.5,
        input_gain: bool = True,
        embedding_init_std: float = 0.3,
        alpha_warmup_steps: int = 0,
        eps: float = 1e-6,
        skip_thresholds: str = "global",
        skip_mode: str = "gather",
    ) -> None:
        super().__init__()
        if gate_directions < 1:
            raise ValueError(f"NAG.gate_directions must be >= 1, got {gate_directions}.")
        if skip_thresholds not in ("global", "per_layer") or skip_mode not in ("gather", "mask"):
            raise ValueError(
                f"NAG.skip_thresholds must be 'global' or 'per_layer' (got {skip_thresholds!r}) and NAG.skip_mode "
                f"'gather' or 'mask' (got {skip_mode!r})."
            )
        self._init_args = dict(
            gate_directions=gate_directions, alpha_power=alpha_power, gate_init_std=gate_init_std,
            input_gain=input_gain, embedding_init_std=embedding_init_std,
            alpha_warmup_steps=alpha_warmup_steps, eps=eps, skip_thresholds=skip_thresholds, skip_mode=skip_mode,
        )
        self.skip_thresholds, self.skip_mode = skip_thresholds, skip_mode
        self.gate_directions, self.alpha_power, self.gate_init_std = gate_directions, alpha_power, gate_init_std
        self.input_gain, self.embedding_init_std = input_gain, embedding_init_std
        self.alpha_warmup_steps, self.eps = alpha_warmup_steps, eps

    def init_args(self) -> dict:
        return dict(self._init_args)

    def bind(self, d_model: int, n_sublayers: int, eps: float, kernel_backend: str = "torch") -> None:
        super().bind(d_model, n_sublayers, eps, kernel_backend)
        n, c = n_sublayers, self.gate_directions
        layers = torch.arange(1, n + 1, dtype=torch.float64)
        self.alpha = nn.Parameter((layers ** -self.alpha_power).float())
        self.gate_w = nn.Parameter(torch.randn(n, c, d_model) * (self.gate_init_std / math.sqrt(d_model)))
        self.gate_b = nn.Parameter(torch.zeros(n, c))
        self.gate_logits = nn.Parameter(torch.zeros(n, c))
        self.beta_raw = nn.Parameter(torch.full((n,), math.log(math.e - 1.0)))  # softplus(beta_raw) = 1
        self.g_enc = nn.Parameter(torch.zeros(()))
        self.g_dec = nn.Parameter(torch.ones(()))
        self.gains = nn.Parameter(torch.ones(n, d_model)) if self.input_gain else None
        self.register_buffer("alpha_scale", torch.tensor(1.0 if self.alpha_warmup_steps <= 0 else 0.0))
        self.register_buffer("skip_threshold", torch.zeros(n if self.skip_thresholds == "per_layer" else 1))
        # Executed fraction per sub-layer in the latest forward (detached; read by MoD callbacks).
        self.register_buffer("executed_fraction", torch.ones(n), persistent=False)
        self.register_buffer("executed_tokens", torch.zeros(n, dtype=torch.float64), persistent=False)
        self.register_buffer("executed_position_sum", torch.zeros(n, dtype=torch.float64), persistent=False)
        self._skipping = False  # a Python flag, so runs without MoD never synchronise on the thresholds
        self._planned: tuple | None = None
        self._calibration: dict | None = None
        self.recorded_steps: dict[int, torch.Tensor] | None = None  # layer -> the step a of each token, when asked
        self.executed_by_position: torch.Tensor | None = None  # (sub-layer, position) counts, when asked
        self.tokens_by_position: torch.Tensor | None = None
        self.register_load_state_dict_post_hook(lambda module, _: module._refresh_skipping())

    @property
    def skipping(self) -> bool:
        """Whether any threshold is positive, i.e. whether the latest plans could skip anything."""
        return self._skipping

    def _refresh_skipping(self) -> None:
        self._skipping = bool((self.skip_threshold > 0).any())

    def set_skip_thresholds(self, thresholds: torch.Tensor | float) -> None:
        """Set the threshold(s) on ``a``; 0 disables skipping."""
        with torch.no_grad():
            self.skip_threshold.copy_(torch.as_tensor(thresholds, dtype=torch.float32).expand_as(self.skip_threshold))
        self._refresh_skipping()

    def start_calibration(self, rate: float) -> None:
        """Set the thresholds during the next forward so that a fraction ``rate`` of (token,
        sub-layer) pairs is skipped: per-layer thresholds take each layer's ``rate``-quantile of
        ``a`` as the pass reaches it; a global threshold takes the quantile over all layers'
        ``a`` of that pass (which saw per-layer skipping, an approximation)."""
        if not 0.0 <= rate < 1.0:
            raise ValueError(f"skip rate must be in [0, 1), got {rate}.")
        self._calibration = {"rate": rate, "steps": []}
        self._skipping = rate > 0

    def finish_calibration(self) -> None:
        calibration, self._calibration = self._calibration, None
        if calibration["rate"] == 0:
            self.set_skip_thresholds(0.0)
        elif self.skip_thresholds == "global":
            steps = torch.cat(calibration["steps"])
            self.set_skip_thresholds(torch.quantile(steps, calibration["rate"]))
        self._refresh_skipping()

    def _calibrate(self, layer: int, a: torch.Tensor) -> None:
        values = a.detach().float().flatten()
        if values.numel() > 1 << 24:  # torch.quantile's input limit
            values = values[torch.randperm(values.numel(), device=values.device)[: 1 << 24]]
        threshold = torch.quantile(values, self._calibration["rate"])
        if self.skip_thresholds == "per_layer":
            self.skip_threshold[layer - 1] = threshold
        else:
            self._calibration["steps"].append(values)
            self.skip_threshold[0] = threshold

    def step_quantiles(self, rate: float) -> torch.Tensor:
        """The thresholds that would have skipped ``rate`` of the pairs of the latest forward: the
        ``rate``-quantile of the recorded steps ``a``, per sub-layer or over all of them."""
        recorded = [self.recorded_steps[layer] for layer in sorted(self.recorded_steps)]
        if self.skip_thresholds == "per_layer":
            return torch.stack([torch.quantile(a, rate) for a in recorded])
        return torch.quantile(torch.cat(recorded), rate).reshape(1)

    def threshold(self, layer: int) -> torch.Tensor:
        return self.skip_threshold[layer - 1 if self.skip_thresholds == "per_layer" else 0]

    def reset_embedding(self, weight: torch.Tensor) -> None:
        nn.init.normal_(weight, mean=0.0, std=self.embedding_init_std)

    def set_training_step(self, step: int) -> None:
        if self.alpha_warmup_steps > 0:
            self.alpha_scale.fill_(min(1.0, step / self.alpha_warmup_steps))

    # ---- the gate and the step, known before the sub-layer runs ----
    def gate(self, direction: torch.Tensor, layer: int) -> torch.Tensor:
        """``m`` in [0, 1], shape (B, T), from the input direction only (Eq. 13)."""
        i = layer - 1
        scores = F.linear(direction.float(), self.gate_w[i], self.gate_b[i])  # (B, T, C)
        mixture = (torch.sigmoid(scores) * torch.softmax(self.gate_logits[i], dim=-1)).sum(-1)
        return mixture.clamp_min(1e-6) ** F.softplus(self.beta_raw[i])

    def step(self, direction: torch.Tensor, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(gate m, step a = alpha_l * m) of sub-layer ``layer``."""
        m = self.gate(direction, layer)
        return m, self.alpha[layer - 1] * self.alpha_scale * m

    # ---- the strategy interface ----
    def enter(self, embedded: torch.Tensor) -> NAGState:
        e = embedded.float()
        e = e - e.mean(dim=-1, keepdim=True)
        norm = e.norm(dim=-1).clamp_min(self.eps)
        root_d = math.sqrt(self.d_model)
        return NAGState(e * (root_d / norm).unsqueeze(-1), torch.log(norm / root_d) + self.g_enc)

    def read(self, state: NAGState, layer: int) -> torch.Tensor:
        return state.direction if self.gains is None else state.direction * self.gains[layer - 1]

    def plan(self, state: NAGState, layer: int) -> torch.Tensor | None:
        if not self._skipping:
            return None
        m, a = self.step(state.direction, layer)
        if self._calibration is not None:
            self._calibrate(layer, a)
        executed = a.detach() >= self.threshold(layer)
        self._planned = (layer, m, a)
        self.executed_fraction[layer - 1] = executed.float().mean()
        self.executed_tokens[layer - 1] = executed.sum()
        positions = torch.arange(1, executed.shape[-1] + 1, device=executed.device, dtype=torch.float64)
        self.executed_position_sum[layer - 1] = (executed * positions).sum()
        if self.executed_by_position is not None:
            self.executed_by_position[layer - 1, : executed.shape[-1]] += executed.sum(0)
            if layer == 1:
                self.tokens_by_position[: executed.shape[-1]] += executed.shape[0]
        return executed

    def executed_counts(self, batch: int, seq: int) -> tuple[torch.Tensor, torch.Tensor]:
        if not self._skipping:
            return super().executed_counts(batch, seq)
        return self.executed_tokens.clone(), self.executed_position_sum.clone()

    def write(self, state: NAGState, update: torch.Tensor, layer: int, stats: dict | None = None,
              executed: torch.Tensor | None = None) -> NAGState:
        planned, self._planned = self._planned, None
        m, a = planned[1:] if planned is not None and planned[0] == layer else self.step(state.direction, layer)
        if self.recorded_steps is not None:
            self.recorded_steps[layer] = a.detach().float().flatten()
        if stats is not None:
            stats[f"nag/gate/{layer_tag(layer)}"] = m.detach().mean()
            stats[f"nag/step/{layer_tag(layer)}"] = a.detach().mean()
        if executed is not None:  # per-layer skip rates are logged from executed_fraction
            a = torch.where(executed, a, torch.zeros_like(a))  # a = 0: both lanes exactly unchanged
        return NAGState(*nag_update(state.direction, state.log_norm, update, a, backend=self.kernel_backend))

    def logits(self, state: NAGState, head: nn.Linear) -> torch.Tensor:
        rows = head.weight - head.weight.mean(dim=-1, keepdim=True)
        rows = rows / rows.norm(dim=-1, keepdim=True).clamp_min(self.eps)
        # Scaling the (B, T, d) input rather than the (B, T, vocab) logits: the same product, far less memory traffic.
        scaled = state.direction * (state.log_norm.exp() * self.g_dec).unsqueeze(-1)
        return F.linear(scaled, rows.to(scaled.dtype))

    def full_residual(self, state: NAGState) -> torch.Tensor:
        return state.direction.float() * state.log_norm.exp().unsqueeze(-1)

    def optimizer_special_parameters(self) -> list[nn.Parameter]:
        return [self.alpha, self.beta_raw, self.gate_logits, self.gate_w, self.gate_b, self.g_enc, self.g_dec]

    def parameter_stats(self) -> dict[str, torch.Tensor]:
        alpha = (self.alpha * self.alpha_scale).detach()
        return {f"nag/alpha/{layer_tag(i + 1)}": alpha[i] for i in range(self.n_sublayers)}
