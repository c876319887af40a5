"""The fast pure-PyTorch SMoA path (the ``torch`` backend; the CPU/MPS production path).

Works in permuted coordinates (SPEC §3, KERNELS.md §2): gather ``x[:, col_order]`` once, then every block is a
contiguous column band, so only the K diagonal blocks are ever touched — no dense d_out×d_in ΔW, no mask, and the
weight-side gradient costs ``2ND²/K`` instead of ``2ND²``. Per block k, with ``M_k = W0[R_k, C_k]``::

    forward   ΔW_k = (B_k A_k) ⊙ M_k                 y[:, R_k] += s · x_a[:, C_k] ΔW_kᵀ
    backward  dx_a[:, C_k] = s · dY[:, R_k] ΔW_k       (ΔW_k regenerated, never saved)
              H_k  = s · (dY[:, R_k]ᵀ x_a[:, C_k]) ⊙ M_k
              dB_k = H_k A_kᵀ        dA_k = B_kᵀ H_k
    base      y = x W0ᵀ + b,  dx = dY W0,  db = Σ dY

FLOPs per step: (4 + 6/K)·N·D² (the exact floor of KERNELS.md §1) plus O(N·D) gathers. Saved for backward: the
inputs (x, x_a) and the factors — nothing D²-sized; the per-block ΔW_k (D²/K² each) lives only inside one loop step.
Precision follows :mod:`smoa_kernels.reference`: base in the input dtype, adapter in the factors' dtype.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from smoa_kernels.blocks import block_bounds, inverse_permutation

__all__ = ["SMoABlockwiseFunction", "smoa_linear_blockwise"]


def _block_views(weight, lora_A, lora_B, row_order, col_order, num_blocks):
    """Yield ``(row_slice, col_slice, A_k, B_k, M_k)`` per block; M_k is gathered in the factors' dtype."""
    row_bounds = block_bounds(row_order.numel(), num_blocks)
    col_bounds = block_bounds(col_order.numel(), num_blocks)
    for (r0, r1), (c0, c1) in zip(row_bounds, col_bounds):
        R_k, C_k = row_order[r0:r1], col_order[c0:c1]
        anchor = weight[R_k[:, None], C_k[None, :]].to(lora_A.dtype)
        yield slice(r0, r1), slice(c0, c1), lora_A[:, C_k], lora_B[R_k, :], anchor


class SMoABlockwiseFunction(torch.autograd.Function):
    """2-D autograd.Function; ``x_adapter`` may be ``x`` itself (no dropout): autograd then sums both gradients."""

    @staticmethod
    def forward(ctx, x, x_adapter, weight, bias, lora_A, lora_B, row_order, col_order, num_blocks, scale):
        base = F.linear(x, weight, bias)
        x_perm = x_adapter.index_select(1, col_order).to(lora_A.dtype)
        y_perm = x_perm.new_empty(x.shape[0], weight.shape[0])
        for rows, cols, A_k, B_k, anchor in _block_views(weight, lora_A, lora_B, row_order, col_order, num_blocks):
            torch.matmul(x_perm[:, cols], ((B_k @ A_k) * anchor).T, out=y_perm[:, rows])
        adapter = (y_perm * scale).index_select(1, inverse_permutation(row_order))
        ctx.save_for_backward(x_adapter, weight, lora_A, lora_B, row_order, col_order)
        ctx.num_blocks, ctx.scale = num_blocks, scale
        return base + adapter.to(base.dtype)

    @staticmethod
    def backward(ctx, grad_out):
        x_adapter, weight, lora_A, lora_B, row_order, col_order = ctx.saved_tensors
        need_x, need_xa, _, need_b, need_A, need_B = ctx.needs_input_grad[:6]
        scale = ctx.scale
        grad_x = grad_out @ weight if need_x else None
        grad_bias = grad_out.sum(0) if need_b else None
        grad_xa = grad_A = grad_B = None
        if need_xa or need_A or need_B:
            dy_perm = grad_out.index_select(1, row_order).to(lora_A.dtype)
            x_perm = x_adapter.index_select(1, col_order).to(lora_A.dtype) if (need_A or need_B) else None
            dx_perm = dy_perm.new_empty(grad_out.shape[0], weight.shape[1]) if need_xa else None
            grad_A = torch.zeros_like(lora_A) if need_A else None
            grad_B = torch.zeros_like(lora_B) if need_B else None
            blocks = _block_views(weight, lora_A, lora_B, row_order, col_order, ctx.num_blocks)
            for (rows, cols, A_k, B_k, anchor), R_k, C_k in zip(
                blocks,
                torch.tensor_split(row_order, ctx.num_blocks),
                torch.tensor_split(col_order, ctx.num_blocks),
            ):
                if need_xa:
                    torch.matmul(dy_perm[:, rows], (B_k @ A_k) * anchor, out=dx_perm[:, cols])
                if need_A or need_B:
                    h_k = (dy_perm[:, rows].T @ x_perm[:, cols]) * anchor
                    if need_A:
                        grad_A[:, C_k] = B_k.T @ h_k
                    if need_B:
                        grad_B[R_k, :] = h_k @ A_k.T
            if need_xa:
                grad_xa = (dx_perm * scale).index_select(1, inverse_permutation(col_order)).to(x_adapter.dtype)
            if need_A:
                grad_A.mul_(scale)
            if need_B:
                grad_B.mul_(scale)
        return grad_x, grad_xa, None, grad_bias, grad_A, grad_B, None, None, None, None


def smoa_linear_blockwise(x, x_adapter, weight, bias, lora_A, lora_B, row_order, col_order, num_blocks, scale):
    """Same signature and result as :func:`smoa_kernels.reference.smoa_linear_reference`, any leading dims."""
    lead = x.shape[:-1]
    y = SMoABlockwiseFunction.apply(
        x.reshape(-1, x.shape[-1]),
        x_adapter.reshape(-1, x.shape[-1]),
        weight,
        bias,
        lora_A,
        lora_B,
        row_order,
        col_order,
        num_blocks,
        float(scale),
    )
    return y.reshape(*lead, weight.shape[0])
