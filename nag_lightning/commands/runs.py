"""One loader of configs and finished runs, shared by every subcommand that is not a Trainer call
(``bench``, ``skip-sweep``, ``generate``): configs go through the same LightningCLI parser as ``nag fit``;
a checkpoint carries its model, its data module's arguments and its training precision."""

from __future__ import annotations

import logging
import math
import sys
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import torch
from lightning.fabric import Fabric
from lightning_utilities.core import rank_zero
from torchmetrics import MeanMetric

from nag_lightning.data import TokenShardDataModule
from nag_lightning.errors import NagError
from nag_lightning.lightning.cli import NagCLI, with_composed_configs
from nag_lightning.lightning.lit_module import LanguageModel
from nag_lightning.lightning.precision import precision_on_this_machine


@dataclass
class Loaded:
    model: Any  # LanguageModel
    datamodule: Any  # TokenShardDataModule
    precision: str  # the Trainer precision the run used, e.g. "bf16-mixed"
    tokenizer: str | None = None  # the tokenizer's JSON, when the checkpoint carries it


@contextmanager
def _parsing_only_these_arguments() -> Iterator[None]:
    """LightningCLI warns when it is handed arguments while sys.argv holds others; here the
    arguments are the ones meant, so it sees none on sys.argv while it parses."""
    saved = sys.argv
    sys.argv = saved[:1]
    try:
        yield
    finally:
        sys.argv = saved


def instantiate(config_files: list[str], overrides: list[str] | None = None) -> Loaded:
    """Model, data module and precision of configs composed like repeated ``--config`` (no Trainer run)."""
    args = []
    for path in config_files:
        if not Path(path).is_file():
            raise NagError(f"config file {path!r} does not exist.")
        args += ["--config", path]
    args = with_composed_configs(args) + list(overrides or []) + ["--trainer.logger=false", "--trainer.callbacks=[]"]
    with _parsing_only_these_arguments():
        cli = NagCLI(run=False, args=args, save_config_callback=None)
    return Loaded(cli.model, cli.datamodule, str(cli.trainer.precision))


def load_run(ckpt_path: str | Path, config: str | Path | None = None, data_dir: str | None = None) -> Loaded:
    """A finished run from its checkpoint: the model (weights, thresholds, counters) from the
    checkpoint; the data module and precision from the checkpoint too, or from ``config`` (a run's
    ``config.yaml``) when given; ``data_dir`` overrides where the dataset is."""
    ckpt_path = Path(ckpt_path)
    if not ckpt_path.is_file():
        raise NagError(f"checkpoint {ckpt_path} does not exist (a single-file checkpoint is needed; consolidate an "
                       "FSDP2 folder first, see the README).")
    checkpoint = torch.load(ckpt_path, map_location="cpu", weights_only=False)
    model = LanguageModel(**_arguments(checkpoint["hyper_parameters"]))
    model.load_state_dict(checkpoint["state_dict"])
    model.on_load_checkpoint(checkpoint)
    if config is not None:
        loaded = instantiate([str(config)])
        data_args, precision = _arguments(loaded.datamodule.hparams), loaded.precision
    elif "datamodule_hyper_parameters" in checkpoint:
        data_args = _arguments(checkpoint["datamodule_hyper_parameters"])
        precision = precision_on_this_machine(checkpoint.get("precision", "32-true"))
    else:
        raise NagError(f"{ckpt_path} does not record its data module (it predates that); pass --config RUN/config.yaml.")
    if data_dir is not None:
        data_args["data_dir"] = data_dir
    return Loaded(model, TokenShardDataModule(**data_args), precision, checkpoint.get("tokenizer"))


def _arguments(hparams) -> dict[str, Any]:
    """Saved hyperparameters as constructor arguments (LightningCLI adds private keys such as ``_class_path``)."""
    return {key: value for key, value in dict(hparams).items() if not key.startswith("_")}


def single_device_fabric(precision: str) -> Fabric:
    """The one Fabric of the commands that run a model outside a Trainer (bench, generate,
    skip-sweep, inspect): one device, chosen automatically, at ``precision``. Fabric announces the
    precision and the accelerators at info level, which is not these commands' output. (Lightning
    points the shared rank-zero logger at its own, so it is looked up where the messages go.)"""
    log = rank_zero.log
    level = log.level
    log.setLevel(logging.WARNING)
    try:
        return Fabric(accelerator="auto", devices=1, precision=precision)
    finally:
        log.setLevel(level)


def validation_batches(loaded: Loaded, fabric: Fabric, count: int | None = None) -> list[torch.Tensor]:
    """The first ``count`` (default: all) validation batches of a run's dataset, on the Fabric's device."""
    data = loaded.datamodule
    data.setup("validate")
    batches = []
    for batch in data.val_dataloader():
        if count is not None and len(batches) == count:
            break
        batches.append(fabric.to_device(batch).long())
    if not batches:
        raise NagError(f"the validation split of {data.data_dir} yielded no batch.")
    return batches


@torch.no_grad()
def evaluate_batches(model, batches: list[torch.Tensor], fabric: Fabric, bytes_per_token: float) -> dict:
    """The one evaluation loop of a finished run (skip-sweep, inspect, study): ``model`` (a
    ``LanguageModel`` set up by ``fabric``) on ``batches`` at the Fabric's precision. ``loss`` is
    the mean over tokens, weighted as ``LanguageModel``'s validation weights it (so the numbers
    agree with ``nag validate``), ``bpb`` its bits per byte, ``skip_rate`` the share of (token,
    sub-layer) pairs skipped and ``forward_flops_per_token`` the executed forward FLOPs."""
    loss, skipped = MeanMetric(), MeanMetric()
    flops = tokens = 0
    for batch in batches:
        with fabric.autocast():
            batch_loss, output = model.loss(batch, return_output=True)
        batch_size, seq = batch.shape[0], batch.shape[1] - 1
        stats = output.record.stats() if output.record.skipped_any else None
        loss.update(batch_loss.float().cpu(), weight=batch_size * seq)
        skipped.update(0.0 if stats is None else stats.skip_rate.float().cpu(), weight=batch_size * seq)
        flops += model.model.forward_flops(batch_size, seq, stats)[0].item()
        tokens += batch_size * seq
    mean_loss = loss.compute().item()
    return {"loss": mean_loss, "bpb": mean_loss / math.log(2) / bytes_per_token, "skip_rate": skipped.compute().item(),
            "forward_flops_per_token": flops / tokens, "tokens": tokens}
