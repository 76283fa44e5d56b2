"""Forward FLOPs of a batch (2 per multiply-add), per sub-layer from what it ran (``SkipStats``).

**Executed** FLOPs (``forward_flops``: IsoFlopBudget, the ``flops/executed_*`` tags, ``nag bench``,
the study) count what ran, padding included:

- a sub-layer's matmuls (attention's query and output projections; the MLP's gate, up and down)
  for every row that went through them (``SkipStats.run_rows``): all ``B * T`` tokens when it
  ran unpacked (every token executed it, a dense forward, or ``skip.execution: mask``); else the
  packing's rows, padding rows included: in threshold mode the executed count rounded up to a
  multiple of ``packing.BUCKET`` (64; at least one bucket, at most ``B * T``), in capacity mode
  ``B * capacity_l``, filled or not. A sub-layer left out (decoding, no token) ran none;
- attention's scores and weighted values for the (query, key) pairs of the layout that ran
  (``SkipStats.run_attention_pairs``, per head): the causal kernel over all ``T`` queries,
  ``T (T + 1) / 2`` per sequence, skipped queries included (dense, and the causal layout: always
  on CUDA); or the masked layout's whole box, ``W * K`` per sequence (threshold mode: the busiest
  sequence's executed count by the last executed position + 1, both bucketed; capacity mode:
  ``capacity_l * T``);
- for every token: its keys and values (every token writes them), the gate's ``C * d``
  multiply-adds per sub-layer (every token plans every sub-layer), and the LM head.

**Useful** FLOPs (``useful_forward_flops``) count the same terms for the executed tokens alone:
matmuls of the tokens that executed a sub-layer (``SkipStats.executed_tokens``), and the scores
and weighted values of executed queries over their causal prefix (a query at position p attends
to p + 1 keys: ``SkipStats.position_sums``). Executed >= useful; both equal the dense count when
every token runs every sub-layer.

Not counted in either: the embedding lookup, rotary embeddings, gathers and scatters (no
multiply-adds), norms, softmax and the NAG lane update (element-wise, a few FLOPs per feature),
and the key blocks a causal kernel computes whole along the diagonal (the triangle is the work
the layout asks for, as in the dense count). A forward with a KV cache (decoding) is not counted
(its queries also see the cached keys). Training executes about three times the forward
(backward = 2 x forward).
"""

from __future__ import annotations

import torch

from nag_lightning.model.config import ModelConfig
from nag_lightning.model.skip_policy import SkipStats


def forward_flops(config: ModelConfig, stats: SkipStats, gate_directions: int = 0) -> torch.Tensor:
    """Executed FLOPs of one forward pass: per sub-layer, its rows through the matmuls (padding
    included) and its attention's score pairs in the layout that ran (``stats.run_rows``,
    ``stats.run_attention_pairs``; ``SkipRecord.stats()`` or ``dense_stats``)."""
    if stats.run_rows is None or stats.run_attention_pairs is None:
        raise ValueError("forward_flops needs what ran per sub-layer (SkipStats.run_rows and run_attention_pairs, "
                         "from SkipRecord.stats() or dense_stats); useful_forward_flops needs only the executed "
                         "tokens.")
    return _flops(config, stats.tokens, stats.run_rows, stats.run_attention_pairs, gate_directions)


def useful_forward_flops(config: ModelConfig, stats: SkipStats, gate_directions: int = 0) -> torch.Tensor:
    """Useful FLOPs of one forward pass: per sub-layer, the matmuls of the tokens that executed it
    and the attention of those queries over their causal prefix (``stats.executed_tokens``,
    ``stats.position_sums``): no padding rows, no scores of skipped queries or past the causal
    prefix."""
    return _flops(config, stats.tokens, stats.executed_tokens, stats.position_sums, gate_directions)


def _flops(config: ModelConfig, tokens: int, rows: torch.Tensor, pairs: torch.Tensor,
           gate_directions: int) -> torch.Tensor:
    """FLOPs of a forward over ``tokens`` tokens whose sub-layers ran ``rows`` rows through their
    matmuls and ``pairs`` (query, key) pairs per head of attention (both (n_sublayers,))."""
    d, heads, kv_heads, head_dim = config.d_model, config.n_heads, config.n_kv_heads, config.head_dim
    rows, pairs = rows.double(), pairs.double()
    attention, mlp = slice(0, None, 2), slice(1, None, 2)
    per_all_tokens = 2 * d * 2 * kv_heads * head_dim * config.n_layers  # K and V of every token
    per_all_tokens += 2 * gate_directions * d * 2 * config.n_layers  # the gate, before every sub-layer
    per_all_tokens += 2 * d * config.vocab_size  # LM head
    flops = torch.as_tensor(float(per_all_tokens * tokens), dtype=torch.float64)
    flops = flops + rows[attention].sum() * 2 * 2 * d * heads * head_dim  # queries and output projection
    flops = flops + pairs[attention].sum() * 2 * 2 * heads * head_dim  # scores and weighted values
    flops = flops + rows[mlp].sum() * 2 * 3 * d * config.mlp_hidden  # SwiGLU: gate, up, down
    return flops
