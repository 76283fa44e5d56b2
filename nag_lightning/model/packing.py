"""Where a skipping sub-layer's executed tokens go: packed rows for the projections and the MLP,
and a per-sequence query layout for attention. Pure PyTorch.

A sub-layer that only some tokens execute runs its matmuls on those tokens, packed across the
batch (``gather``: ``N`` rows instead of ``B * T``), and scatters the results back. ``N`` changes
with every batch, so it is padded up to a multiple of ``BUCKET`` tokens: a compiler then sees a
few row counts, all marked dynamic, instead of a new shape per batch. Padding rows read token 0
and write into a scratch row that is dropped, so they never touch a real token.

Attention needs the executed queries per sequence: they are laid out as ``(B, W)``, ``W`` the
busiest sequence's count (bucketed), and attend with a boolean causal mask over the keys up to
the last executed position (bucketed). The causal kernel skips the keys past each block of
queries, which the masked one cannot, so when the ``(B, W, K)`` box is not smaller than what the
causal kernel computes, the layout keeps every position (``W = T``) and the causal kernel runs,
with the skipped tokens' queries zero and their outputs dropped.

Building a packing reads the counts on the host: one synchronisation per skipping sub-layer,
which a threshold rule cannot avoid (the counts depend on the previous sub-layer's output).

``run_counts`` says what a packing makes run: its ``Np`` rows (padding included) through the
matmuls, and the attention scores of the layout chosen (the masked box or the causal triangle),
which the executed FLOPs count (``flops.py``).
"""

from __future__ import annotations

from typing import NamedTuple

import torch

# Executed-token counts are padded up to a multiple of this (rows, widths and key ranges).
BUCKET = 64
# By device type: the masked (B, W, K) attention is used when W * K is at most this fraction of
# T * T at T = 512, a fraction that scales as (512 / T) ** MASKED_ATTENTION_LENGTH_EXPONENT; above
# it, every query runs through the causal kernel. Measured on the build machine's CPU (torch 2.13,
# bf16, forward + backward; the causal kernel skips key blocks past each block of queries, so its
# saving over the full T x T box grows with T): the masked box breaks even with the causal kernel
# at W * K = 1.25 T^2 (T = 256), 1.0 T^2 (T = 512) and 0.68 T^2 (T = 1024); 0.9 keeps a margin.
# On an H200 (bf16, fwd+bwd, B=16, 16 heads, T=1024) the causal kernel over all 1,024 queries took
# 0.56 ms and the masked one 0.75 ms for only 256 of them: the mask never pays there.
MASKED_ATTENTION_PAYS_BELOW = {"cpu": 0.9, "cuda": 0.0}
MASKED_ATTENTION_LENGTH_EXPONENT = 0.44


# What ``pack_tokens(..., exact=True)`` returns when every token executes (the sub-layer runs
# densely, unpacked) and when none does (it is left out).
EVERY_TOKEN = "every token"
NO_TOKEN = "no token"


def causal_pairs(batch: int, seq: int) -> int:
    """(query, key) pairs per head that causal attention over ``batch`` sequences of ``seq`` computes:
    a query at position t sees t + 1 keys."""
    return batch * seq * (seq + 1) // 2


def bucketed(count: int, limit: int, bucket: int | None = None) -> int:
    """``count`` rounded up to a multiple of ``bucket`` (default ``BUCKET``; at least one), at most ``limit``."""
    bucket = BUCKET if bucket is None else bucket
    return min(limit, max(1, -(-count // bucket)) * bucket)


def _dynamic(tensor: torch.Tensor, *dims: int) -> torch.Tensor:
    for dim in dims:
        torch._dynamo.maybe_mark_dynamic(tensor, dim)
    return tensor


class TokenPacking(NamedTuple):
    """The executed tokens of one sub-layer over a (B, T) batch; ``N`` of them, padded to ``Np``."""

    gather: torch.Tensor  # (Np,) flat index b * T + t of each executed token (row-major); padding: 0
    scatter: torch.Tensor  # (Np,) the same, padding: B * T (a scratch row past the end)
    positions: torch.Tensor  # (Np,) each token's position t (padding: 0), for rotary embeddings
    # Attention only (None for an MLP):
    slot: torch.Tensor | None = None  # (Np,) b * W + j of each token in the (B, W) query layout; padding: B * W
    query_positions: torch.Tensor | None = None  # (B, W) position of each query slot; None: W = T, causal
    key_range: torch.Tensor | None = None  # (K,) arange(K): the keys the queries can see

    def gather_rows(self, x: torch.Tensor) -> torch.Tensor:
        """(Np, ...) rows of ``x`` (B, T, ...) for the executed tokens (padding rows: token 0)."""
        return x.flatten(0, 1).index_select(0, self.gather)

    def rows_of(self, table: torch.Tensor) -> torch.Tensor:
        """(Np, ...) rows of a per-position table: (T, ...) indexed by position, or per sequence
        (B, 1, T, ...) as a KV cache gives when its sequences hold different numbers of tokens."""
        return table[self.positions] if table.dim() == 2 else table.flatten(0, 2).index_select(0, self.gather)

    def source_rows(self, tokens: int) -> torch.Tensor:
        """(tokens,) int64: each token's row among the packed ones, -1 for a token that is not
        packed (the inverse of ``scatter``; the padding rows' scratch slot is dropped)."""
        rows = torch.full((tokens + 1,), -1, dtype=torch.long, device=self.scatter.device)
        return rows.index_copy_(0, self.scatter, torch.arange(len(self.scatter), device=self.scatter.device))[:-1]

    def scatter_into(self, full: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        """A copy of ``full`` (B, T, ...) whose executed tokens hold ``rows`` (Np, ...) instead.
        Padding rows land in a scratch row past the end, which is dropped."""
        flat = full.flatten(0, 1)
        # In place on the concatenation's fresh output: autograd allows it (cat keeps no output for
        # its backward), and it saves a second full copy.
        out = torch.cat((flat, flat.new_zeros(1, *flat.shape[1:]))).index_copy_(0, self.scatter, rows.to(flat.dtype))
        return out[:-1].view(full.shape)


def run_counts(batch: int, seq: int, packing: TokenPacking | str | None, attention: bool) -> tuple[int, int]:
    """What a sub-layer over (batch, seq) tokens ran with ``packing``: (rows through its matmuls,
    (query, key) score pairs per head of its attention; 0 for an MLP). ``packing`` None: unpacked,
    every token (``EVERY_TOKEN``, dense, the mask oracle); ``NO_TOKEN``: left out. A packing runs
    all its ``Np`` rows, padding included; its attention the whole (B, W, K) box of the masked
    layout (the mask hides pairs, it saves none), or the causal kernel over all T queries, the
    skipped ones too (their queries are zero). Without a KV cache: a cached forward's queries also
    see the keys held before it, which this does not count. Shapes only: no synchronisation, and
    under a compiler the counts stay symbolic."""
    if packing is NO_TOKEN:
        return 0, 0
    rows = batch * seq if packing is None else packing.gather.shape[0]
    if not attention:
        return rows, 0
    if packing is None or packing.query_positions is None:
        return rows, causal_pairs(batch, seq)
    return rows, batch * packing.query_positions.shape[1] * packing.key_range.shape[0]


def pack_tokens(executed: torch.Tensor, attention: bool = False, masked_layout: bool = True,
                exact: bool = False) -> TokenPacking | str:
    """The packing of the tokens ``executed`` (B, T) bool; with ``attention``, also their query
    layout (the masked one only if ``masked_layout``).

    ``EVERY_TOKEN`` when every token executes: the sub-layer runs unpacked (gathering and
    scattering every row would only cost time). Otherwise counts are bucketed by default and a
    packing always holds at least one (padding) row: every parameter then takes part in the
    forward, which data-parallel training needs (DDP waits for every gradient). ``exact`` is for
    eager decoding: counts unpadded, and ``NO_TOKEN`` when no token executes (the sub-layer is left out)."""
    batch, seq = executed.shape
    if exact and batch * seq == 1:  # decoding one sequence: the token runs the sub-layer or not
        return EVERY_TOKEN if bool(executed) else NO_TOKEN
    counts = executed.sum(dim=1)
    if attention:
        last = torch.where(executed, torch.arange(1, seq + 1, device=executed.device), 0).amax()
        total, widest, keys = torch.stack((counts.sum(), counts.max(), last)).tolist()
    else:
        total = int(counts.sum())
    if exact and total == 0:
        return NO_TOKEN
    if total == batch * seq:
        return EVERY_TOKEN
    bucket = 1 if exact else None
    rows = bucketed(total, batch * seq, bucket)
    gather = torch.nonzero_static(executed.flatten(), size=rows, fill_value=-1).squeeze(1)
    padding = gather < 0
    scatter = gather.masked_fill(padding, batch * seq)
    gather = gather.masked_fill(padding, 0)
    positions = gather % seq
    if not attention:
        return TokenPacking(_dynamic(gather, 0), _dynamic(scatter, 0), _dynamic(positions, 0))
    width, keys = bucketed(widest, seq, bucket), bucketed(keys, seq, bucket)
    pays_below = MASKED_ATTENTION_PAYS_BELOW.get(executed.device.type, 0.0) * (512 / seq) ** MASKED_ATTENTION_LENGTH_EXPONENT
    if masked_layout and width * keys <= pays_below * seq * seq:
        row = gather // seq
        first_of_row = torch.cumsum(counts, 0) - counts  # exclusive prefix sum: the row's first packed index
        slot = row * width + torch.arange(rows, device=executed.device) - first_of_row[row]
        slot = slot.masked_fill(padding, batch * width)
        query_positions = positions.new_zeros(batch * width + 1).index_copy(0, slot, positions)[:-1].view(batch, width)
        query_positions = _dynamic(query_positions, 1)
        key_range = _dynamic(torch.arange(keys, device=executed.device), 0)
    else:  # every position keeps its slot: the causal kernel over all T queries
        slot, query_positions, key_range = scatter, None, None
    return TokenPacking(_dynamic(gather, 0), _dynamic(scatter, 0), _dynamic(positions, 0), _dynamic(slot, 0),
                        query_positions, key_range)


def capacity_packing(executed: torch.Tensor, capacity: int, attention: bool = False) -> tuple[TokenPacking, torch.Tensor]:
    """Capacity mode's packing: per sequence, the earliest ``capacity`` tokens of ``executed`` (B, T)
    bool, in a static (B, capacity) layout, and the (B, T) mask of the tokens kept. No host
    synchronisation: a running count of ``executed`` along the sequence gives each executed token
    its slot; those below ``capacity`` keep it (causal: a token's slot depends on positions <= t
    only); a scatter of positions into a (B, capacity) table gives the index. A sequence with fewer
    executed tokens fills its last slots with padding, which reads its first token and writes into
    the scratch row. Attention takes the masked (B, capacity, T) layout where it pays on this
    device (``MASKED_ATTENTION_PAYS_BELOW``), else every position keeps its slot (causal kernel)."""
    batch, seq = executed.shape
    device = executed.device
    slot_in_sequence = executed.cumsum(1) - 1
    kept = executed & (slot_in_sequence < capacity)
    positions = torch.arange(seq, device=device).expand(batch, seq)
    table = torch.full((batch, capacity + 1), seq, dtype=torch.long, device=device)  # seq: padding
    # Tokens not kept all write into the extra column, which is dropped.
    table = table.scatter(1, torch.where(kept, slot_in_sequence, capacity), positions)[:, :capacity]
    padding = table == seq
    first = (torch.arange(batch, device=device) * seq).unsqueeze(1)
    token_positions = table.masked_fill(padding, 0)
    gather = (first + token_positions).flatten()
    scatter = (first + table).masked_fill(padding, batch * seq).flatten()
    positions = token_positions.flatten()
    if not attention:
        return TokenPacking(gather, scatter, positions), kept
    pays_below = MASKED_ATTENTION_PAYS_BELOW.get(device.type, 0.0) * (512 / seq) ** MASKED_ATTENTION_LENGTH_EXPONENT
    if capacity * seq <= pays_below * seq * seq:
        slot = torch.arange(batch * capacity, device=device)
        return TokenPacking(gather, scatter, positions, slot, token_positions, torch.arange(seq, device=device)), kept
    return TokenPacking(gather, scatter, positions, scatter), kept
