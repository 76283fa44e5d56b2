"""Compute kernels, installed as ``nag_lightning.kernels``; each beside the PyTorch reference that defines it."""

from __future__ import annotations

import torch

from nag_lightning.kernels.nag_update import nag_update_reference

BACKENDS = ("torch",)


def nag_update(direction: torch.Tensor, log_norm: torch.Tensor, update: torch.Tensor, step: torch.Tensor,
               backend: str = "torch", eps: float = 1e-6) -> tuple[torch.Tensor, torch.Tensor]:
    """NAG lane update: ``(direction, log_norm, update, step) -> (new_direction, new_log_norm)``.

    ``direction`` and ``update`` have shape ``(..., d)``; ``log_norm`` (float32) and ``step`` have
    shape ``(...)``. See ``nag_update.py`` for the equations. ``backend="torch"`` is the reference.
    """
    if backend != "torch":
        raise ValueError(f"nag_update: unknown backend {backend!r}; available: {', '.join(BACKENDS)}.")
    if direction.shape != update.shape or direction.shape[:-1] != log_norm.shape or log_norm.shape != step.shape:
        raise ValueError(
            f"nag_update: direction {tuple(direction.shape)} and update {tuple(update.shape)} must be (..., d) and "
            f"log_norm {tuple(log_norm.shape)} and step {tuple(step.shape)} must be (...), the same leading shape."
        )
    return nag_update_reference(direction, log_norm, update, step, eps)


__all__ = ["BACKENDS", "nag_update", "nag_update_reference"]
