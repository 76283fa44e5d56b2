"""Every residual strategy through the same model: causality, learning, checkpoints, diagnostics."""

from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from conftest import tiny_model_config
from nag_lightning.lightning.lit_module import LanguageModel
from nag_lightning.model import ModelConfig, Transformer
from nag_lightning.model.residual import (NAG, DeepNorm, LayerNormScaling, LayerScale, NAGFixedBeta, NAGNoCentring,
                                          NAGNoGate, NAGNoOrthogonalisation, NGPT, OrthogonalUpdate, PostNorm, PreNorm,
                                          ReZero, RouterMoD)

STRATEGIES = {
    "prenorm": PreNorm, "postnorm": PostNorm, "layernorm_scaling": LayerNormScaling,
    "orthogonal": OrthogonalUpdate, "nag": NAG, "deepnorm": DeepNorm, "rezero": ReZero, "layerscale": LayerScale,
    "nag_no_gate": NAGNoGate, "nag_fixed_beta": NAGFixedBeta, "nag_no_centring": NAGNoCentring,
    "nag_no_orthogonalisation": NAGNoOrthogonalisation, "ngpt": NGPT, "router_mod": RouterMoD,
}
# The strategy's scalars and gates (their own optimizer group), by strategy.
NAG_SPECIAL = ("alpha", "beta_raw", "g_dec", "g_enc", "gate_b", "gate_logits", "gate_w")
SPECIAL = {NAG: NAG_SPECIAL, NAGNoCentring: NAG_SPECIAL, NAGNoOrthogonalisation: NAG_SPECIAL,
           NAGNoGate: ("alpha", "g_dec", "g_enc"), NAGFixedBeta: tuple(n for n in NAG_SPECIAL if n != "beta_raw"),
           NGPT: ("alpha", "logit_scale")}


@pytest.fixture(params=sorted(STRATEGIES))
def strategy(request):
    return STRATEGIES[request.param]


def test_prenorm_outputs_are_unchanged_by_the_refactor():
    saved = torch.load(Path(__file__).parent / "data" / "prenorm_reference.pt", weights_only=True)
    model = Transformer(ModelConfig(**saved["config"]))
    renamed = {}
    for name, value in saved["state_dict"].items():  # parameter names before strategies owned the norms
        parts = name.split(".")
        if name.startswith("blocks.") and parts[2] in ("attn_norm", "mlp_norm"):
            sublayer = 2 * int(parts[1]) + (0 if parts[2] == "attn_norm" else 1)
            name = f"residual.norms.{sublayer}.weight"
        elif name == "final_norm.weight":
            name = "residual.final_norm.weight"
        renamed[name] = value
    model.load_state_dict(renamed)
    with torch.no_grad():
        torch.testing.assert_close(model(saved["tokens"]), saved["logits"], rtol=0, atol=1e-6)


def test_causality(strategy):
    torch.manual_seed(0)
    model = Transformer(tiny_model_config(residual=strategy())).eval()
    tokens = torch.randint(0, 512, (2, 20))
    changed = tokens.clone()
    changed[:, 12:] = (changed[:, 12:] + 1) % 512
    with torch.no_grad():
        a, b = model(tokens), model(changed)
    torch.testing.assert_close(a[:, :12], b[:, :12], rtol=0, atol=1e-5)
    assert not torch.allclose(a[:, 12:], b[:, 12:])


def test_short_overfit(strategy):
    torch.manual_seed(0)
    model = LanguageModel(tiny_model_config(residual=strategy()), learning_rate=1e-2, special_lr_multiplier=1.0)
    tokens = torch.randint(0, 512, (2, 33))
    optimizer = model.build_optimizer()
    first = None
    for _ in range(120):
        loss = model.loss(tokens)
        first = loss.item() if first is None else first
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert loss.item() < 0.25 * first


def test_checkpoint_round_trip(strategy, tiny_data, tmp_path):
    from nag_lightning.data import TokenShardDataModule

    pl.seed_everything(0)

    model = LanguageModel(tiny_model_config(residual=strategy()), warmup_steps=1)
    trainer = pl.Trainer(accelerator="cpu", max_steps=2, logger=False, enable_progress_bar=False,
                         enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0,
                         callbacks=[ModelCheckpoint(dirpath=tmp_path, filename="last")])
    trainer.fit(model, datamodule=TokenShardDataModule(str(tiny_data), context_length=32, batch_size=2))
    loaded = LanguageModel.load_from_checkpoint(tmp_path / "last.ckpt")
    assert type(loaded.model.residual) is strategy
    tokens = torch.randint(0, 512, (2, 16))
    model.eval(), loaded.eval()
    torch.testing.assert_close(loaded(tokens), model(tokens), rtol=0, atol=0)


def test_every_strategy_reports_the_residual_diagnostics(strategy):
    torch.manual_seed(0)
    model = Transformer(tiny_model_config(residual=strategy()))
    stats = model(torch.randint(0, 512, (2, 16)), return_stats=True).stats
    for layer in range(1, 5):
        for kind in ("rms", "relative_update", "rotation_deg"):
            value = stats[f"residual/{kind}/layer_{layer:02d}"]
            assert torch.isfinite(value) and value >= 0
    assert stats["residual/norm_growth"] > 0
    has_nag_tags = any(tag.startswith("nag/") for tag in stats)
    assert has_nag_tags == issubclass(strategy, NAG)


def test_diagnostics_do_not_change_the_outputs():
    torch.manual_seed(0)
    model = Transformer(tiny_model_config(residual=NAG()))
    tokens = torch.randint(0, 512, (2, 16))
    with torch.no_grad():
        assert torch.equal(model(tokens, return_stats=True)[0], model(tokens))


def test_prenorm_diagnostics_match_a_hand_computation():
    torch.manual_seed(0)
    model = Transformer(tiny_model_config())
    tokens = torch.randint(0, 512, (1, 6))
    stats = model(tokens, return_stats=True).stats
    x = model.embed(tokens)
    block = model.blocks[0]
    cos, sin = model.rope_cos[:6], model.rope_sin[:6]
    after = x + block.attn(model.residual.norms[0](x), cos, sin)
    rms = x.pow(2).mean(-1).sqrt().mean()
    rel = ((after - x).norm(dim=-1) / x.norm(dim=-1)).mean()
    torch.testing.assert_close(stats["residual/rms/layer_01"], rms.detach())
    torch.testing.assert_close(stats["residual/relative_update/layer_01"], rel.detach())


def test_nag_scalars_get_their_own_optimizer_group():
    model = LanguageModel(tiny_model_config(residual=NAG()), learning_rate=1e-3, special_lr_multiplier=0.05)
    groups = model.build_optimizer().param_groups
    assert len(groups) == 3
    special = groups[2]
    assert special["lr"] == pytest.approx(5e-5) and special["weight_decay"] == 0.0
    residual = model.model.residual
    expected = {id(p) for p in (residual.alpha, residual.beta_raw, residual.gate_logits, residual.gate_w,
                                residual.gate_b, residual.g_enc, residual.g_dec)}
    assert {id(p) for p in special["params"]} == expected
    all_ids = [id(p) for g in groups for p in g["params"]]
    assert len(all_ids) == len(set(all_ids)) == len({id(p) for p in model.parameters()})


@pytest.mark.parametrize("tied", [True, False])
def test_every_parameter_is_in_the_right_optimizer_group(strategy, tied):
    """By name: weight decay only for the linear layers' matrices; NAG's per-layer input gains,
    every norm gain and the embedding get none; the strategy's scalars and gates their own group."""
    model = LanguageModel(tiny_model_config(residual=strategy(), tie_embeddings=tied))
    names = {id(p): name for name, p in model.named_parameters()}
    groups = {g["name"]: sorted(names[id(p)] for p in g["params"]) for g in model.build_optimizer().param_groups}
    matrices = ("attn.q_proj.weight", "attn.kv_proj.weight", "attn.out_proj.weight", "mlp.gate_up_proj.weight",
                "mlp.down_proj.weight")
    expected_decay = sorted([f"model.blocks.{b}.{m}" for b in range(2) for m in matrices]
                            + ([] if tied else ["model.head.weight"]))
    assert groups["decay"] == expected_decay
    special = [f"model.residual.{n}" for n in SPECIAL.get(strategy, ())]
    assert groups.get("special", []) == sorted(special)
    assert sorted(groups["no_decay"]) == sorted(set(names.values()) - set(expected_decay) - set(special))
    assert "model.embed.weight" in groups["no_decay"]
    if issubclass(strategy, NAG):
        assert "model.residual.gains" in groups["no_decay"]


def test_strategy_is_copied_so_two_models_do_not_share_it():
    config = tiny_model_config(residual=NAG())
    a, b = Transformer(config), Transformer(config)
    assert a.residual is not b.residual and a.residual.alpha is not b.residual.alpha


def test_loss_at_init_is_close_to_uniform_for_nag():
    torch.manual_seed(0)
    model = LanguageModel(tiny_model_config(residual=NAG()))
    loss = model.loss(torch.randint(0, 512, (4, 33)))
    assert abs(loss.item() - torch.log(torch.tensor(512.0)).item()) < 0.3


def test_activation_checkpointing_gives_the_same_loss_and_gradients():
    grads = {}
    for checkpointing in (False, True):
        torch.manual_seed(0)
        model = LanguageModel(tiny_model_config(residual=NAG()), activation_checkpointing=checkpointing)
        loss = model.loss(torch.randint(0, 512, (2, 17), generator=torch.Generator().manual_seed(3)))
        loss.backward()
        grads[checkpointing] = (loss.item(), {n: p.grad for n, p in model.named_parameters() if p.grad is not None})
    assert grads[True][0] == grads[False][0]
    for name, grad in grads[False][1].items():
        torch.testing.assert_close(grads[True][1][name], grad, msg=name)
