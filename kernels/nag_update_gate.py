"""One pass per sub-layer boundary: NAG's lane update of sub-layer ``l``, then the gate, the step and
the input of sub-layer ``l + 1``, all from the same row (issue 23, item 1).

The update of sub-layer ``l`` writes the new direction ``r'``, and the next sub-layer's gate and
input read it straight back; fused, a row is read once (``r``, the sub-layer output ``f``) and
written once (``r'``, the next input ``x'``), with per-row scalars beside it::

    (r', s')  = nag_update(r, s, f, a)                     the lane update (nag_update.py)
    z_c       = <r', w_c> + b_c                            c = 1..C, w/b: the next gate's directions/biases
    m'        = (max(sum_c p_c sigmoid(z_c), 1e-6)) ** beta    p = softmax(gate logits)
    a'        = alpha m'                                   alpha: alpha_{l+1} x alpha_scale (warm-up included)
    x'        = r' * g   (or r' in float32 when there is no input gain)

With ``update_rows`` the sub-layer ran on packed rows (skipping: only the tokens that execute it):
row ``i`` reads its ``f`` from row ``update_rows[i]`` of the packed output, and a token that
skipped (-1) reads a zero update (its step is 0, so its lanes pass through unchanged). The
scatter of the packed rows back into the lanes is then part of the same pass.

This is exactly ``NAG.write`` then ``NAG.gate``/``NAG.planned_step`` and ``NAG.read`` of the next
sub-layer (``nag_lightning/model/residual/nag.py``): the gate and the input read the direction *as stored*
(rounded to bfloat16 when the lane is stored so), and the gate is computed in float32 outside
autocast. NAG's ``write_ahead`` and ``write_packed_ahead`` call it (``kernels: triton``) at every
sub-layer boundary but the last; see docs/kernels.md.

``nag_update_and_gate_reference`` is the definition (PyTorch, differentiable; float64 in, float64
throughout); the Triton kernels below compute the same in one pass forward and one backward.
"""

from __future__ import annotations

import math
from contextlib import nullcontext
from typing import NamedTuple

import torch
import torch.nn.functional as F

from nag_lightning.kernels._triton import HAS_TRITON
from nag_lightning.kernels.nag_update import nag_update_reference

MIXTURE_FLOOR = 1e-6  # NAG.gate's clamp before the power: keeps log(mixture) finite for beta's gradient


class UpdateAndGate(NamedTuple):
    direction: torch.Tensor  # (..., d) r', in the direction's storage dtype
    log_norm: torch.Tensor  # (...) s'
    gate: torch.Tensor  # (...) m' of the next sub-layer
    step: torch.Tensor  # (...) a' = alpha m' of the next sub-layer
    sublayer_input: torch.Tensor  # (..., d) x' = r' * g: what the next sub-layer reads


def nag_update_and_gate_reference(direction: torch.Tensor, log_norm: torch.Tensor, update: torch.Tensor,
                                  step: torch.Tensor, gate_w: torch.Tensor, gate_b: torch.Tensor,
                                  gate_logits: torch.Tensor, beta: torch.Tensor, alpha: torch.Tensor,
                                  gain: torch.Tensor | None = None, eps: float = 1e-4,
                                  update_rows: torch.Tensor | None = None) -> UpdateAndGate:
    """PyTorch reference: ``nag_update_reference``, then NAG's gate, step and read of the next sub-layer.

    ``gate_w`` (C, d), ``gate_b`` (C,), ``gate_logits`` (C,): the next sub-layer's rows of
    ``NAG.gate_w``, ``gate_b``, ``gate_logits``; ``beta`` the exponent ``softplus(NAG.beta_raw[l])``;
    ``alpha`` the next sub-layer's ``NAG.alpha[l] * NAG.alpha_scale``; ``gain`` its ``NAG.gains[l]``.
    ``update_rows`` (...): each row's row of the packed ``update`` (N, d), -1 for a zero update.
    Computes in float32 (float64 when the direction is float64), like the functions it composes.
    """
    if update_rows is not None:
        update = unpack_rows(update, update_rows)
    new_direction, new_log_norm = nag_update_reference(direction, log_norm, update, step, eps)
    compute = torch.float64 if direction.dtype == torch.float64 else torch.float32
    device = direction.device.type
    # As NAG.gate: in float32 even under autocast (bf16 would flip skip decisions near the threshold).
    with nullcontext() if device == "meta" else torch.autocast(device, enabled=False):
        scores = F.linear(new_direction.to(compute), gate_w.to(compute), gate_b.to(compute))
        mixture = (torch.sigmoid(scores) * torch.softmax(gate_logits.to(compute), dim=-1)).sum(-1)
        gate = mixture.clamp_min(MIXTURE_FLOOR) ** beta.to(compute)
    # As NAG.read: the stored direction times the gain (float32 whatever the storage).
    sublayer_input = new_direction.to(compute) if gain is None else new_direction * gain
    return UpdateAndGate(new_direction, new_log_norm, gate, alpha * gate, sublayer_input)


def unpack_rows(packed: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """(..., d): row ``rows[...]`` of ``packed`` (N, d), zeros where ``rows`` is -1."""
    unpacked = packed[rows.clamp_min(0)]
    return torch.where((rows >= 0).unsqueeze(-1), unpacked, torch.zeros_like(unpacked))


# ---------------------------------------------------------------------------------------------
# Fused Triton kernels. Forward: one pass over each row block (read r, f; write r', x' and the
# per-row scalars s', m', a'). Backward: one pass again, recomputing the rows from r, f and the
# saved per-row scalars (p, ||f_perp||, rms, the mixture), as nag_update.py's backward does.
#
# Parameter gradients: the gain's (d,) and the mixture weights' (C,), beta's and alpha's are
# summed per program into a small buffer of partials (programs x d at most: one more row per
# program's ROWS rows, deterministic, no atomics), then summed by PyTorch. The gate directions'
# (C, d) gradient is a matrix product over rows, dW = dZ^T r': per-program (C, d) partials would
# be C times the gain's buffer (256 MB at 8192 x 1024, C = 32), and atomics would contend on it,
# so the kernel writes the per-row score gradients dZ (N, C: 3 % of a row at C = 32, d = 1024) and
# one GEMM reads them with the output direction r' (kept by autograd: it is the next lane, alive
# anyway and saved by the next update as its input).
# ---------------------------------------------------------------------------------------------
if HAS_TRITON:
    import triton
    import triton.language as tl

    from nag_lightning.kernels._triton import plan, row_block, warps_per_program
    from nag_lightning.kernels.nag_update import _recompute_rotation, _rotate, _rotate_backward

    @triton.jit
    def update_rows(SRC, rows, row_ok, cols, mask, offsets, d, INDEXED: tl.constexpr):
        """Where this program's rows find the sub-layer output: their own rows, or (``INDEXED``)
        row ``SRC[row]`` of the packed output, none (a zero update) where that is -1."""
        if INDEXED:
            source = tl.load(SRC + rows, mask=row_ok, other=-1)
            return source[:, None] * d + cols[None, :], mask & (source >= 0)[:, None]
        else:  # noqa: RET505 - Triton compiles both returns of an if without else and requires one type
            return offsets, mask

    @triton.jit
    def _forward_kernel(R, F, SRC, S, A, W, B, P, BETA, ALPHA, GAIN,
                        OUT_R, OUT_S, OUT_M, OUT_A, OUT_X, PROJ, NORM, RMS, MIX,
                        n_rows, d, n_gates, root_d, eps,
                        HAS_GAIN: tl.constexpr, INDEXED: tl.constexpr, BLOCK_D: tl.constexpr, ROWS: tl.constexpr):
        rows, cols, row_ok, mask, offsets = row_block(n_rows, d, BLOCK_D, ROWS)
        col_ok = cols < d
        r = tl.load(R + offsets, mask=mask, other=0.0).to(tl.float32)
        f_offsets, f_mask = update_rows(SRC, rows, row_ok, cols, mask, offsets, d, INDEXED)
        f = tl.load(F + f_offsets, mask=f_mask, other=0.0).to(tl.float32)
        a = tl.load(A + rows, mask=row_ok, other=0.0).to(tl.float32)
        s = tl.load(S + rows, mask=row_ok, other=0.0)
        out, proj, norm, rms = _rotate(r, f, a, mask, row_ok, d, root_d, eps)
        stored = out.to(OUT_R.dtype.element_ty)
        tl.store(OUT_R + offsets, stored, mask=mask)
        tl.store(OUT_S + rows, s + 0.5 * tl.log(1.0 + a * a), mask=row_ok)
        # The next sub-layer sees the direction as stored (bf16-rounded when the lane is bf16).
        x = stored.to(tl.float32)
        # The gate: C dot products against the (C, d) directions, which stay in cache across programs.
        mix = tl.zeros([ROWS], dtype=tl.float32)
        for c in range(n_gates):
            w = tl.load(W + c * d + cols, mask=col_ok, other=0.0).to(tl.float32)
            z = tl.sum(x * w[None, :], axis=1) + tl.load(B + c).to(tl.float32)
            mix += tl.load(P + c).to(tl.float32) * tl.sigmoid(z)
        beta = tl.load(BETA).to(tl.float32)
        m = tl.exp(beta * tl.log(tl.maximum(mix, 1e-6)))
        tl.store(OUT_M + rows, m, mask=row_ok)
        tl.store(OUT_A + rows, tl.load(ALPHA).to(tl.float32) * m, mask=row_ok)
        if HAS_GAIN:
            x = x * tl.load(GAIN + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
        tl.store(OUT_X + offsets, x.to(OUT_X.dtype.element_ty), mask=mask)
        tl.store(PROJ + rows, proj, mask=row_ok)
        tl.store(NORM + rows, norm, mask=row_ok)
        tl.store(RMS + rows, rms, mask=row_ok)
        tl.store(MIX + rows, mix, mask=row_ok)

    @triton.jit
    def _backward_kernel(R, F, SRC, A, W, B, P, BETA, ALPHA, GAIN, PROJ, NORM, RMS, MIX,
                         G_R, G_S, G_M, G_A, G_X,
                         D_R, D_F, D_A, D_Z, D_GAIN_PARTIAL, D_P_PARTIAL, D_BETA_PARTIAL, D_ALPHA_PARTIAL,
                         n_rows, d, n_gates, root_d, eps,
                         HAS_GAIN: tl.constexpr, INDEXED: tl.constexpr, BLOCK_D: tl.constexpr, ROWS: tl.constexpr):
        pid = tl.program_id(0)
        rows, cols, row_ok, mask, offsets = row_block(n_rows, d, BLOCK_D, ROWS)
        col_ok = cols < d
        r = tl.load(R + offsets, mask=mask, other=0.0).to(tl.float32)
        f_offsets, f_mask = update_rows(SRC, rows, row_ok, cols, mask, offsets, d, INDEXED)
        f = tl.load(F + f_offsets, mask=f_mask, other=0.0).to(tl.float32)
        a = tl.load(A + rows, mask=row_ok, other=0.0).to(tl.float32)
        proj = tl.load(PROJ + rows, mask=row_ok, other=0.0)
        norm = tl.load(NORM + rows, mask=row_ok, other=1.0)
        rms = tl.load(RMS + rows, mask=row_ok, other=1.0)
        mix = tl.load(MIX + rows, mask=row_ok, other=1.0)
        # Recompute the new direction as stored (the forward's ops: r' = r where a == 0, bit for bit).
        fc, q, f_norm, relative_floor, perp_wins, norm_c, c = _recompute_rotation(r, f, a, proj, norm, mask, d,
                                                                                  root_d, eps)
        scale = tl.where(a == 0.0, 1.0, 1.0 / rms)
        x = ((r + c[:, None] * q) * scale[:, None]).to(R.dtype.element_ty).to(tl.float32)
        # m = max(mix, 1e-6) ** beta and a' = alpha m: per-row scalars, and beta's and alpha's partial sums.
        beta = tl.load(BETA).to(tl.float32)
        alpha = tl.load(ALPHA).to(tl.float32)
        clamped = tl.maximum(mix, 1e-6)
        m = tl.exp(beta * tl.log(clamped))
        g_a = tl.load(G_A + rows, mask=row_ok, other=0.0).to(tl.float32)
        g_m = tl.load(G_M + rows, mask=row_ok, other=0.0).to(tl.float32) + alpha * g_a
        tl.store(D_ALPHA_PARTIAL + pid, tl.sum(g_a * m, axis=0))
        tl.store(D_BETA_PARTIAL + pid, tl.sum(g_m * m * tl.log(clamped), axis=0))
        # clamp_min passes the gradient where mix >= the floor (as torch's clamp_min does).
        d_mix = tl.where(mix >= 1e-6, g_m * beta * m / clamped, 0.0)
        # dL/dr' (as stored): its own gradient, the next input's through the gain, and the gate's below.
        g_x = tl.load(G_X + offsets, mask=mask, other=0.0).to(tl.float32)
        if HAS_GAIN:
            tl.store(D_GAIN_PARTIAL + pid * d + cols, tl.sum(g_x * x, axis=0), mask=col_ok)
            g_x = g_x * tl.load(GAIN + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
        g = tl.load(G_R + offsets, mask=mask, other=0.0).to(tl.float32) + g_x
        for k in range(n_gates):
            w = tl.load(W + k * d + cols, mask=col_ok, other=0.0).to(tl.float32)
            sig = tl.sigmoid(tl.sum(x * w[None, :], axis=1) + tl.load(B + k).to(tl.float32))  # recomputed
            tl.store(D_P_PARTIAL + pid * n_gates + k, tl.sum(d_mix * sig, axis=0))
            d_z = d_mix * tl.load(P + k).to(tl.float32) * sig * (1.0 - sig)
            tl.store(D_Z + rows * n_gates + k, d_z, mask=row_ok)
            g += d_z[:, None] * w[None, :]
        # Then through the lane update, as nag_update's backward.
        d_r, d_f, d_a = _rotate_backward(g, r, a, proj, norm, rms, fc, q, f_norm, relative_floor, perp_wins, norm_c,
                                         c, mask, d, root_d, eps)
        g_s = tl.load(G_S + rows, mask=row_ok, other=0.0).to(tl.float32)
        d_a = d_a + g_s * a / (1.0 + a * a)
        tl.store(D_R + offsets, d_r.to(D_R.dtype.element_ty), mask=mask)
        tl.store(D_F + f_offsets, d_f.to(D_F.dtype.element_ty), mask=f_mask)
        tl.store(D_A + rows, d_a, mask=row_ok)

    # Custom operators (``torch.library.triton_op``), as nag_update.py's: ``torch.compile`` places
    # them in a graph without a break. The forward's last four outputs are the saved per-row scalars.
    @torch.library.triton_op("nag_lightning::nag_update_gate_forward", mutates_args=())
    def _nag_update_gate_forward(
        r: torch.Tensor, f: torch.Tensor, src: torch.Tensor | None, s: torch.Tensor, a: torch.Tensor, w: torch.Tensor,
        b: torch.Tensor, p: torch.Tensor, beta: torch.Tensor, alpha: torch.Tensor, gain: torch.Tensor | None, eps: float,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
               torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        n_rows, d = r.shape
        out_r, out_s = torch.empty_like(r), torch.empty_like(s)
        x_dtype = torch.float32 if gain is None else torch.promote_types(r.dtype, gain.dtype)
        out_x = torch.empty(n_rows, d, device=r.device, dtype=x_dtype)
        out_m, out_a, proj, norm, rms, mix = (torch.empty(n_rows, device=r.device, dtype=torch.float32)
                                              for _ in range(6))
        block_d, rows, programs = plan(n_rows, d)
        torch.library.wrap_triton(_forward_kernel)[(programs,)](
            r, f, r if src is None else src, s, a, w, b, p, beta, alpha, r if gain is None else gain,
            out_r, out_s, out_m, out_a, out_x, proj, norm, rms, mix,
            n_rows, d, w.shape[0], math.sqrt(d), eps, HAS_GAIN=gain is not None, INDEXED=src is not None,
            BLOCK_D=block_d, ROWS=rows,
            num_warps=warps_per_program(block_d * rows))
        return out_r, out_s, out_m, out_a, out_x, proj, norm, rms, mix

    @torch.library.triton_op("nag_lightning::nag_update_gate_backward", mutates_args=())
    def _nag_update_gate_backward(
        r: torch.Tensor, f: torch.Tensor, src: torch.Tensor | None, a: torch.Tensor, w: torch.Tensor, b: torch.Tensor,
        p: torch.Tensor, beta: torch.Tensor, alpha: torch.Tensor, gain: torch.Tensor | None, new_r: torch.Tensor,
        proj: torch.Tensor, norm: torch.Tensor, rms: torch.Tensor, mix: torch.Tensor,
        g_r: torch.Tensor, g_s: torch.Tensor, g_m: torch.Tensor, g_a: torch.Tensor, g_x: torch.Tensor, eps: float,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
               torch.Tensor, torch.Tensor, torch.Tensor]:
        """(d_r, d_f, d_a, d_w, d_b, d_p, d_beta, d_alpha, d_gain); d_gain is empty without a gain."""
        n_rows, d = r.shape
        n_gates = w.shape[0]
        block_d, rows, programs = plan(n_rows, d)
        # Packed (``src``): the output rows no token reads (padding) get no gradient, so start at zero.
        d_r, d_f = torch.empty_like(r), torch.empty_like(f) if src is None else torch.zeros_like(f)
        d_a = torch.empty(n_rows, device=r.device, dtype=torch.float32)
        d_z = torch.empty(n_rows, n_gates, device=r.device, dtype=torch.float32)
        gain_partial = torch.empty(programs if gain is not None else 0, d, device=r.device, dtype=torch.float32)
        p_partial = torch.empty(programs, n_gates, device=r.device, dtype=torch.float32)
        beta_partial, alpha_partial = (torch.empty(programs, device=r.device, dtype=torch.float32) for _ in range(2))
        torch.library.wrap_triton(_backward_kernel)[(programs,)](
            r, f, r if src is None else src, a, w, b, p, beta, alpha, r if gain is None else gain, proj, norm, rms, mix,
            g_r, g_s, g_m, g_a, g_x,
            d_r, d_f, d_a, d_z, gain_partial, p_partial, beta_partial, alpha_partial,
            n_rows, d, n_gates, math.sqrt(d), eps, HAS_GAIN=gain is not None, INDEXED=src is not None,
            BLOCK_D=block_d, ROWS=rows,
            num_warps=warps_per_program(block_d * rows))
        # The gate directions' gradient: one GEMM over rows against the direction as stored.
        d_w = d_z.t() @ new_r.float()
        return (d_r, d_f, d_a, d_w, d_z.sum(0), p_partial.sum(0), beta_partial.sum().reshape(1),
                alpha_partial.sum().reshape(1), gain_partial.sum(0))

    def _setup_context(ctx, inputs, output) -> None:
        r, f, src, _, a, w, b, p, beta, alpha, gain, eps = inputs
        new_r, _, _, _, _, proj, norm, rms, mix = output
        ctx.save_for_backward(r, f, src, a, w, b, p, beta, alpha, gain, new_r, proj, norm, rms, mix)
        ctx.eps = eps
        ctx.x_dtype = output[4].dtype

    def _backward(ctx, grad_r, grad_s, grad_m, grad_a, grad_x, *_):
        r, f, src, a, w, b, p, beta, alpha, gain, new_r, proj, norm, rms, mix = ctx.saved_tensors
        n_rows, d = r.shape

        def per_row(grad):
            return torch.zeros_like(a) if grad is None else grad.contiguous().float()

        g_r = torch.zeros_like(r) if grad_r is None else grad_r.contiguous()
        g_x = torch.zeros(n_rows, d, device=r.device, dtype=ctx.x_dtype) if grad_x is None else grad_x.contiguous()
        d_r, d_f, d_a, d_w, d_b, d_p, d_beta, d_alpha, d_gain = _nag_update_gate_backward(
            r, f, src, a, w, b, p, beta, alpha, gain, new_r, proj, norm, rms, mix,
            g_r, per_row(grad_s), per_row(grad_m), per_row(grad_a), g_x, ctx.eps)
        return (d_r, d_f, None, grad_s, d_a, d_w, d_b, d_p, d_beta, d_alpha,
                None if gain is None else d_gain.to(gain.dtype), None)

    torch.library.register_autograd("nag_lightning::nag_update_gate_forward", _backward, setup_context=_setup_context)

    def nag_update_gate_triton(direction, log_norm, update, step, gate_w, gate_b, gate_logits, beta, alpha,
                               gain=None, eps: float = 1e-4, update_rows=None) -> UpdateAndGate:
        """Fused Triton update and next gate (forward and backward); same contract as the reference.
        With ``update_rows``, each row reads its update from the packed rows of ``update`` directly.

        The (C,) softmax of the gate logits and the scalars' casts are PyTorch ops around the
        operator (autograd carries their gradients back to the parameters)."""
        shape, d = direction.shape, direction.shape[-1]
        outputs = _nag_update_gate_forward(
            direction.reshape(-1, d).contiguous(), update.reshape(-1, d).contiguous(),
            None if update_rows is None else update_rows.reshape(-1).contiguous().long(),
            log_norm.reshape(-1).contiguous().float(), step.reshape(-1).contiguous().float(),
            gate_w.float().contiguous(), gate_b.float().contiguous(), torch.softmax(gate_logits.float(), dim=-1),
            beta.float().reshape(1), alpha.float().reshape(1), None if gain is None else gain.contiguous(), eps)
        new_r, new_s, m, next_a, x = outputs[:5]
        lead = shape[:-1]
        return UpdateAndGate(new_r.reshape(shape), new_s.reshape(lead).to(log_norm.dtype), m.reshape(lead),
                             next_a.reshape(lead), x.reshape(shape))
