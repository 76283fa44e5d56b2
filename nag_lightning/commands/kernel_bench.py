"""``nag bench --kernels``: the NAG update's forward + backward, eager vs compiled vs fused Triton.

GB/s counts the least memory traffic the update needs: forward reads the direction and the
update and writes the new direction; backward reads the direction, the update and the incoming
gradient and writes two gradients (8 tensors of rows x d; the per-row scalars are negligible).
The fraction of peak is given only for devices whose memory bandwidth is known. Times are the
mean of ``--steps`` back-to-back calls (``timing.mean_ms``): the device's throughput.
"""

from __future__ import annotations

import torch

from nag_lightning.commands.timing import mean_ms
from nag_lightning.kernels import nag_update_reference
from nag_lightning.kernels._triton import triton_unavailable_reason
from nag_lightning.reporting import render_table

# Peak DRAM bandwidth, GB/s, by a substring of torch.cuda.get_device_name().
PEAK_BANDWIDTH_GB_S = {"H200": 4800.0, "H100 80GB HBM3": 3350.0, "H100 PCIe": 2000.0, "A100-SXM4-80GB": 2039.0}


def peak_bandwidth(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((gb for key, gb in PEAK_BANDWIDTH_GB_S.items() if key in name), None)


def benchmark_kernels(steps: int, warmup: int) -> list[dict]:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    sizes = [(8 * 1024, 1024), (8 * 1024, 4096)] if device.type == "cuda" else [(8 * 256, 256), (8 * 256, 1024)]
    implementations = {"eager": nag_update_reference, "compiled": torch.compile(nag_update_reference)}
    if triton_unavailable_reason(device) is None and device.type == "cuda":
        from nag_lightning.kernels.nag_update import nag_update_triton

        implementations["triton"] = nag_update_triton
    peak = peak_bandwidth(device)
    rows_out = []
    for dtype in (torch.float32, torch.bfloat16):
        for n_rows, d in sizes:
            r = torch.randn(n_rows, d, device=device)
            r = (r / r.pow(2).mean(-1, keepdim=True).sqrt()).to(dtype).requires_grad_()
            f = torch.randn(n_rows, d, device=device, dtype=dtype, requires_grad=True)
            s = torch.zeros(n_rows, device=device, requires_grad=True)
            a = torch.rand(n_rows, device=device, requires_grad=True)
            grad = torch.randn(n_rows, d, device=device, dtype=dtype)
            bytes_moved = 8 * n_rows * d * r.element_size()
            for name, fn in implementations.items():
                def step(fn=fn):
                    # autograd.grad, not backward: accumulating into .grad would add two (rows, d)
                    # read-modify-writes per call that the operation itself does not need.
                    new_r, new_s = fn(r, s, f, a)
                    torch.autograd.grad((new_r, new_s), (r, s, f, a), (grad, torch.ones_like(new_s)))

                ms = mean_ms(step, steps, warmup)
                gb_per_sec = bytes_moved / (ms / 1e3) / 1e9
                rows_out.append({
                    "kind": "nag_update fwd+bwd", "implementation": name, "device": str(device),
                    "rows": n_rows, "d": d, "dtype": str(dtype).removeprefix("torch."), "ms_mean": ms,
                    "gb_per_sec": gb_per_sec, "bandwidth_fraction": None if peak is None else gb_per_sec / peak,
                })
    return rows_out


def format_kernel_table(rows: list[dict]) -> str:
    header = ["kernel", "implementation", "rows x d", "dtype", "ms (mean)", "GB/s", "of peak"]
    lines = [[r["kind"], r["implementation"], f"{r['rows']} x {r['d']}", r["dtype"],
              f"{r['ms_mean']:.3f}", f"{r['gb_per_sec']:.1f}",
              "unknown" if r["bandwidth_fraction"] is None else f"{100 * r['bandwidth_fraction']:.0f}%"] for r in rows]
    return render_table(header, lines)
