"""One typed configuration for the decoder."""

from __future__ import annotations

import dataclasses
import importlib
import warnings
from dataclasses import dataclass, field, fields
from typing import Any

from nag_lightning.errors import NagError
from nag_lightning.kernels._triton import triton_unavailable_reason
from nag_lightning.model.residual import PreNorm, ResidualStrategy
from nag_lightning.model.residual.nag import LEGACY_SKIP_ARGS
from nag_lightning.model.skip_policy import SkipConfig

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
    skip: SkipConfig = field(default_factory=SkipConfig)  # how a gated strategy (NAG) skips; skip_policy.py

    def __post_init__(self) -> None:
        if self.n_kv_heads is None:
            self.n_kv_heads = self.n_heads
        if isinstance(self.residual, dict):  # {"class_path": ..., "init_args": {...}} from a checkpoint
            module, _, name = self.residual["class_path"].rpartition(".")
            self.residual = getattr(importlib.import_module(module), name)(**self.residual.get("init_args", {}))
        elif self.residual is None:
            self.residual = PreNorm()
        if isinstance(self.skip, dict):
            self.skip = SkipConfig(**self.skip)
        self._move_legacy_skip_args()

    def _move_legacy_skip_args(self) -> None:
        """NAG took ``threshold_scope``, ``skip_mode`` and ``skip_rule`` before they moved to
        ``ModelConfig.skip``: values given there still take effect, with a warning naming the new keys."""
        legacy = getattr(self.residual, "legacy_skip_args", None)
        if not legacy:
            return
        moved, renamed, defaults = {}, [], SkipConfig()
        for name, value in legacy.items():
            new = LEGACY_SKIP_ARGS[name]
            if name == "skip_mode" and value in ("threshold", "capacity"):
                new = "mode"
            renamed.append(f"residual.init_args.{name} -> skip.{new}")
            if getattr(self.skip, new) == getattr(defaults, new):  # a value given the new way wins
                moved[new] = value
        self.skip = dataclasses.replace(self.skip, **moved)
        renamed = ", ".join(renamed)
        warnings.warn(f"ModelConfig: skipping options moved from the residual strategy to ModelConfig.skip "
                      f"({renamed}); the old keys still work.", FutureWarning, stacklevel=4)

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
        if isinstance(residual, dict) and any(k in residual.get("init_args", {}) for k in (*LEGACY_SKIP_ARGS, "skip_thresholds")):
            init_args = dict(residual["init_args"])
            skip = dict(values.get("skip") or {})
            if "skip_thresholds" in init_args:
                init_args["threshold_scope"] = init_args.pop("skip_thresholds")
            for old, new in LEGACY_SKIP_ARGS.items():
                value = init_args.pop(old, None)
                if value is not None:
                    skip["mode" if old == "skip_mode" and value in ("threshold", "capacity") else new] = value
            values["residual"], values["skip"] = {**residual, "init_args": init_args}, skip
        return cls(**values)

    def to_dict(self) -> dict[str, Any]:
        """Plain data (the residual strategy as class_path + init_args), for checkpoints and configs."""
        values = {f.name: getattr(self, f.name) for f in fields(self)}
        strategy = type(self.residual)
        values["residual"] = {"class_path": f"{strategy.__module__}.{strategy.__qualname__}",
                              "init_args": self.residual.init_args()}
        values["skip"] = dataclasses.asdict(self.skip)
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
        try:
            self.skip.validate()
        except NagError as error:
            raise ConfigError(str(error)) from None
        if self.skip.mode == "topk" and not self.residual.predicts_topk:
            raise ConfigError(f"ModelConfig.skip.mode='topk' needs a learned router with a causal predictor, which "
                              f"{type(self.residual).__name__} has not: set model.init_args.config.residual: "
                              "nag_lightning.model.residual.RouterMoD (--config configs/residual/router_mod.yaml).")
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
