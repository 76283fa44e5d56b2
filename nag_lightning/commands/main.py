"""The ``nag`` command. ``fit``, ``validate``, ``test`` and ``predict`` are LightningCLI
(``nag_lightning/lightning/cli.py``); ``prepare``, ``bench``, ``skip-sweep``, ``generate``, ``study``,
``inspect``, ``export`` and ``eval`` are jsonargparse subcommands, each module's ``add_arguments``
and ``run`` (their options come from one typed function each: ``commands/typed.py``)."""

from __future__ import annotations

import importlib
import logging
import os
import sys
import warnings

from jsonargparse import ArgumentParser

from nag_lightning.errors import NagError
from nag_lightning.lightning.memory import tune_heap

# The Trainer calls, run by LightningCLI (their options: nag fit --help).
TRAINER_COMMANDS = {
    "fit": "train a model: nag fit --config configs/quickstart.yaml",
    "validate": "validation loss, perplexity and bits per byte of a checkpoint",
    "test": "the same, logged under test/",
    "predict": "sampled continuations of validation blocks from a checkpoint",
}
# Subcommand -> the module that declares its options (add_arguments) and runs it (run).
COMMANDS = {
    "prepare": "nag_lightning.commands.prepare",
    "bench": "nag_lightning.commands.bench_command",
    "skip-sweep": "nag_lightning.commands.skip_sweep",
    "generate": "nag_lightning.commands.generate",
    "study": "nag_lightning.commands.study_command",
    "inspect": "nag_lightning.commands.inspect_checkpoint",
    "export": "nag_lightning.interop.export",
    "eval": "nag_lightning.interop.evaluation",
}


class NagParser(ArgumentParser):
    """The top-level parser: a subcommand module's ``normalise(argv)``, where it has one, first
    rewrites the forms users have typed for years into the ones its parser reads (``nag bench
    A.yaml``, ``--rates 0 0.1``; ``commands/typed.py``)."""

    def parse_args(self, args=None, *more, **options):
        args = list(sys.argv[1:] if args is None else args)
        if args and args[0] in COMMANDS:
            module = importlib.import_module(COMMANDS[args[0]])
            if hasattr(module, "normalise"):
                args = [args[0], *module.normalise(args[1:])]
        return super().parse_args(args, *more, **options)


def usage() -> str:
    """``nag``'s own help, from the subcommands' descriptions."""
    lines = [(name, text) for name, text in TRAINER_COMMANDS.items()]
    lines += [(name, importlib.import_module(module).__doc__.split("\n\n")[0].split(": ", 1)[-1]
               .replace("\n", " ").replace("``", "`")) for name, module in COMMANDS.items()]
    width = max(len(name) for name, _ in lines)
    return "\n".join([f"usage: nag {{{','.join(name for name, _ in lines)}}} ...", "",
                      *(f"  {name:<{width}}  {text}" for name, text in lines), "",
                      "`nag SUBCOMMAND --help` shows a subcommand's options; docs/commands.md has examples."])


def build_parser():
    """The jsonargparse parser of the subcommands that are not Trainer calls."""
    parser = NagParser(prog="nag", description="the nag subcommands that are not Trainer calls")
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
    tune_heap()
    quiet_common_path()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "true")
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
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
