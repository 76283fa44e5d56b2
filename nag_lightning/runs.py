"""One loader of configs and finished runs, shared by every subcommand that is not a Trainer call
(``bench``, ``skip-sweep``, ``generate``): configs go through the same LightningCLI parser as ``nag fit``;
a checkpoint carries its model, its data module's arguments and its training precision."""

from __future__ import annotations

import sys
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import torch

from nag_lightning.data import TokenShardDataModule
from nag_lightning.errors import NagError
from nag_lightning.lightning_cli import NagCLI
from nag_lightning.lit_module import LanguageModel
from nag_lightning.precision import precision_on_this_machine


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
    args += list(overrides or []) + ["--trainer.logger=false", "--trainer.callbacks=[]"]
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
