"""Forward FLOPs actually executed by a batch (2 per multiply-add), from what ran per sub-layer.

Counted: every matmul of the tokens that executed a sub-layer, the attention scores and the
attention-weighted sum of executed queries (a query at position p attends to p + 1 keys), the
keys and values of every token (all tokens write K/V), the gate's ``C * d`` multiply-adds per
token and sub-layer (every token plans every sub-layer), and the LM head. Not counted: the
embedding lookup (no arithmetic), norms, softmax and the NAG lane update (element-wise, a few
FLOPs per feature). Training executes about three times the forward (backward = 2 x forward).
"""

from __future__ import annotations

import torch

from nag_lightning.model.config import ModelConfig
from nag_lightning.model.skip_policy import SkipStats


def forward_flops(config: ModelConfig, stats: SkipStats, gate_directions: int = 0) -> torch.Tensor:
    """FLOPs of one forward pass, given per sub-layer the number of tokens that executed it and
    the sum of ``position + 1`` over those tokens (``stats``, see ``SkipStats``)."""
    d, heads, kv_heads, head_dim = config.d_model, config.n_heads, config.n_kv_heads, config.head_dim
    executed, position_sums, tokens = stats.executed_tokens.double(), stats.position_sums.double(), stats.tokens
    attention, mlp = slice(0, None, 2), slice(1, None, 2)
    per_all_tokens = 2 * d * 2 * kv_heads * head_dim * config.n_layers  # K and V of every token
    per_all_tokens += 2 * gate_directions * d * 2 * config.n_layers  # the gate, before every sub-layer
    per_all_tokens += 2 * d * config.vocab_size  # LM head
    flops = torch.as_tensor(float(per_all_tokens * tokens), dtype=torch.float64)
    flops = flops + executed[attention].sum() * 2 * 2 * d * heads * head_dim  # queries and output projection
    flops = flops + position_sums[attention].sum() * 2 * 2 * heads * head_dim  # scores and weighted values
    flops = flops + executed[mlp].sum() * 2 * 3 * d * config.mlp_hidden  # SwiGLU: gate, up, down
    return flops

