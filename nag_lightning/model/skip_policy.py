"""Router-free Mixture-of-Depths (NAG_SPEC.md section 3): which tokens run each sub-layer. Pure PyTorch.

A gated residual strategy (``ResidualStrategy.gated``: NAG) knows, before sub-layer ``l`` runs, a
gate ``m`` and a step ``a`` per token. The ``Transformer`` owns a ``SkipPolicy`` (built from
``ModelConfig.skip``, a ``SkipConfig``) that turns them into a decision: a token is skipped when
its *score* is below the sub-layer's threshold (one global value, or one per sub-layer). The
thresholds are a buffer (``thresholds``, in checkpoints); all zero means no skipping. The score
is the ``rule``'s:

- ``step``: ``a`` (the default); ``abs_step``: ``|a|``; ``gate``: ``m`` (ignores ``alpha_l``);
- two controls that skip the same fraction without looking at the tokens: ``random``, a fresh
  uniform draw per (token, sub-layer); ``last_layers``, ``(n - l + u) / n`` with ``u`` uniform,
  so a global threshold ``t`` drops the last ``t * n`` sub-layers for every token.

Three modes:

- ``threshold``: every token above the threshold runs. The executed count changes with every
  batch, so packing the tokens reads it on the host (one synchronisation per skipping sub-layer).
  Adaptive, and what decoding with a KV cache always uses.
- ``capacity``: as ``threshold``, then each sequence keeps at most ``capacity_l`` executed tokens
  in sub-layer ``l``, the earliest ones (later ones over capacity skip: causal, a token's decision
  depends only on positions <= t). ``capacity_l = ceil(capacity_factor * f_l * T)``, ``f_l`` the
  share of tokens above sub-layer ``l``'s threshold when the thresholds were last set
  (calibration, and the MoD controller every step, averaged over ranks), rounded up to a multiple
  of ``T / 16`` (at least 8; at most T: a compiler sees few shapes). The packed layout is a
  static (B, capacity_l): the model's forward and backward never read the device, and under
  compile the blocks share one graph (the capacities are its arguments).
- ``topk``: router Mixture-of-Depths (Raposo et al. 2024) for a strategy with a learned router
  and a causal predictor (``ResidualStrategy.predicts_topk``: ``RouterMoD``). In training each
  sequence runs exactly ``k = ceil(topk_capacity * T)`` tokens per sub-layer, those with the
  highest router logit (the gate ``m``; ``rule`` and the thresholds are not used), packed
  static (B, k) like capacity mode: no host synchronisation. That top-k is not causal (a token's
  rank depends on later tokens), so the decision also trains the predictor (binary
  cross-entropy of its logit against the top-k mask, in the record: ``predictor_loss``), and
  evaluation and decoding (the policy in eval mode, or a KV cache) run the tokens whose
  predicted probability is > 0.5: a causal, per-token rule, packed as in threshold mode. The
  rate is ``topk_capacity``'s: calibration and ``SkipRateController`` do not apply (an error).

A forward returns what it did as a ``SkipRecord`` (scores, executed tokens, overflow, per
sub-layer); statistics, calibration and the callbacks read that record, never module state.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from nag_lightning.errors import NagError
from nag_lightning.model.packing import TokenPacking, capacity_packing, causal_pairs, pack_tokens

SKIP_MODES = ("threshold", "capacity", "topk")
THRESHOLD_SCOPES = ("global", "per_layer")
SKIP_RULES = ("step", "abs_step", "gate", "random", "last_layers")
EXECUTIONS = ("gather", "mask")
_QUANTILE_LIMIT = 1 << 24  # torch.quantile's input limit
CAPACITY_BUCKETS, CAPACITY_MIN_BUCKET = 16, 8  # capacity mode: capacities are multiples of max(8, T / 16)


@dataclass
class SkipConfig:
    """How a gated model skips (``model.init_args.config.skip`` in YAML).

    mode: ``threshold`` (adaptive) or ``capacity`` (static shapes, sync-free; training and validation).
    threshold_scope: one ``global`` threshold, or one ``per_layer``.
    rule: the score compared with the threshold (module docstring).
    capacity_factor: capacity mode: each sub-layer's capacity is this (>= 1) times its calibrated executed share.
    execution: ``gather`` runs a sub-layer on the executed tokens only; ``mask``, the test oracle, on all.
    topk_capacity: topk mode: the share of each sequence's tokens that run each sub-layer in training
        (0.75: the 25% skip rate of ``configs/nag_mod.yaml``, so the two compare at equal compute).
    """

    mode: str = "threshold"
    threshold_scope: str = "global"
    rule: str = "step"
    capacity_factor: float = 1.0
    execution: str = "gather"
    topk_capacity: float = 0.75

    def validate(self) -> None:
        for name, allowed in (("mode", SKIP_MODES), ("threshold_scope", THRESHOLD_SCOPES), ("rule", SKIP_RULES),
                              ("execution", EXECUTIONS)):
            if getattr(self, name) not in allowed:
                raise NagError(f"ModelConfig.skip.{name} must be one of {', '.join(allowed)}, "
                               f"got {getattr(self, name)!r}.")
        if self.rule == "last_layers" and self.threshold_scope != "global":
            raise NagError("ModelConfig.skip.rule='last_layers' drops the last sub-layers under one global "
                           "threshold: set skip.threshold_scope='global'.")
        if not self.capacity_factor >= 1.0:
            raise NagError(f"ModelConfig.skip.capacity_factor must be >= 1, got {self.capacity_factor}.")
        if not 0.0 < self.topk_capacity <= 1.0:
            raise NagError(f"ModelConfig.skip.topk_capacity must be in (0, 1], got {self.topk_capacity}.")


class SkipStats(NamedTuple):
    """What a forward executed, per sub-layer (shape (n_sublayers,), float64): the tokens it was
    for (useful work), and what ran for them (executed work: padding rows, the attention layout)."""

    executed_tokens: torch.Tensor  # tokens that ran the sub-layer
    position_sums: torch.Tensor  # sum of ``position + 1`` over those tokens (useful attention FLOPs)
    tokens: int  # tokens in that forward (batch x sequence)
    # What ran (``packing.run_counts``); None where only the skip rates were kept:
    run_rows: torch.Tensor | None = None  # rows through the sub-layer's matmuls, padding rows included
    run_attention_pairs: torch.Tensor | None = None  # (query, key) scores per head its attention computed; 0: MLP
    # (n_sublayers + 1,): how many tokens ran 0, 1, ..., n_sublayers sub-layers (the per-token
    # adaptivity of depth); None where it was not kept.
    depth_histogram: torch.Tensor | None = None

    @property
    def executed_sublayers_std(self) -> torch.Tensor | None:
        """Standard deviation over tokens of how many sub-layers each ran (``depth_histogram``): 0
        when every token runs the same ones, larger the more the depth adapts per token."""
        return None if self.depth_histogram is None else depth_spread(self.depth_histogram)

    @property
    def executed_fraction(self) -> torch.Tensor:
        return self.executed_tokens / self.tokens

    @property
    def skip_rate(self) -> torch.Tensor:
        """Fraction of (token, sub-layer) pairs skipped."""
        return 1.0 - self.executed_fraction.mean()


def depth_spread(histogram: torch.Tensor) -> torch.Tensor:
    """Standard deviation of the depth whose per-depth token counts are ``histogram``."""
    depths = torch.arange(len(histogram), dtype=torch.float64, device=histogram.device)
    weights = histogram / histogram.sum().clamp_min(1)
    mean = (weights * depths).sum()
    return ((weights * (depths - mean) ** 2).sum()).sqrt()


def dense_stats(n_sublayers: int, batch: int, seq: int, device: torch.device | None = None) -> SkipStats:
    """The statistics of a forward in which every token runs every sub-layer, unpacked: each
    attention sub-layer (odd numbers, even indices) computes the causal triangle."""
    executed = torch.full((n_sublayers,), float(batch * seq), dtype=torch.float64, device=device)
    pairs = torch.zeros_like(executed)
    pairs[0::2] = causal_pairs(batch, seq)
    return SkipStats(executed, torch.full_like(executed, batch * seq * (seq + 1) / 2), batch * seq, executed, pairs)


class SubLayerRecord(NamedTuple):
    """What one sub-layer of one forward did (detached tensors, but ``predictor_loss``)."""

    score: torch.Tensor | None = None  # (B, T): the rule's score (None: the strategy has no gate)
    step: torch.Tensor | None = None  # (B, T): the planned step a
    executed: torch.Tensor | None = None  # (B, T) bool: the tokens that ran it; None: all of them
    over_capacity: torch.Tensor | None = None  # (): tokens above the threshold dropped by the capacity
    # (), float64, set with ``executed`` (``packing.run_counts``): device tensors, so capacity mode
    # never reads the device for them and a compiled block returns them as graph outputs.
    run_rows: torch.Tensor | None = None  # rows through its matmuls, padding included
    run_attention_pairs: torch.Tensor | None = None  # (query, key) scores per head its attention computed
    # Top-k mode in training: the predictor's binary cross-entropy against the top-k decisions
    # (the one field that keeps its graph: the training loss adds it) and its own decisions (B, T).
    predictor_loss: torch.Tensor | None = None
    predicted: torch.Tensor | None = None


class SkipRecord:
    """What one forward over (batch, seq) tokens did, sub-layer by sub-layer (1-based keys).
    A plain class (not a dataclass): Lightning hands it to callbacks untouched."""

    def __init__(self, layers: dict[int, SubLayerRecord], batch: int, seq: int) -> None:
        self.layers, self.batch, self.seq = layers, batch, seq

    @property
    def skipped_any(self) -> bool:
        """Whether the forward skipped (planned to skip) at all: a Python value, no synchronisation."""
        return any(r.executed is not None for r in self.layers.values())

    def stats(self, depths: bool = False) -> SkipStats:
        """Executed tokens, position sums and what ran per sub-layer (device tensors: no synchronisation).
        ``depths``: also the per-token depth histogram, a few more kernels that the training step
        pays only where it logs them."""
        n = len(self.layers)
        if not self.skipped_any:
            return dense_stats(n, self.batch, self.seq)
        device = next(r.executed for r in self.layers.values() if r.executed is not None).device
        positions = torch.arange(1, self.seq + 1, device=device, dtype=torch.float64)
        dense = dense_stats(n, self.batch, self.seq, device)
        rows = []  # per sub-layer: (executed tokens, position sum, run rows, run attention pairs)
        for index, layer in enumerate(sorted(self.layers)):
            r = self.layers[layer]
            if r.executed is None:  # every token ran it, unpacked
                rows.append((dense.executed_tokens[index], dense.position_sums[index], dense.run_rows[index],
                             dense.run_attention_pairs[index]))
            else:
                rows.append((r.executed.sum(dtype=torch.float64), (r.executed * positions).sum(dtype=torch.float64),
                             r.run_rows, r.run_attention_pairs))
        executed, sums, run_rows, run_pairs = (torch.stack(column) for column in zip(*rows))
        return SkipStats(executed, sums, self.batch * self.seq, run_rows, run_pairs,
                         self.depth_histogram() if depths else None)

    def executed_sublayers(self) -> torch.Tensor | None:
        """Per token (B, T): how many sub-layers it ran. None for a dense forward."""
        if not self.skipped_any:
            return None
        masks = [r.executed for r in self.layers.values() if r.executed is not None]
        dense = len(self.layers) - len(masks)  # sub-layers every token ran
        return torch.stack(masks).sum(0) + dense

    def executed_sublayers_spread(self) -> torch.Tensor | None:
        """``stats(depths=True).executed_sublayers_std``, by its older name."""
        histogram = self.depth_histogram()
        return None if histogram is None else depth_spread(histogram)

    def depth_histogram(self) -> torch.Tensor | None:
        """(n_sublayers + 1,) float64: how many tokens ran 0, 1, ..., n_sublayers sub-layers. A
        scatter-add into a fixed size (``bincount`` would read its length from the device)."""
        depths = self.executed_sublayers()
        if depths is None:
            return None
        histogram = torch.zeros(len(self.layers) + 1, dtype=torch.float64, device=depths.device)
        return histogram.index_add_(0, depths.flatten().long(), torch.ones(depths.numel(), dtype=torch.float64,
                                                                           device=depths.device))

    def over_capacity_fraction(self) -> torch.Tensor | None:
        """Capacity mode: the share of above-threshold (token, sub-layer) pairs that the capacity
        dropped (the overflow). None in threshold mode."""
        dropped = [r.over_capacity for r in self.layers.values() if r.over_capacity is not None]
        if not dropped:
            return None
        executed = sum(r.executed.sum(dtype=torch.float64) for r in self.layers.values() if r.executed is not None)
        total = torch.stack(dropped).sum(dtype=torch.float64)
        return total / (total + executed).clamp_min(1)

    def predictor_loss(self) -> torch.Tensor | None:
        """Top-k mode in training: the predictor's binary cross-entropy, averaged over sub-layers
        (with its graph); None otherwise."""
        losses = [r.predictor_loss for r in self.layers.values() if r.predictor_loss is not None]
        return torch.stack(losses).mean() if losses else None

    def router_stats(self) -> dict[str, torch.Tensor]:
        """Top-k mode in training, TensorBoard tag -> scalar: the predictor's loss, its accuracy
        against the top-k decisions (mean and per sub-layer) and the skip rate its causal rule
        would give (evaluation's). Empty otherwise."""
        layers = {layer: r for layer, r in sorted(self.layers.items()) if r.predicted is not None}
        if not layers:
            return {}
        accuracy = {layer: (r.predicted == r.executed).float().mean() for layer, r in layers.items()}
        stats = {"mod/router/predictor_loss": self.predictor_loss().detach(),
                 "mod/router/predictor_accuracy": torch.stack(list(accuracy.values())).mean(),
                 "mod/router/predicted_skip_rate": 1 - torch.stack([r.predicted.float().mean() for r in layers.values()]).mean()}
        stats.update({f"mod/router/predictor_accuracy/layer_{layer:02d}": value for layer, value in accuracy.items()})
        return stats

    def scores(self) -> list[torch.Tensor]:
        """Each sub-layer's scores, in order (empty for a strategy without a gate)."""
        return [self.layers[layer].score for layer in sorted(self.layers) if self.layers[layer].score is not None]

    def step_samples(self) -> dict[int, torch.Tensor]:
        """Sub-layer -> the planned steps ``a`` of every token (flattened)."""
        return {layer: r.step.flatten() for layer, r in sorted(self.layers.items()) if r.step is not None}

    def position_counts(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(executed tokens (n_sublayers, T), tokens (T)) of this forward."""
        rows = [torch.full((self.seq,), float(self.batch)) if r.executed is None else r.executed.sum(0).float().cpu()
                for _, r in sorted(self.layers.items())]
        return torch.stack(rows), torch.full((self.seq,), float(self.batch))


def _sample(values: torch.Tensor) -> torch.Tensor:
    values = values.detach().float().flatten()
    if values.numel() > _QUANTILE_LIMIT:
        values = values[torch.randperm(values.numel(), device=values.device)[:_QUANTILE_LIMIT]]
    return values


def quantile_thresholds(scores: list[torch.Tensor], rate: float, threshold_scope: str) -> torch.Tensor:
    """The thresholds that would have skipped ``rate`` of the (token, sub-layer) pairs whose scores
    are ``scores`` (one tensor per sub-layer): each sub-layer's ``rate``-quantile (``per_layer``),
    or one quantile over all of them (``global``, shape (1,))."""
    if not scores:
        raise RuntimeError("quantile_thresholds needs the scores of a forward pass of a gated model.")
    if threshold_scope == "per_layer":
        return torch.stack([torch.quantile(_sample(s), rate) for s in scores])
    return torch.quantile(_sample(torch.cat([_sample(s) for s in scores])), rate).reshape(1)


def topk_calibration_error() -> NagError:
    """The one message for thresholds set or calibrated in top-k mode (SkipRateController, a skip rate)."""
    return NagError("skip.mode='topk' runs the top ceil(skip.topk_capacity * T) tokens per sequence in training and "
                    "its predictor's choice in evaluation, without skip thresholds: set the rate with "
                    "model.init_args.config.skip.topk_capacity and remove SkipRateController (or the skip rate).")


def skip_capability_error(strategy: nn.Module, what: str) -> NagError:
    """The one message for "this model cannot skip": ``what`` names the command or callback."""
    return NagError(f"{what}: {type(strategy).__name__} has no gate to skip sub-layers with; skipping needs "
                    "model.init_args.config.residual: nag_lightning.model.residual.NAG "
                    "(e.g. --config configs/residual/nag.yaml).")


class SkipDecision(NamedTuple):
    executed: torch.Tensor  # (B, T) bool: the tokens that run the sub-layer
    score: torch.Tensor  # (B, T)
    packing: TokenPacking | str | None  # None: run every token (mask execution)
    over_capacity: torch.Tensor | None = None
    predictor_loss: torch.Tensor | None = None  # top-k mode in training (``SubLayerRecord``)
    predicted: torch.Tensor | None = None


class SkipPolicy(nn.Module):
    """A gated model's skipping: thresholds, rule, scope and mode (module docstring)."""

    def __init__(self, config: SkipConfig, n_sublayers: int) -> None:
        super().__init__()
        config.validate()
        self.config, self.n_sublayers = config, n_sublayers
        self.register_buffer("thresholds", torch.zeros(n_sublayers if config.threshold_scope == "per_layer" else 1))
        # Capacity mode: per sub-layer, the share of a sequence's tokens kept (0: none fitted yet).
        # A buffer, so a resumed run keeps them; mirrored on the host (``shares``), read from the
        # device only when set or loaded. Shares, not counts: they hold at any sequence length.
        self.register_buffer("capacity_shares", torch.zeros(n_sublayers))
        self._active = False
        self.shares: list[float] | None = None
        self.register_load_state_dict_post_hook(lambda module, _: module._refresh())

    # ---- thresholds and capacities ----
    @property
    def active(self) -> bool:
        """Whether the next forward may skip (a Python flag: dense runs never synchronise); top-k mode always skips."""
        return self._active or self.config.mode == "topk"

    def _refresh(self) -> None:
        """The host mirrors of the buffers, after a checkpoint loaded them."""
        self._active = bool((self.thresholds > 0).any())
        shares = self.capacity_shares.tolist()
        self.shares = shares if all(shares) else None

    def set_thresholds(self, values: torch.Tensor | float) -> None:
        """A scalar, or one value per entry of ``thresholds``; 0 disables skipping. Top-k mode has none (an error)."""
        if self.config.mode == "topk":
            raise topk_calibration_error()
        with torch.no_grad():
            self.thresholds.copy_(torch.as_tensor(values, dtype=torch.float32).expand_as(self.thresholds))
        self._active = values > 0 if isinstance(values, (int, float)) else bool((self.thresholds > 0).any())

    def calibrate_from(self, record: SkipRecord, rate: float) -> None:
        """Thresholds that skip ``rate`` of the pairs of ``record`` (a forward run with
        ``calibrate=rate``), and capacity mode's capacities to match."""
        if self.config.mode == "topk":
            raise topk_calibration_error()
        if not 0.0 <= rate < 1.0:
            raise ValueError(f"skip rate must be in [0, 1), got {rate}.")
        if rate == 0:
            self.set_thresholds(0.0)
            self.set_capacity_shares(None)
        else:
            self.set_thresholds(quantile_thresholds(record.scores(), rate, self.config.threshold_scope))
            if self.config.mode == "capacity":
                self.set_capacity_shares(self.shares_above_threshold(record))

    def shares_above_threshold(self, record: SkipRecord) -> torch.Tensor:
        """Per sub-layer, the share of ``record``'s tokens whose score reaches its current threshold
        (a device tensor: data-parallel callers average it over ranks before setting it)."""
        return torch.stack([(s >= self.threshold(layer)).float().mean() for layer, s in enumerate(record.scores(), 1)])

    def set_capacity_shares(self, shares: torch.Tensor | list[float] | None) -> None:
        """Capacity mode's kept share of each sequence, one per sub-layer (None: no capacity, every
        above-threshold token runs). Reads the device once: call it between steps."""
        if shares is not None:
            shares = [float(x) for x in (shares.tolist() if isinstance(shares, torch.Tensor) else shares)]
            if len(shares) != self.n_sublayers or not all(0.0 <= x <= 1.0 for x in shares):
                raise ValueError(f"set_capacity_shares needs {self.n_sublayers} values in [0, 1], got {shares}.")
            shares = [max(x, 1e-6) for x in shares]  # 0 marks "none fitted"; a sub-layer keeps >= 8 tokens anyway
        self.shares = shares
        with torch.no_grad():
            self.capacity_shares.copy_(torch.tensor(shares or [0.0] * self.n_sublayers))

    def capacity(self, layer: int, seq: int) -> int:
        """Tokens per sequence of ``seq`` that sub-layer ``layer`` keeps: ``ceil(capacity_factor *
        share * seq)`` rounded up to a multiple of ``seq / 16`` (at least 8), at most ``seq`` (few
        distinct shapes while the thresholds move); ``seq`` before any share is fitted. Top-k
        mode: ``k = ceil(topk_capacity * seq)``, every sub-layer alike."""
        if self.config.mode == "topk":
            return math.ceil(self.config.topk_capacity * seq)
        if self.shares is None:
            return seq
        wanted = math.ceil(self.config.capacity_factor * self.shares[layer - 1] * seq)
        bucket = max(CAPACITY_MIN_BUCKET, seq // CAPACITY_BUCKETS)
        return min(seq, max(1, -(-wanted // bucket)) * bucket)

    def threshold(self, layer: int) -> torch.Tensor:
        return self.thresholds[layer - 1 if self.config.threshold_scope == "per_layer" else 0]

    # ---- the decision ----
    def score(self, m: torch.Tensor, a: torch.Tensor, layer: int) -> torch.Tensor:
        """The rule's score (B, T) of sub-layer ``layer``: skipped below the threshold."""
        rule = self.config.rule
        if rule == "step":
            return a.detach()
        if rule == "abs_step":
            return a.detach().abs()
        if rule == "gate":
            return m.detach()
        uniform = torch.rand(a.shape, device=a.device)
        if rule == "random":
            return uniform
        return (self.n_sublayers - layer + uniform) / self.n_sublayers  # last_layers

    def decide(self, m: torch.Tensor, a: torch.Tensor, layer: int, attention: bool, calibrate: float | None = None,
               decoding: bool = False, keys_from_zero: bool = True, capacity: int | None = None,
               predictor_logit: torch.Tensor | None = None) -> SkipDecision:
        """Which tokens run sub-layer ``layer`` and how they are packed. ``calibrate``: skip that
        rate of this sub-layer's scores (a calibration pass). ``decoding`` (a KV cache): threshold
        mode with exact counts whatever the mode; ``keys_from_zero``: the cache's keys start at
        position 0. ``capacity``: capacity mode's tokens per sequence (``capacity(layer, T)``), given
        by the caller so that a compiled block does not specialise on each sub-layer's value; the
        capacity applies when it is given (capacity mode, not decoding, not calibrating); in top-k
        mode it is ``k``. ``predictor_logit``: top-k mode's causal predictor (``SkipPlan``)."""
        if self.config.mode == "topk":
            if calibrate is not None:
                raise topk_calibration_error()
            if self.training and not decoding:
                return self.top_k(m, predictor_logit, attention, capacity or self.capacity(layer, m.shape[1]))
            score = torch.sigmoid(predictor_logit.detach())
            executed = predictor_logit.detach() > 0  # probability > 0.5: causal, the token's own input alone
        else:
            score = self.score(m, a, layer)
            threshold = self.threshold(layer) if calibrate is None else torch.quantile(_sample(score), calibrate)
            executed = score >= threshold
        if capacity is not None and self.config.mode == "capacity" and not decoding and calibrate is None:
            packing, kept = capacity_packing(executed, capacity, attention)
            over = (executed.sum() - kept.sum()).detach()
            return SkipDecision(kept, score, packing if self.config.execution == "gather" else None, over)
        packing = None
        if self.config.execution == "gather":
            # With a cache (decoding, eager): exact counts, and a sub-layer no token executes is left
            # out. Without one, counts are bucketed so a compiler sees few shapes.
            packing = pack_tokens(executed, attention=attention, masked_layout=not decoding or keys_from_zero,
                                  exact=decoding)
        return SkipDecision(executed, score, packing)

    def top_k(self, m: torch.Tensor, predictor_logit: torch.Tensor, attention: bool, k: int) -> SkipDecision:
        """Top-k mode in training: the ``k`` tokens of each sequence with the highest router logit
        ``m`` (B, T), packed (B, k) without a host read, and the predictor's loss against them."""
        score = m.detach()
        executed = torch.zeros_like(score, dtype=torch.bool).scatter(1, score.topk(k, dim=1).indices, True)
        packing, _ = capacity_packing(executed, k, attention)  # exactly k per sequence: none dropped, no padding
        loss = F.binary_cross_entropy_with_logits(predictor_logit.float(), executed.float())
        return SkipDecision(executed, score, packing if self.config.execution == "gather" else None, None, loss,
                            predictor_logit.detach() > 0)
