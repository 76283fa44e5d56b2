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
        return "Triton is not installed: `pip install triton` (or choose kernel_backend: torch)."
    if interpreting():
        return None
    if device is not None and device.type == "cuda" or device is None and torch.cuda.is_available():
        return None
    return (
        "kernel_backend 'triton' needs a CUDA GPU; on a CPU it runs only under the Triton interpreter "
        "(set TRITON_INTERPRET=1 before starting; slow, meant for correctness tests). "
        "Use kernel_backend: torch or compile here."
    )


def rows_per_program(n_rows: int, block_d: int) -> int:
    """Rows each program handles: many under the interpreter (about 1 ms per program there), and
    enough on a GPU that narrow rows still give each program a few thousand elements. A power of two."""
    rows = min(64, n_rows) if interpreting() else min(16, 4096 // block_d)
    return 1 << max(0, rows - 1).bit_length()
