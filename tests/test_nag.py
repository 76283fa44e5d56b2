"""NAG: the lane update against the spec's equations in float64, the gate, and the strategy in a model."""

import math

import pytest
import torch

from conftest import tiny_model_config
from nag_lightning.kernels import nag_update
from nag_lightning.model import Transformer
from nag_lightning.model.residual import NAG


def spec_update(r, s, f, a, eps=1e-6):
    """NAG_SPEC.md section 2, steps 2-7, written literally."""
    d = r.shape[-1]
    f = f - f.mean(-1, keepdim=True)
    f_perp = f - ((f * r).sum(-1, keepdim=True) / d) * r
    u = math.sqrt(d) * f_perp / f_perp.norm(dim=-1, keepdim=True).clamp_min(eps)
    a_ = a.unsqueeze(-1)
    r_new = (r + a_ * u) / torch.sqrt(1 + a_**2)
    r_new = r_new / r_new.pow(2).mean(-1, keepdim=True).sqrt()
    return r_new, s + 0.5 * torch.log(1 + a**2)


def random_lanes(shape=(3, 5), d=24, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    r = torch.randn(*shape, d, generator=g, dtype=dtype)
    r = r - r.mean(-1, keepdim=True)
    r = r / r.pow(2).mean(-1, keepdim=True).sqrt()
    s = torch.randn(*shape, generator=g, dtype=dtype)
    f = 3 * torch.randn(*shape, d, generator=g, dtype=dtype) + 1.5
    a = torch.rand(*shape, generator=g, dtype=dtype) * 2 + 0.01
    return r, s, f, a


def test_matches_the_spec_equations_in_float64():
    r, s, f, a = random_lanes()
    new_r, new_s = nag_update(r, s, f, a)
    ref_r, ref_s = spec_update(r, s, f, a)
    torch.testing.assert_close(new_r, ref_r, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(new_s, ref_s, rtol=1e-12, atol=1e-12)


def test_direction_keeps_rms_one_and_rotates_by_arctan_of_the_step():
    r, s, f, a = random_lanes()
    new_r, _ = nag_update(r, s, f, a)
    torch.testing.assert_close(new_r.pow(2).mean(-1), torch.ones_like(s), rtol=1e-12, atol=1e-12)
    d = r.shape[-1]
    angle = torch.arccos(((r * new_r).sum(-1) / d).clamp(-1, 1))
    torch.testing.assert_close(angle, torch.atan(a), rtol=1e-9, atol=1e-9)


def test_update_is_orthogonal_to_the_old_direction():
    r, s, f, a = random_lanes()
    new_r, _ = nag_update(r, s, f, a)
    moved = new_r * torch.sqrt(1 + a**2).unsqueeze(-1) - r  # = a * u
    torch.testing.assert_close((moved * r).sum(-1), torch.zeros_like(s), rtol=0, atol=1e-10)
    torch.testing.assert_close(moved.norm(dim=-1), a * math.sqrt(r.shape[-1]), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("scale", [-30.0, 0.0, 12.0, 60.0])
def test_norm_ratio_is_sqrt_one_plus_a_squared_whatever_the_norm(scale):
    r, s, f, a = random_lanes()
    s = s + scale
    new_r, new_s = nag_update(r, s, f, a)
    before = (s.exp().unsqueeze(-1) * r).norm(dim=-1)
    after = (new_s.exp().unsqueeze(-1) * new_r).norm(dim=-1)
    torch.testing.assert_close(after / before, torch.sqrt(1 + a**2), rtol=1e-10, atol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_zero_step_is_an_exact_identity_on_both_lanes(dtype):
    r, s, f, a = random_lanes(dtype=torch.float64)
    r, f = r.to(dtype), f.to(dtype)
    s = s.float()
    a = a.float()
    a[0] = 0.0
    a[2, 3] = 0.0
    new_r, new_s = nag_update(r, s, f, a)
    assert torch.equal(new_r[0], r[0]) and torch.equal(new_s[0], s[0])
    assert torch.equal(new_r[2, 3], r[2, 3]) and torch.equal(new_s[2, 3], s[2, 3])
    assert not torch.equal(new_r[1], r[1])
    assert new_r.dtype == dtype and new_s.dtype == torch.float32


def test_gradients_match_finite_differences():
    r, s, f, a = random_lanes(shape=(2, 3), d=7)
    inputs = [t.clone().requires_grad_() for t in (r, s, f, a)]
    assert torch.autograd.gradcheck(lambda *x: nag_update(*x), inputs, eps=1e-6, atol=1e-7)


def test_shapes_are_checked():
    r, s, f, a = random_lanes()
    with pytest.raises(ValueError, match="leading shape"):
        nag_update(r, s[:, :2], f, a)


def test_the_gate_is_eq_13_and_starts_near_one_half():
    """m = (sum_i p_i sigmoid(<r, w_i> + b_i)) ** beta, p = softmax(gate_logits), beta =
    softplus(beta_raw), against float64; near 0.5 at init; floored at 1e-6 ** beta, never 0."""
    torch.manual_seed(0)
    nag = NAG(gate_directions=8)
    nag.bind(d_model=16, n_sublayers=2, eps=1e-6)
    r = torch.randn(64, 16)
    r = 4 * r / r.norm(dim=-1, keepdim=True)  # RMS 1, as the direction lane
    m = nag.gate(r, 1)
    assert ((m > 0.3) & (m < 0.7)).all()  # beta = 1, b = 0, uniform p, <r, w_i> of std 0.5
    with torch.no_grad():
        nag.gate_w[1].normal_(0.0, 0.3)
        nag.gate_b[1].uniform_(-1.0, 1.0)
        nag.gate_logits[1].uniform_(-2.0, 2.0)
        nag.beta_raw[1] = 0.7
    w, b, logits = (t[1].detach().double() for t in (nag.gate_w, nag.gate_b, nag.gate_logits))
    mixture = (torch.sigmoid(r.double() @ w.T + b) * torch.softmax(logits, -1)).sum(-1)
    beta = math.log1p(math.exp(0.7))
    torch.testing.assert_close(nag.gate(r, 2).double(), mixture ** beta, rtol=1e-5, atol=1e-7)
    with torch.no_grad():
        nag.gate_b[1].fill_(-50.0)  # every sigmoid ~2e-22: the mixture is floored at 1e-6
    torch.testing.assert_close(nag.gate(r, 2).double(), torch.full((64,), 1e-6 ** beta, dtype=torch.float64),
                               rtol=1e-5, atol=0)
    with torch.no_grad():
        nag.gate_b[1].fill_(50.0)
    torch.testing.assert_close(nag.gate(r, 2), torch.ones(64), rtol=0, atol=1e-6)


def test_alpha_init_and_warmup():
    nag = NAG(alpha_power=0.5, alpha_warmup_steps=10)
    nag.bind(d_model=8, n_sublayers=4, eps=1e-6)
    torch.testing.assert_close(nag.alpha.detach(), torch.tensor([1.0, 2**-0.5, 3**-0.5, 0.5]))
    nag.set_training_step(5)
    assert nag.parameter_stats()["nag/alpha/layer_04"].item() == pytest.approx(0.25)
    nag.set_training_step(50)
    assert nag.parameter_stats()["nag/alpha/layer_04"].item() == pytest.approx(0.5)


def test_model_stream_stays_within_the_sqrt_l_plus_one_bound():
    torch.manual_seed(0)
    config = tiny_model_config(n_layers=4, residual=NAG())
    model = Transformer(config)
    with torch.no_grad():
        model.residual.gate_b.fill_(20.0)  # m = 1: the largest step alpha_l allows
    stats = model(torch.randint(0, 512, (2, 16)), return_stats=True).stats
    # With m = 1 and alpha_l = l^-1/2 the growth is prod sqrt(1 + 1/l) = sqrt(L + 1) exactly.
    assert stats["residual/norm_growth"].item() == pytest.approx(math.sqrt(2 * 4 + 1), rel=1e-4)
    for layer in range(1, 9):
        tag = f"layer_{layer:02d}"
        # Relative update of R equals the step a; the rotation is arctan(a).
        assert stats[f"residual/relative_update/{tag}"].item() == pytest.approx(layer**-0.5, rel=1e-4)
        assert stats[f"residual/rotation_deg/{tag}"].item() == pytest.approx(math.degrees(math.atan(layer**-0.5)), rel=1e-3)
        assert stats[f"nag/gate/{tag}"].item() == pytest.approx(1.0, abs=1e-6)


def test_log_norm_lane_stays_float32_under_bf16_autocast():
    torch.manual_seed(0)
    model = Transformer(tiny_model_config(residual=NAG()))
    captured = {}
    original = model.residual.logits

    def spy(state, head):
        captured["log_norm"] = state.log_norm.dtype
        return original(state, head)

    model.residual.logits = spy
    with torch.autocast("cpu", dtype=torch.bfloat16):
        model(torch.randint(0, 512, (2, 8)))
    assert captured["log_norm"] == torch.float32


def parallel_lanes(d=32, rows=4, dtype=torch.float64, noise=0.0, seed=3):
    """Outputs parallel to the direction (plus a constant, which centring removes, and ``noise``)."""
    r, s, _, a = random_lanes((rows,), d, dtype, seed)
    g = torch.Generator().manual_seed(seed + 1)
    f = 5.0 * r + 2.0 + noise * torch.randn(rows, d, generator=g, dtype=dtype)
    return r, s, f, a


def test_an_output_parallel_to_the_direction_cannot_rotate_it_but_the_norm_still_grows():
    r, s, f, a = parallel_lanes()
    new_r, new_s = nag_update(r, s, f, a)
    torch.testing.assert_close(new_r, r, rtol=0, atol=1e-10)
    torch.testing.assert_close(new_s, s + 0.5 * torch.log1p(a**2), rtol=1e-12, atol=1e-12)


def test_a_zero_output_leaves_the_direction_and_has_finite_gradients():
    r, s, _, a = random_lanes((4,), 16)
    f = torch.zeros_like(r, requires_grad=True)
    a = a.clone().requires_grad_()
    new_r, new_s = nag_update(r, s, f, a)
    torch.testing.assert_close(new_r, r, rtol=0, atol=1e-12)
    (new_r.sum() + new_s.sum()).backward()
    assert torch.isfinite(f.grad).all() and torch.isfinite(a.grad).all()


def test_below_the_relative_eps_the_rotation_shrinks_with_the_orthogonal_part():
    d = 32
    r, s, _, a = random_lanes((1,), d)
    orthogonal = torch.randn(1, d, dtype=torch.float64, generator=torch.Generator().manual_seed(9))
    orthogonal = orthogonal - orthogonal.mean(-1, keepdim=True)
    orthogonal = orthogonal - ((orthogonal * r).sum(-1, keepdim=True) / d) * r
    orthogonal = orthogonal / orthogonal.norm(dim=-1, keepdim=True)
    f_parallel = 10.0 * r
    angles = []
    for size in (1e-3, 1e-5, 1e-6):  # ||f_perp|| / ||f||: above, then below eps = 1e-4
        new_r, _ = nag_update(r, s, f_parallel + size * f_parallel.norm() * orthogonal, a)
        angles.append(torch.arccos(((r * new_r).sum(-1) / d).clamp(-1, 1)).item())
    assert angles[0] == pytest.approx(torch.atan(a).item(), rel=1e-9)  # a full rotation above eps
    # Below it the step shrinks in proportion to ||f_perp|| / (eps ||f||): arctan(a * 0.1), arctan(a * 0.01).
    assert angles[1] == pytest.approx(torch.atan(a * 0.1).item(), rel=1e-6)
    assert angles[2] == pytest.approx(torch.atan(a * 0.01).item(), rel=1e-6)


def test_gradients_are_right_where_the_relative_eps_binds():
    r, s, f, a = parallel_lanes(d=8, rows=3, noise=1e-7)
    inputs = [t.clone().requires_grad_() for t in (r, s, f, a)]
    assert torch.autograd.gradcheck(lambda *x: nag_update(*x), inputs)


def orthogonal_output(r, seed=5):
    """A centred output orthogonal to every row of ``r``: ``||f_perp|| = ||f||``, so a relative eps
    above 1 binds and the rotation is ``arctan(a / eps)`` instead of ``arctan(a)``."""
    f = torch.randn(r.shape, dtype=r.dtype, generator=torch.Generator().manual_seed(seed))
    f = f - f.mean(-1, keepdim=True)
    return f - ((f * r).sum(-1, keepdim=True) / r.shape[-1]) * r


@pytest.mark.parametrize("eps", [2.0, 4.0, None])
def test_nag_eps_reaches_the_update(eps):
    """The strategy's own ``eps`` (not the model's norm eps, which ``bind`` also gets) sets the
    update's floor: with an output orthogonal to the direction the rotation is arctan(a / eps)."""
    from nag_lightning.model.residual.base import SkipPlan
    from nag_lightning.model.residual.nag import NAGState

    model = Transformer(tiny_model_config(residual=NAG() if eps is None else NAG(eps=eps)))
    r, s, _, a = random_lanes((4, 6), model.config.d_model)
    f = orthogonal_output(r)
    new_r, new_s, _ = model.residual.write(NAGState(r, s), f, 3, SkipPlan(None, torch.ones_like(a), a))
    angle = torch.arccos(((r * new_r).sum(-1) / r.shape[-1]).clamp(-1, 1))
    torch.testing.assert_close(angle, torch.atan(a / (eps or 1.0)), rtol=1e-9, atol=1e-12)  # default 1e-4: no floor
    torch.testing.assert_close(new_s, s + 0.5 * torch.log1p(a**2), rtol=1e-12, atol=1e-12)  # the norm lane ignores eps


def test_the_gate_runs_in_float32_under_bf16_autocast():
    torch.manual_seed(0)
    model = Transformer(tiny_model_config(residual=NAG()))
    state = model.residual.enter(model.embed(torch.randint(0, 512, (2, 8))))
    exact = model.residual.gate(state.direction, 3)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        autocast = model.residual.gate(state.direction, 3)
    assert autocast.dtype == torch.float32
    assert torch.equal(autocast, exact)


def test_checkpoints_with_scalar_gains_still_load():
    """Before FSDP2 support, g_enc and g_dec were 0-dimensional (fully_shard refuses those)."""
    from conftest import tiny_model_config
    from nag_lightning.model import Transformer
    from nag_lightning.model.residual import NAG

    torch.manual_seed(0)
    source, target = Transformer(tiny_model_config(residual=NAG())), Transformer(tiny_model_config(residual=NAG()))
    legacy = source.state_dict()
    legacy["residual.g_enc"], legacy["residual.g_dec"] = torch.tensor(0.25), torch.tensor(1.5)
    target.load_state_dict(legacy)
    assert target.residual.g_enc.shape == (1,) and target.residual.g_dec.shape == (1,)
    # Both gains act: g_enc adds 0.25 to the log-norm lane (which no update reads), g_dec scales the
    # read-out, so every logit is the fresh model's (g_enc = 0, g_dec = 1) times 1.5 exp(0.25).
    tokens = torch.randint(0, 512, (2, 8), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(target(tokens), source(tokens) * 1.5 * math.exp(0.25), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("skip, input_gain", [(False, True), (True, True), (False, False)])
def test_a_bfloat16_direction_lane_stays_bfloat16_and_close_to_float32(skip, input_gain):
    """``direction_dtype="bfloat16"`` stores the direction between sub-layers in bf16 (the log-norm
    lane stays float32; every update computes in float32), also through the packed rows of a
    skipping forward; the logits stay within bf16 rounding of the float32 lane's."""
    tokens = torch.randint(0, 512, (2, 32), generator=torch.Generator().manual_seed(0))
    outputs = {}
    for dtype in ("float32", "bfloat16"):
        torch.manual_seed(0)
        model = Transformer(tiny_model_config(residual=NAG(direction_dtype=dtype, input_gain=input_gain)))
        if skip:
            model.skip_policy.set_thresholds(0.3)
        with torch.no_grad():
            state, record = model.stream(tokens, model.rope_cos[:32], model.rope_sin[:32])
            outputs[dtype] = model.residual.logits(state, model.head)
        assert state.direction.dtype == getattr(torch, dtype) and state.log_norm.dtype == torch.float32
        assert record.skipped_any == skip
        rms = state.direction.float().pow(2).mean(-1).sqrt()
        torch.testing.assert_close(rms, torch.ones_like(rms), rtol=0, atol=1e-2)
    torch.testing.assert_close(outputs["bfloat16"], outputs["float32"], rtol=0.05, atol=0.05)
    with pytest.raises(ValueError, match="direction_dtype"):
        NAG(direction_dtype="float16")
