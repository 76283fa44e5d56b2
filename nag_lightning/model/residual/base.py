"""The interface every residual strategy implements.

A strategy owns how the residual stream is represented (its *state*: a tensor, or NAG's two
lanes), how sub-layer ``l`` reads it and how its output is written back (``l = 1..2 * n_layers``
over all sub-layers: attention of block ``b`` is ``2b - 1``, its MLP ``2b``), the two ends
(embedding -> stream, stream -> logits), its own parameters and its per-layer diagnostics.

Subclasses take only their own hyperparameters in ``__init__`` so that YAML can name them by
``class_path``; the model calls ``bind`` once to create the per-sub-layer parameters.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn


class ResidualStrategy(nn.Module):
    def bind(self, d_model: int, n_sublayers: int, eps: float, kernel_backend: str = "torch") -> None:
        """Create the parameters for a model of this width and number of sub-layers; kernels
        (``nag_lightning.kernels``) are called with ``kernel_backend``."""
        self.d_model, self.n_sublayers, self.kernel_backend = d_model, n_sublayers, kernel_backend

    def enter(self, embedded: torch.Tensor) -> Any:
        """Stream state from the token embeddings (B, T, d)."""
        return embedded

    skip_mode = "gather"  # how skipped tokens are handled: "gather" saves the compute, "mask" is the oracle

    def plan(self, state: Any, layer: int) -> torch.Tensor | None:
        """Which tokens execute sub-layer ``layer``, (B, T) bool, decided before it runs; None: all."""
        return None

    gate_directions = 0  # the gate's C: its C * d multiply-adds per token and sub-layer count as FLOPs

    def executed_counts(self, batch: int, seq: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Per sub-layer, the tokens that executed it in the latest forward and the sum of their
        ``position + 1`` (for attention FLOPs); every token, without skipping."""
        from nag_lightning.model.flops import dense_counts

        return dense_counts(self.n_sublayers, batch, seq)

    def read(self, state: Any, layer: int) -> torch.Tensor:
        """Input of sub-layer ``layer`` (1-based)."""
        raise NotImplementedError

    def write(self, state: Any, update: torch.Tensor, layer: int, stats: dict | None = None,
              executed: torch.Tensor | None = None) -> Any:
        """Stream state after sub-layer ``layer`` produced ``update``; adds its own diagnostics to
        ``stats``; tokens outside ``executed`` (the plan) must come out unchanged."""
        raise NotImplementedError

    def logits(self, state: Any, head: nn.Linear) -> torch.Tensor:
        """Logits (B, T, vocab) from the final stream state."""
        raise NotImplementedError

    def full_residual(self, state: Any) -> torch.Tensor:
        """The full residual vector R (B, T, d) in float32, for diagnostics only."""
        return state.float()

    def optimizer_special_parameters(self) -> list[nn.Parameter]:
        """Scalars and gates trained with their own learning-rate multiplier and no weight decay."""
        return []

    def parameter_stats(self) -> dict[str, torch.Tensor]:
        """TensorBoard tag -> value of the strategy's own parameters (e.g. ``nag/alpha/layer_01``)."""
        return {}

    def reset_embedding(self, weight: torch.Tensor) -> None:
        """Initialise the token embedding the way this strategy expects; the model's default otherwise."""

    def set_training_step(self, step: int) -> None:
        """Called before every optimizer step with the global step (for warm-ups)."""

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v}" for k, v in self.init_args().items())

    def init_args(self) -> dict[str, Any]:
        """The ``__init__`` arguments, so configs and checkpoints can name this strategy by class_path."""
        return {}


def layer_tag(layer: int) -> str:
    return f"layer_{layer:02d}"
