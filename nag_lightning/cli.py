"""The ``nag`` command: LightningCLI's fit/validate/test/predict, plus ``prepare`` and ``bench``."""

from __future__ import annotations

import os
import sys
import time

from nag_lightning.errors import NagError

USAGE = """usage: nag {fit,validate,test,predict,prepare,bench} ...

  fit        train a model:                 nag fit --config configs/quickstart.yaml
  validate   evaluate a checkpoint:         nag validate --config RUN/config.yaml --ckpt_path RUN/checkpoints/last.ckpt
  test       same, logged under test/:      nag test --config RUN/config.yaml --ckpt_path ...
  predict    sample continuations of validation blocks from a checkpoint
  prepare    tokenize a corpus into streaming shards:  nag prepare --output data/stdlib-bpe8192 --corpus stdlib
  bench      time training steps of configs:           nag bench configs/quickstart.yaml configs/baseline.yaml

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

        def before_fit(self) -> None:
            self._fit_started = time.perf_counter()

        def after_fit(self) -> None:
            trainer, model = self.trainer, self.model
            if not trainer.is_global_zero or trainer.interrupted:
                return
            if "val/loss" not in trainer.callback_metrics:
                trainer.validate(model, datamodule=self.datamodule, verbose=False)
            metrics = trainer.callback_metrics
            val_loss = metrics.get("val/loss")
            val_bpb = metrics.get("val/bpb")
            print(
                f"nag fit done: val_loss {float(val_loss):.4f} | val_bpb "
                f"{float(val_bpb) if val_bpb is not None else float('nan'):.4f} | tokens {model.tokens_seen:,} | "
                f"wall {time.perf_counter() - self._fit_started:.1f}s | steps {trainer.global_step} | "
                f"run {trainer.log_dir}",
                flush=True,
            )

        def after_predict(self) -> None:
            if not self.trainer.is_global_zero:
                return
            for batch in self.trainer.predict_loop.predictions or []:
                for sample in batch:
                    print(f"--- prompt ---\n{sample['prompt']}\n--- continuation ---\n{sample['continuation']}\n")

    return NagCLI


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
