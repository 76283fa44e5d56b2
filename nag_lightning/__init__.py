"""nag-lightning: norm-agnostic residual Transformers with router-free Mixture-of-Depths.

The floors, from the ground up: ``nag_lightning.kernels`` (the compute kernels and their
references), ``nag_lightning.model`` (pure PyTorch), ``nag_lightning.data`` (token shards),
``nag_lightning.lightning`` (the LightningModule, callbacks, Trainer and CLI of ``nag fit``),
``nag_lightning.interop`` (Hugging Face export, lm-eval) and ``nag_lightning.commands`` (the
``nag`` command). ``LanguageModel`` and ``TokenShardDataModule`` are importable from here
(lazily, so that the model never pulls in Lightning).
"""

import importlib
import importlib.abc
import importlib.util
import sys

from nag_lightning.version import __version__

__all__ = ["__version__", "LanguageModel", "TokenShardDataModule"]

# Modules that moved into the floors (old name -> new name). Class paths in configs and saved run
# folders (e.g. nag_lightning.dashboard.TensorBoardLogger) and scripts still import them by the old
# name, which resolves to the very same module object.
MOVED_MODULES = {
    f"nag_lightning.{old}": f"nag_lightning.{new}" for old, new in {
        "lit_module": "lightning.lit_module", "callbacks": "lightning.callbacks", "guards": "lightning.guards",
        "progress": "lightning.progress", "dashboard": "lightning.dashboard", "precision": "lightning.precision",
        "memory": "lightning.memory", "lightning_cli": "lightning.cli",
        "runs": "commands.runs", "bench": "commands.bench", "bench_driver": "commands.bench_driver",
        "bench_suite": "commands.bench_suite", "generation_bench": "commands.generation_bench",
        "kernel_bench": "commands.kernel_bench", "data_bench": "commands.data_bench",
        "skip_sweep": "commands.skip_sweep", "generate": "commands.generate",
        "inspect_checkpoint": "commands.inspect_checkpoint", "study": "commands.study",
        "study_report": "commands.study_report", "timing": "commands.timing",
    }.items()
}


class _MovedModuleFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Imports a moved module's old name as its new module (the import system keeps the module's
    own name and spec, and files it under the old name too)."""

    def find_spec(self, name, path=None, target=None):
        return importlib.util.spec_from_loader(name, self) if name in MOVED_MODULES else None

    def create_module(self, spec):
        return importlib.import_module(MOVED_MODULES[spec.name])

    def exec_module(self, module) -> None:
        pass


# First on the path: an old name always means the moved module, never a stale file of that name
# (a build/ folder or a wheel from before the move).
if not any(type(finder).__name__ == "_MovedModuleFinder" for finder in sys.meta_path):
    sys.meta_path.insert(0, _MovedModuleFinder())


def __getattr__(name: str):
    if name == "LanguageModel":
        from nag_lightning.lightning.lit_module import LanguageModel

        return LanguageModel
    if name == "TokenShardDataModule":
        from nag_lightning.data import TokenShardDataModule

        return TokenShardDataModule
    raise AttributeError(f"module 'nag_lightning' has no attribute {name!r}")
