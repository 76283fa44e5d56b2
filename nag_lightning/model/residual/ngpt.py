"""nGPT's residual (Loshchilov et al. 2024, "nGPT: Normalized Transformer with Representation
Learning on the Hypersphere"), the closest peer of a norm-agnostic residual: the stream lives on
a hypersphere, and each sub-layer moves it towards its own normalised output by learned
per-feature "eigen learning rates" ``alpha_l``:

    h <- Norm(h + alpha_l * (Norm(f_l(h)) - h))

Norm projects onto the sphere of radius sqrt(d) (features of RMS 1, the scale the sub-layers are
built for); nGPT's unit sphere differs from it by that constant, which the paper's sqrt(d) on the
MLP's gate compensates (so here the gate has none). ``alpha_l`` is stored as
``alpha_scale = 1 / sqrt(d)`` times ``alpha / alpha_init`` (the paper's parametrisation, which
sets how fast the optimizer moves it) and starts at ``alpha_init``. Logits are cosines between
the stream and the head's (normalised) rows, scaled per vocabulary entry by a learned ``s_z``
(the same parametrisation, starting at ``logit_scale_init``).

nGPT also keeps every weight matrix normalised along the model dimension: ``normalised_weights``
asks the model for that (``Transformer.normalise_weights``), at initialisation and after every
optimizer step (``LanguageModel.optimizer_step``). Its sub-layers differ too
(``normalised_sublayers``, built by the model's attention and MLP): queries and keys normalised
per head and scaled by a learned ``s_qk`` with a softmax scale of sqrt(d_k), and the MLP's two
inputs scaled by learned ``s_u`` and ``s_v``.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from nag_lightning.model.residual.base import ResidualStrategy, SkipPlan, layer_tag


class NGPT(ResidualStrategy):
    normalised_weights = True
    normalised_sublayers = True

    def __init__(self, alpha_init: float = 0.05, logit_scale_init: float = 1.0) -> None:
        super().__init__()
        self.alpha_init, self.logit_scale_init = alpha_init, logit_scale_init

    def init_args(self) -> dict:
        return {"alpha_init": self.alpha_init, "logit_scale_init": self.logit_scale_init}

    def bind(self, d_model: int, n_sublayers: int, eps: float, kernels: str = "torch") -> None:
        super().bind(d_model, n_sublayers, eps, kernels)
        self.eps = eps
        self.scale = 1.0 / math.sqrt(d_model)  # the stored value of a parameter at its initial value
        self.alpha = nn.Parameter(torch.full((n_sublayers, d_model), self.scale))

    def on_sphere(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` scaled to norm sqrt(d) per token (RMS 1)."""
        return x * (math.sqrt(self.d_model) / x.norm(dim=-1, keepdim=True).clamp_min(self.eps))

    def enter(self, embedded: torch.Tensor) -> torch.Tensor:
        return self.on_sphere(_at_least_float32(embedded))

    def read(self, h: torch.Tensor, layer: int) -> torch.Tensor:
        return h

    def eigen_rates(self, layer: int) -> torch.Tensor:
        return self.alpha[layer - 1] * (self.alpha_init / self.scale)

    def write(self, h: torch.Tensor, update: torch.Tensor, layer: int, plan: SkipPlan) -> torch.Tensor:
        target = self.on_sphere(_at_least_float32(update))
        return self.on_sphere(h + self.eigen_rates(layer) * (target - h))

    def logits(self, h: torch.Tensor, head: nn.Linear) -> torch.Tensor:
        cosines = head(h / math.sqrt(self.d_model))  # the head's rows are unit vectors (normalise_weights)
        return cosines * (self.logit_scale * (self.logit_scale_init / self.scale)).to(cosines.dtype)

    def bind_head(self, vocab_size: int) -> None:
        """The per-vocabulary logit scale ``s_z``, once the head's size is known."""
        self.logit_scale = nn.Parameter(torch.full((vocab_size,), self.scale))

    def optimizer_special_parameters(self) -> list[nn.Parameter]:
        return [self.alpha, self.logit_scale]

    def parameter_stats(self) -> dict[str, torch.Tensor]:
        return {f"ngpt/alpha/{layer_tag(i + 1)}": self.eigen_rates(i + 1).detach().mean()
                for i in range(self.n_sublayers)}


def _at_least_float32(x: torch.Tensor) -> torch.Tensor:
    """The stream in float32 (float64 stays): a bf16 sub-layer output is projected at full precision."""
    return x if x.dtype == torch.float64 else x.float()
