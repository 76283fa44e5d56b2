"""A test split held out from validation (data.test_fraction): disjoint blocks, reported by a fit,
and what a study compares."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from conftest import TINY
from nag_lightning.commands.main import main
from nag_lightning.data import TokenShardDataModule
from nag_lightning.errors import NagError


def blocks(loader) -> list[tuple[int, ...]]:
    return [tuple(row.tolist()) for batch in loader for row in batch]


def test_the_test_split_is_the_end_of_validation_and_disjoint_from_what_validation_reads(tiny_data):
    every = TokenShardDataModule(str(tiny_data), context_length=32, batch_size=2)
    every.setup("validate")
    whole = blocks(every.val_dataloader())
    assert blocks(every.test_dataloader()) == whole  # no test_fraction: test reads validation, as before
    split = TokenShardDataModule(str(tiny_data), context_length=32, batch_size=2, test_fraction=0.5)
    split.setup("validate")
    validation, test = blocks(split.val_dataloader()), blocks(split.test_dataloader())
    assert validation == whole[: len(validation)] and abs(len(validation) - len(whole) / 2) <= 2
    assert test and not set(test) & set(validation)
    assert len(validation) + len(test) <= len(whole)
    with pytest.raises(NagError, match=r"data.test_fraction must be in \[0, 1\), got 1.0"):
        TokenShardDataModule(str(tiny_data), test_fraction=1.0)


def test_a_fit_with_a_test_split_reports_its_loss_beside_validation(tiny_data, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    main(["fit", "--config", TINY, "--data.init_args.data_dir", str(tiny_data), "--trainer.max_steps", "4",
          "--trainer.val_check_interval", "4", "--trainer.limit_val_batches", "null",
          "--data.init_args.test_fraction", "0.5", "--trainer.enable_progress_bar", "false"])
    printed = capsys.readouterr().out
    result = json.loads(next(Path("runs").rglob("result.json")).read_text())
    assert result["test_loss"] is not None and result["val_loss"] is not None
    assert result["test_loss"] != result["val_loss"]  # other blocks
    assert f"test_loss {result['test_loss']:.4f}" in printed
    checkpoint = torch.load(next(Path("runs").rglob("last.ckpt")), map_location="cpu", weights_only=True)
    assert checkpoint["datamodule_hyper_parameters"]["test_fraction"] == 0.5


def test_a_study_with_a_test_split_compares_test_losses_and_says_so():
    from nag_lightning.commands.study_report import markdown, summarise

    study = {"kind": "depth", "configs": ["tiny.yaml"], "overrides": [], "learning_rates": [0.01], "seeds": 2,
             "grid": [4], "test_fraction": 0.5, "margin": 0.02,
             "arms": [{"arm": arm, "strategy": arm, "skip_rate": 0.0, "skip_rule": None} for arm in ("prenorm", "nag")]}
    # Validation says the arms are equal; the held-out test split says nag is 0.5 nats better.
    rows = [{"arm": arm, "strategy": arm, "depth": 4, "seed": seed, "learning_rate": 0.01, "val_loss": 5.0 + seed / 10,
             "test_loss": (4.5 if arm == "nag" else 5.0) + seed / 10, "val_bpb": None, "norm_growth": None,
             "executed_flops": 1.0, "skip_rate": 0.0, "wall_s": 1.0} for arm in ("prenorm", "nag") for seed in (0, 1)]
    nag = next(s for s in summarise(study, rows) if s["arm"] == "nag")
    assert nag["reported"] == "test_loss" and nag["diff_vs_reference"] == pytest.approx(-0.5)
    assert nag["val_loss_mean"] == pytest.approx(5.05)
    text = markdown(study, summarise(study, rows), rows)
    assert "on the held-out test split's loss" in text and "| test loss (mean ± std) |" in text
