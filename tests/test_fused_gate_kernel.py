"""The fused "lane update + next gate + next input" (kernels/nag_update_gate.py): its reference is
NAG's own steps composed, its reference backward is right (finite differences), and the Triton
kernels match the float64 reference, forward and backward (interpreter on CPU, compiled on a GPU)."""

import pytest
import torch
import torch.nn.functional as F

from conftest import without_interpreter
from nag_lightning.kernels import nag_update, nag_update_and_gate
from nag_lightning.kernels._triton import HAS_TRITON, triton_unavailable_reason
from nag_lightning.model.residual import NAG
from nag_lightning.model.residual.nag import NAGState

# As tests/test_kernels.py: CPU tensors run the Triton interpreter (conftest sets TRITON_INTERPRET=1
# where there is no GPU); the GPU tests run the compiled kernels.
needs_triton = pytest.mark.skipif(triton_unavailable_reason(torch.device("cpu")) is not None,
                                  reason="Triton on CPU tensors needs TRITON_INTERPRET=1 (set where no GPU is present)")
needs_gpu = pytest.mark.skipif(not torch.cuda.is_available() or not HAS_TRITON, reason="needs a CUDA GPU and Triton")

OUTPUTS = ("direction", "log_norm", "gate", "step", "sublayer_input")
INPUTS = ("direction", "log_norm", "update", "step", "gate_w", "gate_b", "gate_logits", "beta", "alpha", "gain")
# Largest error allowed, (as a fraction of the reference's largest value, of its norm), per direction
# storage. Measured under the interpreter at 64 x 64, C = 8: float32 at most 1.6e-7 and 2.5e-7
# (the step's and beta's gradients, sums over a row and over rows); bf16 at most 5.8e-3 and 3.7e-3
# (the lanes and their gradients are stored in bf16: 2^-8 relative rounding).
TOLERANCE = {torch.float32: (1e-5, 1e-5), torch.bfloat16: (2e-2, 1e-2)}


def fused_inputs(lead, d, n_gates, dtype, gain=True, device="cpu", seed=0, gate_bias=0.0, gate_scale=0.5):
    """Lanes, a sub-layer output and a step (one exact skip, a = 0), and a next gate like NAG's at
    init but with non-trivial biases, mixture logits, beta and alpha."""
    g = torch.Generator().manual_seed(seed)
    r = torch.randn(*lead, d, generator=g)
    r = r - r.mean(-1, keepdim=True)
    r = (r / r.pow(2).mean(-1, keepdim=True).sqrt()).to(dtype)
    s = torch.randn(*lead, generator=g)
    f = torch.randn(*lead, d, generator=g).to(dtype)
    a = torch.rand(*lead, generator=g) + 0.05
    a.view(-1)[0] = 0.0
    w = torch.randn(n_gates, d, generator=g) * (gate_scale / d ** 0.5)
    b = gate_bias + 0.3 * torch.randn(n_gates, generator=g)
    logits = torch.randn(n_gates, generator=g)
    beta, alpha = torch.tensor(1.3), torch.tensor(0.7)
    gains = 1 + 0.2 * torch.randn(d, generator=g) if gain else None
    return [None if t is None else t.to(device) for t in (r, s, f, a, w, b, logits, beta, alpha, gains)]


def outputs_and_grads(inputs, backend, double=False, seed=1, used=OUTPUTS, update_rows=None):
    """The five outputs and every input's gradient under a random linear loss of the ``used`` outputs."""
    leaves = [None if t is None else (t.double() if double else t).detach().clone().requires_grad_() for t in inputs]
    out = nag_update_and_gate(*leaves, backend=backend, update_rows=update_rows)
    g = torch.Generator().manual_seed(seed)
    weights = {name: torch.randn(o.shape, generator=g).to(o.device) for name, o in zip(OUTPUTS, out)}
    loss = sum((getattr(out, name).double() * weights[name].double()).sum() for name in used)
    loss.backward()
    return dict(zip(OUTPUTS, [o.detach() for o in out])) | {
        f"d_{name}": None if leaf is None else leaf.grad for name, leaf in zip(INPUTS, leaves)}


def assert_matches_reference(reference: dict, got: dict, dtype, tolerance=None) -> None:
    by_max, by_norm = tolerance or TOLERANCE[dtype]
    for name, ref in reference.items():
        value = got[name]
        assert (value is None) == (ref is None), name
        if ref is None:
            continue
        ref, value = ref.double(), value.double()
        assert value.shape == ref.shape, name
        scale = ref.abs().max().item()
        if scale == 0:  # exactly zero in the reference (a clamped gate): exactly zero here too
            assert torch.equal(value, ref), name
            continue
        error = (value - ref).abs()
        assert error.max().item() <= by_max * scale, f"{name}: {error.max().item():.3g} > {by_max} x {scale:.3g}"
        assert error.norm().item() <= by_norm * ref.norm().item(), f"{name}: norm error {error.norm().item():.3g}"


def nag_at(d, n_gates, direction_dtype, gain, seed=0):
    """A bound NAG with every gate parameter moved off its initial value, and alpha warming up."""
    torch.manual_seed(seed)
    nag = NAG(gate_directions=n_gates, input_gain=gain, alpha_warmup_steps=10,
              direction_dtype={torch.float32: "float32", torch.bfloat16: "bfloat16"}.get(direction_dtype, "float32"))
    nag.bind(d, n_sublayers=3, eps=1e-6)
    nag.set_training_step(4)  # alpha_scale = 0.4
    with torch.no_grad():
        for parameter in (nag.gate_b, nag.gate_logits, nag.beta_raw, nag.alpha):
            parameter.add_(0.3 * torch.randn_like(parameter))
        if nag.gains is not None:
            nag.gains.add_(0.2 * torch.randn_like(nag.gains))
    return nag


@pytest.mark.parametrize("gain", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_reference_is_nag_update_then_nags_gate_step_and_read(dtype, gain):
    """Item 1's definition: the reference equals NAG's own functions composed, outputs and gradients.

    float32/bf16 lanes: the same operations, so equal to rounding (measured: bit for bit). float64
    lanes: NAG's gate computes in float32 whatever it reads, the reference in float64; 1e-6."""
    d, n_gates, layer = 32, 4, 2  # the update of sub-layer 1, then the gate and input of sub-layer 2
    nag = nag_at(d, n_gates, dtype, gain)
    r, s, f, a = fused_inputs((3, 5), d, n_gates, dtype)[:4]
    leaves = [t.clone().requires_grad_() for t in (r, s, f, a)]
    parameters = [nag.gate_w, nag.gate_b, nag.gate_logits, nag.beta_raw, nag.alpha] + ([nag.gains] if gain else [])

    def gradients(outputs):
        g = torch.Generator().manual_seed(1)
        loss = sum((o.double() * torch.randn(o.shape, generator=g).double()).sum() for o in outputs)
        return torch.autograd.grad(loss, leaves + parameters, allow_unused=True)

    # NAG's steps, as the model runs them: write (nag_update), then the next sub-layer's plan and read.
    new_r, new_s = nag_update(*leaves, eps=nag.eps)
    state = NAGState(new_r, new_s)
    m, next_a = nag.planned_step(state, layer)
    composed = (new_r, new_s, m, next_a, nag.read(state, layer))
    i = layer - 1
    fused = nag_update_and_gate(*leaves, nag.gate_w[i], nag.gate_b[i], nag.gate_logits[i], F.softplus(nag.beta_raw[i]),
                                nag.alpha[i] * nag.alpha_scale, nag.gains[i] if gain else None, eps=nag.eps)
    tolerance = dict(rtol=1e-6, atol=1e-6) if dtype == torch.float64 else dict(rtol=1e-7, atol=1e-7)
    for name, want, got in zip(OUTPUTS, composed, fused):
        assert got.dtype == want.dtype or dtype == torch.float64, name  # the float64 reference stays float64
        torch.testing.assert_close(got, want.to(got.dtype), **tolerance, msg=name)
    for index, (want, got) in enumerate(zip(gradients(composed), gradients(fused))):
        assert (want is None) == (got is None)
        if want is not None:
            torch.testing.assert_close(got, want.to(got.dtype), **tolerance, msg=f"gradient {index}")


@pytest.mark.parametrize("gain", [True, False])
def test_reference_backward_matches_finite_differences(gain):
    """gradcheck in float64: autograd through the reference vs central differences, every input."""
    inputs = [None if t is None else t.double().requires_grad_() for t in fused_inputs((5,), 8, 3, torch.float64, gain)]
    inputs[3] = inputs[3].detach().clamp_min(0.1).requires_grad_()  # a = 0 switches the re-normalisation off: a kink

    def fn(*xs):
        return tuple(nag_update_and_gate(*xs, backend="torch"))

    assert torch.autograd.gradcheck(fn, tuple(inputs), eps=1e-6, atol=1e-6, rtol=1e-5)


@needs_triton
@pytest.mark.parametrize("gain", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("lead, d, n_gates", [((4, 16), 64, 8), ((37,), 100, 5), ((3, 50), 48, 3)])
def test_triton_matches_the_float64_reference(lead, d, n_gates, dtype, gain):
    """64 x 64 (C = 8) as rows of (4, 16); 37 x 100 (C = 5): padded columns and rows; 150 x 48:
    three programs of 64 rows under the interpreter, so the parameters' partial sums add up."""
    inputs = fused_inputs(lead, d, n_gates, dtype, gain)
    fused = outputs_and_grads(inputs, "triton")
    assert_matches_reference(outputs_and_grads(inputs, "torch", double=True), fused, dtype)
    # Dtypes: the contract's (the reference at the same storage), not float64's.
    contract = outputs_and_grads(inputs, "torch")
    assert {k: None if v is None else v.dtype for k, v in fused.items()} == \
           {k: None if v is None else v.dtype for k, v in contract.items()}
    # a = 0 (a skipped sub-layer): the lanes unchanged bit for bit, and the next input reads them.
    r = inputs[0].reshape(-1, d)
    assert torch.equal(fused["direction"].reshape(-1, d)[0], r[0])
    expected_input = r[0].float() * inputs[9] if gain else r[0].float()
    assert torch.equal(fused["sublayer_input"].reshape(-1, d)[0], expected_input)


def packed(inputs, seed=2, padding=3):
    """The inputs as a skipping sub-layer leaves them: about 60 % of the tokens ran it, its output
    holds their rows in a shuffled order plus ``padding`` padding rows, the others' step is 0;
    and each token's row number in that output (-1: skipped)."""
    r, s, f, a, *gate = inputs
    g = torch.Generator().manual_seed(seed)
    executed = torch.rand(a.shape, generator=g) < 0.6
    executed.view(-1)[:2] = torch.tensor([True, False])
    tokens = executed.flatten().nonzero().flatten()
    order = tokens[torch.randperm(len(tokens), generator=g)]
    padding_rows = torch.randn(padding, f.shape[-1], generator=g).to(f)
    f_packed = torch.cat((f.flatten(0, -2)[order.to(f.device)], padding_rows))
    rows = torch.full((a.numel(),), -1, dtype=torch.long)
    rows[order] = torch.arange(len(order))
    executed, rows = executed.to(a.device), rows.view(a.shape).to(a.device)
    return [r, s, f_packed, torch.where(executed, a, torch.zeros_like(a)), *gate], rows


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("lead, d", [((4, 16), 64), ((3, 50), 48)])
def test_triton_reads_packed_rows_and_matches_the_float64_reference(lead, d, dtype):
    """A sub-layer that ran on packed rows: the fused pass reads each token's update through its row
    number (the scatter back into the lanes fused in), matches the float64 reference forward and
    backward, gives the padding rows no gradient, and leaves the skipped tokens' lanes unchanged."""
    inputs, rows = packed(fused_inputs(lead, d, 5, dtype))
    fused = outputs_and_grads(inputs, "triton", update_rows=rows)
    assert_matches_reference(outputs_and_grads(inputs, "torch", double=True, update_rows=rows), fused, dtype)
    assert fused["d_update"].shape == inputs[2].shape and not fused["d_update"][-3:].any()
    skipped = rows < 0
    assert torch.equal(fused["direction"][skipped], inputs[0][skipped])
    assert torch.equal(fused["log_norm"][skipped], inputs[1][skipped])
    # The reference's packed form is the unpacked update with zeros for the skipped tokens.
    f_full = torch.zeros(*lead, d, dtype=dtype)
    f_full[~skipped] = inputs[2][rows[~skipped]]
    full = outputs_and_grads([*inputs[:2], f_full, *inputs[3:]], "torch")
    by_rows = outputs_and_grads(inputs, "torch", update_rows=rows)
    for name in OUTPUTS:
        assert torch.equal(by_rows[name], full[name]), name


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_next_gate_and_input_read_the_direction_as_stored(dtype):
    """As in the model, the gate and the next input see r' after its rounding to the lane's storage
    (a kernel gating the unrounded bf16 row is 1e-3 off here; within the float64 parity's allowance)."""
    r, s, f, a, w, b, logits, beta, alpha, gains = fused_inputs((64,), 64, 8, dtype)
    out = nag_update_and_gate(r, s, f, a, w, b, logits, beta, alpha, gains, backend="triton")
    stored = out.direction.float()
    mixture = (torch.sigmoid(F.linear(stored, w, b)) * torch.softmax(logits, -1)).sum(-1)
    torch.testing.assert_close(out.gate, mixture.clamp_min(1e-6) ** beta, rtol=1e-6, atol=1e-6)
    assert torch.equal(out.sublayer_input, stored * gains)


@needs_triton
def test_triton_matches_when_only_some_outputs_carry_gradients():
    """NAG uses the gate only for skip decisions and statistics: no gradient reaches m' or r' directly."""
    inputs = fused_inputs((64,), 64, 8, torch.float32)
    used = ("log_norm", "step", "sublayer_input")
    assert_matches_reference(outputs_and_grads(inputs, "torch", double=True, used=used),
                             outputs_and_grads(inputs, "triton", used=used), torch.float32)


@needs_triton
@pytest.mark.parametrize("gate_bias, clamped_rows", [(-40.0, "all"), (-16.5, "some")])
def test_triton_matches_where_the_mixture_floor_binds(gate_bias, clamped_rows):
    """Below 1e-6 the mixture is clamped: no gradient to the gate's directions, biases and weights
    from those rows, beta's still flows (through log 1e-6)."""
    inputs = fused_inputs((64,), 64, 8, torch.float32, gate_bias=gate_bias, gate_scale=8.0)
    reference = outputs_and_grads(inputs, "torch", double=True)
    mixture = reference["gate"] ** (1 / inputs[7].double())
    clamped = (mixture <= 1e-6 * (1 + 1e-9)).float().mean().item()
    assert clamped == 1.0 if clamped_rows == "all" else 0.0 < clamped < 1.0, clamped
    fused = outputs_and_grads(inputs, "triton")
    assert_matches_reference(reference, fused, torch.float32)
    if clamped_rows == "all":
        assert not fused["d_gate_w"].any() and not fused["d_gate_b"].any() and fused["d_beta"].item() != 0


@needs_triton
def test_the_parity_check_catches_a_small_error():
    """The tolerances are tight enough to see a kernel that is slightly wrong: beta off by 1e-4."""
    inputs = fused_inputs((64,), 64, 8, torch.float32)
    wrong = list(inputs)
    wrong[7] = inputs[7] * (1 + 1e-4)
    with pytest.raises(AssertionError, match="gate"):
        assert_matches_reference(outputs_and_grads(inputs, "torch", double=True),
                                 outputs_and_grads(wrong, "triton"), torch.float32)


def op_arguments(inputs, rows=None):
    """The forward operator's arguments from ``fused_inputs`` (the public function's own preparation)."""
    r, s, f, a, w, b, logits, beta, alpha, gains = inputs
    return (r, f, rows, s, a, w, b, torch.softmax(logits, -1), beta.reshape(1), alpha.reshape(1), gains, 1e-4)


@needs_triton
@pytest.mark.parametrize("gain, is_packed", [(True, False), (False, False), (True, True)])
def test_the_operators_are_registered_with_their_autograd(gain, is_packed):
    """torch.library.opcheck's schema and autograd-registration checks (its fake-tensor and compile
    checks run the kernels under the interpreter, which fails on fake tensors: the GPU test runs them)."""
    inputs, rows = fused_inputs((64,), 64, 8, torch.bfloat16, gain), None
    if is_packed:
        inputs, rows = packed(inputs)
    for index in (0, 2, 3, 4):  # r, f, a, w
        inputs[index].requires_grad_()
    torch.library.opcheck(torch.ops.nag_lightning.nag_update_gate_forward.default, op_arguments(inputs, rows),
                          test_utils=("test_schema", "test_autograd_registration"))


FAKE_CHECK = """
import torch
from nag_lightning.kernels import nag_update_and_gate
from nag_lightning.kernels.nag_update_gate import nag_update_gate_triton
for gain, is_packed in ((True, False), (False, False), (True, True)):
    d, c = 64, 8
    update = (40, d) if is_packed else (4, 16, d)  # packed: 40 rows, read through row numbers
    rows = torch.empty((4, 16), dtype=torch.long, device="meta") if is_packed else None
    shapes = [(4, 16, d), (4, 16), update, (4, 16), (c, d), (c,), (c,), (), ()] + ([(d,)] if gain else [])
    dtypes = [torch.bfloat16, torch.float32, torch.bfloat16] + [torch.float32] * 7
    results = []
    for fn in (lambda *xs: nag_update_gate_triton(*xs, update_rows=rows),
               lambda *xs: nag_update_and_gate(*xs, backend="torch", update_rows=rows)):
        leaves = [torch.empty(shape, dtype=dtype, device="meta", requires_grad=True) for shape, dtype in zip(shapes, dtypes)]
        out = fn(*leaves, *([] if gain else [None]))
        sum(o.float().sum() for o in out).backward()
        results.append([(tuple(t.shape), t.dtype) for t in list(out) + [leaf.grad for leaf in leaves]])
    assert results[0] == results[1], results
print("same shapes and dtypes")
"""


def test_the_fake_implementations_give_the_contracts_shapes_and_dtypes():
    """What torch.compile traces with: the operators on meta tensors, forward and backward, give the
    reference's shapes and dtypes. In a process without the interpreter (it would run the kernels)."""
    done = without_interpreter(FAKE_CHECK)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "same shapes and dtypes" in done.stdout


def test_bad_arguments_are_rejected():
    r, s, f, a, w, b, logits, beta, alpha, gains = fused_inputs((4,), 16, 3, torch.float32)
    with pytest.raises(ValueError, match="unknown backend"):
        nag_update_and_gate(r, s, f, a, w, b, logits, beta, alpha, gains, backend="cuda")
    with pytest.raises(ValueError, match="gate_w"):
        nag_update_and_gate(r, s, f, a, w[:, :8], b, logits, beta, alpha, gains)
    with pytest.raises(ValueError, match="log_norm"):
        nag_update_and_gate(r, s[:3], f, a, w, b, logits, beta, alpha, gains)
    with pytest.raises(ValueError, match="update_rows"):  # row numbers, shaped like the tokens
        nag_update_and_gate(r, s, f, a, w, b, logits, beta, alpha, gains, update_rows=torch.zeros(3, dtype=torch.long))
    with pytest.raises(ValueError, match="update_rows"):
        nag_update_and_gate(r, s, f, a, w, b, logits, beta, alpha, gains, update_rows=torch.zeros(4))
    # Plain floats for the scalars are accepted.
    out = nag_update_and_gate(r, s, f, a, w, b, logits, 1.3, 0.7, gains)
    torch.testing.assert_close(out.step, 0.7 * out.gate)


@needs_gpu
@pytest.mark.parametrize("gain", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gpu_parity_at_training_sizes(dtype, gain):
    """8192 rows of d = 1024, C = 32 (NAG's default), compiled kernels vs the float64 reference.
    Not yet run (no GPU where it was written): float32 gets 10x the interpreter test's allowance on
    the largest value (the parameters' gradients sum 8192 rows), the same on the norm."""
    inputs = fused_inputs((8, 1024), 1024, 32, dtype, gain, device="cuda")
    reference = outputs_and_grads(inputs, "torch", double=True)
    fused = outputs_and_grads(inputs, "triton")
    assert_matches_reference(reference, fused, dtype, (1e-4, 1e-5) if dtype == torch.float32 else None)


@needs_gpu
@pytest.mark.parametrize("is_packed", [False, True])
def test_torch_compile_places_the_fused_op_in_one_graph(is_packed):
    """Registered as custom ops, the kernels sit inside a compiled graph: fullgraph=True (no break)
    gives the eager Triton results, forward and backward; also reading packed rows."""
    torch._dynamo.reset()
    inputs, rows = fused_inputs((4, 512), 256, 16, torch.bfloat16, device="cuda"), None
    if is_packed:
        inputs, rows = packed(inputs)
    torch.library.opcheck(torch.ops.nag_lightning.nag_update_gate_forward.default, op_arguments(
        [t if t is None or i not in (0, 2, 3, 4) else t.clone().requires_grad_() for i, t in enumerate(inputs)], rows))

    def step(*xs):
        out = nag_update_and_gate(*xs, backend="triton", update_rows=rows)
        return out.sublayer_input.sin().sum() + out.step.sum() + out.log_norm.sum() + out.direction.float().sum()

    results = {}
    for name, fn in (("eager", step), ("compiled", torch.compile(step, fullgraph=True))):
        leaves = [None if t is None else t.clone().requires_grad_() for t in inputs]
        loss = fn(*leaves)
        loss.backward()
        results[name] = [loss.detach()] + [leaf.grad for leaf in leaves if leaf is not None]
    for eager, compiled in zip(results["eager"], results["compiled"]):
        torch.testing.assert_close(compiled.float(), eager.float(), rtol=2e-2, atol=2e-2)


@needs_triton
@pytest.mark.parametrize("skip", [None, dict(execution="mask"), dict(execution="gather"), dict(mode="capacity"),
                                  dict(threshold_scope="per_layer")])
def test_the_model_with_triton_kernels_runs_the_fused_boundary_and_matches_torch(skip, monkeypatch):
    """NAG with ``kernels: triton`` runs one fused pass per sub-layer boundary (``NAG.write_ahead``),
    and the model's loss and every gradient match the PyTorch kernels: dense, threshold skipping
    computed on all rows (mask) or on the packed ones (gather: the pass reads the packed rows
    through their row numbers, the scatter back fused in), capacity mode (packed, static shapes),
    and per-layer thresholds with sub-layer 2's out of reach (it runs on padding rows only, so
    every token passes through that boundary unchanged)."""
    import nag_lightning.model.residual.nag as nag_module
    from conftest import tiny_model_config
    from nag_lightning.model import Transformer
    from nag_lightning.model.skip_policy import SkipConfig

    calls = []
    fused = nag_module.nag_update_and_gate
    monkeypatch.setattr(nag_module, "nag_update_and_gate", lambda *a, **k: calls.append(k["backend"]) or fused(*a, **k))
    tokens = torch.randint(0, 97, (3, 24), generator=torch.Generator().manual_seed(0))
    results = {}
    for backend in ("torch", "triton"):
        torch.manual_seed(0)
        model = Transformer(tiny_model_config(vocab_size=97, context_length=24, n_layers=2, kernels=backend,
                                              residual=NAG(alpha_warmup_steps=10),
                                              **({} if skip is None else {"skip": SkipConfig(**skip)})))
        model.residual.set_training_step(4)  # alpha_scale 0.4: the fused step must carry it
        if skip is not None:
            with torch.no_grad():
                model.skip_policy.calibrate_from(model(tokens, return_record=True, calibrate=0.25).record, 0.25)
            if skip.get("threshold_scope") == "per_layer":  # every token runs sub-layers 1, 3, 4; none runs 2
                model.skip_policy.set_thresholds(torch.tensor([0.0, 1e9, 0.0, 0.0]))
        calls.clear()
        out = model(tokens, return_record=True)
        loss = F.cross_entropy(out.logits.flatten(0, 1), tokens.roll(-1, 1).flatten())
        loss.backward()
        executed = [None if r.executed is None else r.executed.sum().item() for r in out.record.layers.values()]
        results[backend] = (loss.detach(), {n: p.grad for n, p in model.named_parameters()}, executed)
        assert bool(calls) == (backend == "triton")  # the PyTorch kernels leave the fusion to a compiler
    (loss, grads, executed), (loss_t, grads_t, executed_t) = results["torch"], results["triton"]
    assert executed_t == executed  # the same tokens ran each sub-layer
    torch.testing.assert_close(loss_t, loss, rtol=1e-5, atol=1e-5)
    for name, grad in grads.items():
        assert (grad is None) == (grads_t[name] is None), name
        if grad is not None:
            torch.testing.assert_close(grads_t[name], grad, rtol=1e-4, atol=1e-5, msg=name)
    # Boundaries 1-2, 2-3, 3-4 (none after the last), each fused, packed or not.
    assert len(calls) == 3, calls
    if skip in (dict(execution="gather"), dict(mode="capacity")):  # packed rows of some tokens
        assert any(r.executed is not None and 0 < r.executed.sum() < 72 for r in out.record.layers.values())
    if skip is not None and skip.get("threshold_scope") == "per_layer":
        assert executed_t == [72, 0, 72, 72], executed_t


@needs_triton
def test_a_decoding_step_that_leaves_a_sub_layer_out_drops_its_look_ahead():
    """Decoding one token, a sub-layer no token runs is left out (``Block.skipped``); the look-ahead
    the sub-layer before it computed must not reach the one after: the Triton model decodes the
    PyTorch model's logits."""
    from conftest import tiny_model_config
    from nag_lightning.model import Transformer
    from nag_lightning.model.kv_cache import KVCache
    from nag_lightning.model.skip_policy import SkipConfig

    tokens = torch.randint(0, 97, (1, 6), generator=torch.Generator().manual_seed(0))
    logits = {}
    for backend in ("torch", "triton"):
        torch.manual_seed(0)
        model = Transformer(tiny_model_config(vocab_size=97, context_length=24, n_layers=2, kernels=backend,
                                              residual=NAG(), skip=SkipConfig(threshold_scope="per_layer"))).eval()
        model.skip_policy.set_thresholds(torch.tensor([0.0, 1e9, 0.0, 0.0]))  # sub-layer 2: out of reach
        cache = KVCache(model.config, 1)
        with torch.no_grad():
            steps = [model.extend(tokens[:, i:i + 1], cache, return_record=True) for i in range(tokens.shape[1])]
        assert all(record.layers[2].executed.sum() == 0 for _, record in steps)
        logits[backend] = torch.stack([step_logits for step_logits, _ in steps])
    torch.testing.assert_close(logits["triton"], logits["torch"], rtol=1e-5, atol=1e-5)


@needs_triton
def test_the_launch_proxy_counts_a_fused_operator_once():
    """``nag bench``'s operator count (the CPU proxy for GPU launches) counts the custom operator as
    one, not the Triton interpreter's own work inside it on a CPU."""
    from torch.profiler import ProfilerActivity, profile

    from nag_lightning.commands.bench import dispatched_operators

    arguments = op_arguments(fused_inputs((64,), 64, 8, torch.float32))
    with profile(activities=[ProfilerActivity.CPU]) as profiler:
        torch.ops.nag_lightning.nag_update_gate_forward(*arguments)
    events = profiler.events()
    assert sum(e.name.startswith("aten::") for e in events) > 1  # the interpreter dispatches its own
    assert dispatched_operators(events) == 1


COMPILED_CAPACITY_STEP = """
import torch, torch.nn.functional as F, triton
from torch._dynamo.utils import counters
from triton.backends.compiler import GPUTarget
import nag_lightning.kernels as kernels
import nag_lightning.model.residual.nag as nag_module
from nag_lightning.model import ModelConfig, Transformer
from nag_lightning.model.residual import NAG
from nag_lightning.model.skip_policy import SkipConfig

class Hopper:  # all that torch's analysis of a Triton kernel asks the driver: the target it compiles for
    def get_current_target(self):
        return GPUTarget("cuda", 90, 32)

triton.runtime.driver.set_active(Hopper())
torch.manual_seed(0)
config = ModelConfig(vocab_size=512, context_length=32, d_model=32, n_layers=3, n_heads=4, n_kv_heads=2,
                     residual=NAG(gate_directions=4), skip=SkipConfig(mode="capacity"))
model = Transformer(config)
tokens = torch.randint(0, 512, (2, 32))
with torch.no_grad():
    model.skip_policy.calibrate_from(model(tokens, return_record=True, calibrate=0.25).record, 0.25)
model.residual.kernels = "triton"  # from here on (the operators' fake implementations run on meta)
kernels._require_triton = lambda device: None
model.to("meta")
batch = torch.randint(0, 512, (2, 33), device="meta")
packed = []  # eagerly first: which boundaries run the fused pass, and on packed rows
fused = nag_module.nag_update_and_gate
nag_module.nag_update_and_gate = lambda *a, **k: packed.append(k["update_rows"] is not None) or fused(*a, **k)
model(batch[:, :-1])
assert packed == [True] * 5, packed  # 5 boundaries of 6 sub-layers, each reading packed rows
nag_module.nag_update_and_gate = fused
for block in model.blocks:
    block.compile_block(backend="aot_eager")
graphs = []
for _ in range(2):
    F.cross_entropy(model(batch[:, :-1]).flatten(0, 1), batch[:, 1:].flatten()).backward()
    graphs.append(counters["stats"]["unique_graphs"])
assert not counters["graph_break"], dict(counters["graph_break"])
assert graphs[0] == graphs[1] == 3, graphs  # one graph per block; the second step compiles nothing new
assert model.residual.gate_w.grad.device.type == "meta"
print("compiled capacity step traced")

# Dense training, regional compile (each sub-layer a graph shared by every block, the look-ahead in the state).
torch._dynamo.reset()
counters.clear()
dense = Transformer(ModelConfig(vocab_size=512, context_length=32, d_model=32, n_layers=3, n_heads=4, n_kv_heads=2,
                                residual=NAG(gate_directions=4))).to("meta")
dense.residual.kernels = "triton"
for block in dense.blocks:
    block.compile_sublayers(backend="aot_eager")
graphs = []
for _ in range(2):
    F.cross_entropy(dense(batch[:, :-1]).flatten(0, 1), batch[:, 1:].flatten()).backward()
    graphs.append(counters["stats"]["unique_graphs"])
assert not counters["graph_break"], dict(counters["graph_break"])
assert graphs[0] == graphs[1], graphs
print("compiled dense step traced", graphs)
"""


def test_compiled_models_with_triton_kernels_trace_without_breaks_or_recompiles():
    """``kernels: triton`` under ``compile_block`` (capacity mode, ``fullgraph=True``), and dense
    under ``compile_sublayers`` (regional): the fused update + next gate with its look-ahead and
    the packed rows' scatter traces forward and backward without a break (one graph per block in
    capacity mode), and a second step compiles nothing. On the
    meta device, where the operators' fake implementations stand in for the kernels, with the
    target torch's Triton-kernel analysis asks for set to an H100/H200; AOT autograd splits the
    backward as under Inductor (the ``aot_eager`` backend skips only code generation). In a
    process without the interpreter, whose Python kernels cannot be traced."""
    done = without_interpreter(COMPILED_CAPACITY_STEP)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "compiled capacity step traced" in done.stdout and "compiled dense step traced" in done.stdout
