"""Whether Triton kernels can run here, and a clear message when they cannot."""

from __future__ import annotations

import importlib.util
import os

import torch

try:  # Triton is optional: without it the package imports and the torch backend works.
    HAS_TRITON = importlib.util.find_spec("triton") is not None
except (ImportError, ValueError):
    HAS_TRITON = False


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def triton_unavailable_reason(device: torch.device | None = None) -> str | None:
    """None when Triton kernels can run on ``device`` (default: the current CUDA device, if any)."""
    if not HAS_TRITON:
        return "Triton is not installed: `pip install triton` (or choose model.config.kernels: torch)."
    if interpreting():
        return None
    if device is not None and device.type == "cuda" or device is None and torch.cuda.is_available():
        return None
    return (
        "the Triton kernels need a CUDA GPU; on a CPU they run only under the Triton interpreter "
        "(set TRITON_INTERPRET=1 before starting; slow, meant for correctness tests). "
        "Use model.config.kernels: torch here (with model.compile: true to fuse the references)."
    )


def rows_per_program(n_rows: int, block_d: int, interpreted: bool | None = None) -> int:
    """Rows each program handles: many under the interpreter (about 1 ms per program there), and
    enough on a GPU that narrow rows still give each program a few thousand elements. A power of
    two. ``interpreted``: for the interpreter or a GPU (default: whichever runs here)."""
    rows = min(64, n_rows) if (interpreting() if interpreted is None else interpreted) else min(16, 4096 // block_d)
    return 1 << max(0, rows - 1).bit_length()


def warps_per_program(elements: int) -> int:
    """Warps (32 threads each) for a program that holds ``elements`` values of each row tensor: 4
    below 2,048, then doubling with the elements up to 32 (Liger-Kernel's rule for its row
    kernels; Triton's layer-norm tutorial scales the same way up to 8), so a thread keeps about
    16 values per tensor in registers.
    Triton's default, 4, spills registers in the backward kernels, which keep some ten such
    tensors live. Ignored by the interpreter."""
    return 4 if elements < 2048 else 8 if elements < 8192 else 16 if elements < 32768 else 32


if HAS_TRITON:
    import triton
    import triton.language as tl

    @triton.jit
    def row_block(n_rows, d, BLOCK_D: tl.constexpr, ROWS: tl.constexpr):
        """This program's rows of a contiguous (n_rows, d) tensor: row ids, column ids, which rows
        exist, the 2-D mask of real elements, and their offsets."""
        rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
        cols = tl.arange(0, BLOCK_D)
        row_ok = rows < n_rows
        return rows, cols, row_ok, row_ok[:, None] & (cols[None, :] < d), rows[:, None] * d + cols[None, :]

    def plan(n_rows: int, d: int) -> tuple[int, int, int]:
        """(BLOCK_D, ROWS, number of programs) of a row-block kernel over (n_rows, d)."""
        block_d = triton.next_power_of_2(d)
        rows = rows_per_program(n_rows, block_d)
        return block_d, rows, triton.cdiv(n_rows, rows)

    def launch(kernel, n_rows: int, d: int, *args, **constexprs) -> None:
        """Run a row-block kernel over (n_rows, d)."""
        block_d, rows, programs = plan(n_rows, d)
        kernel[(programs,)](*args, BLOCK_D=block_d, ROWS=rows, num_warps=warps_per_program(block_d * rows), **constexprs)
