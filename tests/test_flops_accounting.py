"""Executed FLOPs count what ran (padding rows, the attention layout's scores); useful FLOPs, the
executed tokens' share. Hand counts in float64 from the tiny config: d=32, 4 heads of 8, 2 KV
heads, SwiGLU hidden 128, vocab 512, 2 blocks, a gate of C=4 directions."""

import math

import pytest
import torch
import torch.nn.functional as F

from conftest import tiny_model_config
from nag_lightning.model import Transformer, packing
from nag_lightning.model.residual import NAG
from nag_lightning.model.skip_policy import SkipConfig

B, T, C = 3, 20, 4
D, HEADS, KV_HEADS, HEAD_DIM, HIDDEN, VOCAB, LAYERS = 32, 4, 2, 8, 128, 512, 2
PER_TOKEN = LAYERS * (2 * D * 2 * KV_HEADS * HEAD_DIM + 2 * (2 * C * D)) + 2 * D * VOCAB  # K/V, gates, head
PER_ATTENTION_ROW = 2 * 2 * D * HEADS * HEAD_DIM  # query and output projections
PER_MLP_ROW = 2 * 3 * D * HIDDEN  # gate, up, down
PER_PAIR = 2 * 2 * HEADS * HEAD_DIM  # one query-key score and its weighted value, over all heads
# The masked layout where it pays at all (any box), or never: the causal kernel over all T queries.
LAYOUTS = {"masked": 100.0, "causal": 0.0}


def build(mode="threshold", **skip):
    torch.manual_seed(0)
    model = Transformer(tiny_model_config(residual=NAG(gate_directions=C),
                                          skip=SkipConfig(mode=mode, threshold_scope="per_layer", **skip)))
    config = model.config
    assert (config.d_model, config.n_heads, config.n_kv_heads, config.head_dim, config.mlp_hidden,
            config.vocab_size, config.n_layers) == (D, HEADS, KV_HEADS, HEAD_DIM, HIDDEN, VOCAB, LAYERS)
    return model


def batch(seq=T, seed=1):
    return torch.randint(0, VOCAB, (B, seq), generator=torch.Generator().manual_seed(seed))


def calibrated(model, tokens, rate):
    with torch.no_grad():
        out = model(tokens, return_record=True, calibrate=rate)
    model.skip_policy.calibrate_from(out.record, rate)
    return model


def hand_flops(tokens, rows, pairs):
    """Float64 FLOPs of a forward over ``tokens`` tokens whose sub-layers ran ``rows`` rows and
    (attention) ``pairs`` query-key pairs per head, both lists over sub-layers 1..4."""
    total = PER_TOKEN * tokens
    for index, (n, p) in enumerate(zip(rows, pairs)):
        total += n * (PER_ATTENTION_ROW if index % 2 == 0 else PER_MLP_ROW) + p * PER_PAIR
    return float(total)


def round_up(count, bucket, limit):
    """``count`` rounded up to a multiple of ``bucket``, at least one bucket, at most ``limit``."""
    return min(limit, max(1, math.ceil(count / bucket)) * bucket)


def triangle(seq):
    return B * seq * (seq + 1) // 2


def forward(model, tokens):
    with torch.no_grad():
        return model(tokens, return_record=True)


@pytest.mark.parametrize("case", ["no skipping", "every token executes"])
def test_a_dense_forward_executes_the_useful_closed_form(case):
    model = build()
    tokens = batch()
    if case == "every token executes":  # skipping on, a threshold below every score: unpacked sub-layers
        model.skip_policy.set_thresholds(1e-30)
    record = forward(model, tokens).record
    assert record.skipped_any == (case == "every token executes")
    stats = record.stats()
    dense = hand_flops(B * T, [B * T] * 4, [triangle(T), 0] * 2)
    executed, dense_count = model.forward_flops(B, T, stats)
    assert stats.run_rows.tolist() == [B * T] * 4 and stats.run_attention_pairs.tolist() == [triangle(T), 0] * 2
    assert executed.dtype == torch.float64
    assert executed.item() == model.useful_forward_flops(B, T, stats).item() == dense_count.item() == dense
    assert model.forward_flops(B, T)[0].item() == model.useful_forward_flops(B, T).item() == dense


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_threshold_mode_executes_its_padded_rows_and_the_layouts_scores(layout, monkeypatch):
    """Expected counts from the executed masks and the documented rules: rows rounded up to a
    multiple of BUCKET (at most B * T; every token executing: unpacked), the masked box
    W x K per sequence (busiest sequence's count by the last executed position + 1, bucketed)."""
    bucket = 8  # < B * T = 60, so the padding shows (the default 64 would run all 60 rows)
    monkeypatch.setattr(packing, "BUCKET", bucket)
    monkeypatch.setitem(packing.MASKED_ATTENTION_PAYS_BELOW, "cpu", LAYOUTS[layout])
    tokens = batch()
    model = calibrated(build(), tokens, 0.3)
    record = forward(model, tokens).record
    rows, pairs, useful_rows, useful_pairs = [], [], [], []
    positions = torch.arange(1, T + 1)
    for index, layer in enumerate(sorted(record.layers)):
        executed = record.layers[layer].executed
        n = int(executed.sum())
        attention = index % 2 == 0
        useful_rows.append(n)
        useful_pairs.append(int((executed * positions).sum()) if attention else 0)
        if n == B * T:  # unpacked
            rows.append(B * T)
            pairs.append(triangle(T) if attention else 0)
            continue
        rows.append(round_up(n, bucket, B * T))
        if not attention:
            pairs.append(0)
        elif layout == "causal":
            pairs.append(triangle(T))
        else:
            width = round_up(int(executed.sum(1).max()), bucket, T)
            keys = round_up(int((executed * positions).amax()), bucket, T)
            pairs.append(B * width * keys)
    assert sum(rows) > sum(useful_rows) and any(0 < n < B * T for n in useful_rows)  # padding ran
    stats = record.stats()
    assert stats.run_rows.tolist() == rows and stats.run_attention_pairs.tolist() == pairs
    executed = model.forward_flops(B, T, stats)[0]
    useful = model.useful_forward_flops(B, T, stats)
    assert executed.item() == hand_flops(B * T, rows, pairs)
    assert useful.item() == hand_flops(B * T, useful_rows, useful_pairs)
    assert executed.item() > useful.item()  # padding rows ran (and more scores than the executed prefixes)


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
@pytest.mark.parametrize("compiled", [False, True])
def test_capacity_mode_runs_capacity_rows_per_sequence(layout, compiled, monkeypatch):
    """Each sequence runs its capacity's rows, filled or not: B x C rows per sub-layer; attention
    the masked (B, C, T) box or the causal triangle. Compiled (``compile_block``), the counts
    come out of the graph with capacities it holds as symbols."""
    monkeypatch.setitem(packing.MASKED_ATTENTION_PAYS_BELOW, "cpu", LAYOUTS[layout])
    seq = 32
    tokens = batch(seq)
    model = calibrated(build("capacity"), tokens, 0.25)
    model.skip_policy.set_capacity_shares([1.0, 0.75, 0.5, 0.25])
    capacities = [32, 24, 16, 8]  # share x 32, multiples of max(8, 32 / 16)
    if compiled:
        import torch._dynamo

        torch._dynamo.reset()
        for block in model.blocks:
            block.compile_block(backend="aot_eager")
    record = forward(model, tokens).record
    if compiled:
        torch._dynamo.reset()
    stats = record.stats()
    rows = [B * c for c in capacities]
    masked = layout == "masked"
    pairs = [B * capacities[0] * seq if masked else triangle(seq), 0,
             B * capacities[2] * seq if masked else triangle(seq), 0]
    assert stats.run_rows.tolist() == rows and stats.run_attention_pairs.tolist() == pairs
    assert stats.executed_tokens.sum().item() < sum(rows)  # some capacity slots held padding
    executed, _ = model.forward_flops(B, seq, stats)
    assert executed.item() == hand_flops(B * seq, rows, pairs)
    assert executed.item() > model.useful_forward_flops(B, seq, stats).item()


def test_capacity_counts_never_read_the_device():
    tokens = batch(32)
    model = calibrated(build("capacity"), tokens, 0.25).to("meta")
    with torch.no_grad():
        record = model(torch.randint(0, VOCAB, (B, 32), device="meta"), return_record=True).record
    stats = record.stats()
    assert stats.run_rows.device.type == "meta" and stats.run_attention_pairs.device.type == "meta"
    assert model.forward_flops(B, 32, stats)[0].device.type == "meta"


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_the_attention_term_is_the_layout_that_ran(layout, monkeypatch):
    """One skipping attention sub-layer on a known mask: the causal layout runs T(T+1)/2 pairs per
    sequence and head whatever skips; the masked one the (W, K) box of its query layout."""
    monkeypatch.setattr(packing, "BUCKET", 4)
    monkeypatch.setitem(packing.MASKED_ATTENTION_PAYS_BELOW, "cpu", LAYOUTS[layout])
    executed = torch.zeros(B, T, dtype=torch.bool)
    executed[0, [1, 4, 9]] = True  # busiest sequence: 5 -> W = 8; last executed position 13 -> K = 16
    executed[1, [0, 2, 3, 5, 13]] = True
    packed = packing.pack_tokens(executed, attention=True)
    assert (packed.query_positions is not None) == (layout == "masked")
    rows, pairs = packing.run_counts(B, T, packed, attention=True)
    assert rows == 8  # 8 executed tokens: two buckets of 4, exactly full
    assert pairs == (B * 8 * 16 if layout == "masked" else B * T * (T + 1) // 2)
    assert packing.run_counts(B, T, packed, attention=False) == (8, 0)
    assert packing.run_counts(B, T, None, attention=True) == (B * T, B * T * (T + 1) // 2)
    assert packing.run_counts(B, T, packing.NO_TOKEN, attention=True) == (0, 0)


def measured_flops(model, tokens, monkeypatch):
    """FLOPs of a forward, measured: every F.linear call (projections, the gate, the LM head) as
    2 x rows x in x out, every attention call as 2 x 2 x head_dim per (query, key) pair and head
    it computes (the triangle under is_causal, else the whole box)."""
    total = [0.0]
    linear, attention = F.linear, F.scaled_dot_product_attention

    def counted_linear(x, weight, bias=None):
        total[0] += 2.0 * x.numel() * weight.shape[0]
        return linear(x, weight, bias)

    def counted_attention(q, k, v, *args, is_causal=False, **kwargs):
        batch_, heads, queries, head_dim = q.shape
        keys = k.shape[-2]
        per_head = queries * (queries + 1) // 2 if is_causal else queries * keys
        assert not is_causal or queries == keys
        total[0] += 2.0 * 2 * head_dim * batch_ * heads * per_head
        return attention(q, k, v, *args, is_causal=is_causal, **kwargs)

    monkeypatch.setattr(F, "linear", counted_linear)
    monkeypatch.setattr(F, "scaled_dot_product_attention", counted_attention)
    return forward(model, tokens).record, total[0]


@pytest.mark.parametrize("case", ["dense", "threshold masked", "threshold causal", "capacity masked",
                                  "capacity causal", "mask execution"])
def test_executed_flops_equal_the_flops_measured_at_every_matmul(case, monkeypatch):
    """The count against the arithmetic itself: the matmuls' and attention kernels' shapes."""
    mode = "capacity" if case.startswith("capacity") else "threshold"
    model = build(mode, execution="mask" if case == "mask execution" else "gather")
    seq = 32 if mode == "capacity" else T
    tokens = batch(seq)
    if case != "dense":
        calibrated(model, tokens, 0.3)
    if mode == "capacity":
        model.skip_policy.set_capacity_shares([1.0, 0.75, 0.5, 0.25])
    monkeypatch.setattr(packing, "BUCKET", 8)  # padding rows within B * T
    layout = "causal" if case.endswith("causal") else "masked"
    monkeypatch.setitem(packing.MASKED_ATTENTION_PAYS_BELOW, "cpu", LAYOUTS[layout])
    with monkeypatch.context() as patch:  # measuring only the forward
        record, measured = measured_flops(model, tokens, patch)
    assert record.skipped_any == (case != "dense")
    stats = record.stats() if record.skipped_any else None
    executed, dense = model.forward_flops(B, seq, stats)
    assert executed.item() == measured
    if case not in ("dense", "mask execution"):
        assert executed.item() > model.useful_forward_flops(B, seq, stats).item()
    if case == "mask execution":  # the oracle computes everything: the dense count
        assert executed.item() == dense.item()
