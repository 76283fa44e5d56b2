"""The one evaluation loop of finished runs (skip-sweep, inspect, study): token-weighted, as `nag validate`."""

import math

import pytest
import torch
import torch.nn.functional as F

from conftest import tiny_model_config
from nag_lightning.lightning.lit_module import LanguageModel
from nag_lightning.model.residual import NAG
from nag_lightning.commands.runs import evaluate_batches, single_device_fabric


@pytest.mark.parametrize("rate", [0.0, 0.3])
def test_evaluate_weights_every_token_alike_and_counts_what_ran(rate):
    torch.manual_seed(0)
    model = LanguageModel(tiny_model_config(vocab_size=97, residual=NAG()))
    fabric = single_device_fabric("32-true")
    wrapped = fabric.setup_module(model)
    wrapped.eval()
    # Batches of 4 rows and of 1 row: a mean of batch means would weigh the single row 4 times too much.
    batches = [torch.randint(0, 97, (4, 33)), torch.randint(0, 97, (1, 33))]
    if rate:
        with torch.no_grad():
            _, output = wrapped.loss(batches[0], return_output=True, calibrate=rate)
        model.model.skip_policy.calibrate_from(output.record, rate)
    result = evaluate_batches(wrapped, batches, fabric, bytes_per_token=2.0)

    with torch.no_grad():
        records = [model.model(b[:, :-1], return_record=True) for b in batches]
        nll = sum(F.cross_entropy(r.logits.double().flatten(0, 1), b[:, 1:].flatten(), reduction="sum").item()
                  for r, b in zip(records, batches))
    tokens = 5 * 32
    assert result["tokens"] == tokens
    assert result["loss"] == pytest.approx(nll / tokens, rel=1e-5)
    assert result["bpb"] == pytest.approx(nll / tokens / math.log(2) / 2.0, rel=1e-5)
    skipped = sum(r.record.stats().skip_rate.item() * b.shape[0] for r, b in zip(records, batches)) / 5
    assert result["skip_rate"] == pytest.approx(skipped, abs=1e-6)
    dense = model.model.forward_flops(1, 32)[1].item()
    assert (result["forward_flops_per_token"] < dense / 32) == bool(rate)


@pytest.mark.parametrize("default_callbacks", [True, False])
def test_the_default_callbacks_are_listed_and_can_be_switched_off(default_callbacks):
    import lightning.pytorch as pl

    from nag_lightning.lightning.guards import DivergenceGuard, FinalCheckpoint

    model = LanguageModel(tiny_model_config(), default_callbacks=default_callbacks)
    model.trainer = pl.Trainer(logger=False, enable_checkpointing=False, enable_progress_bar=False, accelerator="cpu")
    added = {type(callback).__name__ for callback in model.configure_callbacks()}
    expected = {"ThroughputMonitor", DivergenceGuard.__name__, FinalCheckpoint.__name__}
    assert added == (expected if default_callbacks else set())


def test_the_trainer_of_nag_fit_shows_tokens_per_second_whichever_bar_lightning_would_pick():
    from lightning.pytorch.callbacks import RichProgressBar

    from nag_lightning.lightning.cli import NagTrainer
    from nag_lightning.lightning.progress import TokensProgressBar

    assert type(NagTrainer(logger=False, accelerator="cpu").progress_bar_callback) is TokensProgressBar
    rich = RichProgressBar()
    assert NagTrainer(logger=False, accelerator="cpu", callbacks=[rich]).progress_bar_callback is rich
    assert NagTrainer(logger=False, accelerator="cpu", enable_progress_bar=False).progress_bar_callback is None
