"""Decoding with a KV cache: the same tokens and the same skip decisions as full forwards."""

import pytest
import torch

from conftest import tiny_model_config
from nag_lightning.model import Transformer
from nag_lightning.model.generation import sample_tokens
from nag_lightning.model.kv_cache import CacheFullError, KVCache
from nag_lightning.model.residual import NAG, PreNorm


def build(residual, seed=0, dtype=torch.float64, **overrides):
    torch.manual_seed(seed)
    # A larger init than training's, so that attention moves the logits far more than rounding does.
    values = dict(vocab_size=97, context_length=40, residual=residual, init_std=0.3)
    values.update(overrides)
    return Transformer(tiny_model_config(**values)).to(dtype).eval()


def skipping_nag(rate=0.3, **overrides):
    """A NAG model whose thresholds skip about ``rate`` of the pairs of a random batch."""
    model = build(NAG(**overrides))
    with torch.no_grad(), model.residual.calibrate(rate):
        model(torch.randint(0, 97, (4, 40), generator=torch.Generator().manual_seed(1)))
    assert model.residual.skipping
    return model


# float64 models, but NAG's gate runs in float32 (gate() casts: it decides skips), so paths that
# round differently agree to ~1e-7, not 1e-15; a wrong position or mask moves logits by > 1e-2.
LOGIT_TOLERANCE = 1e-5


def record_logits(model):
    """Wrap ``model.extend`` to record the logits (B, vocab) of every prefill and decode step."""
    logits = []
    extend = model.extend

    def recording(*args, **kwargs):
        logits.append(extend(*args, **kwargs))
        return logits[-1]

    model.extend = recording
    return logits


def greedy_without_cache(model, prompt, steps):
    """The oracle: every step runs the whole prefix through the full forward."""
    tokens = prompt
    with torch.no_grad():
        for _ in range(steps):
            tokens = torch.cat((tokens, model(tokens)[:, -1].argmax(-1, keepdim=True)), dim=1)
    return tokens


MODELS = {
    "prenorm": lambda: build(PreNorm()),
    "nag": lambda: build(NAG()),
    "nag-skip-global": lambda: skipping_nag(),
    "nag-skip-per-layer": lambda: skipping_nag(threshold_scope="per_layer"),
}


@pytest.mark.parametrize("name", MODELS)
def test_cached_greedy_decoding_equals_uncached(name):
    model = MODELS[name]()
    prompt = torch.randint(0, 97, (3, 6), generator=torch.Generator().manual_seed(2))
    steps = record_logits(model)
    cached = model.generate(prompt, 20, temperature=0)
    assert torch.equal(cached, greedy_without_cache(model, prompt, 20))
    with torch.no_grad():
        full = model(cached[:, :-1])[:, 5:]  # the logits after the prompt's last token onwards
    torch.testing.assert_close(torch.stack(steps, dim=1), full, rtol=0, atol=LOGIT_TOLERANCE)


@pytest.mark.parametrize("name", ["prenorm", "nag-skip-global"])
def test_prompts_of_different_lengths_decode_in_one_batch_as_they_would_alone(name):
    model = MODELS[name]()
    generator = torch.Generator().manual_seed(3)
    prompts = [torch.randint(0, 97, (n,), generator=generator).tolist() for n in (3, 9, 1, 6)]
    steps = record_logits(model)
    together = torch.stack(list(sample_tokens(model, prompts, 12, temperature=0)), dim=1)
    batched_logits = torch.stack(steps, dim=1)
    for row, prompt in enumerate(prompts):
        steps.clear()
        alone = torch.stack(list(sample_tokens(model, [prompt], 12, temperature=0)), dim=1)
        assert torch.equal(together[row], alone[0]), row
        torch.testing.assert_close(batched_logits[row], torch.stack(steps, dim=1)[0], rtol=0, atol=LOGIT_TOLERANCE)


def record_decisions(residual):
    """Wrap ``residual.plan`` to record every sub-layer's executed mask (B, T) per call."""
    decisions = {}
    plan = residual.plan

    def recording(state, layer):
        result = plan(state, layer)
        decisions.setdefault(layer, []).append(result.executed.clone())
        return result

    residual.plan = recording
    return decisions


@pytest.mark.parametrize("scope", ["global", "per_layer"])
def test_incremental_decode_makes_the_skip_decisions_of_a_full_forward(scope):
    model = skipping_nag(threshold_scope=scope)
    prompt = torch.randint(0, 97, (2, 7), generator=torch.Generator().manual_seed(4))
    decisions = record_decisions(model.residual)
    tokens = model.generate(prompt, 15, temperature=0)
    incremental = {layer: torch.cat(chunks, dim=1) for layer, chunks in decisions.items()}
    decisions.clear()
    with torch.no_grad():
        model(tokens[:, :-1])  # the last token sampled is never run
    executed = torch.cat([incremental[layer] for layer in sorted(incremental)])
    full = torch.cat([decisions[layer][0] for layer in sorted(decisions)])
    assert executed.shape == full.shape == (2 * 4, 7 + 14)
    assert torch.equal(executed, full)
    assert 0.1 < 1 - full.double().mean().item() < 0.6  # some pairs skipped, far from all


def test_skipping_nothing_is_bit_identical_to_dense():
    dense = build(NAG(), dtype=torch.float32)
    prompt = torch.randint(0, 97, (2, 5), generator=torch.Generator().manual_seed(5))
    reference = dense.generate(prompt, 12, temperature=0.9, top_k=20, generator=torch.Generator().manual_seed(6))
    reference_logits = dense.extend(prompt, KVCache(dense.config, 2))
    # Skipping machinery on (packing, gather, scatter), with a threshold below every step: nothing skips.
    dense.residual.set_thresholds(1e-30)
    assert dense.residual.skipping
    with torch.no_grad():
        assert torch.equal(dense.extend(prompt, KVCache(dense.config, 2)), reference_logits)
    # Rate 0 (what `nag generate --skip_rate 0` asks for) switches skipping off.
    with torch.no_grad(), dense.residual.calibrate(0.0):
        dense(prompt)
    assert not dense.residual.skipping
    again = dense.generate(prompt, 12, temperature=0.9, top_k=20, generator=torch.Generator().manual_seed(6))
    assert torch.equal(again, reference)


def test_a_sub_layer_no_token_executes_runs_no_matmul_but_still_writes_keys():
    model = build(NAG())
    model.residual.set_thresholds(1e9)  # every (token, sub-layer) pair skips
    calls = {"mlp": 0, "q_proj": 0, "kv_proj": 0}
    for block in model.blocks:
        block.mlp.register_forward_hook(lambda *_: calls.__setitem__("mlp", calls["mlp"] + 1))
        block.attn.q_proj.register_forward_hook(lambda *_: calls.__setitem__("q_proj", calls["q_proj"] + 1))
        block.attn.kv_proj.register_forward_hook(lambda *_: calls.__setitem__("kv_proj", calls["kv_proj"] + 1))
    cache = KVCache(model.config, 2)
    with torch.no_grad():
        model.extend(torch.randint(0, 97, (2, 5)), cache)
    assert calls == {"mlp": 0, "q_proj": 0, "kv_proj": 2}
    assert cache.lengths == [5, 5] and bool(cache.keys[:, :, :, :5].abs().sum(-1).gt(0).all())
    assert model.residual.skip_stats(2, 5).skip_rate.item() == 1.0


def test_cache_size_bounds_and_errors():
    model = build(PreNorm(), context_length=16, dtype=torch.float32)
    config = model.config
    cache = KVCache(config, 3)
    assert cache.nbytes == 0
    with torch.no_grad():
        model.extend(torch.randint(0, 97, (3, 10)), cache, lengths=[10, 4, 7])
    assert cache.lengths == [10, 4, 7]
    assert cache.nbytes == 2 * config.n_layers * 3 * config.n_kv_heads * 16 * config.head_dim * 4
    with pytest.raises(CacheFullError, match="context_length=16"), torch.no_grad():
        model.extend(torch.randint(0, 97, (3, 7)), cache)
    with pytest.raises(ValueError, match="lengths"):
        model.extend(torch.randint(0, 97, (3, 2)), cache, lengths=[1, 0, 2])
    # Generation stops when the context is full instead of sliding: a 12-token prompt leaves 5 steps.
    new = list(sample_tokens(model, [list(range(12))], max_new_tokens=50, temperature=0))
    assert len(new) == 16 - 12 + 1
    with pytest.raises(ValueError, match="longer than the model's context_length"):
        list(sample_tokens(model, [list(range(17))], 3))


def test_generation_stops_when_every_sequence_produced_the_stop_token():
    model = build(PreNorm())
    prompt = [[5, 6, 7]]
    first = next(sample_tokens(model, prompt, 10, temperature=0))
    assert len(list(sample_tokens(model, prompt, 10, temperature=0, stop_token=int(first)))) == 1
