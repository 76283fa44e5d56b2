"""Every kernel against its PyTorch reference (Triton under the interpreter on CPU), and the backends."""

import os
import subprocess
import sys

import pytest
import torch

from conftest import nag, tiny_model_config, without_interpreter
from nag_lightning.kernels import nag_update, rms_norm
from nag_lightning.kernels._triton import HAS_TRITON, triton_unavailable_reason
from nag_lightning.lightning.lit_module import LanguageModel
from nag_lightning.model import ConfigError, ModelConfig, Transformer
from nag_lightning.model.residual import NAG
from nag_lightning.model.skip_policy import SkipConfig

# Tests on CPU tensors: the interpreter (machines without a GPU); the GPU tests: the compiled kernels.
needs_triton = pytest.mark.skipif(triton_unavailable_reason(torch.device("cpu")) is not None,
                                  reason="Triton on CPU tensors needs TRITON_INTERPRET=1 (set where no GPU is present)")
needs_gpu = pytest.mark.skipif(not torch.cuda.is_available() or not HAS_TRITON, reason="needs a CUDA GPU and Triton")
SHAPES = [((3, 5), 24), ((7,), 100), ((2, 3, 4), 33), ((2,), 64)]
TOLERANCE = {torch.float32: dict(rtol=1e-5, atol=1e-5), torch.bfloat16: dict(rtol=2e-2, atol=2e-2)}


def nag_inputs(shape, d, dtype, device="cpu", seed=0):
    g = torch.Generator().manual_seed(seed)
    r = torch.randn(*shape, d, generator=g)
    r = r - r.mean(-1, keepdim=True)
    r = (r / r.pow(2).mean(-1, keepdim=True).sqrt()).to(dtype)
    s = torch.randn(*shape, generator=g)
    f = torch.randn(*shape, d, generator=g).to(dtype)
    a = torch.rand(*shape, generator=g)
    a.view(-1)[0] = 0.0  # one exact skip
    return [t.to(device) for t in (r, s, f, a)]


def outputs_and_grads(fn, inputs, seed=1):
    leaves = [t.clone().requires_grad_() for t in inputs]
    outputs = fn(*leaves)
    outputs = outputs if isinstance(outputs, tuple) else (outputs,)
    g = torch.Generator().manual_seed(seed)
    loss = sum((o.float() * torch.randn(o.shape, generator=g).to(o.device)).sum() for o in outputs)
    loss.backward()
    return [o.detach() for o in outputs] + [leaf.grad for leaf in leaves]


def assert_parity(reference, candidate, dtype):
    for ref, got in zip(reference, candidate):
        assert got.dtype == ref.dtype
        ref, got = ref.float(), got.float()
        # Float32 outputs that are sums over a row (the step's gradient) differ by rounding that
        # scales with the row's terms, not with the (possibly cancelling) sum: absolute tolerance
        # relative to the output's largest value. Measured on an H200 against compiled Triton:
        # 5.3e-5 at most on values up to hundreds, 2.5e-7 of the norm.
        tolerance = dict(TOLERANCE[dtype])
        tolerance["atol"] *= max(1.0, ref.abs().max().item() / 10)
        torch.testing.assert_close(got, ref, **tolerance)
        if dtype == torch.float32:
            assert (got - ref).norm() <= 1e-5 * ref.norm()


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape, d", SHAPES)
def test_nag_update_triton_matches_the_reference(shape, d, dtype):
    inputs = nag_inputs(shape, d, dtype)
    reference = outputs_and_grads(lambda *x: nag_update(*x, backend="torch"), inputs)
    fused = outputs_and_grads(lambda *x: nag_update(*x, backend="triton"), inputs)
    assert_parity(reference, fused, dtype)
    assert torch.equal(fused[0].reshape(-1, d)[0], inputs[0].reshape(-1, d)[0])  # a = 0: identity


def nearly_parallel_inputs(relative_noise, rows=6, d=64, seed=0):
    """Outputs parallel to the direction plus a constant and an orthogonal part of ``relative_noise`` x ||f||."""
    r, s, _, a = nag_inputs((rows,), d, torch.float32, seed=seed)
    noise = torch.randn(rows, d, generator=torch.Generator().manual_seed(seed + 1))
    noise = noise - noise.mean(-1, keepdim=True)
    noise = noise - ((noise * r).sum(-1, keepdim=True) / d) * r
    f = 5.0 * r + 2.0
    f = f + relative_noise * (5.0 * r).norm(dim=-1, keepdim=True) * noise / noise.norm(dim=-1, keepdim=True)
    return [r, s, f, a.clamp_min(0.1)]


@needs_triton
def test_backends_agree_when_the_output_is_parallel_to_the_direction():
    # f_perp is float32 rounding noise here: neither backend may rotate towards it.
    inputs = nearly_parallel_inputs(0.0)
    torch_r, torch_s = nag_update(*inputs, backend="torch")
    triton_r, triton_s = nag_update(*inputs, backend="triton")
    # Before the relative eps they disagreed by up to 2 (a full arctan(a) towards different noise).
    assert (torch_r - triton_r).abs().max() < 5e-3 and (triton_r - inputs[0]).abs().max() < 5e-3
    torch.testing.assert_close(triton_s, torch_s)


@needs_triton
def test_triton_gradients_match_where_the_relative_eps_binds():
    inputs = nearly_parallel_inputs(3e-5)  # below eps = 1e-4, far above float32 rounding
    reference = outputs_and_grads(lambda *x: nag_update(*x, backend="torch"), inputs)
    fused = outputs_and_grads(lambda *x: nag_update(*x, backend="triton"), inputs)
    for ref, got in zip(reference, fused):
        scale = max(ref.abs().max().item(), 1.0)
        torch.testing.assert_close(got, ref, rtol=0, atol=1e-2 * scale)


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("with_weight", [True, False])
@pytest.mark.parametrize("shape, d", SHAPES)
def test_rms_norm_triton_matches_the_reference(shape, d, dtype, with_weight):
    g = torch.Generator().manual_seed(0)
    x = (3 * torch.randn(*shape, d, generator=g)).to(dtype)
    inputs = [x] + ([(1 + 0.1 * torch.randn(d, generator=g)).to(dtype)] if with_weight else [])
    reference = outputs_and_grads(lambda x, *w: rms_norm(x, w[0] if w else None, backend="torch"), inputs)
    fused = outputs_and_grads(lambda x, *w: rms_norm(x, w[0] if w else None, backend="triton"), inputs)
    assert_parity(reference, fused, dtype)


@needs_triton
def test_non_contiguous_inputs_are_handled():
    r, s, f, a = nag_inputs((4, 6), 16, torch.float32)
    r_t, f_t = r.transpose(0, 1), f.transpose(0, 1)  # views with other strides
    s_t, a_t = s.t(), a.t()
    reference = nag_update(r_t.contiguous(), s_t.contiguous(), f_t.contiguous(), a_t.contiguous())
    fused = nag_update(r_t, s_t, f_t, a_t, backend="triton")
    for ref, got in zip(reference, fused):
        torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
    x = torch.randn(8, 12)[:, ::2]
    torch.testing.assert_close(rms_norm(x, None, backend="triton"), rms_norm(x, None), rtol=1e-5, atol=1e-5)


@needs_triton
@pytest.mark.parametrize("residual", [None, "nag"])
def test_a_training_step_gives_the_same_loss_with_torch_and_triton_kernels(residual):
    losses = {}
    for backend in ("torch", "triton"):
        torch.manual_seed(0)
        config = tiny_model_config(n_layers=1, residual=NAG() if residual else None, kernels=backend)
        model = LanguageModel(config)
        optimizer = model.build_optimizer()
        tokens = torch.randint(0, 512, (2, 17), generator=torch.Generator().manual_seed(1))
        step_losses = []
        for _ in range(2):
            loss = model.loss(tokens)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            step_losses.append(loss.item())
        losses[backend] = step_losses
    assert losses["triton"] == pytest.approx(losses["torch"], rel=1e-5)


def test_triton_backend_without_a_gpu_or_interpreter_says_so():
    code = ("import os; os.environ.pop('TRITON_INTERPRET', None)\n"
            "from nag_lightning.model import ModelConfig, Transformer, ConfigError\n"
            "try:\n    Transformer(ModelConfig(kernels='triton'))\nexcept ConfigError as e:\n    print(e)\n")
    result = without_interpreter(code)
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    assert "TRITON_INTERPRET=1" in result.stdout and "kernels" in result.stdout


def test_package_works_without_triton():
    code = (
        "import sys, importlib.abc\n"
        "class Block(importlib.abc.MetaPathFinder):\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name == 'triton' or name.startswith('triton.'):\n"
        "            raise ModuleNotFoundError(name)\n"
        "sys.meta_path.insert(0, Block())\n"
        "import torch\n"
        "from nag_lightning.kernels import nag_update\n"
        "from nag_lightning.model import ModelConfig, Transformer\n"
        "from nag_lightning.model.residual import NAG\n"
        "m = Transformer(ModelConfig(vocab_size=64, context_length=8, d_model=16, n_layers=1, n_heads=2, residual=NAG()))\n"
        "print(m(torch.zeros(1, 4, dtype=torch.long)).shape, 'triton' in sys.modules)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert "torch.Size([1, 4, 64]) False" in result.stdout


def test_unknown_backend_is_rejected():
    with pytest.raises(ConfigError, match="kernels"):
        Transformer(ModelConfig(kernels="cuda"))


def test_compile_matches_eager_and_keeps_the_checkpoint_format():
    """Also: the sub-layers of every block share their compiled graphs (4 blocks, 8 sub-layers:
    one graph per sub-layer kind, plus one recompile when the sub-layer number turns dynamic)."""
    from torch._dynamo.utils import counters

    from nag_lightning.model.parallelize import parallelize

    torch._dynamo.reset()
    counters.clear()
    torch.manual_seed(0)
    small = dict(n_layers=4, d_model=16, n_heads=2, n_kv_heads=1, vocab_size=64)
    eager = Transformer(tiny_model_config(**small, residual=NAG()))
    compiled = parallelize(Transformer(tiny_model_config(**small, residual=NAG())), compile=True)
    compiled.load_state_dict(eager.state_dict())  # same keys, no `_orig_mod` prefixes
    assert eager.state_dict().keys() == compiled.state_dict().keys()
    tokens = torch.randint(0, 64, (2, 16))
    with torch.no_grad():
        out = compiled(tokens, return_record=True)
        torch.testing.assert_close(out.logits, eager(tokens), rtol=1e-4, atol=1e-4)
    assert counters["stats"]["unique_graphs"] <= 4 and not counters["graph_break"]
    assert sorted(out.record.step_samples()) == list(range(1, 9))  # the steps are still recorded


@needs_gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("d", [768, 1000, 4096])
def test_gpu_parity_at_training_sizes(dtype, d):
    inputs = nag_inputs((8, 1024), d, dtype, device="cuda")
    assert_parity(outputs_and_grads(lambda *x: nag_update(*x, backend="torch"), inputs),
                  outputs_and_grads(lambda *x: nag_update(*x, backend="triton"), inputs), dtype)
    x, w = inputs[2], (1 + 0.1 * torch.randn(d, device="cuda")).to(dtype)
    assert_parity(outputs_and_grads(lambda x, w: rms_norm(x, w, backend="torch"), [x, w]),
                  outputs_and_grads(lambda x, w: rms_norm(x, w, backend="triton"), [x, w]), dtype)


@needs_triton
def test_all_three_backends_train_through_the_cli_with_matching_losses(tiny_data, capsys):
    """NAG, whose update has its own kernel (pre-norm's RMSNorm kernel trains in
    test_a_training_step_gives_the_same_loss_with_torch_and_triton_kernels; suite time)."""
    from conftest import REPO
    from nag_lightning.commands.main import main

    val_losses = {}
    for backend in ("torch", "triton", "compile"):
        main(["fit", "--config", str(REPO / "tests/configs/tiny.yaml"), "--config", str(REPO / "configs/residual/nag.yaml"),
              "--config", str(REPO / f"configs/kernels/{backend}.yaml"), "--data.init_args.data_dir", str(tiny_data),
              "--trainer.logger=false", "--trainer.enable_checkpointing=false", "--trainer.callbacks=[]",
              "--trainer.enable_progress_bar=false", "--trainer.max_steps=4", "--trainer.limit_val_batches=1",
              "--model.init_args.config.n_layers=1"])
        summary = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("nag fit done:")][0]
        val_losses[backend] = float(summary.split("val_loss ")[1].split()[0])
    assert val_losses["triton"] == pytest.approx(val_losses["torch"], abs=2e-4)
    assert val_losses["compile"] == pytest.approx(val_losses["torch"], abs=2e-4)


def test_compile_with_skipping_matches_eager_without_graph_breaks_or_recompiles(monkeypatch):
    """The compiled sub-layers under skipping: the eager model's outputs and gradients, no graph
    break, and a bounded set of graphs (bucketed, dynamic shapes) that stops growing once the
    attention and MLP variants have been seen, whatever the batches execute."""
    from torch._dynamo.utils import counters

    from nag_lightning.model import packing
    from nag_lightning.model.parallelize import parallelize

    monkeypatch.setattr(packing, "BUCKET", 8)  # several buckets at this small size
    torch._dynamo.reset()
    counters.clear()
    torch.manual_seed(0)
    small = dict(n_layers=2, d_model=16, n_heads=2, n_kv_heads=1, vocab_size=64)
    per_layer = SkipConfig(threshold_scope="per_layer")
    eager = Transformer(tiny_model_config(**small, residual=NAG(), skip=per_layer))
    compiled = parallelize(Transformer(tiny_model_config(**small, residual=NAG(), skip=per_layer)), compile=True)
    compiled.load_state_dict(eager.state_dict())
    graphs, fractions = [], []
    # Per-layer thresholds: sub-layers executing between none and all tokens, in both attention layouts.
    scales = (0.6, 0.5, 0.55, 0.45, 0.52, 0.58, 0.48, 0.5)
    for seed, scale in enumerate(scales):
        for model in (eager, compiled):
            model.skip_policy.set_thresholds(scale * torch.tensor([1.0, 0.7, 0.5, 0.4]))
            model.zero_grad()
        tokens = torch.randint(0, 64, (4, 32), generator=torch.Generator().manual_seed(seed))
        expected, out = eager(tokens), compiled(tokens, return_record=True)
        got = out.logits
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
        expected.sum().backward()
        got.sum().backward()
        for (name, p_eager), p_compiled in zip(eager.named_parameters(), compiled.parameters()):
            if p_eager.grad is not None:
                torch.testing.assert_close(p_compiled.grad, p_eager.grad, rtol=1e-3, atol=1e-4, msg=name)
        graphs.append(counters["stats"]["unique_graphs"])
        fractions.append(out.record.stats().executed_fraction)
    assert not counters["graph_break"], dict(counters["graph_break"])
    # Which batch first shows a variant (e.g. attention keys reaching the last position) depends on
    # the data; that the count stops is the property: the same over the last four batches.
    assert graphs[-1] == graphs[-4] <= 8, graphs
    fractions = torch.stack(fractions)
    assert ((fractions > 0) & (fractions < 1)).any() and len({tuple(f.tolist()) for f in fractions}) == len(scales)


COMPILE_FOR_A_GPU = """
import importlib, itertools
import triton
from nag_lightning.commands.kernel_resources import compile_for_hopper

compiled = 0
for module in ("nag_update", "nag_update_gate", "rmsnorm"):
    kernels = importlib.import_module(f"nag_lightning.kernels.{module}")
    for name, kernel in vars(kernels).items():
        if not (isinstance(kernel, triton.runtime.jit.JITFunction) and name.endswith("_kernel")):
            continue
        flags = [p.name for p in kernel.params if p.is_constexpr and p.name not in ("BLOCK_D", "ROWS")]
        for values in itertools.product((True, False), repeat=len(flags)):
            assert ".entry" in compile_for_hopper(kernel, "bfloat16", {"BLOCK_D": 64, "ROWS": 4, **dict(zip(flags, values))}, 4)
            compiled += 1
print("compiled", compiled)
"""


def test_every_triton_kernel_compiles_for_a_gpu_in_every_variant():
    """The interpreter runs a kernel's Python as Python, so it misses what only Triton's compiler
    refuses (a branch that returns another type, say). Each kernel, with every combination of its
    flags, is compiled to PTX for an H100/H200 here, without a GPU."""
    done = without_interpreter(COMPILE_FOR_A_GPU)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "compiled 14" in done.stdout  # nag_update 2, rmsnorm 2 x 2 weights, update+gate 2 x 4 flags


REGISTERS = """
from nag_lightning.commands.kernel_resources import KERNELS, format_resource_table, kernel_resources
rows = kernel_resources(widths=(1024,), lane_dtypes=("bfloat16",), kernels=[k for k in KERNELS if k[1] == "_backward_kernel"][:1])
print(format_resource_table(rows))
assert [r["warps"] for r in rows] == [8, 4, 16], rows  # the package's launch, Triton's default, twice the package's
assert all(0 < r["registers"] <= 255 and r["spill_store_bytes"] >= 0 and 0 < r["warps_per_sm"] <= 64 for r in rows)
# Fewer registers per thread with more threads per row block; occupancy follows.
assert rows[2]["registers"] < rows[0]["registers"] and rows[2]["warps_per_sm"] >= rows[0]["warps_per_sm"]
print("registers reported")
"""


def test_kernel_registers_and_spills_are_reported_for_a_gpu_without_one(capsys):
    """`nag bench kernels --registers` compiles the kernels for sm_90a and reads ptxas's report (in
    a process without the interpreter); under the interpreter it says why it cannot."""
    done = without_interpreter(REGISTERS)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "registers reported" in done.stdout and "spill stores (B)" in done.stdout
    if os.environ.get("TRITON_INTERPRET") == "1":  # as the tests run where there is no GPU
        code, _, err = nag("bench", "kernels", "--registers")
        assert code != 0 and "without TRITON_INTERPRET=1" in err
