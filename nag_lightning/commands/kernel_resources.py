"""``nag bench kernels --registers``: each Triton kernel compiled for a Hopper GPU (sm_90a) at the
training widths, with the launch shape the package uses there, and what ``ptxas`` reports:
registers per thread and bytes spilled to local memory. Needs Triton (its NVIDIA backend ships
``ptxas``), not a GPU, so it runs on any machine (not under ``TRITON_INTERPRET=1``, where the
kernels are Python functions). A spill in a row kernel costs memory traffic on every row, which
is what these kernels are meant to save; this is the one launch-shape question a CPU can answer.

Each kernel is compiled with the warps the package launches it with (``warps_per_program``) and,
for comparison, with Triton's default of 4 and with twice the package's. ``warps/SM`` is how
many warps of it fit on one SM by registers alone (65,536 per SM, allocated per warp in units of
256, at most 64 warps): the occupancy that hides memory latency in these memory-bound kernels.
Pointer element types: the lanes (direction, update, their gradients; RMSNorm's input, output and
gradients) in the listed dtype, everything else float32, row numbers int64.
"""

from __future__ import annotations

import importlib
import re
import subprocess
from pathlib import Path

from nag_lightning.errors import NagError
from nag_lightning.kernels._triton import HAS_TRITON, interpreting, rows_per_program, warps_per_program
from nag_lightning.reporting import render_table

TARGET_CAPABILITY = 90  # H100 / H200
REGISTERS_PER_SM, MAX_WARPS_PER_SM, MAX_BLOCKS_PER_SM = 65536, 64, 32
ROWS = 8 * 1024  # the rows of a training step at the large shape (only the launch shape depends on it)
WIDTHS = (1024, 4096)
LANE_POINTERS = {"R", "F", "OUT_R", "G_R", "D_R", "D_F", "X", "Y", "G", "DX"}
# (module, kernel, its flags): each kernel at the flags the model launches it with.
KERNELS = [("nag_update", "_nag_forward_kernel", {}), ("nag_update", "_nag_backward_kernel", {}),
           ("nag_update_gate", "_forward_kernel", {"HAS_GAIN": True, "INDEXED": False}),
           ("nag_update_gate", "_backward_kernel", {"HAS_GAIN": True, "INDEXED": False}),
           ("nag_update_gate", "_backward_kernel", {"HAS_GAIN": True, "INDEXED": True}),
           ("rmsnorm", "_rms_norm_forward_kernel", {"HAS_WEIGHT": True}),
           ("rmsnorm", "_rms_norm_backward_kernel", {"HAS_WEIGHT": True})]
POINTER_TYPES = {"float32": "*fp32", "bfloat16": "*bf16"}


def check_compilable() -> Path:
    """The ``ptxas`` that Triton ships, or an error naming what is missing."""
    if not HAS_TRITON:
        raise NagError("nag bench kernels --registers compiles the Triton kernels: `pip install triton`.")
    if interpreting():
        raise NagError("nag bench kernels --registers compiles the kernels for a GPU, which the Triton interpreter "
                       "replaces with Python: run it without TRITON_INTERPRET=1.")
    import triton.backends.nvidia

    ptxas = Path(triton.backends.nvidia.__file__).parent / "bin" / "ptxas"
    if not ptxas.is_file():
        raise NagError(f"nag bench kernels --registers needs Triton's NVIDIA backend with its ptxas ({ptxas} is missing).")
    return ptxas


def compile_for_hopper(kernel, lane_dtype: str, constexprs: dict, warps: int) -> str:
    """The kernel's PTX for sm_90a."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler.compiler import ASTSource

    def pointer_or_scalar(name: str) -> str:
        if name in constexprs:
            return "constexpr"
        if name == "SRC":
            return "*i64"
        if name[0].isupper():
            return POINTER_TYPES[lane_dtype] if name in LANE_POINTERS else "*fp32"
        return "fp32" if name in ("root_d", "eps") else "i32"

    signature = {p.name: pointer_or_scalar(p.name) for p in kernel.params}
    compiled = triton.compile(ASTSource(kernel, signature, constexprs), target=GPUTarget("cuda", TARGET_CAPABILITY, 32),
                              options={"num_warps": warps})
    return compiled.asm["ptx"]


def ptxas_usage(ptxas: Path, ptx: str, scratch: Path) -> dict:
    """Registers per thread and spill stores/loads (bytes) that ``ptxas -v`` reports."""
    source = scratch / "kernel.ptx"
    source.write_text(ptx)
    done = subprocess.run([str(ptxas), "-v", f"--gpu-name=sm_{TARGET_CAPABILITY}a", str(source),
                           "-o", str(scratch / "kernel.cubin")], capture_output=True, text=True)
    if done.returncode != 0:
        raise NagError(f"ptxas failed: {done.stderr[-500:]}")
    registers = re.search(r"Used (\d+) registers", done.stderr)
    spills = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", done.stderr)
    return {"registers": int(registers.group(1)) if registers else None,
            "spill_store_bytes": int(spills.group(1)) if spills else 0,
            "spill_load_bytes": int(spills.group(2)) if spills else 0}


def resident_warps(registers: int, warps: int) -> int:
    """Warps of a kernel resident on one Hopper SM, as its registers allow."""
    per_warp = -(-registers * 32 // 256) * 256
    blocks = min(MAX_BLOCKS_PER_SM, REGISTERS_PER_SM // (per_warp * warps), MAX_WARPS_PER_SM // warps)
    return blocks * warps


def kernel_resources(widths=WIDTHS, lane_dtypes=("float32", "bfloat16"), kernels=KERNELS) -> list[dict]:
    """One row per kernel, width, lane dtype and warp count (the package's, 4, and twice the package's)."""
    import tempfile

    import triton

    ptxas = check_compilable()
    rows = []
    with tempfile.TemporaryDirectory() as scratch:
        for module, name, flags in kernels:
            kernel = getattr(importlib.import_module(f"nag_lightning.kernels.{module}"), name)
            label = f"{module}.{name}" + "".join(f" {k}" for k, v in flags.items() if v is True and k != "HAS_GAIN")
            for d in widths:
                block_d = triton.next_power_of_2(d)
                rows_each = rows_per_program(ROWS, block_d, interpreted=False)
                package_warps = warps_per_program(block_d * rows_each)
                for lane_dtype in lane_dtypes:
                    for warps in dict.fromkeys((package_warps, 4, min(32, 2 * package_warps))):
                        ptx = compile_for_hopper(kernel, lane_dtype, {**flags, "BLOCK_D": block_d, "ROWS": rows_each},
                                                 warps)
                        usage = ptxas_usage(ptxas, ptx, Path(scratch))
                        rows.append({"kernel": label, "d": d, "lanes": lane_dtype, "rows_per_program": rows_each,
                                     "warps": warps, "package_launch": warps == package_warps, **usage,
                                     "warps_per_sm": resident_warps(usage["registers"], warps)})
    return rows


def format_resource_table(rows: list[dict]) -> str:
    header = ["kernel", "d", "lanes", "rows/program", "warps", "registers", "spill stores (B)", "spill loads (B)",
              "warps/SM"]
    lines = [[r["kernel"], r["d"], r["lanes"], r["rows_per_program"],
              f"{r['warps']}{' (package)' if r['package_launch'] else ' (Triton default)' if r['warps'] == 4 else ''}",
              r["registers"], r["spill_store_bytes"], r["spill_load_bytes"], r["warps_per_sm"]] for r in rows]
    return (f"Triton kernels compiled for sm_{TARGET_CAPABILITY}a (ptxas -v; no GPU needed), launch shapes for "
            f"{ROWS} rows:\n" + render_table(header, lines))
