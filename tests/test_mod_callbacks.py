"""MoD callbacks under a real Trainer: schedule, controller, iso-FLOP budget, resume, bad options."""

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint

from conftest import tiny_model_config
from nag_lightning.lightning.callbacks import IsoFlopBudget, SkipRateController, SkipRateSchedule
from nag_lightning.data import TokenShardDataModule
from nag_lightning.errors import NagError
from nag_lightning.lightning.lit_module import LanguageModel
from nag_lightning.model.residual import NAG
from nag_lightning.model.skip_policy import SkipConfig


class Record(Callback):
    def __init__(self):
        self.losses, self.skip_rates, self.thresholds, self.lrs = [], [], [], []

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        record = outputs["skip_record"]  # what the training forward skipped
        assert (record.batch, record.seq) == (batch.shape[0], batch.shape[1] - 1)
        self.losses.append(outputs["loss"].item())
        self.skip_rates.append(record.stats().skip_rate.item())
        self.thresholds.append(module.model.skip_policy.thresholds.clone())
        self.lrs.append(trainer.optimizers[0].param_groups[0]["lr"])


def run(tiny_data, callbacks, max_steps=40, ckpt_path=None, residual=None, skip=None, **trainer_args):
    pl.seed_everything(0)
    model = LanguageModel(tiny_model_config(residual=residual or NAG(), skip=skip or SkipConfig()), warmup_steps=2)
    settings = dict(logger=False, limit_val_batches=0)
    settings.update(trainer_args)
    trainer = pl.Trainer(accelerator="cpu", max_steps=max_steps, enable_progress_bar=False,
                         enable_model_summary=False, num_sanity_val_steps=0,
                         enable_checkpointing=any(isinstance(c, ModelCheckpoint) for c in callbacks),
                         callbacks=callbacks, **settings)
    trainer.fit(model, datamodule=TokenShardDataModule(str(tiny_data), context_length=32, batch_size=4), ckpt_path=ckpt_path)
    return model, trainer


def test_schedule_ramps_linearly_or_by_cosine():
    linear = SkipRateSchedule(0.25, warmup_steps=10, ramp_steps=20)
    assert [linear.rate(s) for s in (0, 9, 10, 20, 30, 100)] == pytest.approx([0, 0, 0, 0.125, 0.25, 0.25])
    cosine = SkipRateSchedule(0.25, warmup_steps=0, ramp_steps=20, shape="cosine")
    assert [cosine.rate(s) for s in (0, 10, 20)] == pytest.approx([0, 0.125, 0.25])
    assert cosine.rate(5) < 0.25 * 5 / 20


def test_controller_tracks_the_target(tiny_data):
    record = Record()
    run(tiny_data, [SkipRateSchedule(0.25, warmup_steps=5, ramp_steps=10), SkipRateController(), record], max_steps=60)
    assert record.skip_rates[:5] == [0.0] * 5
    recent = record.skip_rates[-15:]
    assert sum(recent) / len(recent) == pytest.approx(0.25, abs=0.03)


def test_controller_with_per_layer_thresholds(tiny_data):
    record = Record()
    run(tiny_data, [SkipRateController(target_rate=0.3), record], skip=SkipConfig(threshold_scope="per_layer"),
        max_steps=50)
    assert record.thresholds[-1].shape == (4,)
    assert sum(record.skip_rates[-10:]) / 10 == pytest.approx(0.3, abs=0.03)


def test_controller_in_capacity_mode_tracks_the_target_and_bounds_every_sequence(tiny_data):
    """Capacity mode under the schedule and controller: the capacities follow the moving
    thresholds, each sequence runs at most its sub-layer's capacity, and the realized rate tracks
    the target; the overflow (over-capacity share) is logged."""
    record = Record()

    class Capacities(Callback):
        def __init__(self):
            self.bounded, self.seen, self.current = True, set(), None

        def on_train_batch_start(self, trainer, module, batch, batch_idx):
            policy = module.model.skip_policy  # the capacities this step runs with
            self.current = [policy.capacity(layer, 32) for layer in range(1, policy.n_sublayers + 1)]
            self.seen.add(tuple(self.current))

        def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
            for layer, r in outputs["skip_record"].layers.items():
                if r.executed is not None and r.over_capacity is not None:
                    self.bounded &= r.executed.sum(1).max().item() <= self.current[layer - 1]

    capacities = Capacities()
    model, _ = run(tiny_data, [SkipRateSchedule(0.25, warmup_steps=5, ramp_steps=10), SkipRateController(), capacities,
                               record], skip=SkipConfig(mode="capacity", threshold_scope="per_layer"), max_steps=50)
    assert capacities.bounded and len(capacities.seen) >= 2  # they moved with the ramp
    assert sum(record.skip_rates[-10:]) / 10 == pytest.approx(0.25, abs=0.04)
    assert "mod/over_capacity" in model.mod_stats(model.model(torch.zeros(2, 32, dtype=torch.long),
                                                               return_record=True).record)


def test_iso_flop_budget_stops_at_the_budget_with_a_complete_schedule(tiny_data):
    record = Record()
    probe = LanguageModel(tiny_model_config(residual=NAG()))
    probe.model(torch.zeros(4, 32, dtype=torch.long))
    step_flops = 3 * probe.model.forward_flops(4, 32)[1].item()
    budget = 12.5 * step_flops
    model, trainer = run(tiny_data, [IsoFlopBudget(budget), record], max_steps=-1)
    assert trainer.global_step == 13  # dense: the 13th step crosses 12.5 steps' worth
    assert budget <= model.executed_flops_total < budget + step_flops
    assert record.lrs[-1] == pytest.approx(3e-3 * 0.1, rel=1e-6)  # the cosine reached its floor at the budget


def test_skipping_buys_more_steps_for_the_same_budget(tiny_data):
    probe = LanguageModel(tiny_model_config(residual=NAG()))
    step_flops = 3 * probe.model.forward_flops(4, 32)[1].item()
    dense_model, dense = run(tiny_data, [IsoFlopBudget(20 * step_flops)], max_steps=-1)
    sparse_model, sparse = run(tiny_data, [IsoFlopBudget(20 * step_flops), SkipRateController(target_rate=0.4)],
                               max_steps=-1)
    assert sparse.global_step > dense.global_step
    assert sparse_model.tokens_seen > dense_model.tokens_seen


def test_resume_of_a_mod_run_is_exact(tiny_data, tmp_path):
    full = Record()
    checkpoint = ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=12, save_top_k=-1, filename="step{step}",
                                 auto_insert_metric_name=False)
    callbacks = lambda record: [SkipRateSchedule(0.25, warmup_steps=4, ramp_steps=4), SkipRateController(), record]
    full_model, _ = run(tiny_data, callbacks(full) + [checkpoint], max_steps=24)
    resumed = Record()
    resumed_model, _ = run(tiny_data, callbacks(resumed), max_steps=24, ckpt_path=tmp_path / "step12.ckpt")
    assert resumed.losses == full.losses[12:]
    assert torch.equal(resumed.thresholds[-1], full.thresholds[-1])
    assert resumed_model.executed_flops_total == full_model.executed_flops_total


@pytest.mark.parametrize("make", [lambda: SkipRateSchedule(1.0), lambda: SkipRateSchedule(-0.1),
                                  lambda: SkipRateController(target_rate=1.5), lambda: IsoFlopBudget(0)])
def test_bad_options_name_themselves(make):
    with pytest.raises(NagError, match=r"SkipRateSchedule|SkipRateController|IsoFlopBudget"):
        make()


def test_budget_smaller_than_one_step_is_an_error(tiny_data):
    with pytest.raises(NagError, match="smaller than one dense optimizer step"):
        run(tiny_data, [IsoFlopBudget(1e3)], max_steps=-1)


@pytest.mark.parametrize("callback", [SkipRateSchedule(0.2), SkipRateController(target_rate=0.2)])
def test_mod_callbacks_need_a_gate(tiny_data, callback):
    from nag_lightning.model.residual import PreNorm

    with pytest.raises(NagError, match="no(ne)? .*gate|has none"):
        run(tiny_data, [callback], residual=PreNorm(), max_steps=2)


def test_skip_stats_logger_writes_histograms_and_a_heat_map(tiny_data, tmp_path):
    from lightning.pytorch.loggers import TensorBoardLogger
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from nag_lightning.lightning.callbacks import SkipStatsLogger

    logger = TensorBoardLogger(tmp_path, name="mod", version="v")
    run(tiny_data, [SkipRateController(target_rate=0.25), SkipStatsLogger()], max_steps=10, logger=logger,
        log_every_n_steps=5, limit_val_batches=2, val_check_interval=10)
    tags = EventAccumulator(str(tmp_path / "mod" / "v"), size_guidance={"images": 0, "histograms": 0}).Reload().Tags()
    assert {f"mod/step_histogram/layer_{i:02d}" for i in range(1, 5)} <= set(tags["histograms"])
    assert "mod/skip_heatmap" in tags["images"]
    # How many sub-layers each validation token ran: 2 batches of 4 sequences x 32 tokens, 0..4 sub-layers.
    (event,) = EventAccumulator(str(tmp_path / "mod" / "v"), size_guidance={"histograms": 0}).Reload().Histograms(
        "mod/depth_histogram")
    histogram = event.histogram_value
    assert histogram.num == sum(histogram.bucket) == 2 * 4 * 32
    assert list(histogram.bucket_limit) == [0.5, 1.5, 2.5, 3.5, 4.5]
    assert 2 < histogram.sum / histogram.num < 4  # about 25% of the 4 sub-layers skipped
