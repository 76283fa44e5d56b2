"""The interface every residual strategy implements.

A strategy owns how the residual stream is represented (its *state*: a tensor, or NAG's two
lanes), how sub-layer ``l`` reads it and how its output is written back (``l = 1..2 * n_layers``
over all sub-layers: attention of block ``b`` is ``2b - 1``, its MLP ``2b``), the two ends
(embedding -> stream, stream -> logits), its own parameters and its per-layer diagnostics.

Per sub-layer the model calls ``plan`` (before the sub-layer runs), ``read``, the sub-layer, then
``write`` with the plan. A *gated* strategy (``gated``: NAG) knows a gate and a step per token
before the sub-layer runs (``planned_step``); the model's skip policy (``skip_policy.py``) turns
them into which tokens execute. The strategy itself never decides, records or counts skipping.

Subclasses take only their own hyperparameters in ``__init__`` so that YAML can name them by
``class_path``; the model calls ``bind`` once to create the per-sub-layer parameters.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import torch
from torch import nn

from nag_lightning.model.packing import TokenPacking


class SkipPlan(NamedTuple):
    """What is known of one sub-layer before it runs; handed to ``write``."""

    executed: torch.Tensor | None = None  # (B, T) bool: the tokens that run the sub-layer; None: all
    gate: torch.Tensor | None = None  # (B, T): a gated strategy's gate m (NAG)
    step: torch.Tensor | None = None  # (B, T): a gated strategy's step a = alpha_l * m (NAG)
    # (B, T): a router's causal predictor, the logit that the token is in the top-k (``RouterMoD``)
    predictor_logit: torch.Tensor | None = None


class ResidualStrategy(nn.Module):
    gated = False  # whether ``planned_step`` gives a gate and a step before each sub-layer (so it can skip)
    gate_directions = 0  # a gate's C: its C * d multiply-adds per token and sub-layer count as FLOPs
    predicts_topk = False  # whether ``plan`` gives ``predictor_logit`` (skip.mode "topk" needs it: RouterMoD)
    normalised_weights = False  # whether the model keeps its matrices unit-norm along d (nGPT: Transformer.normalise_weights)
    # Whether attention normalises queries and keys (learned s_qk, softmax scale sqrt(h)) and the MLP
    # scales its inputs (learned s_u, s_v), as nGPT's sub-layers do (``CausalSelfAttention``, ``SwiGLU``).
    normalised_sublayers = False

    def bind(self, d_model: int, n_sublayers: int, eps: float, kernels: str = "torch") -> None:
        """Create the parameters for a model of this width and number of sub-layers; kernels
        (``nag_lightning.kernels``) are called with ``kernels`` as their backend."""
        self.d_model, self.n_sublayers, self.kernels = d_model, n_sublayers, kernels

    def bind_head(self, vocab_size: int) -> None:
        """Create parameters that depend on the vocabulary (nGPT's logit scale); called after ``bind``."""

    def enter(self, embedded: torch.Tensor) -> Any:
        """Stream state from the token embeddings (B, T, d)."""
        return embedded

    def planned_step(self, state: Any, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """A gated strategy's (gate m, step a), each (B, T), of sub-layer ``layer`` from the state before it."""
        raise NotImplementedError(f"{type(self).__name__} has no gate.")

    def plan(self, state: Any, layer: int) -> SkipPlan:
        """What is known before sub-layer ``layer`` runs: a gated strategy's gate and step; all tokens execute."""
        return SkipPlan(None, *self.planned_step(state, layer)) if self.gated else SkipPlan()

    def read(self, state: Any, layer: int) -> torch.Tensor:
        """Input of sub-layer ``layer`` (1-based)."""
        raise NotImplementedError

    def write(self, state: Any, update: torch.Tensor, layer: int, plan: SkipPlan) -> Any:
        """Stream state after sub-layer ``layer`` produced ``update`` under ``plan``; tokens outside
        ``plan.executed`` must come out unchanged. Per token: a skipping model also calls it on the
        packed rows (N, ...) of the executed tokens alone (``plan.executed`` then None)."""
        raise NotImplementedError

    def write_ahead(self, state: Any, update: torch.Tensor, layer: int, plan: SkipPlan) -> Any:
        """``write`` on every token's row (not packed rows): the state may then also carry what the
        next sub-layer's ``plan`` and ``read`` need, computed in the same pass (NAG with the Triton
        kernels: one fused kernel per sub-layer boundary). Only the lanes are a state's contract:
        ``transformer.map_lanes`` drops anything else, so a sub-layer no token runs never hands a
        look-ahead to the wrong sub-layer."""
        return self.write(state, update, layer, plan)

    def write_packed_ahead(self, state: Any, update: torch.Tensor, layer: int, plan: SkipPlan,
                           packing: TokenPacking) -> Any | None:
        """``write_ahead`` after the sub-layer ran on the packed rows of the tokens in
        ``plan.executed`` (``update`` is (Np, ...)), for a strategy that can write every token's
        row straight from them (the scatter back fused into the same pass); None, the default,
        leaves the gather, ``write`` and scatter to the model."""
        return None

    def plan_stats(self, layer: int, plan: SkipPlan) -> dict[str, torch.Tensor]:
        """TensorBoard tag -> scalar: the strategy's diagnostics of sub-layer ``layer``'s plan (e.g. NAG's mean gate)."""
        return {}

    def auxiliary_loss(self, record: Any) -> torch.Tensor | None:
        """A term the training loss adds for this strategy, from a forward's ``SkipRecord`` (router
        MoD's predictor objective); None: none."""
        return None

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

    def reset_sublayer(self, attention: nn.Module, mlp: nn.Module) -> None:
        """Re-initialise a block's sub-layers the way this strategy expects (DeepNorm); called after
        the model's own initialisation, which stays otherwise."""

    def set_training_step(self, step: int) -> None:
        """Called before every optimizer step with the global step (for warm-ups)."""

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v}" for k, v in self.init_args().items())

    def init_args(self) -> dict[str, Any]:
        """The ``__init__`` arguments, so configs and checkpoints can name this strategy by class_path."""
        return {}


def layer_tag(layer: int) -> str:
    return f"layer_{layer:02d}"
