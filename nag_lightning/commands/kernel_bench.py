"""``nag bench --kernels``: NAG's fused kernels, forward + backward, eager vs compiled vs fused Triton.

Two kernels, each at the same sizes:
- ``nag_update``, the lane update. GB/s counts the least memory traffic it needs: forward reads the
  direction and the update and writes the new direction; backward reads the direction, the update
  and the incoming gradient and writes two gradients (8 tensors of rows x d; the per-row scalars
  are negligible).
- ``nag_update+gate``, the update fused with the next sub-layer's gate, step and input
  (``nag_update_gate.py``). Least traffic: forward reads the direction and the update (rows x d)
  and the log-norm and step (rows), writes the new direction and the next input (rows x d, the
  input in float32 as ``NAG.read`` gives it) and the log-norm, gate and step (rows); backward reads
  the direction, the update and the gradients of the new direction and of the input, writes the
  gradients of the direction and the update, and reads/writes the per-row scalars (step, its
  gradient, the gradients of log-norm, gate and step); the gate's parameters are counted too
  (read forward and backward, their gradients written), a few rows' worth.

The fraction of peak is given only for devices whose memory bandwidth is known. Times are the
mean of ``--steps`` back-to-back calls (``timing.mean_ms``): the device's throughput. The Triton
kernels are timed only on a CUDA GPU (under the CPU interpreter they are a correctness tool): on a
CPU their rows are listed as skipped, with why.
"""

from __future__ import annotations

import torch

from nag_lightning.commands.timing import mean_ms
from nag_lightning.kernels import nag_update_reference
from nag_lightning.kernels._triton import triton_unavailable_reason
from nag_lightning.kernels.nag_update_gate import nag_update_and_gate_reference
from nag_lightning.reporting import render_table

# Peak DRAM bandwidth, GB/s, by a substring of torch.cuda.get_device_name().
PEAK_BANDWIDTH_GB_S = {"H200": 4800.0, "H100 80GB HBM3": 3350.0, "H100 PCIe": 2000.0, "A100-SXM4-80GB": 2039.0}
GATE_DIRECTIONS = 32  # NAG's default C for the fused kernel's rows


def peak_bandwidth(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((gb for key, gb in PEAK_BANDWIDTH_GB_S.items() if key in name), None)


def triton_skip_reason(device: torch.device) -> str | None:
    """Why the Triton rows are not timed here (None: they are)."""
    if device.type != "cuda":
        return "no CUDA GPU here: the Triton kernels are timed on a GPU only (on a CPU the interpreter runs them, for correctness)"
    return triton_unavailable_reason(device)


def lanes(n_rows: int, d: int, dtype: torch.dtype, device: torch.device) -> list[torch.Tensor]:
    """A direction (RMS 1), log-norm, sub-layer output and step, all requiring gradients."""
    r = torch.randn(n_rows, d, device=device)
    r = (r / r.pow(2).mean(-1, keepdim=True).sqrt()).to(dtype).requires_grad_()
    f = torch.randn(n_rows, d, device=device, dtype=dtype, requires_grad=True)
    s = torch.zeros(n_rows, device=device, requires_grad=True)
    a = torch.rand(n_rows, device=device, requires_grad=True)
    return [r, s, f, a]


def update_case(n_rows: int, d: int, dtype: torch.dtype, device: torch.device):
    """(step: fn -> one forward + backward of fn, bytes moved) for ``nag_update``."""
    r, s, f, a = lanes(n_rows, d, dtype, device)
    grad = torch.randn(n_rows, d, device=device, dtype=dtype)

    def step(fn):
        # autograd.grad, not backward: accumulating into .grad would add two (rows, d)
        # read-modify-writes per call that the operation itself does not need.
        new_r, new_s = fn(r, s, f, a)
        torch.autograd.grad((new_r, new_s), (r, s, f, a), (grad, torch.ones_like(new_s)))

    return step, 8 * n_rows * d * r.element_size()


def update_and_gate_case(n_rows: int, d: int, dtype: torch.dtype, device: torch.device):
    """(step: fn -> one forward + backward of fn, bytes moved) for ``nag_update_and_gate``, with an input gain."""
    c = GATE_DIRECTIONS
    r, s, f, a = lanes(n_rows, d, dtype, device)
    gate = [torch.randn(c, d, device=device) * (0.5 / d ** 0.5), torch.zeros(c, device=device),
            torch.zeros(c, device=device), torch.ones((), device=device), torch.full((), 0.5, device=device),
            torch.ones(d, device=device)]  # w, b, logits, beta, alpha, gain
    inputs = [r, s, f, a] + [t.requires_grad_() for t in gate]
    grad_r = torch.randn(n_rows, d, device=device, dtype=dtype)
    grad_x = torch.randn(n_rows, d, device=device)  # the next input is float32 (the gain's dtype)
    ones = torch.ones(n_rows, device=device)

    def step(fn):
        out = fn(*inputs)  # autograd.grad: as update_case
        torch.autograd.grad(tuple(out), inputs, (grad_r, ones, ones, ones, grad_x))

    # rows x d: r, r', r, g_r, d_r (the lane's dtype); f, f, d_f (the output's); x', g_x (float32)
    rows_x_d = n_rows * d * (5 * r.element_size() + 3 * f.element_size() + 2 * 4)
    per_row = n_rows * 4 * (2 + 3 + 4 + 1)  # forward: s, a in, s', m', a' out; backward: a, g_s, g_m, g_a in, d_a out
    parameters = 3 * (c * d + d + 2 * c + 2) * 4  # read forward, read backward, gradients written
    return step, rows_x_d + per_row + parameters


def benchmark_kernels(steps: int, warmup: int) -> list[dict]:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    sizes = [(8 * 1024, 1024), (8 * 1024, 4096)] if device.type == "cuda" else [(8 * 256, 256), (8 * 256, 1024)]
    skip_triton = triton_skip_reason(device)
    kernels = {"nag_update fwd+bwd": (update_case, {"eager": nag_update_reference,
                                                     "compiled": torch.compile(nag_update_reference)}),
               "nag_update+gate fwd+bwd": (update_and_gate_case, {"eager": nag_update_and_gate_reference,
                                                                   "compiled": torch.compile(nag_update_and_gate_reference)})}
    if skip_triton is None:
        from nag_lightning.kernels.nag_update import nag_update_triton
        from nag_lightning.kernels.nag_update_gate import nag_update_gate_triton

        kernels["nag_update fwd+bwd"][1]["triton"] = nag_update_triton
        kernels["nag_update+gate fwd+bwd"][1]["triton"] = nag_update_gate_triton
    peak = peak_bandwidth(device)
    rows_out = [] if skip_triton is None else [
        {"kind": kind, "implementation": "triton", "device": str(device), "skipped": skip_triton} for kind in kernels]
    # Size by size, each kernel's rows together: the fused kernel's beside the update's.
    for dtype in (torch.float32, torch.bfloat16):
        for n_rows, d in sizes:
            for kind, (case, implementations) in kernels.items():
                step, bytes_moved = case(n_rows, d, dtype, device)
                for name, fn in implementations.items():
                    ms = mean_ms(lambda fn=fn: step(fn), steps, warmup)
                    gb_per_sec = bytes_moved / (ms / 1e3) / 1e9
                    rows_out.append({
                        "kind": kind, "implementation": name, "device": str(device),
                        "rows": n_rows, "d": d, "dtype": str(dtype).removeprefix("torch."), "ms_mean": ms,
                        "gb_per_sec": gb_per_sec, "bandwidth_fraction": None if peak is None else gb_per_sec / peak,
                    })
    return rows_out


def format_kernel_table(rows: list[dict]) -> str:
    """The timed rows, then the skipped ones with why."""
    timed = [r for r in rows if not r.get("skipped")]
    header = ["kernel", "implementation", "rows x d", "dtype", "ms (mean)", "GB/s", "of peak"]
    lines = [[r["kind"], r["implementation"], f"{r['rows']} x {r['d']}", r["dtype"],
              f"{r['ms_mean']:.3f}", f"{r['gb_per_sec']:.1f}",
              "unknown" if r["bandwidth_fraction"] is None else f"{100 * r['bandwidth_fraction']:.0f}%"] for r in timed]
    text = render_table(header, lines)
    skipped = [r for r in rows if r.get("skipped")]
    if skipped:
        text += "\n\nskipped:\n" + "\n".join(f"  {r['kind']} {r['implementation']}: {r['skipped']}" for r in skipped)
    return text
