"""Sampling with a KV cache: one prefill over the prompts, then one token per step. Pure PyTorch."""

from __future__ import annotations

from typing import Iterator

import torch

from nag_lightning.model.kv_cache import KVCache


def next_tokens(logits: torch.Tensor, temperature: float, top_k: int | None,
                generator: torch.Generator | None) -> torch.Tensor:
    """(B,) tokens from logits (B, vocab): the argmax when ``temperature == 0``, else sampled from
    ``softmax(logits / temperature)`` restricted to the ``top_k`` most likely tokens."""
    logits = logits.float()
    if temperature == 0:
        return logits.argmax(dim=-1)
    logits = logits / temperature
    if top_k is not None:
        kth = torch.topk(logits, min(top_k, logits.shape[-1])).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    return torch.multinomial(logits.softmax(dim=-1), 1, generator=generator).squeeze(1)


def padded_prompts(prompts: list[list[int]], device: torch.device) -> torch.Tensor:
    """(B, longest) token ids: each prompt followed by copies of its last token (positions past a
    prompt's own length are padding its sequence never reads)."""
    longest = max(len(prompt) for prompt in prompts)
    return torch.tensor([prompt + [prompt[-1]] * (longest - len(prompt)) for prompt in prompts], device=device)


def sample_tokens(model, prompts: list[list[int]], max_new_tokens: int, temperature: float = 1.0,
                  top_k: int | None = None, generator: torch.Generator | None = None,
                  stop_token: int | None = None, cache: KVCache | None = None,
                  records: list | None = None) -> Iterator[torch.Tensor]:
    """Yield the next token (B,) of every prompt, step by step, for up to ``max_new_tokens`` steps.

    ``model`` is a ``Transformer``. The prompts (lists of token ids, lengths may differ) are run
    in one prefill; each step then runs the tokens just sampled. Generation ends early when the
    model's context is full (no token is ever run past ``context_length``: the KV cache does not
    slide) or when every sequence has produced ``stop_token``. Pass ``cache`` to read its size
    afterwards; a new one is made otherwise. Pass ``records`` (a list) to have each forward's
    ``SkipRecord`` appended to it: the last one made the token just yielded.
    """
    if not prompts or any(len(prompt) == 0 for prompt in prompts):
        raise ValueError("every prompt needs at least one token.")
    context = model.config.context_length
    longest = max(len(prompt) for prompt in prompts)
    if longest > context:
        raise ValueError(f"a prompt of {longest} tokens is longer than the model's context_length={context}.")
    steps = min(max_new_tokens, context - longest + 1)  # the last token sampled is never run
    cache = KVCache(model.config, len(prompts)) if cache is None else cache
    device = model.head.weight.device
    def extend(tokens: torch.Tensor, lengths: list[int] | None = None) -> torch.Tensor:
        logits, record = model.extend(tokens, cache, lengths, return_record=True)
        if records is not None:
            records.append(record)
        return logits

    logits = extend(padded_prompts(prompts, device), [len(prompt) for prompt in prompts])
    finished = torch.zeros(len(prompts), dtype=torch.bool, device=device)
    for step in range(steps):
        token = next_tokens(logits, temperature, top_k, generator)
        yield token
        if stop_token is not None:
            finished |= token == stop_token
            if bool(finished.all()):
                return
        if step + 1 < steps:
            logits = extend(token.unsqueeze(1))
