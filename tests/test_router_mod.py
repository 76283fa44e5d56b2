"""Router Mixture-of-Depths (Raposo et al. 2024): ``RouterMoD`` under ``skip.mode: topk``. Top-k per
sequence in training (static shapes, no host read), the predictor's causal rule in evaluation."""

import math

import pytest
import torch
import torch.nn.functional as F

from conftest import tiny_model_config
from nag_lightning.errors import NagError
from nag_lightning.lightning.lit_module import LanguageModel
from nag_lightning.model import ModelConfig, Transformer
from nag_lightning.model.config import ConfigError
from nag_lightning.model.kv_cache import KVCache
from nag_lightning.model.residual import NAG, RouterMoD
from nag_lightning.model.skip_policy import SkipConfig

TOKENS = torch.randint(0, 512, (3, 32), generator=torch.Generator().manual_seed(1))


def config(capacity=0.5, execution="gather", **overrides):
    return tiny_model_config(residual=RouterMoD(), skip=SkipConfig(mode="topk", topk_capacity=capacity,
                                                                  execution=execution), **overrides)


def build(seed=0, **kwargs):
    torch.manual_seed(seed)
    return Transformer(config(**kwargs))


class Recorder:
    """A probe (``Block.body`` calls it per sub-layer) that keeps each sub-layer's stream before and after."""

    def __init__(self):
        self.stats, self.streams = {}, {}

    def record(self, layer, before, after):
        self.streams[layer] = (before.detach().clone(), after.detach().clone())


@pytest.mark.parametrize("capacity, seq", [(0.5, 32), (0.3, 30), (1.0, 16)])
def test_training_runs_exactly_k_tokens_of_every_sequence_with_the_highest_router_logits(capacity, seq):
    model = build(capacity=capacity)
    record = model(TOKENS[:, :seq], return_record=True).record
    k = math.ceil(capacity * seq)
    for layer, r in record.layers.items():
        assert r.executed.sum(1).tolist() == [k] * 3, layer
        assert r.run_rows.item() == 3 * k  # the static (B, k) packing, no padding
        if k < seq:  # the top-k of the router logit (the score): every executed token above every skipped one
            lowest_in = r.score.masked_fill(~r.executed, math.inf).amin(1)
            highest_out = r.score.masked_fill(r.executed, -math.inf).amax(1)
            assert (lowest_in > highest_out).all(), layer


@pytest.mark.parametrize("mode", ["train", "eval"])
@pytest.mark.parametrize("execution", ["gather", "mask"])
def test_skipped_tokens_pass_unchanged_bit_for_bit(execution, mode):
    model = build(execution=execution)
    getattr(model, mode)()
    probe = Recorder()
    with torch.no_grad():
        record = model(TOKENS, return_record=True, probe=probe).record
    for layer, r in record.layers.items():
        before, after = probe.streams[layer]
        assert 0 < r.executed.sum() < r.executed.numel(), layer  # both kinds present
        assert torch.equal(after[~r.executed], before[~r.executed]), layer
        assert (after[r.executed] != before[r.executed]).any(-1).all(), layer


def test_packed_rows_equal_the_mask_oracle_in_outputs_and_router_gradients():
    results = {}
    for execution in ("gather", "mask"):
        model = build(execution=execution)
        out = model(TOKENS, return_record=True)
        (out.logits * torch.linspace(-1, 1, 512)).sum().backward()
        results[execution] = (out.logits.detach(), model.residual.router.grad,
                              [r.executed for r in out.record.layers.values()])
    assert all(torch.equal(a, b) for a, b in zip(results["gather"][2], results["mask"][2]))
    torch.testing.assert_close(results["gather"][0], results["mask"][0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(results["gather"][1], results["mask"][1], rtol=1e-4, atol=1e-7)


def test_the_router_learns_from_the_language_model_and_the_predictor_only_from_its_loss():
    model = build()
    out = model(TOKENS[:, :-1], return_record=True)
    F.cross_entropy(out.logits.flatten(0, 1), TOKENS[:, 1:].flatten()).backward(retain_graph=True)
    residual = model.residual
    assert (residual.router.grad.abs().sum(1) > 0).all()  # every sub-layer's router
    assert residual.predictor_weight.grad is None
    model.zero_grad(set_to_none=True)
    residual.auxiliary_loss(out.record).backward()
    assert (residual.predictor_weight.grad.abs().sum(1) > 0).all() and (residual.predictor_bias.grad != 0).all()
    # Behind the stop-gradient: the predictor's loss moves nothing else.
    assert all(p.grad is None for name, p in model.named_parameters() if "predictor" not in name)


def test_the_auxiliary_loss_is_the_predictors_bce_against_the_topk_mask():
    """Sub-layer 1 by hand in float64 (its input is the embedding), and the training loss."""
    torch.manual_seed(0)
    lm = LanguageModel(config(capacity=0.5, n_layers=1))
    model, residual = lm.model, lm.model.residual
    batch = torch.randint(0, 512, (2, 7), generator=torch.Generator().manual_seed(3))
    tokens = batch[:, :-1]  # T = 6, k = 3
    with torch.no_grad():
        residual.norms[0].weight.uniform_(0.5, 1.5)
        residual.predictor_bias.fill_(0.3)
    x = model.embed.weight.double()[tokens]
    n = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + model.config.norm_eps) * residual.norms[0].weight.double()
    router = n @ residual.router[0].double()
    mask = torch.zeros_like(router).scatter(1, router.topk(3, dim=1).indices, 1.0)
    p = n @ residual.predictor_weight[0].double() + residual.predictor_bias[0].double()
    expected = -(mask * torch.log(torch.sigmoid(p)) + (1 - mask) * torch.log(1 - torch.sigmoid(p))).mean()

    loss, out = lm.loss(batch, return_stats=True)
    record = out.record
    assert torch.equal(record.layers[1].executed, mask.bool())
    assert record.layers[1].predictor_loss.item() == pytest.approx(expected.item(), rel=1e-5)
    cross_entropy = F.cross_entropy(model(tokens).flatten(0, 1), batch[:, 1:].flatten())
    mean_bce = (record.layers[1].predictor_loss + record.layers[2].predictor_loss) / 2
    assert loss.item() == pytest.approx(cross_entropy.item() + 0.01 * mean_bce.item(), rel=1e-6)
    # TensorBoard: the unweighted loss and the predictor's accuracy against the top-k.
    accuracy = ((p > 0) == mask.bool()).double().mean()
    assert out.stats["mod/router/predictor_loss"].item() == pytest.approx(mean_bce.item(), rel=1e-6)
    assert out.stats["mod/router/predictor_accuracy/layer_01"].item() == pytest.approx(accuracy.item())
    lm.eval()  # evaluation: no top-k, so no auxiliary term
    with torch.no_grad():
        eval_loss, eval_out = lm.loss(batch, return_output=True)
        assert eval_out.record.predictor_loss() is None
        assert eval_loss.item() == F.cross_entropy(model(tokens).flatten(0, 1), batch[:, 1:].flatten()).item()


def test_evaluation_is_causal_and_training_topk_is_not():
    model = build()
    changed = TOKENS.clone()
    changed[:, 16:] = (changed[:, 16:] + 1) % 512
    with torch.no_grad():
        model.train()
        a, b = model(TOKENS), model(changed)
        assert not torch.allclose(a[:, :16], b[:, :16], atol=1e-4)  # later tokens moved earlier tokens' top-k
        model.eval()
        a, b = model(TOKENS), model(changed)
    torch.testing.assert_close(a[:, :16], b[:, :16], rtol=0, atol=1e-5)
    assert not torch.allclose(a[:, 16:], b[:, 16:])


def test_decoding_with_a_kv_cache_follows_the_predictor_even_in_train_mode():
    model = build().train()  # a cache always decides with the predictor, never top-k
    with torch.no_grad():
        full = model.eval()(TOKENS[:, :20])
        model.train()
        cache = KVCache(model.config, 3)
        steps = [model.extend(TOKENS[:, :12], cache)]
        steps += [model.extend(TOKENS[:, t:t + 1], cache) for t in range(12, 20)]
    torch.testing.assert_close(torch.stack(steps, 1), full[:, 11:20], rtol=1e-4, atol=1e-4)


def test_a_topk_training_step_never_reads_the_device():
    """Forward and backward (cross-entropy and the predictor's loss) on the meta device, where
    .item(), .tolist(), bool(tensor) and nonzero raise; evaluation's predictor rule packs on the host."""
    model = build().to("meta")
    batch = torch.randint(0, 512, (2, 33), device="meta")
    out = model(batch[:, :-1], return_record=True)
    loss = F.cross_entropy(out.logits.flatten(0, 1), batch[:, 1:].flatten()) + model.residual.auxiliary_loss(out.record)
    loss.backward()
    assert model.residual.router.grad.device.type == "meta" and model.residual.predictor_weight.grad is not None
    model.eval()
    with pytest.raises((RuntimeError, NotImplementedError)):
        model(batch[:, :-1])


def test_a_short_overfit_trains_the_model_and_the_predictor():
    torch.manual_seed(0)
    lm = LanguageModel(config(capacity=0.75), learning_rate=1e-2)
    tokens = torch.randint(0, 512, (2, 33), generator=torch.Generator().manual_seed(4))
    optimizer = lm.build_optimizer()

    def evaluate():
        lm.eval()
        with torch.no_grad():
            loss = lm.loss(tokens).item()
        lm.train()
        return loss

    first, first_eval = lm.loss(tokens).item(), evaluate()
    for _ in range(120):
        loss, out = lm.loss(tokens, return_output=True)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    stats = out.record.router_stats()
    assert loss.item() < 0.25 * first
    assert evaluate() < 0.5 * first_eval  # through the predictor's causal rule
    assert stats["mod/router/predictor_accuracy"] > 0.8, stats


def test_a_checkpoint_round_trip_gives_the_same_logits(tmp_path):
    model = build()
    with torch.no_grad():
        model.residual.predictor_bias.fill_(0.1)
    torch.save({"config": model.config.to_dict(), "state_dict": model.state_dict()}, tmp_path / "model.pt")
    saved = torch.load(tmp_path / "model.pt", weights_only=True)
    torch.manual_seed(1)  # other initial weights
    loaded = Transformer(ModelConfig.from_dict(saved["config"]))
    assert type(loaded.residual) is RouterMoD and loaded.config.skip == model.config.skip
    assert not torch.equal(loaded.residual.router, model.residual.router)
    loaded.load_state_dict(saved["state_dict"])
    for mode in ("train", "eval"):
        getattr(model, mode)(), getattr(loaded, mode)()
        with torch.no_grad():
            assert torch.equal(loaded(TOKENS), model(TOKENS)), mode


def test_topk_needs_a_router_and_refuses_calibration():
    with pytest.raises(ConfigError, match="RouterMoD"):
        Transformer(tiny_model_config(residual=NAG(), skip=SkipConfig(mode="topk")))
    with pytest.raises(NagError, match="topk_capacity must be in"):
        SkipConfig(mode="topk", topk_capacity=0.0).validate()
    # SkipRateController, nag skip-sweep and nag bench at a rate calibrate thresholds: refused.
    lm = LanguageModel(config())
    with pytest.raises(NagError, match="remove SkipRateController"):
        lm.loss(torch.randint(0, 512, (2, 17)), return_output=True, calibrate=0.25)
