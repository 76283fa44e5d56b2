"""Router Mixture-of-Depths (Raposo et al. 2024): pre-norm plus a learned linear router per
sub-layer, the learned-routing peer of NAG's router-free skipping (``skip_policy.py``).

Per sub-layer ``l``, from its normalised input ``n = norm_l(x)`` (what the sub-layer reads):

- router logit ``r = <n, w_l>`` (``router``, (n_sublayers, d)): the plan's gate ``m``;
- router weight ``g = sigmoid(r)``: the plan's step. An executed token's stream becomes
  ``x + g * f_l(n)``, so the router gets gradients through the tokens it selects; a skipped
  token's stays ``x``, bit for bit;
- predictor logit ``p = <stopgrad(n), u_l> + c_l`` (``predictor_weight``, ``predictor_bias``):
  Raposo et al.'s auxiliary classifier of "is this token in the top-k", the causal rule of
  evaluation and decoding.

Which tokens execute is the model's skip policy's, ``skip.mode: topk`` (set by ``configs/residual/router_mod.yaml``):
in training the ``k = ceil(skip.topk_capacity * T)`` tokens of each sequence with the highest
``r``, and the predictor's binary cross-entropy against that choice (``auxiliary_loss``, added to
the training loss); in evaluation (the model in eval mode, or a KV cache) the tokens whose
predicted probability ``sigmoid(p)`` is > 0.5. Under ``threshold``/``capacity`` mode ``g`` is
compared with the thresholds like NAG's step (a causal threshold router, not Raposo et al.'s);
with no thresholds set every token runs, ``x + g * f_l(n)``.

Choices (arguments below, documented defaults):

- ``sigmoid(r)`` scales the update, not Raposo et al.'s raw ``r``: the same top-k (sigmoid is
  monotone), but a weight in (0, 1) that never flips the update's sign (a selected token's raw
  logit may be negative) and starts at 0.5, where the raw logit near 0 would start every
  sub-layer switched off; the bounded weight also leaves the update's scale to the output
  projections.
- The router reads the normalised input (the sub-layer's, with its RMSNorm gain), so its logits'
  scale does not follow the stream's growth over depth (Raposo et al. route the block input).
  ``router_init_std=0.1``: ``w_l`` drawn with std ``0.1 / sqrt(d)``, so ``r`` has std about 0.1 at
  init: ``g = 0.5 +- 0.03`` and an almost random, tie-free top-k.
- The predictor is linear (Raposo et al. use a small MLP): top-k keeps the tokens whose ``r`` is
  above the sequence's k-th largest, a threshold on a linear function of the same input, which a
  linear classifier of that input represents exactly ("r > c"); only the cutoff's variation
  between sequences escapes it, as it escapes any per-token predictor. It starts like the router
  (bias 0, about half the tokens predicted in). Router and predictor cost ``2 d`` multiply-adds
  per token and sub-layer (``gate_directions = 2``, counted as FLOPs).
- ``predictor_loss_weight=0.01``: behind the stop-gradient the term's gradient reaches only the
  predictor, whose AdamW steps do not depend on the gradient's scale (far above ``eps``), so the
  weight changes neither what it learns nor the language model; 0.01 keeps its share of the
  logged ``train/loss`` under ``0.01 * ln 2 = 0.007`` nats. Evaluation runs no top-k, so
  ``val/loss`` is the cross-entropy alone.
- Router and predictor are plain parameters, trained at the base learning rate without weight
  decay (no ``special`` group: Raposo et al. train the router with the model).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from nag_lightning.model.residual.base import SkipPlan, layer_tag
from nag_lightning.model.residual.prenorm import PreNorm


def _dot(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``<x, weight>`` over the last dimension in float32: a product and a sum, which autocast
    leaves in float32 (a bf16 matmul would flip top-k and predictor decisions near their cutoff)."""
    return (x.float() * weight.float()).sum(-1)


class RouterMoD(PreNorm):
    gated = True
    predicts_topk = True
    gate_directions = 2  # router and predictor: 2 d multiply-adds per token and sub-layer

    def __init__(self, router_init_std: float = 0.1, predictor_loss_weight: float = 0.01) -> None:
        super().__init__()
        if router_init_std < 0 or predictor_loss_weight < 0:
            raise ValueError(f"RouterMoD.router_init_std and predictor_loss_weight must be >= 0, got "
                             f"{router_init_std}, {predictor_loss_weight}.")
        self.router_init_std, self.predictor_loss_weight = router_init_std, predictor_loss_weight

    def init_args(self) -> dict:
        return {"router_init_std": self.router_init_std, "predictor_loss_weight": self.predictor_loss_weight}

    def bind(self, d_model: int, n_sublayers: int, eps: float, kernels: str = "torch") -> None:
        super().bind(d_model, n_sublayers, eps, kernels)
        std = self.router_init_std / math.sqrt(d_model)
        self.router = nn.Parameter(torch.randn(n_sublayers, d_model) * std)
        self.predictor_weight = nn.Parameter(torch.randn(n_sublayers, d_model) * std)
        self.predictor_bias = nn.Parameter(torch.zeros(n_sublayers))

    def plan(self, x: torch.Tensor, layer: int) -> SkipPlan:
        """Gate: the router logit ``r``; step: the router weight ``sigmoid(r)``; the predictor's logit."""
        i = layer - 1
        normalised = self.read(x, layer)
        logit = _dot(normalised, self.router[i])
        predictor_logit = _dot(normalised.detach(), self.predictor_weight[i]) + self.predictor_bias[i].float()
        return SkipPlan(None, logit, torch.sigmoid(logit), predictor_logit)

    def planned_step(self, x: torch.Tensor, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        plan = self.plan(x, layer)
        return plan.gate, plan.step

    def write(self, x: torch.Tensor, update: torch.Tensor, layer: int, plan: SkipPlan) -> torch.Tensor:
        updated = x + (plan.step.unsqueeze(-1) * update).to(x.dtype)
        return updated if plan.executed is None else torch.where(plan.executed.unsqueeze(-1), updated, x)

    def plan_stats(self, layer: int, plan: SkipPlan) -> dict[str, torch.Tensor]:
        return {f"mod/router/weight/{layer_tag(layer)}": plan.step.detach().mean()}

    def auxiliary_loss(self, record) -> torch.Tensor | None:
        """``predictor_loss_weight`` times the predictor's binary cross-entropy against the top-k
        decisions (``SkipRecord.predictor_loss``): a top-k training forward's only; None otherwise."""
        loss = record.predictor_loss()
        return None if loss is None else self.predictor_loss_weight * loss
