"""Skip rules (what the threshold is on) and the controls that skip without looking at the tokens."""

import json

import pytest
import torch

from conftest import REPO, tiny_model_config
from nag_lightning.errors import NagError
from nag_lightning.model import Transformer
from nag_lightning.model.config import ConfigError
from nag_lightning.model.residual import NAG
from nag_lightning.model.skip_policy import SkipConfig

BATCH = torch.randint(0, 97, (4, 40), generator=torch.Generator().manual_seed(0))


def build(**skip_args):
    torch.manual_seed(0)
    return Transformer(tiny_model_config(vocab_size=97, context_length=40, n_layers=4, residual=NAG(),
                                         skip=SkipConfig(**skip_args))).eval()


def calibrated(model, rate):
    """Thresholds set on one forward, then the per-sub-layer skip rates of a second forward (and its record)."""
    with torch.no_grad():
        out = model(BATCH, return_record=True, calibrate=rate)
        model.skip_policy.calibrate_from(out.record, rate)
        out = model(BATCH, return_record=True)
    return 1 - out.record.stats().executed_fraction, out.record


@pytest.mark.parametrize("rule", ["step", "abs_step", "gate", "random", "last_layers"])
def test_every_rule_skips_the_calibrated_fraction(rule):
    rates, _ = calibrated(build(rule=rule), 0.25)
    assert abs(rates.mean().item() - 0.25) < 0.05, rates


def test_last_layers_drops_the_last_sub_layers_for_every_token():
    model = build(rule="last_layers")
    rates, record = calibrated(model, 0.25)  # 2 of 8 sub-layers
    assert (rates[:5] == 0).all() and (rates[6:] > 0.9).all(), rates
    assert record.stats(depths=True).executed_sublayers_std.item() < 0.5  # hardly any per-token adaptivity


def test_random_skips_every_sub_layer_alike_and_varies_per_token():
    model = build(rule="random")
    rates, record = calibrated(model, 0.25)
    assert ((rates - 0.25).abs() < 0.12).all(), rates
    # Binomial(8, 0.25) executed-skips per token: std sqrt(8 * 0.25 * 0.75) = 1.22.
    assert record.stats().depth_histogram is None  # a training step pays for it only where it logs it
    stats = record.stats(depths=True)
    assert 0.9 < stats.executed_sublayers_std.item() < 1.5
    # The histogram of sub-layers per token, as evaluation sums it and result.json keeps it, from
    # the per-sub-layer masks directly.
    depths = sum(r.executed.long() for r in record.layers.values())
    expected = torch.tensor([(depths == k).sum().item() for k in range(9)], dtype=torch.float64)
    assert torch.equal(stats.depth_histogram, expected) and expected.sum() == depths.numel()
    assert stats.executed_sublayers_std.item() == pytest.approx(depths.double().std(unbiased=False).item(), rel=1e-9)
    assert record.executed_sublayers_spread() == stats.executed_sublayers_std  # the older name


def test_a_negative_alpha_skips_its_whole_layer_under_step_but_not_under_abs_step():
    results = {}
    for rule in ("step", "abs_step"):
        model = build(rule=rule)
        with torch.no_grad():
            model.residual.alpha[2] = -model.residual.alpha[2]  # sub-layer 3 learned a negative alpha
        results[rule] = calibrated(model, 0.25)[0][2].item()
    assert results["step"] == 1.0 and results["abs_step"] < 0.5, results


def test_the_gate_rule_ignores_alpha():
    """Sub-layer 1's gate reads only the embedding: scaling its alpha moves its steps, not its gate."""
    decisions = {}
    for rule in ("step", "gate"):
        model = build(rule=rule)
        calibrated(model, 0.3)
        first = []
        for scale in (1.0, 0.2):
            with torch.no_grad():
                model.residual.alpha[0] *= scale
                out = model(BATCH, return_record=True)
            first.append(out.record.layers[1].executed.clone())
        decisions[rule] = torch.equal(*first)
    assert decisions == {"step": False, "gate": True}


def test_rules_are_checked():
    with pytest.raises(NagError, match="skip.rule must be one of"):
        SkipConfig(rule="norm").validate()
    with pytest.raises(NagError, match="threshold_scope='global'"):
        SkipConfig(rule="last_layers", threshold_scope="per_layer").validate()
    # Building a model checks them too, as a configuration error.
    with pytest.raises(ConfigError, match="skip.rule must be one of"):
        build(rule="norm")
    with pytest.raises(ConfigError, match="threshold_scope='global'"):
        build(rule="last_layers", threshold_scope="per_layer")


def test_a_skip_rule_trains_through_the_cli_with_the_controller(tiny_data, tmp_path, capsys):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from test_cli import TINY, run_main

    code, _, err = run_main(
        ["fit", "--config", TINY, "--config", str(REPO / "configs/residual/nag.yaml"),
         "--config", str(REPO / "configs/skip/random.yaml"), "--data.init_args.data_dir", str(tiny_data),
         "--trainer.logger.init_args.save_dir", str(tmp_path), "--trainer.max_steps", "17",
         "--trainer.enable_progress_bar", "false", "--trainer.limit_val_batches", "0",
         "--trainer.callbacks+=nag_lightning.lightning.callbacks.SkipRateController", "--trainer.callbacks.target_rate=0.3"],
        capsys)
    assert code == 0, err
    events = EventAccumulator(str(tmp_path / "nag" / "version_0")).Reload()
    assert abs(events.Scalars("mod/skip_rate")[-1].value - 0.3) < 0.1
    assert events.Scalars("mod/executed_sublayers_std")[-1].value > 0.5
    # Without a validation, result.json keeps the last training step's depth spread (step 17 is
    # not a logging step: the last step computes it anyway).
    result = json.loads((tmp_path / "nag" / "version_0" / "result.json").read_text())
    assert result["steps"] == 17 and result["val_loss"] is None
    assert result["executed_sublayers_std"] > 0.5 and len(result["depth_histogram"]) == 2 * 2 + 1
