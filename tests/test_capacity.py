"""Capacity-mode skipping: static shapes, causal, no host synchronisation, one compiled graph per block."""

import math

import pytest
import torch
import torch.nn.functional as F

from conftest import tiny_model_config
from nag_lightning.model import Transformer, packing
from nag_lightning.model.packing import capacity_packing
from nag_lightning.model.residual import NAG
from nag_lightning.model.skip_policy import SkipConfig


def build(mode="capacity", seed=0, **skip):
    torch.manual_seed(seed)
    return Transformer(tiny_model_config(residual=NAG(gate_directions=4), skip=SkipConfig(mode=mode, **skip)))


def calibrated(model, tokens, rate):
    with torch.no_grad():
        out = model(tokens, return_record=True, calibrate=rate)
    model.skip_policy.calibrate_from(out.record, rate)
    return model


def test_capacity_packing_keeps_the_earliest_executed_tokens():
    executed = torch.tensor([[1, 0, 1, 1, 1, 0, 1, 0], [0, 0, 1, 0, 0, 0, 0, 0]], dtype=torch.bool)
    pack, kept = capacity_packing(executed, capacity=3, attention=True)
    assert torch.equal(kept, torch.tensor([[1, 0, 1, 1, 0, 0, 0, 0], [0, 0, 1, 0, 0, 0, 0, 0]], dtype=torch.bool))
    # Row 0 holds positions 0, 2, 3; row 1 position 2 and two padding slots (read token 0, write the scratch row).
    assert pack.gather.tolist() == [0, 2, 3, 10, 8, 8]
    assert pack.scatter.tolist() == [0, 2, 3, 10, 16, 16]
    assert pack.positions.tolist() == [0, 2, 3, 2, 0, 0]


def test_capacity_equal_to_the_sequence_is_dense_bit_for_bit(monkeypatch):
    """Every token above a threshold below every step, capacity T: the packed path equals the dense
    model exactly where the same attention kernel runs (the causal layout), and within float
    tolerance where the masked layout (another SDPA kernel) runs."""
    tokens = torch.randint(0, 512, (3, 32), generator=torch.Generator().manual_seed(1))
    dense = build("threshold")
    with torch.no_grad():
        steps = dense(tokens, return_record=True).record.step_samples()
    expected = dense(tokens)
    capacity = build("capacity")
    capacity.skip_policy.set_thresholds(min(a.min().item() for a in steps.values()) / 2)
    capacity.skip_policy.set_capacity_shares([1.0] * 4)
    for pays_below, exact in ((0.0, True), (10.0, False)):
        monkeypatch.setitem(packing.MASKED_ATTENTION_PAYS_BELOW, "cpu", pays_below)
        out = capacity(tokens, return_record=True)
        assert out.record.skipped_any and out.record.stats().skip_rate.item() == 0.0
        if exact:
            assert torch.equal(out.logits, expected)
        else:
            torch.testing.assert_close(out.logits, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("pays_below", [0.0, 10.0])  # causal layout; masked (B, capacity, T) layout
def test_causality_with_overflow(pays_below, monkeypatch):
    monkeypatch.setitem(packing.MASKED_ATTENTION_PAYS_BELOW, "cpu", pays_below)
    tokens = torch.randint(0, 512, (2, 32), generator=torch.Generator().manual_seed(2))
    model = calibrated(build(), tokens, 0.1).eval()
    model.skip_policy.set_capacity_shares([0.5] * 4)  # 16 of 32, while the thresholds let ~90% through
    changed = tokens.clone()
    changed[:, 20:] = (changed[:, 20:] + 7) % 512
    with torch.no_grad():
        a, b = model(tokens, return_record=True), model(changed, return_record=True)
    assert a.record.over_capacity_fraction().item() > 0.3
    torch.testing.assert_close(a.logits[:, :20], b.logits[:, :20], rtol=0, atol=0)
    assert not torch.equal(a.logits[:, 20:], b.logits[:, 20:])


def test_capacities_follow_the_calibrated_shares_and_bound_every_sequence():
    tokens = torch.randint(0, 512, (4, 32), generator=torch.Generator().manual_seed(3))
    model = build(threshold_scope="global")
    with torch.no_grad():
        out = model(tokens, return_record=True, calibrate=0.25)
    model.skip_policy.calibrate_from(out.record, 0.25)
    policy = model.skip_policy
    capacities = [policy.capacity(layer, 32) for layer in range(1, 5)]
    for layer, scores in enumerate(out.record.scores(), 1):
        share = (scores >= policy.threshold(layer)).float().mean().item()
        assert policy.shares[layer - 1] == pytest.approx(share)
        # ceil(share * 32) rounded up to a multiple of max(8, 32 / 16) = 8
        assert capacities[layer - 1] == min(32, max(8, -(-math.ceil(share * 32) // 8) * 8))
    assert len(set(capacities)) > 1  # a global threshold executes more of the early sub-layers
    assert policy.capacity(1, 256) == min(256, -(-math.ceil(policy.shares[0] * 256) // 16) * 16)  # any length
    with torch.no_grad():
        record = model(tokens, return_record=True).record
    for layer, r in record.layers.items():
        assert r.executed.sum(1).max().item() <= capacities[layer - 1]
    assert abs(record.stats().skip_rate.item() - 0.25) < 0.1
    state = model.state_dict()
    resumed = build(seed=1)
    resumed.load_state_dict(state)
    assert resumed.skip_policy.shares == pytest.approx(policy.shares) and resumed.skip_policy.active


def test_a_capacity_step_never_reads_the_device():
    """Forward and backward of a capacity-mode step on the meta device, where .item(), .tolist(),
    bool(tensor) and nonzero raise: no host synchronisation. Threshold mode cannot do this."""
    tokens = torch.randint(0, 512, (2, 32))
    for mode, synchronises in (("capacity", False), ("threshold", True)):
        model = calibrated(build(mode), tokens, 0.25)
        model.to("meta")
        batch = torch.randint(0, 512, (2, 33), device="meta")

        def step():
            logits = model(batch[:, :-1])
            F.cross_entropy(logits.flatten(0, 1), batch[:, 1:].flatten()).backward()

        if synchronises:
            with pytest.raises((RuntimeError, NotImplementedError)):
                step()
        else:
            step()
            assert model.blocks[0].attn.q_proj.weight.grad.device.type == "meta"


def test_a_compiled_capacity_block_is_one_graph_and_never_recompiles():
    """``compile_block``: the whole block (gate, decision, packing, sub-layers) under
    ``fullgraph=True``, forward and backward; 20 batches with different skip patterns after the
    warm-up compile nothing new. Dynamo traces and AOT autograd splits the backward as under
    Inductor; the ``aot_eager`` backend only skips Inductor's code generation (40 s on 2 cores)."""
    import torch._dynamo
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    tokens = torch.randint(0, 512, (2, 32), generator=torch.Generator().manual_seed(4))
    torch.manual_seed(0)
    model = Transformer(tiny_model_config(n_layers=4, residual=NAG(gate_directions=4), skip=SkipConfig(mode="capacity")))
    model = calibrated(model, tokens, 0.25)
    # Capacities that differ per sub-layer: the blocks still share one graph (the capacity an argument,
    # dynamic after the first block), compiled twice in all: static for the first block, then dynamic.
    model.skip_policy.set_capacity_shares([1.0, 0.75, 0.5, 0.25, 1.0, 0.75, 0.5, 0.25])  # 32, 24, 16, 8 of 32
    for block in model.blocks:
        block.compile_block(backend="aot_eager")
    generator = torch.Generator().manual_seed(5)
    patterns = set()

    def step():
        batch = torch.randint(0, 512, (2, 33), generator=generator)
        out = model(batch[:, :-1], return_record=True)
        F.cross_entropy(out.logits.flatten(0, 1), batch[:, 1:].flatten()).backward()
        patterns.add(tuple(torch.cat([r.executed.flatten() for r in out.record.layers.values()]).tolist()))

    for _ in range(2):
        step()
    with torch._dynamo.config.patch(error_on_recompile=True):
        for _ in range(20):
            step()
    assert len(patterns) == 22
    assert counters["stats"]["unique_graphs"] <= 2 and not counters["graph_break"]
    torch._dynamo.reset()
