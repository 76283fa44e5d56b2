"""The ``nag`` command: LightningCLI's fit/validate/test/predict, plus ``prepare`` and ``bench``."""

from __future__ import annotations

import os
import sys
import time

from nag_lightning.errors import NagError

USAGE = """usage: nag {fit,validate,test,predict,prepare,bench,skip-sweep} ...

  fit        train a model:                 nag fit --config configs/quickstart.yaml
  validate   evaluate a checkpoint:         nag validate --config RUN/config.yaml --ckpt_path RUN/checkpoints/last.ckpt
  test       same, logged under test/:      nag test --config RUN/config.yaml --ckpt_path ...
  predict    sample continuations of validation blocks from a checkpoint
  prepare    tokenize a corpus into streaming shards:  nag prepare --output data/stdlib-bpe8192 --corpus stdlib
  bench      time training steps of configs:           nag bench configs/quickstart.yaml configs/baseline.yaml
  skip-sweep accuracy vs compute of a NAG checkpoint:  nag skip-sweep --ckpt_path RUN/checkpoints/last.ckpt

`nag SUBCOMMAND --help` shows a subcommand's options."""


def build_cli_class():
    from lightning.pytorch.cli import LightningCLI

    class NagCLI(LightningCLI):
        def before_instantiate_classes(self) -> None:
            # Checked here because jsonargparse folds errors raised while instantiating into its own
            # union-type message, where the field names get lost.
            from nag_lightning.model import ModelConfig

            config = self.config[self.subcommand] if self.subcommand else self.config
            model_config = config.get("model.init_args.config")
            if model_config is not None:
                ModelConfig(**model_config.as_dict()).validate()
            check_distributed_settings(config)

        def before_fit(self) -> None:
            self._fit_started = time.perf_counter()

        def after_fit(self) -> None:
            trainer, model = self.trainer, self.model
            if trainer.interrupted:
                return
            if "val/loss" not in trainer.callback_metrics:  # every rank: validation is collective
                trainer.validate(model, datamodule=self.datamodule, verbose=False)
            run_dir = trainer.log_dir  # a broadcast under DDP, so every rank asks
            if not trainer.is_global_zero:
                return
            metrics = trainer.callback_metrics
            val_loss = metrics.get("val/loss")
            val_bpb = metrics.get("val/bpb")
            print(
                f"nag fit done: val_loss {float(val_loss):.4f} | val_bpb "
                f"{float(val_bpb) if val_bpb is not None else float('nan'):.4f} | tokens {model.tokens_seen:,} | "
                f"wall {time.perf_counter() - self._fit_started:.1f}s | steps {trainer.global_step} | "
                f"{self.mod_summary(model)}run {run_dir}",
                flush=True,
            )

        @staticmethod
        def mod_summary(model) -> str:
            """Skip rate and executed FLOPs, for runs that skipped sub-layers."""
            residual = model.model.residual
            if not getattr(residual, "skipping", False):
                return ""
            realized = 1.0 - residual.executed_fraction.mean().item()
            return (f"skip_rate {realized:.3f} (target {model.mod_target_rate:.3f}) | "
                    f"executed_flops {model.executed_flops_total:.3e} | ")

        def after_predict(self) -> None:
            if not self.trainer.is_global_zero:
                return
            for batch in self.trainer.predict_loop.predictions or []:
                for sample in batch:
                    print(f"--- prompt ---\n{sample['prompt']}\n--- continuation ---\n{sample['continuation']}\n")

    return NagCLI


def _device_count(accelerator: str, devices) -> int | None:
    """How many processes per node ``trainer.devices`` asks for, where that can be told from the config."""
    import torch

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
    """Clear errors for distributed misconfigurations, and the gradient accumulation a global batch implies."""
    import torch

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
    data = config.get("data.init_args")
    global_batch = data.get("global_batch_size") if data is not None else None
    if global_batch and ranks:
        per_step = ranks * data.batch_size
        if global_batch % per_step:
            raise NagError(
                f"data.global_batch_size={global_batch} is not divisible by ranks x micro-batch = {ranks} x "
                f"{data.batch_size} = {per_step}. Choose a global batch that is a multiple of {per_step}, or change "
                "data.batch_size / trainer.devices / trainer.num_nodes."
            )
        trainer.accumulate_grad_batches = global_batch // per_step


def run_lightning_cli(args: list[str] | None) -> None:
    from nag_lightning.data import TokenShardDataModule
    from nag_lightning.lit_module import LanguageModel

    build_cli_class()(
        LanguageModel,
        TokenShardDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        args=args,
        save_config_kwargs={"overwrite": True},
        auto_configure_optimizers=False,
    )
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        # An orderly shutdown: a process group left to the interpreter's exit can abort in gloo's threads.
        dist.barrier()
        dist.destroy_process_group()


def keep_large_allocations_mapped() -> None:
    """Stop glibc from returning large blocks to the OS after every step.

    Above its mmap threshold glibc maps and page-faults each large tensor afresh (the LM head's
    logits hit this every step); raising the thresholds cut CPU step times by 6-33% in measurements.
    A no-op where glibc is not the C library.
    """
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return
    m_trim_threshold, m_mmap_threshold = -1, -3
    mallopt(m_mmap_threshold, 1 << 30)
    mallopt(m_trim_threshold, 2**31 - 1)


def main(argv: list[str] | None = None) -> None:
    from_command_line = argv is None
    argv = list(sys.argv[1:] if from_command_line else argv)
    keep_large_allocations_mapped()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "true")
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        if not argv:
            sys.exit(2)
        return
    try:
        if argv[0] == "prepare":
            from nag_lightning.data.preparation import main as prepare_main

            prepare_main(argv[1:])
        elif argv[0] == "skip-sweep":
            from nag_lightning.skip_sweep import main as sweep_main

            sweep_main(argv[1:])
        elif argv[0] == "bench":
            from nag_lightning.bench import main as bench_main

            bench_main(argv[1:])
        else:
            run_lightning_cli(None if from_command_line else argv)  # None: LightningCLI reads sys.argv
    except NagError as error:
        print(f"nag: error: {error}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
