"""Router-free Mixture-of-Depths (NAG_SPEC.md section 3) for any strategy with a planned step.

A strategy derived from ``ThresholdSkipping`` knows, before sub-layer ``l`` runs, a step ``a`` per
token (NAG: ``a = alpha_l * m``, ``m`` its gate). A (token, sub-layer) pair is skipped when its
*score* is below the sub-layer's threshold: one global value, or one per sub-layer
(``threshold_scope``). The thresholds are a buffer (``thresholds``, saved in checkpoints); all
zero means no skipping. The score is the ``skip_rule``'s:

- ``step``: ``a`` (the default); ``abs_step``: ``|a|`` (a learned negative ``alpha_l`` then no
  longer skips every token of its layer); ``gate``: ``m`` (ignores ``alpha_l``, so one global
  threshold does not single out the layers with the smallest ``alpha_l``);
- two controls that skip the same fraction without looking at the tokens: ``random``, a fresh
  uniform draw per (token, sub-layer); ``last_layers``, ``(n - l + u) / n`` with ``u`` uniform,
  so a global threshold ``t`` drops the last ``t * n`` sub-layers for every token (the boundary
  sub-layer for a random share of tokens). It needs ``threshold_scope="global"``.

What callers use, and nothing else:
- ``skipping``: whether the next forward may skip (a Python flag: dense runs never synchronise);
- ``set_thresholds(values)``; ``with calibrate(rate): model(batch)`` sets them from one forward;
- ``threshold_quantiles(rate)``: the thresholds that would have skipped ``rate`` of the latest forward;
- ``skip_stats(batch, seq)``, ``step_samples()``: what the latest forward executed, and its steps;
- ``count_positions(True)`` ... ``position_counts()``: executed tokens per sub-layer and position.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Iterator

import torch

from nag_lightning.model.residual.base import ResidualStrategy, SkipPlan, SkipStats

THRESHOLD_SCOPES = ("global", "per_layer")
SKIP_MODES = ("gather", "mask")
SKIP_RULES = ("step", "abs_step", "gate", "random", "last_layers")
_QUANTILE_LIMIT = 1 << 24  # torch.quantile's input limit


def _sample(values: torch.Tensor) -> torch.Tensor:
    values = values.detach().float().flatten()
    if values.numel() > _QUANTILE_LIMIT:
        values = values[torch.randperm(values.numel(), device=values.device)[:_QUANTILE_LIMIT]]
    return values


class ThresholdSkipping(ResidualStrategy):
    can_skip = True

    def __init__(self, threshold_scope: str = "global", skip_mode: str = "gather", skip_rule: str = "step") -> None:
        super().__init__()
        if threshold_scope not in THRESHOLD_SCOPES:
            raise ValueError(f"threshold_scope must be one of {', '.join(THRESHOLD_SCOPES)}, got {threshold_scope!r}.")
        if skip_mode not in SKIP_MODES:
            raise ValueError(f"skip_mode must be one of {', '.join(SKIP_MODES)}, got {skip_mode!r}.")
        if skip_rule not in SKIP_RULES:
            raise ValueError(f"skip_rule must be one of {', '.join(SKIP_RULES)}, got {skip_rule!r}.")
        if skip_rule == "last_layers" and threshold_scope != "global":
            raise ValueError("skip_rule='last_layers' drops the last sub-layers under one global threshold: "
                             "set threshold_scope='global'.")
        self.threshold_scope, self.skip_mode, self.skip_rule = threshold_scope, skip_mode, skip_rule

    def planned_step(self, state: Any, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(gate m, step a), each (B, T), of sub-layer ``layer``, from the state before it runs."""
        raise NotImplementedError

    def bind(self, d_model: int, n_sublayers: int, eps: float, kernels: str = "torch") -> None:
        super().bind(d_model, n_sublayers, eps, kernels)
        n = n_sublayers
        self.register_buffer("thresholds", torch.zeros(n if self.threshold_scope == "per_layer" else 1))
        # What the latest forward executed (detached; read through skip_stats()).
        self.register_buffer("_executed_tokens", torch.zeros(n, dtype=torch.float64), persistent=False)
        self.register_buffer("_position_sums", torch.zeros(n, dtype=torch.float64), persistent=False)
        self._skipping = False
        self._forward_tokens = 1
        self._calibration: dict | None = None
        self._steps: dict[int, torch.Tensor] = {}  # layer -> the latest forward's steps a (detached)
        self._scores: dict[int, torch.Tensor] = {}  # layer -> the latest skipping forward's scores
        # layer -> the latest skipping forward's executed mask (assigned, not summed: a block
        # recomputed under activation checkpointing must not count twice)
        self._executed: dict[int, torch.Tensor] = {}
        self._positions: tuple[torch.Tensor, torch.Tensor] | None = None  # (executed (n, T), tokens (T))
        self.register_load_state_dict_pre_hook(_rename_legacy_threshold_buffer)
        self.register_load_state_dict_post_hook(lambda module, _: module._refresh_skipping())

    # ---- thresholds ----
    @property
    def skipping(self) -> bool:
        return self._skipping

    def _refresh_skipping(self) -> None:
        self._skipping = bool((self.thresholds > 0).any())

    def set_thresholds(self, values: torch.Tensor | float) -> None:
        """Set the threshold(s) on ``a``: a scalar, or one value per entry of ``thresholds``; 0 disables skipping."""
        with torch.no_grad():
            self.thresholds.copy_(torch.as_tensor(values, dtype=torch.float32).expand_as(self.thresholds))
        self._refresh_skipping()

    def threshold(self, layer: int) -> torch.Tensor:
        return self.thresholds[layer - 1 if self.threshold_scope == "per_layer" else 0]

    @contextmanager
    def calibrate(self, rate: float) -> Iterator[None]:
        """Inside the block, the next forward sets the thresholds so that a fraction ``rate`` of
        (token, sub-layer) pairs is skipped: per-layer thresholds take each layer's
        ``rate``-quantile of ``a`` as the pass reaches it; a global threshold takes the quantile
        over all layers' ``a`` of that pass (which saw the layers before skipping: an approximation)."""
        if not 0.0 <= rate < 1.0:
            raise ValueError(f"skip rate must be in [0, 1), got {rate}.")
        self._calibration = {"rate": rate, "steps": []}
        self._skipping = rate > 0
        try:
            yield
        except BaseException:
            self._calibration = None
            self._refresh_skipping()
            raise
        calibration, self._calibration = self._calibration, None
        if rate == 0:
            self.set_thresholds(0.0)
        elif self.threshold_scope == "global" and calibration["steps"]:
            self.set_thresholds(torch.quantile(torch.cat(calibration["steps"]), rate))
        self._refresh_skipping()

    def _calibrate(self, layer: int, a: torch.Tensor) -> None:
        values = _sample(a)
        threshold = torch.quantile(values, self._calibration["rate"])
        if self.threshold_scope == "per_layer":
            self.thresholds[layer - 1] = threshold
        else:
            self._calibration["steps"].append(values)
            self.thresholds[0] = threshold

    def threshold_quantiles(self, rate: float) -> torch.Tensor:
        """The thresholds that would have skipped ``rate`` of the pairs of the latest forward (shaped
        like ``thresholds``): the ``rate``-quantile of its scores, per sub-layer or over all of them
        (under the ``step`` rule, the steps of any forward; otherwise of the latest skipping one)."""
        recorded = self._steps if self.skip_rule == "step" else self._scores
        steps = [_sample(recorded[layer]) for layer in sorted(recorded)]
        if not steps:
            raise RuntimeError("threshold_quantiles needs a (skipping) forward pass first.")
        if self.threshold_scope == "per_layer":
            return torch.stack([torch.quantile(a, rate) for a in steps])
        return torch.quantile(_sample(torch.cat(steps)), rate).reshape(1)

    # ---- the plan ----
    def score(self, m: torch.Tensor, a: torch.Tensor, layer: int) -> torch.Tensor:
        """The skip rule's score (B, T) of sub-layer ``layer``: skipped below the threshold."""
        if self.skip_rule == "step":
            return a.detach()
        if self.skip_rule == "abs_step":
            return a.detach().abs()
        if self.skip_rule == "gate":
            return m.detach()
        uniform = torch.rand(a.shape, device=a.device)
        if self.skip_rule == "random":
            return uniform
        return (self.n_sublayers - layer + uniform) / self.n_sublayers  # last_layers

    def plan(self, state: Any, layer: int) -> SkipPlan:
        m, a = self.planned_step(state, layer)
        if not self._skipping:
            return SkipPlan(None, m, a)
        score = self.score(m, a, layer)
        if self._calibration is not None:
            self._calibrate(layer, score)
        executed = score >= self.threshold(layer)
        self._forward_tokens = executed.numel()
        if layer == 1:
            self._executed.clear()
        self._executed[layer] = executed
        with torch.no_grad():
            self._executed_tokens[layer - 1] = executed.sum()
            positions = torch.arange(1, executed.shape[-1] + 1, device=executed.device, dtype=torch.float64)
            self._position_sums[layer - 1] = (executed * positions).sum()
            if self._positions is not None:
                by_position, tokens = self._positions
                by_position[layer - 1, : executed.shape[-1]] += executed.sum(0)
                if layer == 1:
                    tokens[: executed.shape[-1]] += executed.shape[0]
        return SkipPlan(executed, m, a, score)

    def remember(self, layer: int, plan: SkipPlan) -> None:
        self._steps[layer] = plan.step.detach()
        if plan.score is not None:
            self._scores[layer] = plan.score

    # ---- statistics of the latest forward ----
    def skip_stats(self, batch: int, seq: int) -> SkipStats:
        """While skipping, the counts of the latest forward, whatever its shape; otherwise the dense
        counts of a (batch, seq) forward."""
        if not self._skipping:
            return super().skip_stats(batch, seq)
        return SkipStats(self._executed_tokens.clone(), self._position_sums.clone(), self._forward_tokens)

    def executed_sublayers_spread(self) -> torch.Tensor | None:
        """Standard deviation over the latest skipping forward's tokens of how many sub-layers each
        ran: 0 when every token runs the same ones (``last_layers`` at a whole number of them), larger
        the more the depth adapts per token. None before a skipping forward."""
        if not self._executed:
            return None
        return torch.stack(list(self._executed.values())).sum(0, dtype=torch.float32).std(unbiased=False)

    def step_samples(self) -> dict[int, torch.Tensor]:
        """Sub-layer -> the steps ``a`` of every token in the latest forward (detached, flattened)."""
        return {layer: a.flatten() for layer, a in sorted(self._steps.items())}

    def count_positions(self, enabled: bool, context_length: int = 0) -> None:
        """Start (from zero) or stop counting executed tokens per sub-layer and position over forwards."""
        if not enabled:
            self._positions = None
            return
        device = self.thresholds.device
        self._positions = (torch.zeros(self.n_sublayers, context_length, device=device),
                           torch.zeros(context_length, device=device))

    def position_counts(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(executed tokens (n_sublayers, T), tokens (T)) counted since ``count_positions(True)``."""
        return self._positions


def _rename_legacy_threshold_buffer(module, state_dict, prefix, *args) -> None:
    """Checkpoints before the skipping interface named the thresholds buffer ``skip_threshold``."""
    legacy = prefix + "skip_threshold"
    if legacy in state_dict and prefix + "thresholds" not in state_dict:
        state_dict[prefix + "thresholds"] = state_dict.pop(legacy)
