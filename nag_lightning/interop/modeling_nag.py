"""The nag_lightning decoder as a standalone Hugging Face ``transformers`` model.

This file is copied next to an exported model's ``config.json`` and ``model.safetensors``
(``nag_lightning.interop.hf.save_hf_folder``), so that

    AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)

works on a machine without the nag_lightning package: it imports only the standard library,
``torch`` and ``transformers``. It re-implements the package's model in eager PyTorch:

    token embedding -> n_layers x [causal attention (RoPE, GQA) ; SwiGLU MLP] -> LM head

Every block has two sub-layers, numbered ``l = 1..2 * n_layers`` over the whole model (attention
of block ``b`` is ``2b - 1``, its MLP ``2b``). The residual strategy (``nag_config["residual"]``)
owns the stream between them: how sub-layer ``l`` reads it, how its output is written back, how
the stream enters from the embedding and how it turns into logits. ``model.model.state_dict()``
has the names of the package's ``Transformer.state_dict()``, so the exported weights are the
package's state dict under the prefix ``model.``.

Skipping (router-free Mixture-of-Depths): with ``config.skip_enabled``, a gated strategy (NAG and
its ablations) skips a (token, sub-layer) pair whose score is below the trained threshold, as the
package's ``SkipPolicy`` does. Here every token runs every sub-layer and a skipped pair's step is
set to 0, which leaves both of NAG's lanes unchanged bit for bit: the package's packed execution
gives the same numbers (it computes every token's keys and values too). ``model.last_skip_rate``
is the share of (real token, sub-layer) pairs the last forward skipped.

A model built from a config alone is initialised generically; this file is for trained weights.
Needs torch >= 2.5 (``scaled_dot_product_attention``'s ``enable_gqa``); written against transformers 5.25.
"""

from __future__ import annotations

import copy
import math
from contextlib import nullcontext
from typing import Any, ClassVar, NamedTuple

import torch
import torch.nn.functional as F
import transformers
from torch import nn
from transformers import PreTrainedModel
from transformers.cache_utils import DynamicCache
from transformers.generation import GenerationMixin
from transformers.modeling_outputs import CausalLMOutputWithPast

try:  # transformers >= 5 spells it PreTrainedConfig; 4.x only PretrainedConfig
    from transformers import PreTrainedConfig
except ImportError:  # pragma: no cover
    from transformers import PretrainedConfig as PreTrainedConfig

_TRANSFORMERS_MAJOR = int(transformers.__version__.split(".")[0])
# transformers 5.25 renamed the outputs' ``past_key_values`` to ``cache``.
_CACHE_FIELD = "cache" if "cache" in getattr(CausalLMOutputWithPast, "__dataclass_fields__", {}) else "past_key_values"

# ``ModelConfig.to_dict()``'s defaults: a partial ``nag_config`` (or none, as transformers sometimes
# builds configs without arguments) is completed with them.
DEFAULT_SKIP = {"mode": "threshold", "threshold_scope": "global", "rule": "step", "capacity_factor": 1.0,
                "execution": "gather"}
DEFAULT_NAG_CONFIG = {
    "vocab_size": 8192, "context_length": 256, "d_model": 256, "n_layers": 4, "n_heads": 4, "n_kv_heads": None,
    "mlp_ratio": 8 / 3, "mlp_multiple_of": 64, "rope_theta": 10000.0, "dropout": 0.0, "tie_embeddings": True,
    "init_std": 0.02, "norm_eps": 1e-6,
    "residual": {"class_path": "nag_lightning.model.residual.prenorm.PreNorm", "init_args": {}},
    "kernels": "torch", "skip": DEFAULT_SKIP,
}
# The standard fields derived from ``nag_config``: on reload they are recomputed, not read.
_DERIVED_FIELDS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                   "num_key_value_heads", "head_dim", "max_position_embeddings", "tie_word_embeddings",
                   "initializer_range")


def mlp_hidden(nag: dict) -> int:
    """The SwiGLU width: ``mlp_ratio * d_model`` rounded up to a multiple of ``mlp_multiple_of``."""
    hidden = int(nag["mlp_ratio"] * nag["d_model"])
    return -(-hidden // nag["mlp_multiple_of"]) * nag["mlp_multiple_of"]


class NagLightningConfig(PreTrainedConfig):
    """``nag_config``: the package's ``ModelConfig.to_dict()`` (the residual strategy as
    ``{"class_path", "init_args"}``, ``skip`` as the ``SkipConfig`` fields). ``skip_enabled``:
    whether a gated model skips with its trained thresholds (off by default: a dense model)."""

    model_type = "nag_lightning"

    def __init__(self, nag_config: dict | None = None, skip_enabled: bool = False, **kwargs: Any) -> None:
        nag = copy.deepcopy({**DEFAULT_NAG_CONFIG, **(nag_config or {})})
        nag["skip"] = {**DEFAULT_SKIP, **(nag.get("skip") or {})}
        if nag["n_kv_heads"] is None:
            nag["n_kv_heads"] = nag["n_heads"]
        for name in _DERIVED_FIELDS:
            kwargs.pop(name, None)
        use_cache = kwargs.pop("use_cache", True)
        # Passed to the base too: transformers 4.x sets tie_word_embeddings in its __init__.
        super().__init__(tie_word_embeddings=bool(nag["tie_embeddings"]), **kwargs)
        self.nag_config = nag
        self.skip_enabled = bool(skip_enabled)
        self.use_cache = use_cache
        # The standard names, so that generic tools (generation, lm-eval, vLLM's checks) find them.
        self.vocab_size = nag["vocab_size"]
        self.hidden_size = nag["d_model"]
        self.intermediate_size = mlp_hidden(nag)
        self.num_hidden_layers = nag["n_layers"]
        self.num_attention_heads = nag["n_heads"]
        self.num_key_value_heads = nag["n_kv_heads"]
        self.head_dim = nag["d_model"] // nag["n_heads"]
        self.max_position_embeddings = nag["context_length"]
        self.tie_word_embeddings = bool(nag["tie_embeddings"])
        self.initializer_range = nag["init_std"]


# ---------------------------------------------------------------------------------------------
# Building blocks
# ---------------------------------------------------------------------------------------------

def rotary_tables(positions: torch.Tensor, head_dim: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin of shape ``positions.shape + (head_dim // 2,)``: angle ``p * theta ** (-2i / head_dim)``,
    in float64 and then rounded to float32, as the package's ``rope_tables``."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64, device=positions.device) / head_dim))
    angles = positions.to(torch.float64).unsqueeze(-1) * inv_freq
    return angles.cos().float(), angles.sin().float()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate the pairs (x[..., i], x[..., i + h/2]) of ``x`` (B, heads, T, h) by their angles."""
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half].float(), x[..., half:].float()
    return torch.cat((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1).type_as(x)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Statistics in float32, output in the input's dtype: the package's reference kernel.
        return F.rms_norm(x.float(), (x.shape[-1],), self.weight.float(), self.eps).to(x.dtype)


class CausalSelfAttention(nn.Module):
    def __init__(self, d_model: int, n_heads: int, n_kv_heads: int, dropout: float) -> None:
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = n_heads, n_kv_heads, d_model // n_heads
        self.q_proj = nn.Linear(d_model, n_heads * self.head_dim, bias=False)
        # Keys and values in one matmul, laid out per token as (2, kv_heads, head_dim).
        self.kv_proj = nn.Linear(d_model, 2 * n_kv_heads * self.head_dim, bias=False)
        self.out_proj = nn.Linear(n_heads * self.head_dim, d_model, bias=False)
        self.dropout = dropout

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, masking: dict,
                cache: Any = None, layer_idx: int = 0) -> torch.Tensor:
        batch, seq, _ = x.shape
        x = x.to(self.q_proj.weight.dtype)  # NAG's lane is float32 whatever dtype the weights were loaded in
        k, v = self.kv_proj(x).view(batch, seq, 2, self.n_kv_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        k = apply_rope(k, cos, sin)
        q = apply_rope(self.q_proj(x).view(batch, seq, self.n_heads, self.head_dim).transpose(1, 2), cos, sin)
        if cache is not None:  # the keys and values of every token so far
            k, v = cache.update(k, v, layer_idx)
        y = F.scaled_dot_product_attention(q, k, v, dropout_p=self.dropout if self.training else 0.0,
                                           enable_gqa=self.n_kv_heads != self.n_heads, **masking)
        return self.out_proj(y.transpose(1, 2).reshape(batch, seq, -1))


class SwiGLU(nn.Module):
    def __init__(self, d_model: int, hidden: int, dropout: float) -> None:
        super().__init__()
        self.gate_up_proj = nn.Linear(d_model, 2 * hidden, bias=False)
        self.down_proj = nn.Linear(hidden, d_model, bias=False)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up_proj(x.to(self.gate_up_proj.weight.dtype)).chunk(2, dim=-1)
        return self.dropout(self.down_proj(F.silu(gate) * up))


class Block(nn.Module):
    def __init__(self, nag: dict) -> None:
        super().__init__()
        self.attn = CausalSelfAttention(nag["d_model"], nag["n_heads"], nag["n_kv_heads"], nag["dropout"])
        self.mlp = SwiGLU(nag["d_model"], mlp_hidden(nag), nag["dropout"])


# ---------------------------------------------------------------------------------------------
# Residual strategies: how the stream is read, written, entered and read out.
# Each takes (d_model, n_sublayers, norm_eps) and then the package class's init_args.
# ---------------------------------------------------------------------------------------------

class ResidualStrategy(nn.Module):
    gated = False  # whether a gate and a step per token are known before each sub-layer (so it can skip)

    def enter(self, embedded: torch.Tensor) -> Any:
        """Stream state from the token embeddings (B, T, d)."""
        return embedded

    def plan(self, state: Any, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """A gated strategy's (gate m, step a), each (B, T), before sub-layer ``layer`` runs."""
        raise NotImplementedError(f"{type(self).__name__} has no gate.")

    def read(self, state: Any, layer: int) -> torch.Tensor:
        """Input of sub-layer ``layer`` (1-based)."""
        raise NotImplementedError

    def write(self, state: Any, update: torch.Tensor, layer: int, step: torch.Tensor | None) -> Any:
        """Stream state after sub-layer ``layer`` output ``update``; ``step``: a gated strategy's a."""
        raise NotImplementedError

    def logits(self, state: Any, head: nn.Linear) -> torch.Tensor:
        """Logits (B, T, vocab) from the final stream state."""
        raise NotImplementedError


class PreNorm(ResidualStrategy):
    """``x_{l+1} = x_l + f_l(norm(x_l))``, a final norm before the head."""

    def __init__(self, d_model: int, n_sublayers: int, norm_eps: float) -> None:
        super().__init__()
        self.norms = nn.ModuleList(RMSNorm(d_model, norm_eps) for _ in range(n_sublayers))
        self.final_norm = RMSNorm(d_model, norm_eps)

    def read(self, x, layer):
        return self.norms[layer - 1](x)

    def write(self, x, update, layer, step):
        return x + update

    def logits(self, x, head):
        return head(self.final_norm(x).to(head.weight.dtype))


class LayerNormScaling(PreNorm):
    """Pre-norm whose normalised input to sub-layer ``l`` is scaled by ``1 / sqrt(l)``."""

    def read(self, x, layer):
        return self.norms[layer - 1](x) * (1.0 / math.sqrt(layer))


class LayerScale(PreNorm):
    """Pre-norm with a learned per-feature scale of each sub-layer's output: ``x + lambda_l * f``."""

    def __init__(self, d_model: int, n_sublayers: int, norm_eps: float, init_value: float = 0.1) -> None:
        super().__init__(d_model, n_sublayers, norm_eps)
        self.scales = nn.Parameter(torch.full((n_sublayers, d_model), float(init_value)))

    def write(self, x, update, layer, step):
        return x + self.scales[layer - 1] * update


class OrthogonalUpdate(PreNorm):
    """Pre-norm adding only the part of the output orthogonal to the stream: ``x + f - (<f, x> / <x, x>) x``."""

    def __init__(self, d_model: int, n_sublayers: int, norm_eps: float, eps: float = 1e-6) -> None:
        super().__init__(d_model, n_sublayers, norm_eps)
        self.eps = eps

    def write(self, x, update, layer, step):
        f, stream = update.float(), x.float()
        along = (f * stream).sum(-1, keepdim=True) / (stream * stream).sum(-1, keepdim=True).clamp_min(self.eps)
        return x + (f - along * stream).to(x.dtype)


class PostNorm(ResidualStrategy):
    """``x_{l+1} = norm(x_l + f_l(x_l))``; the last sub-layer's norm is the final norm."""

    def __init__(self, d_model: int, n_sublayers: int, norm_eps: float) -> None:
        super().__init__()
        self.norms = nn.ModuleList(RMSNorm(d_model, norm_eps) for _ in range(n_sublayers))

    def read(self, x, layer):
        return x

    def write(self, x, update, layer, step):
        return self.norms[layer - 1](x + update)

    def logits(self, x, head):
        return head(x.to(head.weight.dtype))


class DeepNorm(PostNorm):
    """Post-norm with the stream up-weighted: ``norm(alpha x + f)``, ``alpha = (2 * blocks) ** 0.25``
    (its ``beta`` only scales the initialisation)."""

    def __init__(self, d_model: int, n_sublayers: int, norm_eps: float) -> None:
        super().__init__(d_model, n_sublayers, norm_eps)
        self.alpha = (2 * (n_sublayers // 2)) ** 0.25

    def write(self, x, update, layer, step):
        return self.norms[layer - 1](self.alpha * x + update)


class ReZero(ResidualStrategy):
    """``x_{l+1} = x_l + alpha_l f_l(x_l)``, no normalisation anywhere."""

    def __init__(self, d_model: int, n_sublayers: int, norm_eps: float, init_value: float = 0.0) -> None:
        super().__init__()
        self.alpha = nn.Parameter(torch.full((n_sublayers,), float(init_value)))

    def read(self, x, layer):
        return x

    def write(self, x, update, layer, step):
        return x + self.alpha[layer - 1] * update

    def logits(self, x, head):
        return head(x.to(head.weight.dtype))


# How NAG's direction lane is stored between sub-layers; its updates compute in float32 regardless.
DIRECTION_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
TINY = 1e-30  # the NAG update's normaliser floor where the output is 0


class NAGState(NamedTuple):
    direction: torch.Tensor  # (B, T, d), RMS 1
    log_norm: torch.Tensor  # (B, T), float32: log(||R|| / sqrt(d))


def nag_update(direction: torch.Tensor, log_norm: torch.Tensor, update: torch.Tensor, step: torch.Tensor,
               eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """NAG's lane update (the package's ``nag_update_reference``), with r the direction, f the
    sub-layer's output and a the step::

        f      <- f - mean(f)
        f_perp <- f - (<f, r> / d) r
        r'     <- r + a sqrt(d) f_perp / max(||f_perp||, eps ||f||, 1e-30), then RMS 1 again
        s'     <- s + log(1 + a^2) / 2

    (``r'`` is ``cos(theta) r + sin(theta) u`` with ``theta = arctan(a)``.) Rows with ``a == 0``
    come out unchanged bit for bit: a skipped sub-layer is an exact identity."""
    compute = torch.float64 if direction.dtype == torch.float64 else torch.float32
    d = direction.shape[-1]
    r, a, f = direction.to(compute), step.to(compute).unsqueeze(-1), update.to(compute)
    f = f - f.mean(dim=-1, keepdim=True)
    f_perp = torch.addcmul(f, r, torch.linalg.vecdot(f, r).unsqueeze(-1), value=-1.0 / d)
    floor = (eps * torch.linalg.vector_norm(f, dim=-1, keepdim=True)).clamp_min(TINY)
    coefficient = a * math.sqrt(d) / torch.maximum(torch.linalg.vector_norm(f_perp, dim=-1, keepdim=True), floor)
    rotated = torch.addcmul(r, f_perp, coefficient)
    rms = torch.linalg.vector_norm(rotated, dim=-1, keepdim=True) / math.sqrt(d)
    scale = torch.where(a == 0, torch.ones_like(rms), 1.0 / rms)
    return (rotated * scale).to(direction.dtype), log_norm + 0.5 * torch.log1p(step.to(log_norm.dtype) ** 2)


def ablated_update(direction: torch.Tensor, log_norm: torch.Tensor, update: torch.Tensor, step: torch.Tensor,
                   eps: float, centre: bool, orthogonalise: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """``nag_update`` with the centring and/or the orthogonalisation left out (the ablations)."""
    compute = torch.float64 if direction.dtype == torch.float64 else torch.float32
    d = direction.shape[-1]
    r, a, f = direction.to(compute), step.to(compute).unsqueeze(-1), update.to(compute)
    if centre:
        f = f - f.mean(dim=-1, keepdim=True)
    moved = f - torch.linalg.vecdot(f, r).unsqueeze(-1) / d * r if orthogonalise else f
    floor = (eps * torch.linalg.vector_norm(f, dim=-1, keepdim=True)).clamp_min(TINY)
    rotated = r + a * math.sqrt(d) * moved / torch.maximum(torch.linalg.vector_norm(moved, dim=-1, keepdim=True), floor)
    rms = torch.linalg.vector_norm(rotated, dim=-1, keepdim=True) / math.sqrt(d)
    new_direction = torch.where(a == 0, r, rotated / rms).to(direction.dtype)
    return new_direction, log_norm + 0.5 * torch.log1p(step.to(log_norm.dtype) ** 2)


def _centred_unit_rows(weight: torch.Tensor, eps: float) -> torch.Tensor:
    rows = weight - weight.mean(dim=-1, keepdim=True)
    return rows / rows.norm(dim=-1, keepdim=True).clamp_min(eps)


def _float32_region(device: torch.device):
    """No autocast inside: NAG's gate decides skips, and bfloat16's 8-bit mantissa would flip decisions."""
    kind = device.type
    return torch.autocast(kind, enabled=False) if torch.amp.is_autocast_available(kind) else nullcontext()


class NAG(ResidualStrategy):
    """Norm-agnostic residual: a direction lane ``r`` (RMS 1) and a float32 log-norm lane ``s``;
    the full residual ``R = exp(s) r`` is never built.

    - enter: the embedding, centred over features, gives ``r`` (scaled to RMS 1) and ``s = log(rms) + g_enc``;
    - sub-layer ``l`` reads ``r * gains_l``; a gate from ``r`` alone,
      ``m = (sum_i softmax(gate_logits)_i sigmoid(<r, w_i> + b_i)) ** softplus(beta_raw)``,
      sets the step ``a = alpha_l * alpha_scale * m``; ``nag_update`` rotates ``r`` by ``arctan(a)``
      towards the output and adds ``log(1 + a^2) / 2`` to ``s``;
    - logits: a cosine head, ``exp(s) * g_dec * <r, w_v>`` with the head's rows ``w_v`` centred and of unit norm.
    """

    gated = True
    centre = orthogonalise = True  # the ablations switch one off

    def __init__(self, d_model: int, n_sublayers: int, norm_eps: float, gate_directions: int = 32,
                 alpha_power: float = 0.5, gate_init_std: float = 0.5, input_gain: bool = True,
                 embedding_init_std: float = 0.3, alpha_warmup_steps: int = 0, eps: float = 1e-4,
                 direction_dtype: str = "float32") -> None:
        super().__init__()
        if direction_dtype not in DIRECTION_DTYPES:
            raise ValueError(f"NAG.direction_dtype must be one of {', '.join(DIRECTION_DTYPES)}, "
                             f"got {direction_dtype!r}.")
        self.d_model, self.eps, self.direction_dtype = d_model, eps, DIRECTION_DTYPES[direction_dtype]
        n, c = n_sublayers, gate_directions
        # The package's initial values (its parameters' names and shapes are what matter: trained weights replace them).
        self.alpha = nn.Parameter((torch.arange(1, n + 1, dtype=torch.float64) ** -alpha_power).float())
        self.gate_w = nn.Parameter(torch.randn(n, c, d_model) * (gate_init_std / math.sqrt(d_model)))
        self.gate_b = nn.Parameter(torch.zeros(n, c))
        self.gate_logits = nn.Parameter(torch.zeros(n, c))
        self.beta_raw = nn.Parameter(torch.full((n,), math.log(math.e - 1.0)))  # softplus(beta_raw) = 1
        self.g_enc = nn.Parameter(torch.zeros(1))
        self.g_dec = nn.Parameter(torch.ones(1))
        self.gains = nn.Parameter(torch.ones(n, d_model)) if input_gain else None
        # Training's alpha warm-up factor (1 once it is over), kept in the checkpoint.
        self.register_buffer("alpha_scale", torch.tensor(1.0 if alpha_warmup_steps <= 0 else 0.0))

    def gate(self, direction: torch.Tensor, layer: int) -> torch.Tensor:
        i = layer - 1
        with _float32_region(direction.device):
            scores = F.linear(direction.float(), self.gate_w[i].float(), self.gate_b[i].float())  # (B, T, C)
            mixture = (torch.sigmoid(scores) * torch.softmax(self.gate_logits[i].float(), dim=-1)).sum(-1)
            return mixture.clamp_min(1e-6) ** F.softplus(self.beta_raw[i].float())

    def plan(self, state: NAGState, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        m = self.gate(state.direction, layer)
        return m, self.alpha[layer - 1] * self.alpha_scale * m

    def enter(self, embedded: torch.Tensor) -> NAGState:
        e = embedded.float()
        e = e - e.mean(dim=-1, keepdim=True)
        norm = e.norm(dim=-1).clamp_min(self.eps)
        root_d = math.sqrt(self.d_model)
        direction = (e * (root_d / norm).unsqueeze(-1)).to(self.direction_dtype)
        return NAGState(direction, torch.log(norm / root_d) + self.g_enc)

    def read(self, state: NAGState, layer: int) -> torch.Tensor:
        return state.direction.float() if self.gains is None else state.direction * self.gains[layer - 1]

    def write(self, state: NAGState, update: torch.Tensor, layer: int, step: torch.Tensor) -> NAGState:
        if self.centre and self.orthogonalise:
            return NAGState(*nag_update(state.direction, state.log_norm, update, step, self.eps))
        return NAGState(*ablated_update(state.direction, state.log_norm, update, step, self.eps,
                                        self.centre, self.orthogonalise))

    def head_rows(self, weight: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """The cosine head's rows, kept between forwards without gradients (decoding): rebuilding
        the (vocab, d) rows per token costs about as much as the rest of a decode step."""
        if torch.is_grad_enabled():
            return _centred_unit_rows(weight.float(), self.eps).to(dtype)
        key = (weight.data_ptr(), weight._version, weight.device, dtype)
        if getattr(self, "_head_rows", (None,))[0] != key:
            self._head_rows = (key, _centred_unit_rows(weight.float(), self.eps).to(dtype))
        return self._head_rows[1]

    def logits(self, state: NAGState, head: nn.Linear) -> torch.Tensor:
        # Scaling the (B, T, d) input rather than the (B, T, vocab) logits: the same product, less memory traffic.
        scaled = state.direction * (state.log_norm.exp() * self.g_dec).unsqueeze(-1)
        return F.linear(scaled, self.head_rows(head.weight, scaled.dtype))


class NAGNoGate(NAG):
    """NAG with ``m = 1``: every token steps by ``alpha_l`` (no gate parameters)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        for name in ("gate_w", "gate_b", "gate_logits", "beta_raw"):
            delattr(self, name)

    def gate(self, direction, layer):
        return direction.new_ones(direction.shape[:-1], dtype=torch.float32)


class NAGFixedBeta(NAG):
    """NAG whose gate exponent stays 1 (``beta_raw`` a buffer, not trained)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        beta_raw = self.beta_raw.detach().clone()
        delattr(self, "beta_raw")
        self.register_buffer("beta_raw", beta_raw)


class NAGNoCentring(NAG):
    """NAG without centring the sub-layer output."""

    centre = False


class NAGNoOrthogonalisation(NAG):
    """NAG moving towards the whole (centred) output, not only its part orthogonal to the direction."""

    orthogonalise = False


STRATEGIES = {cls.__name__: cls for cls in (PreNorm, PostNorm, DeepNorm, ReZero, LayerScale, OrthogonalUpdate,
                                            LayerNormScaling, NAG, NAGNoGate, NAGFixedBeta, NAGNoCentring,
                                            NAGNoOrthogonalisation)}


def build_strategy(spec: dict, d_model: int, n_sublayers: int, norm_eps: float) -> ResidualStrategy:
    """The strategy named by the last part of ``spec["class_path"]``, built with ``spec["init_args"]``."""
    class_path = spec["class_path"]
    name = class_path.rpartition(".")[2]
    if name not in STRATEGIES:
        raise ValueError(f"Unknown residual strategy {class_path!r}: this file implements "
                         f"{', '.join(sorted(STRATEGIES))}.")
    return STRATEGIES[name](d_model, n_sublayers, norm_eps, **spec.get("init_args", {}))


# ---------------------------------------------------------------------------------------------
# Skipping: the package's SkipPolicy, threshold and capacity modes
# ---------------------------------------------------------------------------------------------

SKIP_RULES = {"step", "abs_step", "gate"}  # scores that are a function of the token's state
RANDOM_RULES = {"random", "last_layers"}  # the controls: a fresh random draw per pair, which no copy reproduces


class SkipPolicy(nn.Module):
    """Which tokens run each sub-layer of a gated model.

    A pair (token, sub-layer ``l``) runs when its score reaches the threshold, ``score >= t``
    (``t``: ``thresholds[0]``, or ``thresholds[l - 1]`` with ``threshold_scope: per_layer``); no
    token is exempt. The score is the rule's: ``step`` a, ``abs_step`` |a|, ``gate`` m. Nothing
    skips while every threshold is <= 0. In ``capacity`` mode, a forward without a KV cache
    then keeps, per sequence, only the earliest ``capacity(l, T)`` of those tokens; with a cache
    (generation) the package decides in threshold mode, and so does this copy.
    """

    def __init__(self, skip: dict, n_sublayers: int) -> None:
        super().__init__()
        if skip["threshold_scope"] not in ("global", "per_layer") or skip["mode"] not in ("threshold", "capacity"):
            raise ValueError(f"Unknown skip configuration {skip}.")
        self.mode, self.rule, self.per_layer = skip["mode"], skip["rule"], skip["threshold_scope"] == "per_layer"
        self.capacity_factor = float(skip["capacity_factor"])
        self.register_buffer("thresholds", torch.zeros(n_sublayers if self.per_layer else 1))
        # Capacity mode: per sub-layer, the share of a sequence's tokens kept (all zero: none fitted yet).
        self.register_buffer("capacity_shares", torch.zeros(n_sublayers))

    @property
    def active(self) -> bool:
        return bool((self.thresholds > 0).any())

    def capacity(self, layer: int, seq: int) -> int:
        """``ceil(capacity_factor * share * seq)`` rounded up to a multiple of ``max(8, seq // 16)``,
        at most ``seq``; ``seq`` while a share is missing."""
        shares = self.capacity_shares.tolist()
        if not all(shares):
            return seq
        wanted = math.ceil(self.capacity_factor * shares[layer - 1] * seq)
        bucket = max(8, seq // 16)
        return min(seq, max(1, -(-wanted // bucket)) * bucket)

    def executed(self, m: torch.Tensor, a: torch.Tensor, layer: int, capacity: bool) -> torch.Tensor:
        """(B, T) bool: the tokens that run sub-layer ``layer``."""
        if self.rule not in SKIP_RULES:
            raise ValueError(f"skip rule {self.rule!r} cannot be reproduced outside the package "
                             f"(supported: {', '.join(sorted(SKIP_RULES))}).")
        score = {"step": a, "abs_step": a.abs(), "gate": m}[self.rule].detach()
        executed = score >= self.thresholds[layer - 1 if self.per_layer else 0]
        if capacity:  # causal: a token's place in the queue depends only on earlier tokens
            executed = executed & (executed.cumsum(1) - 1 < self.capacity(layer, a.shape[1]))
        return executed


# ---------------------------------------------------------------------------------------------
# The model
# ---------------------------------------------------------------------------------------------

class NagTransformer(nn.Module):
    """The package's ``Transformer``: the same submodules under the same names."""

    def __init__(self, nag: dict) -> None:
        super().__init__()
        self.nag = nag
        self.embed = nn.Embedding(nag["vocab_size"], nag["d_model"])
        self.drop = nn.Dropout(nag["dropout"])
        self.blocks = nn.ModuleList(Block(nag) for _ in range(nag["n_layers"]))
        self.n_sublayers = 2 * nag["n_layers"]
        self.residual = build_strategy(nag["residual"], nag["d_model"], self.n_sublayers, nag["norm_eps"])
        self.skip_policy = SkipPolicy(nag["skip"], self.n_sublayers) if self.residual.gated else None
        self.head = nn.Linear(nag["d_model"], nag["vocab_size"], bias=False)
        if nag["tie_embeddings"]:
            self.head.weight = self.embed.weight

    def forward(self, input_ids: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, masking: dict,
                cache: Any = None, skipping: bool = False,
                capacity: bool = False) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Logits (B, T, vocab) and, when ``skipping``, each sub-layer's executed tokens (B, T)."""
        residual = self.residual
        state = residual.enter(self.drop(self.embed(input_ids)))
        executed = []
        for index, block in enumerate(self.blocks):
            for layer in (2 * index + 1, 2 * index + 2):
                step = None
                if residual.gated:  # the step is known before the sub-layer runs
                    m, step = residual.plan(state, layer)
                    if skipping:
                        runs = self.skip_policy.executed(m, step, layer, capacity)
                        step = torch.where(runs, step, torch.zeros_like(step))  # a = 0: the state stays
                        executed.append(runs)
                x = residual.read(state, layer)
                if layer % 2:
                    update = block.attn(x, cos, sin, masking, cache, index)
                else:
                    update = block.mlp(x)
                state = residual.write(state, update, layer, step)
        return residual.logits(state, self.head), executed


def attention_masking(attention_mask: torch.Tensor | None, past: int, seq: int, device: torch.device) -> dict:
    """``scaled_dot_product_attention``'s masking arguments for ``seq`` queries after ``past``
    cached keys; ``attention_mask`` (B, past + seq), 0 at padding, or None without padding.
    Without padding, the package's own choice (its numbers): the causal kernel from position 0,
    no mask for one new token."""
    keys = past + seq
    if attention_mask is None:
        if past == 0:
            return {"is_causal": True}
        if seq == 1:
            return {}
        return {"attn_mask": torch.arange(past, keys, device=device)[:, None] >= torch.arange(keys, device=device)}
    if attention_mask.shape[-1] != keys:
        raise ValueError(f"attention_mask covers {attention_mask.shape[-1]} tokens; "
                         f"the cache and the input hold {keys}.")
    query, key = torch.arange(past, keys, device=device)[:, None], torch.arange(keys, device=device)
    visible = (query >= key) & attention_mask.bool()[:, None, :]  # (B, T, K)
    # A padding query sees at least itself: a row with no key would give NaN, which 0 weights do not cancel.
    visible = visible | (query == key)
    return {"attn_mask": visible.unsqueeze(1)}


class NagLightningForCausalLM(PreTrainedModel, GenerationMixin):
    """A nag_lightning decoder for ``transformers``: ``forward`` gives logits (and the loss with
    ``labels``); ``generate`` decodes with a ``DynamicCache``. Batches may be left-padded (the
    ``attention_mask`` marks padding with 0; positions count real tokens only). A position at or past
    ``context_length`` raises (the package's ``generate`` stops there instead): keep
    ``prompt + max_new_tokens`` within it."""

    config_class = NagLightningConfig
    base_model_prefix = "model"
    main_input_name = "input_ids"
    _no_split_modules: ClassVar[list[str]] = ["Block"]
    # transformers 5 maps each tied parameter to its source; 4.x listed the tied ones.
    _tied_weights_keys = ({"model.head.weight": "model.embed.weight"} if _TRANSFORMERS_MAJOR >= 5
                          else ["model.head.weight"])

    def __init__(self, config: NagLightningConfig) -> None:
        super().__init__(config)
        self.model = NagTransformer(config.nag_config)
        self.last_skip_rate: float | None = None  # share of (real token, sub-layer) pairs the last forward skipped
        self._check_skipping()
        self.post_init()

    def _check_skipping(self) -> None:
        if not self.config.skip_enabled:
            return
        name = self.config.nag_config["residual"]["class_path"].rpartition(".")[2]
        if self.model.skip_policy is None:
            raise ValueError(f"skip_enabled=True, but the residual strategy {name} has no gate to skip with "
                             "(NAG and its ablations do).")
        rule = self.model.skip_policy.rule
        if rule not in SKIP_RULES:
            why = "draws random scores" if rule in RANDOM_RULES else "is unknown"
            raise ValueError(f"skip_enabled=True with skip rule {rule!r}: the rule {why}, so this copy cannot "
                             f"reproduce the package's decisions; supported rules: {', '.join(sorted(SKIP_RULES))}. "
                             "Load with skip_enabled=False for the dense model.")

    def get_input_embeddings(self) -> nn.Module:
        return self.model.embed

    def set_input_embeddings(self, value: nn.Module) -> None:
        self.model.embed = value

    def get_output_embeddings(self) -> nn.Module:
        return self.model.head

    def set_output_embeddings(self, value: nn.Module) -> None:
        self.model.head = value

    def forward(self, input_ids: torch.LongTensor | None = None, attention_mask: torch.Tensor | None = None,
                position_ids: torch.LongTensor | None = None, past_key_values: Any = None,
                use_cache: bool | None = None, labels: torch.LongTensor | None = None,
                return_dict: bool | None = None, cache: Any = None, **kwargs: Any):
        """``cache`` is ``past_key_values``' name since transformers 5.25 (``generate`` passes it so)."""
        if input_ids is None:
            raise ValueError("NagLightningForCausalLM needs input_ids (inputs_embeds are not supported).")
        nag, policy = self.config.nag_config, self.model.skip_policy
        batch, seq = input_ids.shape
        device = input_ids.device
        cache = past_key_values if cache is None else cache
        decoding = cache is not None  # as the package: with a KV cache, skipping is threshold mode
        use_cache = getattr(self.config, "use_cache", True) if use_cache is None else use_cache
        if use_cache and cache is None:
            cache = DynamicCache()
        past = cache.get_seq_length() if cache is not None else 0

        padded = attention_mask is not None and not bool(attention_mask.all())
        if position_ids is None:
            position_ids = ((attention_mask.long().cumsum(-1) - 1).clamp_min(0)[:, -seq:] if padded
                            else torch.arange(past, past + seq, device=device).unsqueeze(0))
        if int(position_ids.max()) >= nag["context_length"]:
            raise ValueError(f"Position {int(position_ids.max())} is past the model's context_length="
                             f"{nag['context_length']} (it was trained on no longer sequences).")
        cos, sin = rotary_tables(position_ids, nag["d_model"] // nag["n_heads"], nag["rope_theta"])
        masking = attention_masking(attention_mask if padded else None, past, seq, device)

        skip_enabled = self.config.skip_enabled
        if skip_enabled:
            self._check_skipping()  # the flag may have been switched on after loading
        skipping = skip_enabled and policy.active
        capacity = skipping and policy.mode == "capacity" and not decoding
        if capacity and padded:
            raise ValueError("Capacity-mode skipping needs unpadded sequences (its per-sequence capacities "
                             "count every token); pass no attention_mask with zeros, or decode with a cache.")
        logits, executed = self.model(input_ids, cos.unsqueeze(1), sin.unsqueeze(1), masking, cache,
                                      skipping, capacity)
        logits = logits.float()

        self.last_skip_rate = None
        if skip_enabled:
            real = (attention_mask[:, -seq:].bool() if padded
                    else torch.ones(batch, seq, dtype=torch.bool, device=device))
            skipped = sum(int((real & ~runs).sum()) for runs in executed)
            self.last_skip_rate = skipped / (int(real.sum()) * self.model.n_sublayers)

        loss = None
        if labels is not None:  # token t predicts token t + 1
            loss = F.cross_entropy(logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten().to(device), ignore_index=-100)
        output = CausalLMOutputWithPast(loss=loss, logits=logits, **{_CACHE_FIELD: cache if use_cache else None})
        return_dict = getattr(self.config, "return_dict", True) if return_dict is None else return_dict
        return output if return_dict else output.to_tuple()
