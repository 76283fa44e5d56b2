"""Decoding with a KV cache: the same tokens and the same skip decisions as full forwards."""

import pytest
import torch

from conftest import tiny_model_config
from nag_lightning.commands.generate import calibrate_on_prompts
from nag_lightning.model import Transformer
from nag_lightning.model.generation import sample_tokens
from nag_lightning.model.kv_cache import CacheFullError, KVCache
from nag_lightning.model.residual import NAG, NGPT, PreNorm
from nag_lightning.model.skip_policy import SkipConfig


def build(residual, seed=0, dtype=torch.float64, **overrides):
    torch.manual_seed(seed)
    # A larger init than training's, so that attention moves the logits far more than rounding does.
    values = dict(vocab_size=97, context_length=40, residual=residual, init_std=0.3)
    values.update(overrides)
    return Transformer(tiny_model_config(**values)).to(dtype).eval()


def skipping_nag(rate=0.3, **skip):
    """A NAG model whose thresholds skip about ``rate`` of the pairs of a random batch."""
    model = build(NAG(), skip=SkipConfig(**skip))
    with torch.no_grad():
        out = model(torch.randint(0, 97, (4, 40), generator=torch.Generator().manual_seed(1)), return_record=True,
                    calibrate=rate)
    model.skip_policy.calibrate_from(out.record, rate)
    assert model.skip_policy.active
    return model


# float64 models, but NAG's gate runs in float32 (gate() casts: it decides skips), so paths that
# round differently agree to ~1e-7, not 1e-15; a wrong position or mask moves logits by > 1e-2.
LOGIT_TOLERANCE = 1e-5


def record_logits(model):
    """Wrap ``model.extend`` to record the logits (B, vocab) of every prefill and decode step."""
    logits = []
    extend = model.extend

    def recording(*args, **kwargs):
        result = extend(*args, **kwargs)
        logits.append(result[0] if isinstance(result, tuple) else result)  # (logits, record) with return_record
        return result

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
    "ngpt": lambda: build(NGPT()),  # its normalised keys go into the cache
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


@pytest.mark.parametrize("scope", ["global", "per_layer"])
def test_incremental_decode_makes_the_skip_decisions_of_a_full_forward(scope):
    model = skipping_nag(threshold_scope=scope)
    prompt = torch.randint(0, 97, (2, 7), generator=torch.Generator().manual_seed(4))
    records = []
    with torch.no_grad():
        new = list(sample_tokens(model, prompt.tolist(), 15, temperature=0, records=records))
        tokens = torch.cat([prompt, *(token.unsqueeze(1) for token in new)], dim=1)
        full_record = model(tokens[:, :-1], return_record=True).record  # the last token sampled is never run
    layers = sorted(full_record.layers)
    executed = torch.cat([torch.cat([r.layers[layer].executed for r in records], dim=1) for layer in layers])
    full = torch.cat([full_record.layers[layer].executed for layer in layers])
    assert executed.shape == full.shape == (2 * 4, 7 + 14)
    assert torch.equal(executed, full)
    assert 0.1 < 1 - full.double().mean().item() < 0.6  # some pairs skipped, far from all


def test_skipping_nothing_is_bit_identical_to_dense():
    dense = build(NAG(), dtype=torch.float32)
    prompt = torch.randint(0, 97, (2, 5), generator=torch.Generator().manual_seed(5))
    reference = dense.generate(prompt, 12, temperature=0.9, top_k=20, generator=torch.Generator().manual_seed(6))
    reference_logits = dense.extend(prompt, KVCache(dense.config, 2))
    # Skipping machinery on (packing, gather, scatter), with a threshold below every step: nothing skips.
    dense.skip_policy.set_thresholds(1e-30)
    assert dense.skip_policy.active
    with torch.no_grad():
        assert torch.equal(dense.extend(prompt, KVCache(dense.config, 2)), reference_logits)
    # Rate 0 (what `nag generate --skip_rate 0` asks for) switches skipping off.
    calibrate_on_prompts(dense, prompt.tolist(), 0.0)
    assert not dense.skip_policy.active
    again = dense.generate(prompt, 12, temperature=0.9, top_k=20, generator=torch.Generator().manual_seed(6))
    assert torch.equal(again, reference)


def test_a_sub_layer_no_token_executes_runs_no_matmul_but_still_writes_keys():
    model = build(NAG())
    model.skip_policy.set_thresholds(1e9)  # every (token, sub-layer) pair skips
    calls = {"mlp": 0, "q_proj": 0, "kv_proj": 0}
    for block in model.blocks:
        block.mlp.register_forward_hook(lambda *_: calls.__setitem__("mlp", calls["mlp"] + 1))
        block.attn.q_proj.register_forward_hook(lambda *_: calls.__setitem__("q_proj", calls["q_proj"] + 1))
        block.attn.kv_proj.register_forward_hook(lambda *_: calls.__setitem__("kv_proj", calls["kv_proj"] + 1))
    cache = KVCache(model.config, 2)
    with torch.no_grad():
        _, record = model.extend(torch.randint(0, 97, (2, 5)), cache, return_record=True)
    assert calls == {"mlp": 0, "q_proj": 0, "kv_proj": 2}
    assert cache.lengths == [5, 5] and bool(cache.keys[:, :, :, :5].abs().sum(-1).gt(0).all())
    assert record.stats().skip_rate.item() == 1.0


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


# ---- `nag generate` and `nag bench --generate` through the real command ----
import json  # noqa: E402

from io import StringIO  # noqa: E402

from conftest import NAG_OVERLAY, TINY, nag  # noqa: E402


def test_generate_streams_text_from_a_checkpoint_copied_away_from_its_dataset(tiny_checkpoints, tmp_path):
    from tokenizers import Tokenizer

    from nag_lightning.commands.runs import load_run

    ckpt = str(tiny_checkpoints["prenorm"])
    args = ["generate", "--ckpt_path", ckpt, "--prompt", "import json\ndef ", "--max_new_tokens", "12",
            "--temperature", "0", "--data_dir", str(tmp_path / "moved")]  # the dataset is not there: the tokenizer travels
    code, out, err = nag(*args)
    assert code == 0, err
    assert out.startswith("import json\ndef ") and len(out) > len("import json\ndef \n")
    assert "nag generate: 1 prompt(s)" in err and "decode" in err and "KV cache" in err
    # The same text as the model's own cached greedy decoding, cut at the end-of-text token.
    loaded = load_run(ckpt, data_dir=str(tmp_path / "moved"))
    tokenizer = Tokenizer.from_str(loaded.tokenizer)
    eot = tokenizer.token_to_id("<|endoftext|>")
    prompt = tokenizer.encode("import json\ndef ").ids
    with torch.no_grad():
        new = [int(t) for t in sample_tokens(loaded.model.model.eval(), [prompt], 12, temperature=0, stop_token=eot)]
    new = new[: new.index(eot)] if eot in new else new
    assert out == "import json\ndef " + tokenizer.decode(new) + "\n"
    assert nag(*args)[1] == out  # and the same again


def test_generate_batches_prompts_and_reads_stdin(tiny_checkpoints, monkeypatch):
    monkeypatch.setattr("sys.stdin", StringIO("class Parser:\n"))
    code, out, err = nag("generate", "--ckpt_path", str(tiny_checkpoints["prenorm"]), "--prompt", "-", "x = [",
                         "--max_new_tokens", "6", "--seed", "3")
    assert code == 0, err
    assert out.startswith("=== sample 1 ===\nclass Parser:\n") and "\n=== sample 2 ===\nx = [" in out
    assert "nag generate: 2 prompt(s)" in err


def test_generate_with_skipping_reports_the_rate_while_decoding(tiny_checkpoints):
    ckpt = str(tiny_checkpoints["nag"])
    code, _, err = nag("generate", "--ckpt_path", ckpt, "--prompt", "def main():\n    return", "--skip_rate", "0.3",
                       "--max_new_tokens", "8")
    assert code == 0, err
    rate = float(err.split("skip rate ")[1].split()[0])
    assert 0.0 < rate < 1.0
    code, _, err = nag("generate", "--ckpt_path", ckpt, "--prompt", "def", "--skip_rate", "0", "--max_new_tokens", "4")
    assert code == 0 and "skip rate" not in err


def test_generate_stops_at_the_context_with_a_message(tiny_checkpoints):
    code, out, err = nag("generate", "--ckpt_path", str(tiny_checkpoints["prenorm"]), "--prompt", "import os\n" * 2,
                         "--max_new_tokens", "100", "--temperature", "1", "--top_k", "null", "--seed", "1")
    assert code == 0, err
    assert "context of 32 tokens is full" in err


def test_generate_bad_input_is_one_message_and_exit_code_2(tiny_checkpoints, tmp_path):
    prenorm = str(tiny_checkpoints["prenorm"])
    cases = [
        (["--ckpt_path", prenorm, "--skip_rate", "0.25"], "no gate to skip"),
        (["--ckpt_path", prenorm, "--skip_rate", "1.0"], "--skip_rate must be in [0, 1)"),
        (["--ckpt_path", prenorm, "--max_new_tokens", "0"], "--max_new_tokens must be >= 1"),
        (["--ckpt_path", prenorm, "--prompt", "import os\n" * 40], "longer than the model's context_length=32"),
        (["--ckpt_path", str(tmp_path / "none.ckpt")], "does not exist"),
    ]
    # A checkpoint from before they carried their tokenizer, whose dataset is not where it says.
    old = torch.load(prenorm, weights_only=False)
    del old["tokenizer"]
    torch.save(old, tmp_path / "old.ckpt")
    cases.append((["--ckpt_path", str(tmp_path / "old.ckpt"), "--data_dir", str(tmp_path / "gone")], "--tokenizer"))
    for args, message in cases:
        code, out, err = nag("generate", *args)
        assert code == 2 and message in err and "Traceback" not in err, (args, err)
        assert out == ""


def test_bench_generate_reports_prefill_decode_and_cache(tmp_path):
    out = tmp_path / "generate.json"
    nag_tiny = f"{TINY}+{NAG_OVERLAY}"
    code, printed, err = nag("bench", "--generate", TINY, f"{nag_tiny}@0,0.3", "--steps", "2", "--warmup", "1",
                             "--batch", "2", "--prompt_tokens", "12", "--new_tokens", "6", "--interleave",
                             "--json", str(out))
    assert code == 0, err
    rows = json.loads(out.read_text())
    assert [r["config"] for r in rows] == [TINY, nag_tiny, f"{nag_tiny}@0.3"]
    for row in rows:
        assert row["prefill_tokens_per_sec"] > 0 and row["decode_tokens_per_sec"] > 0
        assert (row["batch"], row["prompt_tokens"], row["new_tokens"]) == (2, 12, 6)
        # keys and values, float32: 2 x layers x batch x kv heads x context x head_dim x 4 bytes
        assert row["kv_cache_mb"] * 2**20 == 2 * 2 * 2 * 2 * 32 * 8 * 4
    assert rows[0]["skip_rate"] == rows[1]["skip_rate"] == 0.0 and 0.0 < rows[2]["skip_rate"] < 1.0
    assert "decode tokens/s" in printed and "KV cache MB" in printed
    code, _, err = nag("bench", "--generate", f"{TINY}@0.25", "--steps", "1")
    assert code == 2 and "no gate to skip" in err
    code, _, err = nag("bench", "--generate", TINY, "--prompt_tokens", "30", "--new_tokens", "8")
    assert code == 2 and "do not fit" in err


def test_the_nag_head_kept_between_evaluation_forwards_follows_the_weights():
    """NAG's cosine head is rebuilt per forward while training and kept while evaluating; any
    change of the weight (an optimizer step, a loaded checkpoint) must be seen."""
    model = build(NAG(), dtype=torch.float32)
    tokens = torch.randint(0, 97, (2, 8))

    def fresh_logits():
        with torch.enable_grad():
            return model(tokens).detach()

    with torch.no_grad():
        torch.testing.assert_close(model(tokens), fresh_logits(), rtol=0, atol=0)
        model(tokens)  # kept now
        model.head.weight.mul_(1.5).add_(0.01)  # in place, as an optimizer step
        torch.testing.assert_close(model(tokens), fresh_logits(), rtol=0, atol=0)
    other = build(NAG(), seed=9, dtype=torch.float32)
    model.load_state_dict(other.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(model(tokens), other(tokens), rtol=0, atol=0)
