"""nag-lightning: norm-agnostic residual Transformers with router-free Mixture-of-Depths.

``nag_lightning.model`` is pure PyTorch; ``LanguageModel`` and ``TokenShardDataModule`` are the
Lightning layer on top of it (imported lazily so that the model never pulls in Lightning).
"""

from nag_lightning.version import __version__

__all__ = ["__version__", "LanguageModel", "TokenShardDataModule"]


def __getattr__(name: str):
    if name == "LanguageModel":
        from nag_lightning.lit_module import LanguageModel

        return LanguageModel
    if name == "TokenShardDataModule":
        from nag_lightning.data import TokenShardDataModule

        return TokenShardDataModule
    raise AttributeError(f"module 'nag_lightning' has no attribute {name!r}")
