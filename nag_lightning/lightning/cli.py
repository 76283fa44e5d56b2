"""``NagCLI``: LightningCLI for ``nag fit/validate/test/predict``, and the checks it runs before
building anything. ``commands/runs.py`` uses the same parser to load configs for the other subcommands."""

from __future__ import annotations

import json
import os
import shutil
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
import yaml
from lightning.pytorch.callbacks import ProgressBar
from lightning.pytorch.cli import LightningCLI

from nag_lightning.data import TokenShardDataModule, remote
from nag_lightning.data.preparation import META_FILE, read_meta
from nag_lightning.errors import NagError
from nag_lightning.lightning.config_errors import CONFIG_FLAGS, refused_setting
from nag_lightning.lightning.dashboard import TensorBoardLogger, first_screen_url
from nag_lightning.lightning.guards import AtomicCheckpointIO
from nag_lightning.lightning.lit_module import LanguageModel
from nag_lightning.lightning.precision import announce, resolve_precision
from nag_lightning.lightning.progress import TokensProgressBar
from nag_lightning.model import ModelConfig
from nag_lightning.reporting import write_atomically

FIT_HELP_PREAMBLE = """\
nag fit: train a model. The options that matter most (all settable in YAML, later --config wins):
  --config FILE                      a config: configs/quickstart.yaml, configs/nag.yaml, overlays under configs/
  --model.init_args.config.*         the model (ModelConfig: d_model, n_layers, residual, kernels, ...)
  --model.init_args.learning_rate    and the other LanguageModel options (compile, activation_checkpointing, ...)
  --data.init_args.data_dir DIR      a `nag prepare` folder (built from data.init_args.corpus when missing)
  --trainer.max_steps N, --trainer.devices N, --trainer.precision P, --trainer.callbacks+=CLASS
  --ckpt_path PATH                   resume from a checkpoint (exactly: data position, MoD state, counters)
  --print_config                     print the fully resolved config and exit
Every option, Lightning's Trainer flags included, follows.
"""


class NagTrainer(pl.Trainer):
    """Lightning's Trainer with ``precision: auto`` (the default): the precision this machine runs
    fastest (``precision.py``), said in one line. An explicit precision is kept; bf16 on a CPU
    that would emulate it gets a warning with the measured slowdown. Its progress bar is
    ``TokensProgressBar`` (tokens/s) unless one is given or the bar is off: Lightning's own default
    turns into its Rich bar wherever ``rich`` happens to be installed (transformers brings it)."""

    def __init__(self, *args, precision: str | int | None = "auto", **kwargs) -> None:
        if precision is not None:
            resolved, line = resolve_precision(precision, kwargs.get("accelerator", "auto"))
            announce(line, warning=str(precision) != "auto")
            precision = resolved
        callbacks = kwargs.get("callbacks")
        callbacks = [] if callbacks is None else list(callbacks) if isinstance(callbacks, (list, tuple)) else [callbacks]
        if kwargs.get("enable_progress_bar") is not False and not any(isinstance(c, ProgressBar) for c in callbacks):
            kwargs["callbacks"] = [*callbacks, TokensProgressBar()]
        super().__init__(*args, precision=precision, **kwargs)

    def fit(self, model: pl.LightningModule, train_dataloaders: Any = None, val_dataloaders: Any = None,
            datamodule: pl.LightningDataModule | None = None, ckpt_path: str | Path | None = None,
            weights_only: bool | None = None) -> None:
        # A fit refused before its first step also removes the run folder it had started.
        try:
            super().fit(model, train_dataloaders, val_dataloaders, datamodule, ckpt_path, weights_only)
        except NagError:
            if self.global_step == 0 and not ckpt_path and self.is_global_zero:
                self._remove_unused_run_folder()
            raise

    fit.__doc__ = pl.Trainer.fit.__doc__  # LightningCLI builds `nag fit --help` from it

    def _remove_unused_run_folder(self) -> None:
        """A fit that failed its input checks before its first step leaves no run folder behind
        (the logger and the saved config had already made it: config, hyperparameters, an empty
        event file)."""
        for logger in self.loggers:
            folder = Path(getattr(logger, "log_dir", None) or "")
            if not str(folder) or not folder.is_dir():
                continue
            if all(p.is_file() and (p.name in ("config.yaml", "hparams.yaml") or p.name.startswith("events.out.tfevents."))
                   for p in folder.iterdir()):
                shutil.rmtree(folder, ignore_errors=True)
                try:
                    folder.parent.rmdir()  # the run name's folder, if this was its only version
                except OSError:
                    pass


class NagCLI(LightningCLI):
    def __init__(self, *args, **kwargs) -> None:
        kwargs.setdefault("trainer_class", NagTrainer)
        kwargs.setdefault("subclass_mode_model", True)
        kwargs.setdefault("subclass_mode_data", True)
        kwargs.setdefault("auto_configure_optimizers", False)
        given = kwargs.get("args")
        # The settings as typed, for one-line errors (config_errors.py); none for a dict or namespace.
        self._given_args = sys.argv[1:] if given is None else list(given) if isinstance(given, (list, tuple)) else []
        super().__init__(LanguageModel, TokenShardDataModule, *args, **kwargs)

    def before_instantiate_classes(self) -> None:
        if getattr(self, "_hidden_ckpt_path", None) is not None:  # see parse_arguments
            self.config[self.subcommand].ckpt_path = self._hidden_ckpt_path
        # Checked here because jsonargparse folds errors raised while instantiating into its own
        # union-type message, where the field names get lost.
        config = self.config[self.subcommand] if self.subcommand else self.config
        model_config = config.get("model.init_args.config")
        if model_config is not None:
            ModelConfig(**model_config.as_dict()).validate()
        check_distributed_settings(config)
        if self.subcommand:  # not for `nag bench`, which loads configs to time them on synthetic tokens
            check_dataset(config)
        if self.subcommand in ("validate", "test", "predict"):
            evaluate_in_the_run_folder(config, self.subcommand)
            self.save_config_callback = None  # never overwrite the run's config.yaml with this command's

    def init_parser(self, **kwargs):
        parser = super().init_parser(**kwargs)  # the root parser and each subcommand's
        shout = parser.error

        def error(message, *args, **kwargs):
            refused = refused_setting(self._given_args)
            if refused:  # first, above the usage text that jsonargparse prints before its message
                print(f"nag: error: {refused}", file=sys.stderr)
            return shout(message, *args, **kwargs)

        parser.error = error
        return parser

    def instantiate_classes(self) -> None:
        try:
            super().instantiate_classes()
        except (ValueError, TypeError) as error:
            # A class the config names refused its arguments (e.g. SkipRateSchedule(target_rate=1.0)):
            # jsonargparse folds that message into a long union-type traceback; say it alone.
            ours = raised_by_this_package(error)
            if ours is None:
                raise
            raise NagError(f"{ours} (building what the config names; fix that value in the config or on the "
                           "command line)") from error

    def parse_arguments(self, parser, args) -> None:
        """``--ckpt_path`` with a config: the checkpoint's architecture must be the config's (an
        error names the differing fields), and the config's model settings (learning rate,
        schedule, kernels) apply. Without ``--config``, the checkpoint's own settings are taken,
        as LightningCLI does. With a config, LightningCLI would next replace the config's model
        with the checkpoint's hyperparameters (explicit overrides included, and without the
        upgrades ``ModelConfig.from_dict`` gives older checkpoints), so the path is hidden from
        it until ``before_instantiate_classes``."""
        super().parse_arguments(parser, args)
        self._hidden_ckpt_path = None
        subcommand = self.config.get("subcommand")
        ckpt_path = self.config[subcommand].get("ckpt_path") if subcommand else None
        if not ckpt_path or str(ckpt_path) in ("last", "best", "hpc") or str(ckpt_path).startswith("registry") \
                or "://" in str(ckpt_path):
            return  # Lightning's own names for checkpoints it finds, and remote paths: Lightning resolves them
        if not Path(ckpt_path).exists():
            raise NagError(f"--ckpt_path {ckpt_path} does not exist.")
        if not Path(ckpt_path).is_file():
            return  # a sharded (FSDP2) checkpoint folder: Lightning loads it under the run's config
        saved = read_checkpoint_hyperparameters(ckpt_path).get("config")
        if not self.config[subcommand].get("config") or saved is None:
            return
        differing = architecture_differences(self.config[subcommand].get("model.init_args.config"), saved)
        if differing:
            raise NagError(
                f"--ckpt_path {ckpt_path} holds a different model than the config: "
                + "; ".join(f"model.init_args.config.{field}: checkpoint {old!r}, config {new!r}"
                            for field, old, new in differing)
                + ". Pass the run's own config (RUN/config.yaml) with the checkpoint, or change those fields back.")
        self._hidden_ckpt_path, self.config[subcommand].ckpt_path = ckpt_path, None

    def instantiate_trainer(self, **kwargs):
        trainer = super().instantiate_trainer(**kwargs)
        from lightning.pytorch.plugins.io import TorchCheckpointIO

        data = self.datamodule
        if isinstance(data, TokenShardDataModule) and data.global_batch_size:
            # The launcher, not the data module, sets the trainer: the global batch fixes the
            # accumulation once the ranks are known (the Trainer knows them).
            trainer.accumulate_grad_batches = data.accumulation(trainer.world_size, trainer.accumulate_grad_batches)
        if type(trainer.strategy.checkpoint_io) is TorchCheckpointIO:  # Lightning's default, not the user's choice
            trainer.strategy.checkpoint_io = AtomicCheckpointIO()
        if self.subcommand == "predict" and trainer.limit_predict_batches in (None, 1.0):
            # A few prompts by default: one batch of validation blocks. The Trainer's flag reads "1"
            # as 1.0 (its type is float | int), which Lightning takes as 100%: the whole split,
            # minutes of sampling. For predict, 1.0 means one batch too (set here: the parser
            # would turn an int back into 1.0).
            trainer.limit_predict_batches = 1
        return trainer

    def before_fit(self) -> None:
        self._fit_started = time.perf_counter()
        logger = self.trainer.logger
        if isinstance(logger, TensorBoardLogger) and self.trainer.is_global_zero:
            print(f"TensorBoard: tensorboard --logdir {logger.save_dir}, then {first_screen_url()} opens with the "
                  "loss curves pinned", flush=True)

    def after_fit(self) -> None:
        trainer, model = self.trainer, self.model
        if trainer.interrupted:
            return
        # The summary is the final model's: validated again unless the last validation was at the
        # last step (every rank: validation is collective).
        training_metrics = dict(trainer.callback_metrics)  # a validation run replaces them
        if "val/loss" not in trainer.callback_metrics or model.validated_at_step != trainer.global_step:
            trainer.validate(model, datamodule=self.datamodule, verbose=False)
        validation_metrics = dict(trainer.callback_metrics)  # a test run replaces them
        data = self.datamodule
        if isinstance(data, TokenShardDataModule) and data.test_fraction:  # the held-out test split too
            validation_skip = model.evaluation_skip  # the summary's skip rate stays validation's
            trainer.test(model, datamodule=data, verbose=False)
            model.evaluation_skip = validation_skip
        run_dir = trainer.log_dir  # a broadcast under DDP, so every rank asks
        if not trainer.is_global_zero:
            return
        metrics = {**training_metrics, **validation_metrics, **trainer.callback_metrics}
        val_loss = metrics.get("val/loss")
        val_bpb = metrics.get("val/bpb")
        wall = time.perf_counter() - self._fit_started
        test_loss = metrics.get("test/loss")

        def number(value) -> float:  # nan where no validation ran (limit_val_batches: 0)
            return float("nan") if value is None else float(value)

        print(
            f"nag fit done: val_loss {number(val_loss):.4f} | val_bpb {number(val_bpb):.4f} | "
            f"{'' if test_loss is None else f'test_loss {float(test_loss):.4f} | '}tokens {model.tokens_seen:,} | "
            f"wall {wall:.1f}s | steps {trainer.global_step} | "
            f"{mod_summary(model)}run {run_dir}",
            flush=True,
        )
        if trainer.logger is not None and run_dir is not None:
            write_atomically(Path(run_dir) / "result.json", json.dumps(run_result(model, metrics, wall), indent=2))

    def after_predict(self) -> None:
        if not self.trainer.is_global_zero:
            return
        for batch in self.trainer.predict_loop.predictions or []:
            for sample in batch:
                print(f"--- prompt ---\n{sample['prompt']}\n--- continuation ---\n{sample['continuation']}\n")


def check_dataset(config) -> None:
    """A missing or damaged dataset folder is reported before the Trainer creates a run folder
    (unless ``prepare_data`` is to build it from ``data.init_args.corpus``)."""
    data = config.get("data")
    init_args = getattr(data, "init_args", None)
    data_dir = None if init_args is None else init_args.get("data_dir")
    if data_dir is None:
        return
    if remote.is_remote(data_dir):  # the bucket answers, with a complete dataset unless corpus is to build one
        if init_args.get("corpus"):
            remote.check_bucket(data_dir)
        else:
            folder = remote.cache_folder(data_dir, init_args.get("cache_dir")) / "meta"
            read_meta(remote.fetch_small_files(data_dir, folder), check_shards=False)
        return
    if (Path(data_dir) / META_FILE).is_file() or not init_args.get("corpus"):
        read_meta(data_dir)


def raised_by_this_package(error: BaseException) -> str | None:
    """The message of the first error in ``error``'s chain raised by nag_lightning's own code, or
    a configuration Lightning refused (``MisconfigurationException``, e.g. a ModelCheckpoint
    with save_top_k but no monitor)."""
    import traceback

    from lightning.pytorch.utilities.exceptions import MisconfigurationException

    package = str(Path(__file__).resolve().parents[1])  # the nag_lightning package folder
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        frames = traceback.extract_tb(error.__traceback__)
        if frames and frames[-1].filename.startswith(package) and isinstance(error, (ValueError, TypeError, NagError)):
            return str(error)
        if isinstance(error, MisconfigurationException):
            return str(error).strip().splitlines()[0]
        error = error.__cause__ or error.__context__
    return None


def read_checkpoint_hyperparameters(ckpt_path: str | Path) -> dict:
    """A Lightning checkpoint's ``hyper_parameters``; a clear error for a file that is not one."""
    try:
        checkpoint = torch.load(ckpt_path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as error:  # truncated zip, not a pickle, a foreign object: all mean "not a checkpoint"
        raise NagError(f"--ckpt_path {ckpt_path} is not a readable checkpoint (truncated, or not a file that "
                       f"`nag fit` wrote): {type(error).__name__}: {str(error).splitlines()[0][:200]}") from None
    if not isinstance(checkpoint, dict) or "state_dict" not in checkpoint:
        raise NagError(f"--ckpt_path {ckpt_path} is not a Lightning checkpoint (no state_dict in it).")
    return checkpoint.get("hyper_parameters") or {}


# Settings that change how a model runs, not its weights: a checkpoint may be resumed or evaluated with others.
_RUNTIME_FIELDS = {"kernels", "dropout"}
_RUNTIME_SKIP_FIELDS = {"mode", "rule", "capacity_factor", "execution"}
_RUNTIME_RESIDUAL_ARGS = {"direction_dtype"}  # how a lane is stored, not what the weights mean


def architecture_differences(config, saved: dict) -> list[tuple[str, Any, Any]]:
    """(field, checkpoint's value, config's value) for each architecture field that differs."""
    given = ModelConfig(**config.as_dict()).to_dict() if hasattr(config, "as_dict") else ModelConfig.from_dict(config).to_dict()
    saved = ModelConfig.from_dict(saved).to_dict()
    differing = [(field, saved.get(field), given.get(field)) for field in sorted(given.keys() | saved.keys())
                 if field not in _RUNTIME_FIELDS | {"residual", "skip"} and given.get(field) != saved.get(field)]
    old_skip, new_skip = saved.get("skip") or {}, given.get("skip") or {}
    differing += [(f"skip.{name}", old_skip.get(name), new_skip.get(name)) for name in sorted(old_skip.keys() | new_skip.keys())
                  if name not in _RUNTIME_SKIP_FIELDS and old_skip.get(name) != new_skip.get(name)]
    old_residual, new_residual = saved["residual"], given["residual"]
    if old_residual["class_path"] != new_residual["class_path"]:
        differing.append(("residual", old_residual["class_path"], new_residual["class_path"]))
    else:
        old_args, new_args = old_residual["init_args"], new_residual["init_args"]
        differing += [(f"residual.init_args.{name}", old_args.get(name), new_args.get(name))
                      for name in sorted(old_args.keys() | new_args.keys())
                      if name not in _RUNTIME_RESIDUAL_ARGS and old_args.get(name) != new_args.get(name)]
    return differing


def run_result(model, metrics, wall_s: float) -> dict:
    """What a finished fit measured, for tools that compare runs (``nag study``): ``RUN/result.json``."""
    def value(name):
        found = metrics.get(name)
        return None if found is None else float(found)

    skipped = model.evaluation_skip or model.training_skip  # the final validation's; without one, the last batch's
    result = {"val_loss": value("val/loss"), "val_bpb": value("val/bpb"), "test_loss": value("test/loss"),
              "test_bpb": value("test/bpb"), "norm_growth": value("residual/norm_growth"),
              "tokens": model.tokens_seen, "steps": model.global_step, "wall_s": wall_s,
              "executed_flops": model.executed_flops_total, "target_skip_rate": float(model.mod_target_rate),
              "skip_rate": 0.0, "skip_rate_per_layer": None, "executed_sublayers_std": None,
              "depth_histogram": None}
    if skipped is not None:
        result["skip_rate"] = skipped.skip_rate.item()
        result["skip_rate_per_layer"] = (1.0 - skipped.executed_fraction).tolist()
        if skipped.depth_histogram is not None:  # tokens that ran 0, 1, ..., n sub-layers: depth's adaptivity
            result["executed_sublayers_std"] = skipped.executed_sublayers_std.item()
            result["depth_histogram"] = [int(count) for count in skipped.depth_histogram.tolist()]
    return result


def mod_summary(model) -> str:
    """Skip rate and executed FLOPs, for runs that skipped sub-layers."""
    skipped = model.evaluation_skip or model.training_skip
    if skipped is None:
        return ""
    realized = skipped.skip_rate.item()  # the final validation's; without one, the last training batch's
    return (f"skip_rate {realized:.3f} (target {model.mod_target_rate:.3f}) | "
            f"executed_flops {model.executed_flops_total:.3e} | ")


def evaluate_in_the_run_folder(config, subcommand: str) -> None:
    """``nag validate/test/predict --ckpt_path RUN/checkpoints/X.ckpt``: no new run folder. Metrics
    of validate and test go to the run's own TensorBoard folder, predict logs nothing, and no
    checkpoint callback runs (it would warn that its folder changed)."""
    trainer = config.trainer
    callbacks = trainer.get("callbacks") or []
    trainer.callbacks = [c for c in callbacks if not str(getattr(c, "class_path", "")).endswith("ModelCheckpoint")]
    trainer.enable_checkpointing = False
    if subcommand == "predict":
        trainer.logger = False
        return
    logger = trainer.get("logger")
    ckpt_path = config.get("ckpt_path")
    if ckpt_path is None or not str(getattr(logger, "class_path", "")).endswith("TensorBoardLogger"):
        return
    run = Path(ckpt_path).resolve().parent.parent
    if not (run / "config.yaml").is_file() and not any(run.glob("events.out.tfevents.*")):
        return  # not a run folder of ours: leave the logger as configured
    logger.init_args.save_dir = str(run.parent.parent)
    logger.init_args.name = run.parent.name
    logger.init_args.version = run.name


def _device_count(accelerator: str, devices) -> int | None:
    """How many processes per node ``trainer.devices`` asks for, where that can be told from the config."""
    uses_gpu = accelerator in ("gpu", "cuda") or (accelerator == "auto" and torch.cuda.is_available())
    if isinstance(devices, (list, tuple)):
        return len(devices)
    if isinstance(devices, str) and devices.strip().lstrip("-").isdigit():
        devices = int(devices)
    if devices == "auto":
        return torch.cuda.device_count() if uses_gpu else 1
    if devices == -1:
        return torch.cuda.device_count() if uses_gpu else None
    return devices if isinstance(devices, int) else None


def check_distributed_settings(config) -> None:
    """Clear errors for distributed misconfigurations; FSDP2's data-parallel size from the ranks."""
    trainer = config.trainer
    accelerator = str(trainer.get("accelerator") or "auto")
    strategy = trainer.get("strategy")
    strategy_name = strategy if isinstance(strategy, str) else str(getattr(strategy, "class_path", ""))
    uses_gpu = accelerator in ("gpu", "cuda") or (accelerator == "auto" and torch.cuda.is_available())
    if not uses_gpu and (strategy_name.startswith("fsdp") or strategy_name.endswith(".FSDPStrategy")):
        raise NagError(
            f"trainer.strategy={strategy_name!r} is FSDP1, which does not run on CPUs. Use FSDP2 instead: "
            "--config configs/strategy/fsdp.yaml (ModelParallelStrategy + fully_shard), which runs on CPUs and GPUs."
        )
    devices = _device_count(accelerator, trainer.get("devices", "auto"))
    available = torch.cuda.device_count() if uses_gpu else os.cpu_count()
    if devices is not None and devices > available:
        kind = "GPUs" if uses_gpu else "CPU cores"
        raise NagError(f"trainer.devices={devices} asks for more devices than this machine has ({available} {kind}). "
                       f"Lower --trainer.devices, or add nodes with --trainer.num_nodes.")
    ranks = devices * int(trainer.get("num_nodes") or 1) if devices else None
    init_args = getattr(strategy, "init_args", None)
    if strategy_name.endswith("ModelParallelStrategy") and init_args is not None and ranks:
        # Pure FSDP2: every rank is a data-parallel shard. Lightning's "auto" would instead put the
        # devices of a node on the tensor-parallel axis.
        if init_args.get("data_parallel_size") == "auto" and init_args.get("tensor_parallel_size") == 1:
            init_args.data_parallel_size = ranks


def with_composed_configs(args: list[str]) -> list[str]:
    """``--config FILE`` whose top-level ``config:`` lists other config files (paths relative to
    FILE's folder) becomes ``--config`` for each of them, in order and recursively, then FILE: a
    shipped config composes its overlays exactly as repeated ``--config`` does (later wins, lists
    replaced whole) instead of copying them. jsonargparse skips a list under that key; a single
    path there it would nest itself, with other merge rules, so that form is refused."""
    expanded: list[str] = []
    index = 0
    while index < len(args):
        flag, equals, value = args[index].partition("=")
        if flag in CONFIG_FLAGS and (equals or index + 1 < len(args)):
            if not equals:
                index += 1
                value = args[index]
            expanded += [option for path in _composition(Path(value), ()) for option in ("--config", str(path))]
        else:
            expanded.append(args[index])
        index += 1
    return expanded


def _composition(path: Path, including: tuple[Path, ...]) -> list[Path]:
    """``path``'s bases (its ``config:`` list, each composed the same way), then ``path``."""
    if path.resolve() in including:
        chain = " -> ".join(str(p) for p in (*including, path.resolve()))
        raise NagError(f"config files include each other in a circle: {chain}. Remove one of those `config:` entries.")
    if not path.is_file():
        return [path]  # a YAML string, or a missing file: jsonargparse reads or reports it as without us
    try:
        content = yaml.safe_load(path.read_text())
    except yaml.YAMLError:
        return [path]  # jsonargparse reports the syntax error with the file's name
    bases = content.get("config") if isinstance(content, dict) else None
    if bases is None:
        return [path]
    if not isinstance(bases, list) or not all(isinstance(base, str) for base in bases):
        raise NagError(f"{path}: `config:` must be a list of config files, e.g. `config: [{bases}]` "
                       f"(relative to {path.parent}), got {bases!r}.")
    composed: list[Path] = []
    for base in bases:
        base_path = Path(base) if Path(base).is_absolute() else path.parent / base
        if not base_path.is_file():
            raise NagError(f"{path} lists {base!r} under `config:`, which is not a file ({base_path}).")
        composed += _composition(base_path, (*including, path.resolve()))
    return [*composed, path]


def run_lightning_cli(args: list[str] | None) -> None:
    shown = sys.argv[1:] if args is None else args
    if shown and shown[0] == "fit" and any(a in ("-h", "--help") for a in shown[1:]):
        print(FIT_HELP_PREAMBLE)
    composed = with_composed_configs(shown)
    with warnings.catch_warnings():
        # Handed the composed arguments while sys.argv holds the typed ones, LightningCLI warns that
        # the two differ: meant here. sys.argv stays as typed: DDP launches its ranks from it.
        warnings.filterwarnings("ignore", message=r"LightningCLI's args parameter is intended")
        NagCLI(args=args if composed == shown else composed, save_config_kwargs={"overwrite": True})
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        # An orderly shutdown: a process group left to the interpreter's exit can abort in gloo's threads.
        dist.barrier()
        dist.destroy_process_group()
