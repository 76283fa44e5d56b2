"""Mixture-of-Depths callbacks, mixed in YAML under ``trainer.callbacks``.

``SkipRateSchedule`` sets the target skip rate over training, ``SkipRateController`` moves NAG's
skip thresholds so the realized rate tracks it, ``IsoFlopBudget`` stops training at a budget of
executed training FLOPs and measures the learning-rate schedule's progress against it, and
``SkipStatsLogger`` adds histograms of the planned steps and a layer x position heat map.
"""

from __future__ import annotations

import math
from typing import Any

import lightning.pytorch as pl
import torch

from nag_lightning.errors import NagError
from nag_lightning.lightning.lit_module import is_logging_step
from nag_lightning.model.flops import forward_flops
from nag_lightning.model.skip_policy import dense_stats, quantile_thresholds


def _reshard(module: torch.nn.Module) -> None:
    """After a forward outside the training step under FSDP2: the root keeps its parameters
    gathered after a forward (its backward would need them next), so hand them back to their
    shards; otherwise the step's other callbacks see plain tensors beside sharded ones."""
    from torch.distributed.fsdp import FSDPModule

    for submodule in module.modules():
        if isinstance(submodule, FSDPModule):
            submodule.reshard()


class SkipRateSchedule(pl.Callback):
    """Target skip rate: 0 for ``warmup_steps``, then a ``linear`` or ``cosine`` ramp over
    ``ramp_steps`` to ``target_rate`` (the fraction of (token, sub-layer) pairs skipped)."""

    def __init__(self, target_rate: float, warmup_steps: int = 0, ramp_steps: int = 0, shape: str = "linear") -> None:
        if not 0.0 <= target_rate < 1.0:
            raise NagError(f"SkipRateSchedule.target_rate must be in [0, 1), got {target_rate}.")
        if shape not in ("linear", "cosine") or warmup_steps < 0 or ramp_steps < 0:
            raise NagError("SkipRateSchedule.shape must be 'linear' or 'cosine' and warmup_steps, ramp_steps >= 0.")
        self.target_rate, self.warmup_steps, self.ramp_steps, self.shape = target_rate, warmup_steps, ramp_steps, shape

    def rate(self, step: int) -> float:
        if step < self.warmup_steps:
            return 0.0
        progress = 1.0 if self.ramp_steps == 0 else min(1.0, (step - self.warmup_steps) / self.ramp_steps)
        if self.shape == "cosine":
            progress = 0.5 * (1.0 - math.cos(math.pi * progress))
        return self.target_rate * progress

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        pl_module.model.require_skipping("SkipRateSchedule (or remove the callback)")

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int) -> None:
        pl_module.set_skip_target(self.rate(trainer.global_step))


class SkipRateController(pl.Callback):
    """Moves the skip thresholds (global or per sub-layer, as the NAG strategy has them) so the
    realized skip rate tracks ``pl_module.mod_target_rate`` (set by ``SkipRateSchedule``, or
    ``target_rate`` here when no schedule is used).

    After every training batch each threshold moves a fraction ``rate`` of the way to the batch's
    quantile of the planned steps ``a`` at ``target + correction`` (averaged over ranks): a
    smoothed quantile tracker, because the steps of one sub-layer are tightly spread and a
    threshold steered by the rate error alone swings between "all" and "nothing". ``correction``
    integrates the realized rate's error (``integral_gain`` per batch), removing the lag while the
    gates drift during training. When the target first becomes positive, the thresholds start
    from a calibration on that batch. The correction is the controller's state and travels in
    checkpoints with the thresholds (model buffers).
    """

    def __init__(self, rate: float = 0.5, integral_gain: float = 0.2, target_rate: float | None = None) -> None:
        if not 0.0 < rate <= 1.0 or integral_gain < 0:
            raise NagError(f"SkipRateController needs rate in (0, 1] and integral_gain >= 0, got {rate}, {integral_gain}.")
        if target_rate is not None and not 0.0 <= target_rate < 1.0:
            raise NagError(f"SkipRateController.target_rate must be in [0, 1), got {target_rate}.")
        self.rate, self.integral_gain, self.target_rate = rate, integral_gain, target_rate
        self.correction = 0.0

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        pl_module.model.require_skipping("SkipRateController (or remove the callback)")

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int) -> None:
        if self.target_rate is not None:
            pl_module.set_skip_target(self.target_rate)

    @torch.no_grad()
    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        policy = pl_module.model.skip_policy
        target = float(pl_module.mod_target_rate)
        if target <= 0.0:
            if policy.active:
                policy.set_thresholds(0.0)
            return
        if not policy.active:  # first positive target: start from this batch's quantiles
            with trainer.precision_plugin.forward_context():
                _, output = pl_module.loss(batch, return_output=True, calibrate=target)
            _reshard(pl_module)
            policy.calibrate_from(output.record, target)
            return
        record = outputs["skip_record"]  # what the training forward did (LanguageModel.training_step)
        stats = pl_module.training_skip or record.stats()  # the step's own, computed once there
        skipped = trainer.strategy.reduce(stats.skip_rate, reduce_op="mean").item()
        self.correction = min(max(self.correction + self.integral_gain * (target - skipped), -target), 0.99 - target)
        quantiles = quantile_thresholds(record.scores(), target + self.correction, policy.config.threshold_scope)
        quantiles = trainer.strategy.reduce(quantiles, reduce_op="mean")
        policy.set_thresholds(policy.thresholds + self.rate * (quantiles - policy.thresholds))
        if policy.config.mode == "capacity":  # the capacities follow the thresholds, alike on every rank
            shares = trainer.strategy.reduce(policy.shares_above_threshold(record), reduce_op="mean")
            policy.set_capacity_shares(shares)

    def state_dict(self) -> dict[str, Any]:
        return {"correction": self.correction}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.correction = state_dict.get("correction", 0.0)


class IsoFlopBudget(pl.Callback):
    """Stops training once the executed training FLOPs (all ranks) reach ``budget_flops``, and
    makes the learning-rate schedule's progress the fraction of the budget spent, so a run that
    skips more trains on more tokens with a complete schedule. Set ``trainer.max_steps: -1``."""

    def __init__(self, budget_flops: float) -> None:
        if budget_flops <= 0:
            raise NagError(f"IsoFlopBudget.budget_flops must be positive, got {budget_flops}.")
        self.budget_flops = float(budget_flops)

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        pl_module.set_schedule_progress(lambda: min(1.0, pl_module.executed_flops_total / self.budget_flops))

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        data = trainer.datamodule
        config = pl_module.model.config
        batch, seq = data.batch_size, data.context_length
        gates = pl_module.model.residual.gate_directions
        one_step = 3 * forward_flops(config, dense_stats(2 * config.n_layers, batch, seq), gates).item()
        one_step *= trainer.world_size * trainer.accumulate_grad_batches
        if self.budget_flops < one_step:
            raise NagError(
                f"IsoFlopBudget.budget_flops={self.budget_flops:.3e} is smaller than one dense optimizer step "
                f"({one_step:.3e} FLOPs at this model, batch and context). Raise the budget."
            )

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        if pl_module.executed_flops_total >= self.budget_flops:
            trainer.should_stop = True


class SkipStatsLogger(pl.Callback):
    """TensorBoard views of skipping: every ``trainer.log_every_n_steps`` a histogram of the
    planned steps ``a`` per sub-layer (``mod/step_histogram/layer_XX``; the per-layer skip rates
    are the module's ``mod/skip_rate/layer_XX``), and at each validation an image of the skip rate
    per sub-layer (rows, layer 01 at the top) and position (columns), ``mod/skip_heatmap``
    (white = always skipped, black = always executed), and a histogram of how many sub-layers
    each validation token ran, ``mod/depth_histogram`` (one spike: layers dropped alike for every
    token; spread: depth adapted per token)."""

    def __init__(self, row_height: int = 8) -> None:
        self.row_height = row_height
        self._counts: tuple[torch.Tensor, torch.Tensor] | None = None  # this validation's position counts
        self._depths: torch.Tensor | None = None  # this validation's tokens per number of sub-layers run

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        pl_module.model.require_skipping("SkipStatsLogger (or remove the callback)")

    def _writers(self, trainer: pl.Trainer):
        return [logger.experiment for logger in trainer.loggers if hasattr(logger.experiment, "add_histogram")]

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        # on_train_batch_end runs after the optimizer step: global_step already counts it.
        if not is_logging_step(trainer, trainer.global_step) or not trainer.is_global_zero:
            return
        recorded = outputs["skip_record"].step_samples()
        for writer in self._writers(trainer):
            for layer, steps in recorded.items():
                writer.add_histogram(f"mod/step_histogram/layer_{layer:02d}", steps.cpu(), trainer.global_step)

    def on_validation_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._counts = self._depths = None

    def on_validation_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                                batch_idx: int, dataloader_idx: int = 0) -> None:
        record = outputs["skip_record"]
        if not record.skipped_any:  # the map shows skipping only
            return
        executed, tokens = record.position_counts()
        if self._counts is not None:
            executed, tokens = executed + self._counts[0], tokens + self._counts[1]
        self._counts = (executed, tokens)
        depths = record.depth_histogram()
        self._depths = depths if self._depths is None else self._depths + depths

    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        counts, self._counts = self._counts, None
        depths, self._depths = self._depths, None
        if counts is None or not trainer.is_global_zero or counts[1].sum() == 0:
            return
        self._write_depth_histogram(trainer, depths.cpu())
        executed, tokens = counts
        seen = tokens > 0
        skip = 1.0 - executed[:, seen] / tokens[seen]
        image = skip.repeat_interleave(self.row_height, dim=0).clamp(0, 1).cpu()
        for writer in self._writers(trainer):
            writer.add_image("mod/skip_heatmap", image, trainer.global_step, dataformats="HW")

    def _write_depth_histogram(self, trainer: pl.Trainer, depths: torch.Tensor) -> None:
        """``depths[k]`` tokens ran k sub-layers: one bucket per k, centred on it."""
        values = torch.arange(len(depths), dtype=torch.float64)
        tokens = depths.sum().item()
        seen = values[depths > 0]
        for writer in self._writers(trainer):
            writer.add_histogram_raw(
                "mod/depth_histogram", min=seen.min().item(), max=seen.max().item(), num=tokens,
                sum=(values * depths).sum().item(), sum_squares=(values ** 2 * depths).sum().item(),
                bucket_limits=(values + 0.5).tolist(), bucket_counts=depths.tolist(), global_step=trainer.global_step)
