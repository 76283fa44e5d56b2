"""Compute kernels, installed as ``nag_lightning.kernels``; each beside the PyTorch reference that defines it."""

from __future__ import annotations

import torch

from nag_lightning.kernels._triton import triton_unavailable_reason
from nag_lightning.kernels.nag_update import nag_update_reference
from nag_lightning.kernels.rmsnorm import rms_norm_reference

BACKENDS = ("torch", "triton")


def nag_update(direction: torch.Tensor, log_norm: torch.Tensor, update: torch.Tensor, step: torch.Tensor,
               backend: str = "torch", eps: float = 1e-4) -> tuple[torch.Tensor, torch.Tensor]:
    """NAG lane update: ``(direction, log_norm, update, step) -> (new_direction, new_log_norm)``.

    ``direction`` and ``update`` have shape ``(..., d)``; ``log_norm`` (float32) and ``step`` have
    shape ``(...)``. ``eps`` is relative to the update's norm (below ``eps * ||f||`` its part
    orthogonal to ``direction`` is rounding noise and stops rotating it). See ``nag_update.py`` for
    the equations. ``backend="torch"`` is the reference,
    ``backend="triton"`` the fused kernel (a CUDA GPU, or ``TRITON_INTERPRET=1`` on a CPU).
    """
    if backend not in BACKENDS:
        raise ValueError(f"nag_update: unknown backend {backend!r}; available: {', '.join(BACKENDS)}.")
    if direction.shape != update.shape or direction.shape[:-1] != log_norm.shape or log_norm.shape != step.shape:
        raise ValueError(
            f"nag_update: direction {tuple(direction.shape)} and update {tuple(update.shape)} must be (..., d) and "
            f"log_norm {tuple(log_norm.shape)} and step {tuple(step.shape)} must be (...), the same leading shape."
        )
    if backend == "triton":
        _require_triton(direction.device)
        from nag_lightning.kernels.nag_update import nag_update_triton

        return nag_update_triton(direction, log_norm, update, step, eps)
    return nag_update_reference(direction, log_norm, update, step, eps)


def _require_triton(device: torch.device) -> None:
    reason = triton_unavailable_reason(device)
    if reason is not None:
        raise RuntimeError(reason)


def rms_norm(x: torch.Tensor, weight: torch.Tensor | None, eps: float = 1e-6, backend: str = "torch") -> torch.Tensor:
    """RMSNorm over the last dimension, with an optional gain; see ``rmsnorm.py``."""
    if backend == "triton":
        _require_triton(x.device)
        from nag_lightning.kernels.rmsnorm import rms_norm_triton

        return rms_norm_triton(x, weight, eps)
    if backend != "torch":
        raise ValueError(f"rms_norm: unknown backend {backend!r}; available: {', '.join(BACKENDS)}.")
    return rms_norm_reference(x, weight, eps)


__all__ = ["BACKENDS", "nag_update", "nag_update_reference", "rms_norm", "rms_norm_reference"]
