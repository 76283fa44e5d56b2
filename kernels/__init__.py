"""Compute kernels, installed as ``nag_lightning.kernels``; each beside the PyTorch reference that defines it."""

from __future__ import annotations

import torch

from nag_lightning.kernels._triton import triton_unavailable_reason
from nag_lightning.kernels.nag_update import nag_update_reference
from nag_lightning.kernels.nag_update_gate import UpdateAndGate, nag_update_and_gate_reference
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


def nag_update_and_gate(direction: torch.Tensor, log_norm: torch.Tensor, update: torch.Tensor, step: torch.Tensor,
                        gate_w: torch.Tensor, gate_b: torch.Tensor, gate_logits: torch.Tensor,
                        beta: torch.Tensor | float, alpha: torch.Tensor | float, gain: torch.Tensor | None = None,
                        backend: str = "torch", eps: float = 1e-4,
                        update_rows: torch.Tensor | None = None) -> UpdateAndGate:
    """The lane update of sub-layer ``l`` fused with the gate, step and input of sub-layer ``l + 1``.

    Returns ``UpdateAndGate(direction, log_norm, gate, step, sublayer_input)``: ``nag_update``'s
    two lanes, then ``m' = max(sum_c softmax(gate_logits)_c sigmoid(<r', w_c> + b_c), 1e-6) ** beta``,
    ``a' = alpha m'`` and ``x' = r' * gain`` (``r'`` in float32 without a gain). ``gate_w`` (C, d),
    ``gate_b`` and ``gate_logits`` (C,) are the next sub-layer's gate parameters as NAG stores them,
    ``beta`` its exponent (``softplus(beta_raw)``), ``alpha`` its ``alpha * alpha_scale``, ``gain``
    its input gain (d,) or None. ``update_rows`` (...) int: the sub-layer ran on packed rows and
    ``update`` is (N, d); each row reads row ``update_rows[...]`` of it, and -1 a zero update (give
    such rows step 0: their lanes then pass through unchanged); each packed row at most once (the
    backward stores a packed row's gradient, it does not add). See ``nag_update_gate.py``.
    ``backend="torch"`` is the reference, ``backend="triton"`` the fused kernel (a CUDA GPU, or ``TRITON_INTERPRET=1`` on a CPU).
    """
    if backend not in BACKENDS:
        raise ValueError(f"nag_update_and_gate: unknown backend {backend!r}; available: {', '.join(BACKENDS)}.")
    d, n_gates = direction.shape[-1], gate_w.shape[0]
    if update_rows is not None:
        if update.dim() != 2 or update.shape[-1] != d or update_rows.shape != direction.shape[:-1] or (
                update_rows.dtype.is_floating_point or update_rows.dtype == torch.bool):
            raise ValueError(
                f"nag_update_and_gate: with update_rows, update {tuple(update.shape)} must be the packed rows (N, {d}) "
                f"and update_rows {tuple(update_rows.shape)} {update_rows.dtype} integer row numbers shaped like "
                f"direction's leading shape {tuple(direction.shape[:-1])}."
            )
    elif direction.shape != update.shape:
        raise ValueError(f"nag_update_and_gate: direction {tuple(direction.shape)} and update {tuple(update.shape)} "
                         f"must be (..., d), the same shape (or pass update_rows for packed rows).")
    if direction.shape[:-1] != log_norm.shape or log_norm.shape != step.shape:
        raise ValueError(
            f"nag_update_and_gate: direction {tuple(direction.shape)} must be (..., d) and log_norm "
            f"{tuple(log_norm.shape)} and step {tuple(step.shape)} (...), the same leading shape."
        )
    if gate_w.shape != (n_gates, d) or gate_b.shape != (n_gates,) or gate_logits.shape != (n_gates,) or (
            gain is not None and gain.shape != (d,)):
        raise ValueError(
            f"nag_update_and_gate: gate_w {tuple(gate_w.shape)} must be (C, {d}), gate_b {tuple(gate_b.shape)} and "
            f"gate_logits {tuple(gate_logits.shape)} (C,), and gain {None if gain is None else tuple(gain.shape)} ({d},)."
        )
    beta, alpha = (torch.as_tensor(x, dtype=torch.float32, device=direction.device)
                   if not isinstance(x, torch.Tensor) else x for x in (beta, alpha))
    if beta.numel() != 1 or alpha.numel() != 1:
        raise ValueError(f"nag_update_and_gate: beta and alpha must be scalars, got {tuple(beta.shape)} and {tuple(alpha.shape)}.")
    if backend == "triton":
        _require_triton(direction.device)
        from nag_lightning.kernels.nag_update_gate import nag_update_gate_triton

        return nag_update_gate_triton(direction, log_norm, update, step, gate_w, gate_b, gate_logits, beta, alpha, gain,
                                      eps, update_rows)
    return nag_update_and_gate_reference(direction, log_norm, update, step, gate_w, gate_b, gate_logits, beta, alpha,
                                         gain, eps, update_rows)


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


__all__ = ["BACKENDS", "UpdateAndGate", "nag_update", "nag_update_and_gate", "nag_update_and_gate_reference",
           "nag_update_reference", "rms_norm", "rms_norm_reference"]
