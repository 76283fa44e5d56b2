"""The model, in pure PyTorch: importing it never imports Lightning."""

from nag_lightning.model.config import ConfigError, ModelConfig
from nag_lightning.model.transformer import Transformer

__all__ = ["ConfigError", "ModelConfig", "Transformer"]
