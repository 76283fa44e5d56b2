"""A key/value cache for incremental decoding. Pure PyTorch.

Every block's keys and values for ``B`` sequences are preallocated up to the model's
``context_length``; a forward with a cache runs only the new tokens and attends to everything the
sequences hold so far. Sequences may hold different numbers of tokens (prompts of different
lengths decoded in one batch): each new token sits at its own sequence's next position, for its
rotary embedding, its cache slot and the keys it may see.

Under Mixture-of-Depths a token that skips attention still writes its keys and values (the
projection runs for every token), so the cache is the same whatever the skip rate.
"""

from __future__ import annotations

from typing import Any

import torch


class CacheFullError(ValueError):
    """A forward that would write past the cache's ``context_length``."""


class KVCache:
    def __init__(self, config: Any, batch: int) -> None:
        """Empty cache for ``batch`` sequences of a model built from ``config`` (a ModelConfig).
        Its memory is allocated at the first write, on that write's device and in its dtype (the
        projections' output dtype: bfloat16 under bf16 autocast)."""
        self.shape = (config.n_layers, batch, config.n_kv_heads, config.context_length, config.head_dim)
        self.keys: torch.Tensor | None = None
        self.values: torch.Tensor | None = None
        self.capacity = config.context_length
        # Tokens held per sequence, on the host: planning a forward never waits for the device.
        self.lengths = [0] * batch
        self._starts: torch.Tensor | None = None  # (B, 1) of the forward under way, when not aligned
        self._positions: torch.Tensor | None = None  # (B, T) absolute positions of its tokens

    @property
    def nbytes(self) -> int:
        """Bytes held by keys and values (0 before the first forward)."""
        return 0 if self.keys is None else self.keys.nbytes + self.values.nbytes

    @property
    def batch(self) -> int:
        return len(self.lengths)

    # ---- one forward: begin, then store per block, then commit ----
    def begin(self, seq: int, cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Prepare a forward of ``seq`` new tokens per sequence; the rotary tables ``cos``/``sin``
        (context_length, h/2) at their positions: (seq, h/2) when every sequence holds as many
        tokens, else (B, 1, seq, h/2)."""
        longest = max(self.lengths) + seq
        if longest > self.capacity:
            raise CacheFullError(
                f"the KV cache holds at most context_length={self.capacity} tokens per sequence; this forward "
                f"would reach {longest}. Generation does not slide past the context: shorten the prompt or "
                "ask for fewer new tokens.")
        self._seq = seq
        if self.aligned:
            start = self.lengths[0]
            self._positions = None
            return cos[start:start + seq], sin[start:start + seq]
        starts = torch.tensor(self.lengths, device=cos.device).unsqueeze(1)
        self._positions = starts + torch.arange(seq, device=cos.device)
        return cos[self._positions].unsqueeze(1), sin[self._positions].unsqueeze(1)

    @property
    def aligned(self) -> bool:
        """Whether every sequence holds the same number of tokens (a Python value)."""
        return len(set(self.lengths)) == 1

    @property
    def starts_at_zero(self) -> bool:
        return not any(self.lengths)

    def store(self, block: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, dict]:
        """Write block ``block``'s new keys and values (B, kv_heads, seq, h); return every key and
        value the new queries may see (B, kv_heads, K, h) and the ``scaled_dot_product_attention``
        arguments that keep attention causal over them."""
        seq = self._seq
        if self.keys is None:
            self.keys = k.new_zeros(self.shape)
            self.values = v.new_zeros(self.shape)
        if self.aligned:
            start = self.lengths[0]
            self.keys[block, :, :, start:start + seq] = k
            self.values[block, :, :, start:start + seq] = v
            end = start + seq
            keys, values = self.keys[block, :, :, :end], self.values[block, :, :, :end]
            if start == 0:
                return keys, values, {"is_causal": True}
            if seq == 1:
                return keys, values, {}  # the one new query sees every key
            visible = torch.arange(start, end, device=k.device)[:, None] >= torch.arange(end, device=k.device)
            return keys, values, {"attn_mask": visible}
        rows = torch.arange(self.batch, device=k.device).unsqueeze(1)
        # Advanced indices on dims 1 and 3 (a slice between them) put (B, seq) first: (B, seq, heads, h).
        self.keys[block, rows, :, self._positions] = k.transpose(1, 2)
        self.values[block, rows, :, self._positions] = v.transpose(1, 2)
        end = max(self.lengths) + seq
        # A query sees the keys at or before its own position in its own sequence; slots past a
        # shorter sequence's end hold stale values and stay hidden.
        visible = self._positions[:, None, :, None] >= torch.arange(end, device=k.device)
        return self.keys[block, :, :, :end], self.values[block, :, :, :end], {"attn_mask": visible}

    def commit(self, advance: list[int] | None = None) -> None:
        """After the forward: each sequence now holds ``advance[b]`` more tokens (default: all the
        forward's tokens; fewer when a batch of prompts was padded to its longest)."""
        advance = [self._seq] * self.batch if advance is None else advance
        self.lengths = [length + step for length, step in zip(self.lengths, advance)]
        self._positions = None
