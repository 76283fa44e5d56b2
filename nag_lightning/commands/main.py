"""The ``nag`` command. ``fit``, ``validate``, ``test`` and ``predict`` are LightningCLI
(``nag_lightning/lightning/cli.py``); ``prepare``, ``bench``, ``skip-sweep``, ``generate``, ``study``,
``inspect``, ``export`` and ``eval`` are jsonargparse subcommands whose options each module declares (``add_arguments``)
and runs (``run``)."""

from __future__ import annotations

import importlib
import logging
import os
import sys
import warnings

from nag_lightning.errors import NagError
from nag_lightning.lightning.memory import keep_large_allocations_mapped

USAGE = """usage: nag {fit,validate,test,predict,generate,prepare,bench,skip-sweep,study,inspect,export,eval} ...

  fit        train a model:                 nag fit --config configs/quickstart.yaml
  validate   evaluate a checkpoint:         nag validate --config RUN/config.yaml --ckpt_path RUN/checkpoints/last.ckpt
  test       same, logged under test/:      nag test --config RUN/config.yaml --ckpt_path ...
  predict    sample continuations of validation blocks from a checkpoint
  generate   text in, text out:             nag generate --ckpt_path RUN/checkpoints/last.ckpt --prompt "def "
  prepare    tokenize a corpus into streaming shards:  nag prepare --output data/stdlib-bpe8192 --corpus stdlib
  bench      time training steps of configs:           nag bench configs/quickstart.yaml configs/nag.yaml@0.25
             or generation (prefill, decode, KV cache): nag bench --generate configs/nag.yaml@0,0.25
  skip-sweep accuracy vs compute of a NAG checkpoint:  nag skip-sweep --ckpt_path RUN/checkpoints/last.ckpt
  study      grids of runs with seeds and statistics: nag study depth --config configs/quickstart.yaml --output S
             (depth: strategies x depths; isoflop: skip rates at one FLOP budget; skip: skip-sweep of a study)
  inspect    attention sinks, massive activations, kurtosis, int8 robustness of a checkpoint:
             nag inspect --ckpt_path A.ckpt [--compare B.ckpt] [--quantize int8]
  export     a checkpoint as a Hugging Face folder:    nag export --ckpt_path CKPT --output DIR [--format hf|safetensors]
  eval       lm-eval-harness tasks:                    nag eval --ckpt_path CKPT|--hf DIR --tasks T1,T2 [--limit N]

`nag SUBCOMMAND --help` shows a subcommand's options."""

# Subcommand -> the module that declares its options (add_arguments) and runs it (run).
COMMANDS = {
    "prepare": "nag_lightning.data.preparation",
    "bench": "nag_lightning.commands.bench",
    "skip-sweep": "nag_lightning.commands.skip_sweep",
    "generate": "nag_lightning.commands.generate",
    "study": "nag_lightning.commands.study",
    "inspect": "nag_lightning.commands.inspect_checkpoint",
    "export": "nag_lightning.interop.export",
    "eval": "nag_lightning.interop.evaluation",
}


def build_parser():
    """The jsonargparse parser of the subcommands that are not Trainer calls."""
    from jsonargparse import ArgumentParser

    parser = ArgumentParser(prog="nag", description=USAGE.split("\n\n")[1])
    subcommands = parser.add_subcommands(dest="subcommand")
    for name, module in COMMANDS.items():
        module = importlib.import_module(module)
        command = ArgumentParser(prog=f"nag {name}", description=module.__doc__.split("\n\n")[0])
        # Added before its options: jsonargparse wants nested subcommands (nag study ...) added level by level.
        subcommands.add_subcommand(name, command, help=command.description)
        module.add_arguments(command)
    return parser


def quiet_common_path() -> None:
    """Drop what every command would print that says nothing about this run."""
    class DropNoise(logging.Filter):
        def filter(self, record: logging.LogRecord) -> bool:
            message = record.getMessage()
            ours = "configure_callbacks" in message and message.endswith(": TQDMProgressBar")  # our tokens/s bar
            return "litlogger" not in message and not ours

    for name in ("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero"):
        logging.getLogger(name).addFilter(DropNoise())
    # Under *-mixed precision the parameters are float32, which is what the summary assumes anyway.
    warnings.filterwarnings("ignore", message=r"Precision .*-mixed is not supported by the model summary")
    # Lightning's use of a deprecated torch API, and a caution about datasets that litdata answers itself.
    warnings.filterwarnings("ignore", message=r"`isinstance\(treespec, LeafSpec\)` is deprecated")
    warnings.filterwarnings("ignore", message=r"Your `IterableDataset` has `__len__` defined")


def main(argv: list[str] | None = None) -> None:
    from_command_line = argv is None
    argv = list(sys.argv[1:] if from_command_line else argv)
    keep_large_allocations_mapped()
    quiet_common_path()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "true")
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        if not argv:
            sys.exit(2)
        return
    try:
        if argv[0] in COMMANDS:
            args = build_parser().parse_args(argv)
            importlib.import_module(COMMANDS[args.subcommand]).run(args[args.subcommand])
        else:
            from nag_lightning.lightning.cli import run_lightning_cli

            run_lightning_cli(None if from_command_line else argv)  # None: LightningCLI reads sys.argv
    except NagError as error:
        print(f"nag: error: {error}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
