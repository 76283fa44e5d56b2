"""The NAG lane update (NAG_SPEC.md section 2, steps 2-7): the contract every backend implements.

Given the direction lane ``r`` (RMS 1), the float32 log-norm lane ``s``, a sub-layer's output
``f`` and the planned step ``a`` (the gate stays outside: Mixture-of-Depths needs it before the
sub-layer runs)::

    f      <- f - mean(f)                               centre over features
    f_perp <- f - (<f, r> / d) r                        keep only the new direction (Eqs. 10-11)
    u      <- sqrt(d) f_perp / max(||f_perp||, eps ||f||, 1e-30)   normalise (Eq. 12)
    r'     <- (r + a u) / sqrt(1 + a^2)                 = cos(theta) r + sin(theta) u, theta = arctan(a)
    r'     <- r' / rms(r')                              re-normalise against rounding drift
    s'     <- s + log(1 + a^2) / 2                      (Eqs. 14-17)

so ``||R'|| / ||R|| = sqrt(1 + a^2)`` whatever ``||R|| = exp(s) sqrt(d)`` is. Where ``a == 0``
both lanes are returned unchanged bit for bit (a skipped sub-layer is an exact identity).

``eps`` is relative to ``||f||``: when the output is (nearly) parallel to ``r``, ``f_perp`` is
float rounding noise (1e-7 to 1e-6 of ``||f||`` in float32), and normalising it would rotate ``r``
by the full ``arctan(a)`` towards noise (so two backends, rounding differently, disagreed by 2 on
the new direction). Below ``eps ||f||`` the rotation shrinks in proportion to ``||f_perp||`` and
vanishes with it: nothing can rotate, so the direction stays. The log-norm still grows by
``log(1 + a^2) / 2``: the lane's invariant ``||R'|| / ||R|| = sqrt(1 + a^2)`` depends on ``a``
alone, so the gate's gradient through the norm lane stays continuous (a choice the spec leaves open).
"""

from __future__ import annotations

import math

import torch

from nag_lightning.kernels._triton import HAS_TRITON

TINY = 1e-30  # the normaliser's floor where f = 0 (then f_perp = 0 and the rotation is exactly 0)


def nag_update_reference(direction: torch.Tensor, log_norm: torch.Tensor, update: torch.Tensor,
                         step: torch.Tensor, eps: float = 1e-4) -> tuple[torch.Tensor, torch.Tensor]:
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
    floor = (eps * torch.linalg.vector_norm(f, dim=-1, keepdim=True)).clamp_min(TINY)
    # Steps 4 and 7: r' = (r + a u) / sqrt(1 + a^2) with u = sqrt(d) f_perp / max(||f_perp||, eps ||f||).
    coefficient = a * math.sqrt(d) / torch.maximum(f_perp_norm, floor)
    rotated = torch.addcmul(r, f_perp, coefficient)
    # Re-normalise to RMS 1 (stops rounding drift; exactly sqrt(1 + a^2) in exact arithmetic), and
    # leave rows with a == 0 untouched bit for bit.
    rms = torch.linalg.vector_norm(rotated, dim=-1, keepdim=True) / math.sqrt(d)
    scale = torch.where(a == 0, torch.ones_like(rms), 1.0 / rms)
    new_direction = (rotated * scale).to(direction.dtype)
    new_log_norm = log_norm + 0.5 * torch.log1p(step.to(log_norm.dtype) ** 2)
    return new_direction, new_log_norm


# ---------------------------------------------------------------------------------------------
# Fused Triton kernels: one pass over each row forward, one backward; between them only per-row
# scalars (p = <f_c, r>/d, ||f_perp||, rms of the rotated row) are kept, not (N, d) tensors.
# ---------------------------------------------------------------------------------------------
if HAS_TRITON:
    import triton
    import triton.language as tl

    from nag_lightning.kernels._triton import plan, row_block, warps_per_program

    # The row math lives in @triton.jit helpers (inlined by Triton) so that the fused "update and
    # next gate" kernels (nag_update_gate.py) run exactly these operations, in this order.
    @triton.jit
    def _rotate(r, f, a, mask, row_ok, d, root_d, eps):
        """The update of a block of rows in float32: (new direction, p = <f_c, r>/d, ||f_perp||, rms of the rotated row)."""
        fc = tl.where(mask, f - tl.sum(f, axis=1)[:, None] / d, 0.0)
        p = tl.sum(fc * r, axis=1) / d
        q = fc - p[:, None] * r
        norm = tl.sqrt(tl.sum(q * q, axis=1))
        floor = tl.maximum(eps * tl.sqrt(tl.sum(fc * fc, axis=1)), 1e-30)
        c = a * root_d / tl.maximum(norm, floor)
        y = r + c[:, None] * q
        rms = tl.where(row_ok, tl.sqrt(tl.sum(y * y, axis=1) / d), 1.0)  # padding rows: no 1/0
        scale = tl.where(a == 0.0, 1.0, 1.0 / rms)
        return y * scale[:, None], p, norm, rms

    @triton.jit
    def _recompute_rotation(r, f, a, p, norm, mask, d, root_d, eps):
        """The forward's row quantities again, from the inputs and the saved per-row scalars p and ||f_perp||."""
        fc = tl.where(mask, f - tl.sum(f, axis=1)[:, None] / d, 0.0)
        q = fc - p[:, None] * r
        f_norm = tl.sqrt(tl.sum(fc * fc, axis=1))
        relative_floor = eps * f_norm
        floor = tl.maximum(relative_floor, 1e-30)
        perp_wins = norm > floor
        norm_c = tl.where(perp_wins, norm, floor)
        c = a * root_d / norm_c
        return fc, q, f_norm, relative_floor, perp_wins, norm_c, c

    @triton.jit
    def _rotate_backward(g, r, a, p, norm, rms, fc, q, f_norm, relative_floor, perp_wins, norm_c, c, mask, d, root_d, eps):
        """Gradients of r, f and (through the rotation only) a, given g = dL/d(new direction) in float32."""
        out = (r + c[:, None] * q) / rms[:, None]
        # Through the re-normalisation (skipped where a == 0, where the scale is the constant 1).
        d_y = tl.where((a == 0.0)[:, None], g, (g - out * (tl.sum(out * g, axis=1) / d)[:, None]) / rms[:, None])
        # y = r + c q, c = a sqrt(d) / max(||q||, eps ||f_c||, 1e-30)
        d_c = tl.sum(d_y * q, axis=1)
        d_norm_c = -d_c * c / norm_c
        d_norm = tl.where(perp_wins, d_norm_c, 0.0)
        d_f_norm = tl.where(perp_wins | (relative_floor <= 1e-30), 0.0, d_norm_c * eps)
        d_q = c[:, None] * d_y + (d_norm / tl.maximum(norm, 1e-30))[:, None] * q
        # q = f_c - p r, p = <f_c, r> / d
        d_p = -tl.sum(d_q * r, axis=1)
        d_r = d_y - p[:, None] * d_q + (d_p / d)[:, None] * fc
        d_fc = d_q + (d_p / d)[:, None] * r + (d_f_norm / tl.maximum(f_norm, 1e-30))[:, None] * fc
        d_f = tl.where(mask, d_fc - tl.sum(d_fc, axis=1)[:, None] / d, 0.0)
        return d_r, d_f, d_c * root_d / norm_c

    @triton.jit
    def _nag_forward_kernel(R, F, S, A, OUT_R, OUT_S, P, NORM, RMS, n_rows, d, root_d, eps,
                            BLOCK_D: tl.constexpr, ROWS: tl.constexpr):
        rows, cols, row_ok, mask, offsets = row_block(n_rows, d, BLOCK_D, ROWS)
        r = tl.load(R + offsets, mask=mask, other=0.0).to(tl.float32)
        f = tl.load(F + offsets, mask=mask, other=0.0).to(tl.float32)
        a = tl.load(A + rows, mask=row_ok, other=0.0).to(tl.float32)
        s = tl.load(S + rows, mask=row_ok, other=0.0)
        out, p, norm, rms = _rotate(r, f, a, mask, row_ok, d, root_d, eps)
        tl.store(OUT_R + offsets, out.to(OUT_R.dtype.element_ty), mask=mask)
        tl.store(OUT_S + rows, s + 0.5 * tl.log(1.0 + a * a), mask=row_ok)
        tl.store(P + rows, p, mask=row_ok)
        tl.store(NORM + rows, norm, mask=row_ok)
        tl.store(RMS + rows, rms, mask=row_ok)

    @triton.jit
    def _nag_backward_kernel(R, F, A, P, NORM, RMS, G_R, G_S, D_R, D_F, D_A, n_rows, d, root_d, eps,
                             BLOCK_D: tl.constexpr, ROWS: tl.constexpr):
        rows, cols, row_ok, mask, offsets = row_block(n_rows, d, BLOCK_D, ROWS)
        r = tl.load(R + offsets, mask=mask, other=0.0).to(tl.float32)
        f = tl.load(F + offsets, mask=mask, other=0.0).to(tl.float32)
        g = tl.load(G_R + offsets, mask=mask, other=0.0).to(tl.float32)
        a = tl.load(A + rows, mask=row_ok, other=0.0).to(tl.float32)
        g_s = tl.load(G_S + rows, mask=row_ok, other=0.0).to(tl.float32)
        p = tl.load(P + rows, mask=row_ok, other=0.0)
        norm = tl.load(NORM + rows, mask=row_ok, other=1.0)
        rms = tl.load(RMS + rows, mask=row_ok, other=1.0)
        # Recompute the forward from the inputs and the saved per-row scalars.
        fc, q, f_norm, relative_floor, perp_wins, norm_c, c = _recompute_rotation(r, f, a, p, norm, mask, d, root_d, eps)
        d_r, d_f, d_a = _rotate_backward(g, r, a, p, norm, rms, fc, q, f_norm, relative_floor, perp_wins, norm_c, c,
                                         mask, d, root_d, eps)
        d_a = d_a + g_s * a / (1.0 + a * a)
        tl.store(D_R + offsets, d_r.to(D_R.dtype.element_ty), mask=mask)
        tl.store(D_F + offsets, d_f.to(D_F.dtype.element_ty), mask=mask)
        tl.store(D_A + rows, d_a, mask=row_ok)

    # Registered as custom operators (``torch.library.triton_op``), so ``torch.compile`` places the
    # kernels inside a compiled graph (no graph break) and knows what they read and write. The
    # per-row sqrt(d) is an argument: Triton's mutation analysis under compile fails on int casts.
    @torch.library.triton_op("nag_lightning::nag_update_forward", mutates_args=())
    def _nag_update_forward(r: torch.Tensor, f: torch.Tensor, s: torch.Tensor, a: torch.Tensor,
                            eps: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        n_rows, d = r.shape
        out_r, out_s = torch.empty_like(r), torch.empty_like(s)
        p, norm, rms = (torch.empty(n_rows, device=r.device, dtype=torch.float32) for _ in range(3))
        block_d, rows, programs = plan(n_rows, d)
        torch.library.wrap_triton(_nag_forward_kernel)[(programs,)](
            r, f, s, a, out_r, out_s, p, norm, rms, n_rows, d, math.sqrt(d), eps, BLOCK_D=block_d, ROWS=rows,
            num_warps=warps_per_program(block_d * rows))
        return out_r, out_s, p, norm, rms

    @torch.library.triton_op("nag_lightning::nag_update_backward", mutates_args=())
    def _nag_update_backward(r: torch.Tensor, f: torch.Tensor, a: torch.Tensor, p: torch.Tensor, norm: torch.Tensor,
                             rms: torch.Tensor, g_r: torch.Tensor, g_s: torch.Tensor,
                             eps: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        n_rows, d = r.shape
        d_r, d_f = torch.empty_like(r), torch.empty_like(f)
        d_a = torch.empty(n_rows, device=r.device, dtype=torch.float32)
        block_d, rows, programs = plan(n_rows, d)
        torch.library.wrap_triton(_nag_backward_kernel)[(programs,)](
            r, f, a, p, norm, rms, g_r, g_s, d_r, d_f, d_a, n_rows, d, math.sqrt(d), eps, BLOCK_D=block_d, ROWS=rows,
            num_warps=warps_per_program(block_d * rows))
        return d_r, d_f, d_a

    def _setup_context(ctx, inputs, output) -> None:
        r, f, _, a, eps = inputs
        _, _, p, norm, rms = output
        ctx.save_for_backward(r, f, a, p, norm, rms)
        ctx.eps = eps

    def _backward(ctx, grad_r, grad_s, *_):
        r, f, a, p, norm, rms = ctx.saved_tensors
        g_r = torch.zeros_like(r) if grad_r is None else grad_r.contiguous()
        g_s = torch.zeros_like(a) if grad_s is None else grad_s.contiguous().float()
        d_r, d_f, d_a = _nag_update_backward(r, f, a, p, norm, rms, g_r, g_s, ctx.eps)
        return d_r, d_f, grad_s, d_a, None

    torch.library.register_autograd("nag_lightning::nag_update_forward", _backward, setup_context=_setup_context)

    def nag_update_triton(direction, log_norm, update, step, eps: float = 1e-4):
        """Fused Triton NAG update (forward and backward); same contract as the reference."""
        shape, d = direction.shape, direction.shape[-1]
        out_r, out_s, *_ = _nag_update_forward(direction.reshape(-1, d).contiguous(), update.reshape(-1, d).contiguous(),
                                               log_norm.reshape(-1).contiguous().float(),
                                               step.reshape(-1).contiguous().float(), eps)
        return out_r.reshape(shape), out_s.reshape(shape[:-1]).to(log_norm.dtype)
