"""The NAG ablations and the depth baselines (DeepNorm, ReZero, LayerScale): their equations, in float64."""

import math

import pytest
import torch

from conftest import tiny_model_config
from nag_lightning.kernels.nag_update import nag_update_reference
from nag_lightning.model import Transformer
from nag_lightning.model.residual import (NAG, DeepNorm, LayerScale, NAGFixedBeta, NAGNoCentring, NAGNoGate,
                                          NAGNoOrthogonalisation, ReZero)
from nag_lightning.model.residual.base import SkipPlan
from nag_lightning.model.residual.nag import NAGState
from nag_lightning.model.residual.nag_ablations import ablated_update
from nag_lightning.model.skip_policy import SkipConfig

D = 64


def lanes(seed=0, rows=32):
    generator = torch.Generator().manual_seed(seed)
    r = torch.randn(rows, D, dtype=torch.float64, generator=generator)
    r = r - r.mean(-1, keepdim=True)
    r = r / r.norm(dim=-1, keepdim=True) * math.sqrt(D)
    s = torch.randn(rows, dtype=torch.float64, generator=generator)
    f = torch.randn(rows, D, dtype=torch.float64, generator=generator) + 0.5  # not centred
    a = torch.rand(rows, dtype=torch.float64, generator=generator)
    a[:4] = 0.0
    return r, s, f, a


def test_the_ablated_update_with_nothing_left_out_is_the_reference():
    r, s, f, a = lanes()
    expected = nag_update_reference(r, s, f, a)
    got = ablated_update(r, s, f, a, 1e-4, centre=True, orthogonalise=True)
    for e, g in zip(expected, got):
        torch.testing.assert_close(g, e, rtol=1e-12, atol=1e-12)


def test_without_centring_an_offset_output_moves_the_direction_off_centre():
    r, s, f, a = lanes()
    new_r, new_s = ablated_update(r, s, f, a, 1e-4, centre=False, orthogonalise=True)
    assert new_r[4:].mean(-1).abs().min() > 1e-3  # the reference keeps every row centred
    centred = f - f.mean(-1, keepdim=True)  # an already centred output: the same as NAG
    torch.testing.assert_close(ablated_update(r, s, centred, a, 1e-4, False, True)[0], nag_update_reference(r, s, centred, a)[0])
    torch.testing.assert_close(new_s, s + 0.5 * torch.log1p(a ** 2))  # the norm lane is untouched by the ablation


def test_without_orthogonalisation_the_direction_mixes_in_the_whole_output():
    r, s, f, a = lanes()
    new_r, _ = ablated_update(r, s, f, a, 1e-4, centre=True, orthogonalise=False)
    fc = f - f.mean(-1, keepdim=True)
    mixed = r + a[:, None] * math.sqrt(D) * fc / fc.norm(dim=-1, keepdim=True)
    expected = mixed / (mixed.norm(dim=-1, keepdim=True) / math.sqrt(D))
    torch.testing.assert_close(new_r, expected, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(new_r.norm(dim=-1) / math.sqrt(D), torch.ones(32, dtype=torch.float64))
    assert torch.equal(new_r[:4], r[:4])  # a = 0: unchanged bit for bit


def test_nag_without_gate_steps_by_alpha_and_has_no_gate_parameters():
    model = Transformer(tiny_model_config(residual=NAGNoGate())).double()
    residual = model.residual
    assert not hasattr(residual, "gate_w") and residual.gate_directions == 0
    state = residual.enter(model.embed(torch.randint(0, 512, (2, 5))))
    m, a = residual.planned_step(state, 3)
    assert torch.equal(m, torch.ones_like(m)) and torch.allclose(a, residual.alpha[2] * torch.ones_like(a))


def test_nag_with_fixed_beta_does_not_train_beta():
    model = Transformer(tiny_model_config(residual=NAGFixedBeta()))
    residual = model.residual
    assert "beta_raw" not in dict(residual.named_parameters()) and "beta_raw" in dict(residual.named_buffers())
    torch.testing.assert_close(torch.nn.functional.softplus(residual.beta_raw), torch.ones(4))
    assert "residual.beta_raw" in model.state_dict()


@pytest.mark.parametrize("ablation", [NAGNoCentring, NAGNoOrthogonalisation])
def test_replaced_updates_refuse_the_triton_kernels(ablation, monkeypatch):
    with pytest.raises(ValueError, match="kernels: torch"):
        ablation().bind(D, 4, 1e-6, kernels="triton")


def test_deepnorm_upweights_the_residual_and_downweights_the_init():
    blocks = 4
    model = Transformer(tiny_model_config(residual=DeepNorm(), n_layers=blocks, d_model=64, n_heads=4, n_kv_heads=4))
    residual = model.residual
    assert residual.alpha == pytest.approx((2 * blocks) ** 0.25) and residual.beta == pytest.approx((8 * blocks) ** -0.25)
    attention = model.blocks[0].attn
    keys, values = attention.kv_proj.weight.chunk(2, dim=0)
    xavier = math.sqrt(2.0 / (64 + 64))
    assert keys.std().item() == pytest.approx(xavier, rel=0.1)
    assert values.std().item() == pytest.approx(residual.beta * xavier, rel=0.1)
    x, f = torch.randn(2, 3, 64), torch.randn(2, 3, 64)
    torch.testing.assert_close(residual.write(x, f, 1, None), residual.norms[0](residual.alpha * x + f))


def test_rezero_starts_as_the_identity():
    model = Transformer(tiny_model_config(residual=ReZero())).eval()
    tokens = torch.randint(0, 512, (2, 7))
    with torch.no_grad():
        torch.testing.assert_close(model(tokens), model.head(model.embed(tokens)))


def test_layerscale_scales_each_feature_of_the_update():
    residual = LayerScale(init_value=0.1)
    residual.bind(8, 4, 1e-6)
    with torch.no_grad():
        residual.scales[1] = torch.arange(8.0)
    x, f = torch.randn(3, 8), torch.randn(3, 8)
    torch.testing.assert_close(residual.write(x, f, 2, None), x + torch.arange(8.0) * f)
    assert torch.equal(residual.scales[0], torch.full((8,), 0.1))


ABLATIONS = [NAGNoGate, NAGFixedBeta, NAGNoCentring, NAGNoOrthogonalisation]


@pytest.mark.parametrize("ablation", ABLATIONS)
def test_every_ablation_takes_nags_eps_into_its_update(ablation):
    """NAG's arguments reach an ablation's own update: with a centred output orthogonal to the
    direction, a relative eps of 2 halves the step (arctan(a / 2)); the default 1e-4 does not."""
    assert issubclass(ablation, NAG)
    r, s, _, a = lanes()
    f = torch.randn(r.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    f = f - f.mean(-1, keepdim=True)
    f = f - torch.linalg.vecdot(f, r).unsqueeze(-1) / D * r
    for eps, divisor in ((2.0, 2.0), (1e-4, 1.0)):
        model = Transformer(tiny_model_config(residual=ablation(eps=eps), d_model=D, n_heads=4, n_kv_heads=4))
        new_r, new_s, _ = model.residual.write(NAGState(r, s), f, 2, SkipPlan(None, torch.ones_like(a), a))
        cos = torch.linalg.vecdot(r, new_r) / D
        angle = torch.atan2((new_r - cos.unsqueeze(-1) * r).norm(dim=-1) / math.sqrt(D), cos)  # exact near 0
        torch.testing.assert_close(angle, torch.atan(a / divisor), rtol=1e-9, atol=1e-12)
        torch.testing.assert_close(new_s, s + 0.5 * torch.log1p(a ** 2), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("ablation", ABLATIONS)
def test_every_ablation_skips_under_the_models_skip_policy(ablation):
    """The skip policy (``ModelConfig.skip``, no NAG argument) drives an ablation as it drives NAG:
    a token runs a sub-layer exactly when its planned step reaches the threshold, and running only
    those tokens (gather) gives the logits of running all and discarding the rest (the mask oracle)."""
    tokens = torch.randint(0, 512, (2, 16), generator=torch.Generator().manual_seed(0))
    outputs = {}
    for execution in ("gather", "mask"):
        torch.manual_seed(0)
        model = Transformer(tiny_model_config(residual=ablation(), skip=SkipConfig(execution=execution)))
        with torch.no_grad():
            model.skip_policy.calibrate_from(model(tokens, return_record=True, calibrate=0.4).record, 0.4)
            outputs[execution] = model(tokens, return_record=True)
    threshold = model.skip_policy.thresholds[0]
    record = outputs["gather"].record
    for layer, sub in record.layers.items():
        assert torch.equal(sub.executed, sub.step >= threshold), layer
    fractions = record.stats().executed_fraction
    assert 0.0 < fractions.mean() < 1.0
    if ablation is NAGNoGate:  # step = alpha_l for every token: a threshold drops whole sub-layers
        alpha = model.residual.alpha.detach()
        torch.testing.assert_close(fractions, (alpha >= threshold).double(), rtol=0, atol=0)
    torch.testing.assert_close(outputs["gather"].logits, outputs["mask"].logits, rtol=1e-5, atol=1e-6)
