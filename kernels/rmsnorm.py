"""RMSNorm: ``y = x / sqrt(mean(x^2) + eps) * weight`` over the last dimension (``weight`` optional).

The PyTorch reference defines it (statistics in float32, output in the input's dtype); the fused
Triton kernels below compute the same in one pass forward and one backward, keeping only the
per-row ``1 / rms`` between them.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from nag_lightning.kernels._triton import HAS_TRITON


def rms_norm_reference(x: torch.Tensor, weight: torch.Tensor | None, eps: float = 1e-6) -> torch.Tensor:
    return F.rms_norm(x.float(), (x.shape[-1],), None if weight is None else weight.float(), eps).to(x.dtype)


if HAS_TRITON:
    import triton
    import triton.language as tl

    from nag_lightning.kernels._triton import launch, plan, row_block, warps_per_program

    @triton.jit
    def _rms_norm_forward_kernel(X, W, Y, RSTD, n_rows, d, eps, HAS_WEIGHT: tl.constexpr,
                                 BLOCK_D: tl.constexpr, ROWS: tl.constexpr):
        rows, cols, row_ok, mask, offsets = row_block(n_rows, d, BLOCK_D, ROWS)
        x = tl.load(X + offsets, mask=mask, other=0.0).to(tl.float32)
        rstd = 1.0 / tl.sqrt(tl.sum(x * x, axis=1) / d + eps)
        y = x * rstd[:, None]
        if HAS_WEIGHT:
            y = y * tl.load(W + cols, mask=cols < d, other=0.0).to(tl.float32)[None, :]
        tl.store(Y + offsets, y.to(Y.dtype.element_ty), mask=mask)
        tl.store(RSTD + rows, rstd, mask=row_ok)

    @triton.jit
    def _rms_norm_backward_kernel(X, W, RSTD, G, DX, DW_PARTIAL, n_rows, d, HAS_WEIGHT: tl.constexpr,
                                  BLOCK_D: tl.constexpr, ROWS: tl.constexpr):
        pid = tl.program_id(0)
        rows, cols, row_ok, mask, offsets = row_block(n_rows, d, BLOCK_D, ROWS)
        x = tl.load(X + offsets, mask=mask, other=0.0).to(tl.float32)
        g = tl.load(G + offsets, mask=mask, other=0.0).to(tl.float32)
        rstd = tl.load(RSTD + rows, mask=row_ok, other=0.0)
        x_hat = x * rstd[:, None]
        if HAS_WEIGHT:
            w = tl.load(W + cols, mask=cols < d, other=0.0).to(tl.float32)
            tl.store(DW_PARTIAL + pid * d + cols, tl.sum(g * x_hat, axis=0), mask=cols < d)
            g = g * w[None, :]
        dx = rstd[:, None] * (g - x_hat * (tl.sum(g * x_hat, axis=1) / d)[:, None])
        tl.store(DX + offsets, dx.to(DX.dtype.element_ty), mask=mask)

    class _RMSNormTriton(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x, weight, eps):
            shape, d = x.shape, x.shape[-1]
            x2 = x.reshape(-1, d).contiguous()
            n_rows = x2.shape[0]
            y = torch.empty_like(x2)
            rstd = torch.empty(n_rows, device=x.device, dtype=torch.float32)
            launch(_rms_norm_forward_kernel, n_rows, d, x2, weight if weight is not None else x2, y, rstd, n_rows, d,
                   eps, HAS_WEIGHT=weight is not None)
            ctx.save_for_backward(x2, weight, rstd)
            ctx.shape = shape
            return y.reshape(shape)

        @staticmethod
        def backward(ctx, grad):
            x2, weight, rstd = ctx.saved_tensors
            n_rows, d = x2.shape
            g = grad.reshape(-1, d).contiguous()
            dx = torch.empty_like(x2)
            block_d, rows, programs = plan(n_rows, d)
            partial = torch.empty(programs if weight is not None else 1, d, device=x2.device, dtype=torch.float32)
            _rms_norm_backward_kernel[(programs,)](
                x2, weight if weight is not None else x2, rstd, g, dx, partial, n_rows, d,
                HAS_WEIGHT=weight is not None, BLOCK_D=block_d, ROWS=rows,
                num_warps=warps_per_program(block_d * rows))
            d_weight = None if weight is None else partial.sum(0).to(weight.dtype)
            return dx.reshape(ctx.shape), d_weight, None

    def rms_norm_triton(x: torch.Tensor, weight: torch.Tensor | None, eps: float = 1e-6) -> torch.Tensor:
        """Fused Triton RMSNorm (forward and backward); same contract as the reference."""
        return _RMSNormTriton.apply(x, weight, eps)
