"""Geometric Mixture-of-Depths: per-token skipping of NAG sub-layers."""

import pytest
import torch

from conftest import tiny_model_config
from nag_lightning.model import Transformer
from nag_lightning.model.generation import sample_tokens
from nag_lightning.model.residual import NAG
from nag_lightning.model.skip_policy import SkipConfig

THRESHOLDS = {
    "mixed": [0.5, 0.4, 0.3, 0.25],
    "attention all skipped": [10.0, 0.3, 0.0, 0.2],
    "nothing skipped": [0.0, 0.0, 0.0, 0.0],
    "everything skipped": [10.0, 10.0, 10.0, 10.0],
}


def build(mode="gather", thresholds=None, seed=0, **skip_args):
    torch.manual_seed(seed)
    skip = SkipConfig(execution=mode, threshold_scope="per_layer", **skip_args)
    model = Transformer(tiny_model_config(residual=NAG(), skip=skip))
    if thresholds is not None:
        model.skip_policy.set_thresholds(torch.tensor(thresholds))
    return model


@pytest.mark.parametrize("case", sorted(THRESHOLDS))
@pytest.mark.parametrize("bucket", [4, 64])  # 4: masked query layout and padding; 64: every position, one bucket
def test_gather_equals_the_mask_oracle_in_outputs_and_gradients(case, bucket, monkeypatch):
    from nag_lightning.model import packing

    monkeypatch.setattr(packing, "BUCKET", bucket)
    monkeypatch.setitem(packing.MASKED_ATTENTION_PAYS_BELOW, "cpu", 1.0 if bucket == 4 else 0.0)
    tokens = torch.randint(0, 512, (3, 20), generator=torch.Generator().manual_seed(1))
    results = {}
    for mode in ("gather", "mask"):
        model = build(mode, THRESHOLDS[case])
        out = model(tokens, return_record=True)
        logits = out.logits
        (logits.float() * torch.linspace(-1, 1, logits.shape[-1])).sum().backward()
        grads = {name: p.grad for name, p in model.named_parameters() if p.grad is not None}
        results[mode] = (logits.detach(), grads, out.record.stats().executed_fraction)
    torch.testing.assert_close(results["gather"][0], results["mask"][0], rtol=1e-5, atol=1e-6)
    # A sub-layer that no token executes leaves its weights without a gradient in gather mode
    # (they were never used); the oracle's gradient for them must then be exactly zero.
    for name in results["mask"][1].keys() - results["gather"][1].keys():
        assert torch.count_nonzero(results["mask"][1][name]) == 0, name
        results["gather"][1][name] = torch.zeros_like(results["mask"][1][name])
    assert results["gather"][1].keys() == results["mask"][1].keys()
    for name, grad in results["mask"][1].items():
        # Float32 rounding of different summation orders, relative to the gradient's scale.
        scale = grad.abs().max().item()
        torch.testing.assert_close(results["gather"][1][name], grad, rtol=1e-5, atol=1e-6 * max(scale, 1.0), msg=name)
    torch.testing.assert_close(results["gather"][2], results["mask"][2])


def test_skipped_pairs_are_exact_identities():
    model = build("gather", THRESHOLDS["everything skipped"])
    tokens = torch.randint(0, 512, (2, 12))
    with torch.no_grad():
        untouched = model.residual.logits(model.residual.enter(model.embed(tokens)), model.head)
        out = model(tokens, return_record=True)
        assert torch.equal(out.logits, untouched)
    assert torch.equal(out.record.stats().executed_fraction, torch.zeros(4, dtype=torch.float64))


def test_executed_fraction_follows_the_threshold():
    tokens = torch.randint(0, 512, (4, 32))
    model = build("gather", THRESHOLDS["nothing skipped"])
    with torch.no_grad():
        # Positive thresholds below every step: skipping is on, and every token must still execute.
        out = model(tokens, return_record=True)
        lowest = min(a.min().item() for a in out.record.step_samples().values())
        model.skip_policy.set_thresholds(torch.full((4,), lowest / 2))
        assert model.skip_policy.active
        out = model(tokens, return_record=True)
        assert out.record.skipped_any  # skipping was on, and decided for every sub-layer
        assert torch.equal(out.record.stats().executed_fraction, torch.ones(4, dtype=torch.float64))
        model.skip_policy.set_thresholds(torch.tensor(THRESHOLDS["mixed"]))
        out = model(tokens, return_record=True)
    fractions = out.record.stats().executed_fraction
    assert ((fractions > 0) & (fractions < 1)).any()
    steps = out.record.step_samples()
    expected = torch.stack([(steps[layer] >= t).double().mean() for layer, t in zip(sorted(steps), THRESHOLDS["mixed"])])
    torch.testing.assert_close(fractions, expected)


def test_causality_with_skipping():
    model = build("gather", THRESHOLDS["mixed"]).eval()
    tokens = torch.randint(0, 512, (2, 24))
    changed = tokens.clone()
    changed[:, 14:] = (changed[:, 14:] + 7) % 512
    with torch.no_grad():
        a, b = model(tokens), model(changed)
    torch.testing.assert_close(a[:, :14], b[:, :14], rtol=0, atol=1e-5)


def test_thresholds_travel_in_the_checkpoint():
    source = build("gather", THRESHOLDS["mixed"])
    target = build("gather", None, seed=1)
    assert not target.skip_policy.active
    assert "skip_policy.thresholds" in source.state_dict()
    target.load_state_dict(source.state_dict())
    assert target.skip_policy.active
    torch.testing.assert_close(target.skip_policy.thresholds, torch.tensor(THRESHOLDS["mixed"]))
    tokens = torch.randint(0, 512, (2, 12))
    with torch.no_grad():
        assert torch.equal(target(tokens), source(tokens))


def test_a_global_threshold_is_one_value_every_sub_layer_compares_with():
    """One entry in the checkpoint, and every sub-layer skips exactly the tokens whose step is below
    it. Set to the median of sub-layer 2's steps: every token runs sub-layer 1 (alpha_1 = 1 makes
    its steps larger), so sub-layer 2 sees the dense stream and runs exactly 65 of its 128 tokens
    (torch's median is the lower middle value); the later, smaller steps (alpha_l = l^-1/2) run less."""
    torch.manual_seed(0)
    model = Transformer(tiny_model_config(residual=NAG()))
    assert model.skip_policy.thresholds.shape == (1,) and "skip_policy.thresholds" in model.state_dict()
    tokens = torch.randint(0, 512, (4, 32), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        dense_steps = model(tokens, return_record=True).record.step_samples()
        model.skip_policy.set_thresholds(dense_steps[2].median().item())
        record = model(tokens, return_record=True).record
    threshold = model.skip_policy.thresholds[0]
    for layer, sub in record.layers.items():
        assert torch.equal(sub.executed, sub.step >= threshold), layer
    fractions = record.stats().executed_fraction.tolist()
    assert fractions[:2] == [1.0, 65 / 128] and fractions[3] < fractions[1], fractions


def test_generation_skips_too():
    model = build("gather", THRESHOLDS["mixed"]).eval()
    prompt = torch.randint(0, 512, (1, 5))
    out = model.generate(prompt, max_new_tokens=4, temperature=0)
    assert out.shape == (1, 9)
    # The same greedy decoding, keeping each forward's record: the latest one (decoding one token) skipped.
    records = []
    with torch.no_grad():
        new = list(sample_tokens(model, prompt.tolist(), 4, temperature=0, records=records))
    assert torch.equal(torch.stack(new, dim=1), out[:, 5:])
    assert (records[-1].stats().executed_fraction < 1).any()


@pytest.mark.parametrize("thresholds", ["per_layer", "global"])
@pytest.mark.parametrize("rate", [0.0, 0.25, 0.5])
def test_calibration_reaches_the_target_rate(thresholds, rate):
    torch.manual_seed(0)
    model = Transformer(tiny_model_config(residual=NAG(), skip=SkipConfig(threshold_scope=thresholds)))
    tokens = torch.randint(0, 512, (8, 32))
    with torch.no_grad():
        out = model(tokens, return_record=True, calibrate=rate)
        model.skip_policy.calibrate_from(out.record, rate)
        out = model(tokens, return_record=True)
    realized = out.record.stats().skip_rate.item()
    assert realized == pytest.approx(rate, abs=0.02 if thresholds == "per_layer" else 0.1)
    assert model.skip_policy.active == (rate > 0)


def test_gather_equals_mask_under_bf16_autocast():
    tokens = torch.randint(0, 512, (2, 16), generator=torch.Generator().manual_seed(2))
    outputs = {}
    for mode in ("gather", "mask"):
        model = build(mode, THRESHOLDS["mixed"])
        with torch.autocast("cpu", dtype=torch.bfloat16):
            outputs[mode] = model(tokens).float()
    torch.testing.assert_close(outputs["gather"], outputs["mask"], rtol=2e-2, atol=2e-2)


def test_executed_flops_match_a_hand_count():
    # d=32, 4 heads of 8, 2 KV heads, SwiGLU hidden 128 (8/3 * 32 -> 85 -> 128), vocab 512, C=4, 2 blocks.
    torch.manual_seed(0)
    model = Transformer(tiny_model_config(residual=NAG(gate_directions=4), skip=SkipConfig(threshold_scope="per_layer")))
    assert model.config.mlp_hidden == 128
    tokens = torch.randint(0, 512, (1, 3))
    model.skip_policy.set_thresholds(torch.tensor([0.0, 0.0, 0.0, 0.0]))
    with torch.no_grad():
        out = model(tokens, return_record=True)
    executed, dense = model.forward_flops(1, 3, out.record.stats())
    kv, gate, head = 2 * 32 * 32, 2 * 4 * 32, 2 * 32 * 512  # per token: K+V (2 heads x 8 x 2), gate, head
    q_out = 2 * 32 * 32 * 2  # per executed token: query + output projection
    scores = 2 * 2 * 32  # per executed query and key: QK^T and AV over 4 heads x 8
    mlp = 2 * 3 * 32 * 128
    tokens_n, keys = 3, 1 + 2 + 3
    per_block = tokens_n * (kv + 2 * gate + q_out + mlp) + keys * scores
    assert dense.item() == executed.item() == 2 * per_block + tokens_n * head
    # Skip everything: only K/V, gates and the head remain useful. What runs: every packing's one
    # bucket of padding rows (64, at most the 3 tokens) and, on a CPU at T = 3, the masked layout's
    # whole 3 x 3 box of scores (more than the dense triangle of 6 at this toy size).
    model.skip_policy.set_thresholds(torch.tensor([10.0, 10.0, 10.0, 10.0]))
    with torch.no_grad():
        out = model(tokens, return_record=True)
    executed, dense = model.forward_flops(1, 3, out.record.stats())
    useful = model.useful_forward_flops(1, 3, out.record.stats())
    assert useful.item() == 2 * tokens_n * (kv + 2 * gate) + tokens_n * head
    box = 3 * 3
    assert executed.item() == 2 * (tokens_n * (kv + 2 * gate + q_out + mlp) + box * scores) + tokens_n * head
    # Skip exactly one token's attention in block 1: its query, output projection and scores go.
    with torch.no_grad():
        a = model.residual.planned_step(model.residual.enter(model.embed(tokens)), 1)[1][0]
        order = torch.argsort(a)
        model.skip_policy.set_thresholds(torch.tensor([(a[order[0]] + a[order[1]]).item() / 2, 0.0, 0.0, 0.0]))
        out = model(tokens, return_record=True)
    position = order[0].item()
    stats = out.record.stats()
    assert stats.executed_tokens[0].item() == 2
    assert model.useful_forward_flops(1, 3, stats).item() == dense.item() - q_out - scores * (position + 1)
    # Run: 3 rows (2 tokens and a padding row) and the 3 x 3 masked box.
    assert model.forward_flops(1, 3, stats)[0].item() == dense.item() + scores * (box - keys)


@pytest.mark.parametrize("fraction", [0.0, 0.3, 0.75, 1.0])
@pytest.mark.parametrize("layout", ["masked", "causal"])
@pytest.mark.parametrize("bucket", [1, 4, 64])
def test_packed_attention_equals_dense_attention_on_the_executed_tokens(fraction, layout, bucket, monkeypatch):
    """Packed (bucketed, padded) queries in either layout: the dense attention's outputs at the
    executed tokens, zeros elsewhere, and the same gradients."""
    from nag_lightning.model import packing
    from nag_lightning.model.transformer import CausalSelfAttention, rope_tables

    monkeypatch.setattr(packing, "BUCKET", bucket)
    monkeypatch.setitem(packing.MASKED_ATTENTION_PAYS_BELOW, "cpu", 1.0 if layout == "masked" else 0.0)
    torch.manual_seed(0)
    config = tiny_model_config()
    attention = CausalSelfAttention(config)
    cos, sin = rope_tables(config.head_dim, 24, config.rope_theta)
    x = torch.randn(3, 24, config.d_model, requires_grad=True)
    executed = torch.rand(3, 24, generator=torch.Generator().manual_seed(1)) < fraction
    executed[0, 5] = fraction > 0  # a row with a single executed token in the middle, when any execute
    executed[2, 15:] = False  # a row that ends early: keys past the batch's last executed query are cut
    weights = torch.randn(3, 24, config.d_model)
    dense = attention(x, cos, sin)
    (dense * weights * executed.unsqueeze(-1)).sum().backward()
    expected_grads = [x.grad.clone()] + [p.grad.clone() for p in attention.parameters()]
    x.grad = None
    attention.zero_grad()
    packed = packing.pack_tokens(executed, attention=True)
    assert (packed.query_positions is not None) == (layout == "masked")
    gathered = packed.scatter_into(torch.zeros_like(x), attention(x, cos, sin, packed))  # packed rows -> (B, T, d)
    torch.testing.assert_close(gathered, dense * executed.unsqueeze(-1), rtol=1e-5, atol=1e-6)
    (gathered * weights).sum().backward()
    for expected, param in zip(expected_grads, [x] + list(attention.parameters())):
        got = torch.zeros_like(expected) if param.grad is None else param.grad
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_packing_pads_to_buckets_and_never_writes_a_real_token_from_padding(monkeypatch):
    from nag_lightning.model import packing

    monkeypatch.setattr(packing, "BUCKET", 8)
    monkeypatch.setitem(packing.MASKED_ATTENTION_PAYS_BELOW, "cpu", 1.0)
    executed = torch.zeros(2, 16, dtype=torch.bool)
    executed[0, [1, 4, 9]] = True
    executed[1, [0, 2, 3, 5, 6]] = True
    packed = packing.pack_tokens(executed, attention=True)
    assert packed.gather.shape == (8,)  # 8 executed tokens: one bucket, exactly full
    torch.testing.assert_close(packed.gather, executed.flatten().nonzero().squeeze(1))
    executed[1, 7] = True  # 9 tokens: two buckets, 7 padding rows
    packed = packing.pack_tokens(executed, attention=True)
    assert packed.gather.shape == (16,) and (packed.scatter[9:] == 32).all() and (packed.slot[9:] == 2 * 8).all()
    assert packed.query_positions.shape == (2, 8) and packed.key_range.shape == (16,)  # last executed: 10th position
    assert packed.query_positions[0, :3].tolist() == [1, 4, 9] and packed.query_positions[1, :6].tolist() == [0, 2, 3, 5, 6, 7]
    rows = torch.arange(1, 17, dtype=torch.float32).unsqueeze(1)
    scattered = packed.scatter_into(rows.new_zeros(2, 16, *rows.shape[1:]), rows).squeeze(-1)
    assert torch.equal(scattered != 0, executed)  # padding rows (10..16) went to the scratch row


def test_training_packing_keeps_every_parameter_in_the_forward_and_decoding_packs_exactly():
    """Without ``exact`` a sub-layer no token executes still runs one bucket of padding rows, so its
    parameters take part in autograd (DDP waits for every gradient: leaving them out deadlocked a
    2-rank MoD run). Decoding packs exact counts and leaves such a sub-layer out."""
    from nag_lightning.model import packing

    nothing = torch.zeros(2, 16, dtype=torch.bool)
    padded = packing.pack_tokens(nothing, attention=True)
    assert padded.gather.shape == (32,) and (padded.scatter == 32).all()  # one bucket (capped at B * T) of padding
    assert packing.pack_tokens(nothing, attention=True, exact=True) is packing.NO_TOKEN
    assert packing.pack_tokens(~nothing, exact=True) is packing.EVERY_TOKEN
    some = nothing.clone()
    some[1, [2, 5, 7]] = True
    assert packing.pack_tokens(some, exact=True).gather.tolist() == [18, 21, 23]


# Checkpoints from before the renames. A config dict: NAG's ``skip_thresholds`` (now
# ``ModelConfig.skip.threshold_scope``), or NAG's ``threshold_scope``/``skip_mode``/``skip_rule``
# from before the skip policy; the thresholds buffer: ``residual.skip_threshold``, later ``residual.thresholds``.
LEGACY_CHECKPOINTS = {
    "skip_thresholds": ({"skip_thresholds": "per_layer"}, "residual.skip_threshold"),
    "nag skip arguments": ({"threshold_scope": "per_layer", "skip_mode": "gather", "skip_rule": "step"},
                           "residual.thresholds"),
}


@pytest.mark.parametrize("legacy_format", sorted(LEGACY_CHECKPOINTS))
def test_checkpoints_from_before_the_renames_still_load(legacy_format):
    from nag_lightning.model import ModelConfig

    init_args, buffer = LEGACY_CHECKPOINTS[legacy_format]
    source = build("gather", THRESHOLDS["mixed"])
    legacy = source.config.to_dict()
    legacy["kernel_backend"] = legacy.pop("kernels")
    del legacy["skip"]  # no such key before the skip policy
    legacy["residual"]["init_args"].update(init_args)
    config = ModelConfig.from_dict(legacy)
    assert config.kernels == "torch" and config.skip.threshold_scope == "per_layer"
    assert config.skip == source.config.skip
    state = {(buffer if k == "skip_policy.thresholds" else k): v for k, v in source.state_dict().items()}
    assert buffer in state and "skip_policy.thresholds" not in state
    target = Transformer(config)
    target.load_state_dict(state)
    assert target.skip_policy.active
    torch.testing.assert_close(target.skip_policy.thresholds, torch.tensor(THRESHOLDS["mixed"]))


def test_the_old_nag_skipping_arguments_still_work_with_a_warning():
    with pytest.warns(FutureWarning, match="ModelConfig.skip"):
        model = Transformer(tiny_model_config(residual=NAG(skip_mode="mask", threshold_scope="per_layer",
                                                           skip_rule="gate")))
    config = model.skip_policy.config
    assert (config.execution, config.threshold_scope, config.rule) == ("mask", "per_layer", "gate")
