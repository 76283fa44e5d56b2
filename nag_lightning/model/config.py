"""One typed configuration for the decoder."""

from __future__ import annotations

import importlib
from dataclasses import dataclass, fields
from typing import Any

from nag_lightning.errors import NagError
from nag_lightning.kernels._triton import triton_unavailable_reason
from nag_lightning.model.residual import PreNorm, ResidualStrategy

KERNELS = ("torch", "triton")


class ConfigError(NagError, ValueError):
    """A model configuration that cannot be built; the message names the fields."""


@dataclass
class ModelConfig:
    """Hyperparameters of the Llama-style decoder.

    ``n_kv_heads=None`` means one key/value head per query head (no GQA). The SwiGLU hidden width
    is ``mlp_ratio * d_model`` rounded up to a multiple of ``mlp_multiple_of``. Output projections
    (attention out, MLP down) are initialised with ``init_std / sqrt(2 * n_layers)`` so the
    residual stream's variance at init does not grow with depth.
    """

    vocab_size: int = 8192
    context_length: int = 256
    d_model: int = 256
    n_layers: int = 4
    n_heads: int = 4
    n_kv_heads: int | None = None
    mlp_ratio: float = 8 / 3
    mlp_multiple_of: int = 64
    rope_theta: float = 10000.0
    dropout: float = 0.0
    tie_embeddings: bool = True
    init_std: float = 0.02
    norm_eps: float = 1e-6
    residual: ResidualStrategy | None = None  # None: PreNorm, the baseline
    kernels: str = "torch"  # torch (the eager references) | triton (fused kernels); compiling is LanguageModel.compile

    def __post_init__(self) -> None:
        if self.n_kv_heads is None:
            self.n_kv_heads = self.n_heads
        if isinstance(self.residual, dict):  # {"class_path": ..., "init_args": {...}} from a checkpoint
            module, _, name = self.residual["class_path"].rpartition(".")
            self.residual = getattr(importlib.import_module(module), name)(**self.residual.get("init_args", {}))
        elif self.residual is None:
            self.residual = PreNorm()

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "ModelConfig":
        """The config saved in a checkpoint's hyperparameters, also from before renamed fields:
        ``kernel_backend`` (now ``kernels``; "compile" is now ``LanguageModel.compile``) and NAG's
        ``skip_thresholds`` (now ``threshold_scope``)."""
        values = dict(values)
        legacy_backend = values.pop("kernel_backend", None)
        if legacy_backend is not None and "kernels" not in values:
            values["kernels"] = "triton" if legacy_backend == "triton" else "torch"
        residual = values.get("residual")
        if isinstance(residual, dict) and "skip_thresholds" in residual.get("init_args", {}):
            init_args = dict(residual["init_args"])
            init_args["threshold_scope"] = init_args.pop("skip_thresholds")
            values["residual"] = {**residual, "init_args": init_args}
        return cls(**values)

    def to_dict(self) -> dict[str, Any]:
        """Plain data (the residual strategy as class_path + init_args), for checkpoints and configs."""
        values = {f.name: getattr(self, f.name) for f in fields(self)}
        strategy = type(self.residual)
        values["residual"] = {"class_path": f"{strategy.__module__}.{strategy.__qualname__}",
                              "init_args": self.residual.init_args()}
        return values

    def validate(self) -> None:
        """Raise ConfigError naming the fields of an invalid combination.

        Called when a model is built rather than in ``__post_init__``, so that configuration parsers
        (jsonargparse) report this message instead of wrapping it in their own type errors.
        """
        positive = ("vocab_size", "context_length", "d_model", "n_layers", "n_heads", "n_kv_heads", "mlp_multiple_of")
        for name in positive:
            if getattr(self, name) <= 0:
                raise ConfigError(f"ModelConfig.{name} must be positive, got {getattr(self, name)}.")
        if self.d_model % self.n_heads:
            raise ConfigError(
                f"ModelConfig.d_model ({self.d_model}) must be divisible by ModelConfig.n_heads ({self.n_heads})."
            )
        if self.head_dim % 2:
            raise ConfigError(
                f"ModelConfig.d_model / n_heads = {self.head_dim} must be even for rotary embeddings; "
                "change d_model or n_heads."
            )
        if self.n_heads % self.n_kv_heads:
            raise ConfigError(
                f"ModelConfig.n_heads ({self.n_heads}) must be divisible by ModelConfig.n_kv_heads ({self.n_kv_heads})."
            )
        if self.kernels not in KERNELS:
            raise ConfigError(f"ModelConfig.kernels must be one of {', '.join(KERNELS)}, got {self.kernels!r}.")
        if self.kernels == "triton" and (reason := triton_unavailable_reason()) is not None:
            raise ConfigError(f"ModelConfig.kernels='triton': {reason}")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"ModelConfig.dropout must be in [0, 1), got {self.dropout}.")
        if self.mlp_ratio <= 0 or self.init_std <= 0 or self.rope_theta <= 0:
            raise ConfigError("ModelConfig.mlp_ratio, init_std and rope_theta must be positive.")

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    @property
    def mlp_hidden(self) -> int:
        hidden = int(self.mlp_ratio * self.d_model)
        return -(-hidden // self.mlp_multiple_of) * self.mlp_multiple_of
