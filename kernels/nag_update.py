"""The NAG lane update (NAG_SPEC.md section 2, steps 2-7): the contract every backend implements.

Given the direction lane ``r`` (RMS 1), the float32 log-norm lane ``s``, a sub-layer's output
``f`` and the planned step ``a`` (the gate stays outside: Mixture-of-Depths needs it before the
sub-layer runs)::

    f      <- f - mean(f)                               centre over features
    f_perp <- f - (<f, r> / d) r                        keep only the new direction (Eqs. 10-11)
    u      <- sqrt(d) f_perp / max(||f_perp||, eps)     normalise (Eq. 12)
    r'     <- (r + a u) / sqrt(1 + a^2)                 = cos(theta) r + sin(theta) u, theta = arctan(a)
    r'     <- r' / rms(r')                              re-normalise against rounding drift
    s'     <- s + log(1 + a^2) / 2                      (Eqs. 14-17)

so ``||R'|| / ||R|| = sqrt(1 + a^2)`` whatever ``||R|| = exp(s) sqrt(d)`` is. Where ``a == 0``
both lanes are returned unchanged bit for bit (a skipped sub-layer is an exact identity).
"""

from __future__ import annotations

import math

import torch


def nag_update_reference(direction: torch.Tensor, log_norm: torch.Tensor, update: torch.Tensor,
                         step: torch.Tensor, eps: float = 1e-6) -> tuple[torch.Tensor, torch.Tensor]:
    """PyTorch reference of the NAG lane update; differentiable; computes in float32 (or float64).

    Written to touch each (..., d) tensor as few times as eager PyTorch allows: everything after
    ``f_perp`` is folded into per-row scalars, and the output is one multiply-add and one scale.
    """
    compute = torch.float64 if direction.dtype == torch.float64 else torch.float32
    d = direction.shape[-1]
    r = direction.to(compute)
    a = step.to(compute).unsqueeze(-1)
    f = update.to(compute)
    f = f - f.mean(dim=-1, keepdim=True)  # step 2: centre
    f_perp = torch.addcmul(f, r, torch.linalg.vecdot(f, r).unsqueeze(-1), value=-1.0 / d)  # step 3
    f_perp_norm = torch.linalg.vector_norm(f_perp, dim=-1, keepdim=True)
    # Steps 4 and 7: r' = (r + a u) / sqrt(1 + a^2) with u = sqrt(d) f_perp / max(||f_perp||, eps).
    coefficient = a * math.sqrt(d) / f_perp_norm.clamp_min(eps)
    rotated = torch.addcmul(r, f_perp, coefficient)
    # Re-normalise to RMS 1 (stops rounding drift; exactly sqrt(1 + a^2) in exact arithmetic), and
    # leave rows with a == 0 untouched bit for bit.
    rms = torch.linalg.vector_norm(rotated, dim=-1, keepdim=True) / math.sqrt(d)
    scale = torch.where(a == 0, torch.ones_like(rms), 1.0 / rms)
    new_direction = (rotated * scale).to(direction.dtype)
    new_log_norm = log_norm + 0.5 * torch.log1p(step.to(log_norm.dtype) ** 2)
    return new_direction, new_log_norm
