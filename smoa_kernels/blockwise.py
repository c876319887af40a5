"""The fast pure-PyTorch SMoA path (the ``torch`` backend; the CPU/MPS production path).

Works in permuted coordinates (SPEC §3, KERNELS.md §2): gather ``x[:, col_order]`` once, then every block is a
contiguous column band, so only the K diagonal blocks are ever touched — no dense d_out×d_in ΔW, no mask, and the
weight-side gradient costs ``2ND²/K`` instead of ``2ND²``. Per block k, with ``M_k = W0[R_k, C_k]``::

    forward   ΔW_k = (B_k A_k) ⊙ M_k                 y[:, R_k] += s · x_a[:, C_k] ΔW_kᵀ
    backward  dx_a[:, C_k] = s · dY[:, R_k] ΔW_k       (ΔW_k regenerated, never saved)
              H_k  = s · (dY[:, R_k]ᵀ x_a[:, C_k]) ⊙ M_k
              dB_k = H_k A_kᵀ        dA_k = B_kᵀ H_k
    base      y = x W0ᵀ + b,  dx = dY W0,  db = Σ dY

FLOPs per step: (4 + 6/K)·N·D² (the exact floor of KERNELS.md §1) plus O(N·D) gathers. Saved for backward:
``x_a[:, col_order]`` (in the input's dtype, the size of x) and the factors — nothing D²-sized; the per-block ΔW_k
(D²/K² each) lives only inside one loop step, and the scale s is folded into the anchor, the smallest operand.
With no dropout (``x_a is x``) the adapter's input gradient is added in place into the base one.
Precision follows :mod:`smoa_kernels.reference`: base in the input dtype, adapter in the factors' dtype.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from smoa_kernels.blocks import block_bounds

__all__ = ["SMoABlockwiseFunction", "smoa_linear_blockwise"]


def _block_views(weight, lora_A, lora_B, row_order, col_order, num_blocks, scale):
    """Yield ``(R_k, C_k, rows, cols, A_k, B_k, s·M_k)`` per block: original indices, slices in permuted
    coordinates, the block's factors and its anchor gathered in the factors' dtype with the scale folded in (the
    anchor is the smallest operand, |R_k|×|C_k|, so that is where s costs least)."""
    row_bounds = block_bounds(row_order.numel(), num_blocks)
    col_bounds = block_bounds(col_order.numel(), num_blocks)
    for (r0, r1), (c0, c1) in zip(row_bounds, col_bounds):
        R_k, C_k = row_order[r0:r1], col_order[c0:c1]
        anchor = weight.index_select(0, R_k)[:, C_k].to(lora_A.dtype) * scale
        yield R_k, C_k, slice(r0, r1), slice(c0, c1), lora_A[:, C_k], lora_B[R_k, :], anchor


class SMoABlockwiseFunction(torch.autograd.Function):
    """2-D autograd.Function. When ``x_adapter is x`` (no dropout) the whole input gradient is returned on ``x``."""

    @staticmethod
    def forward(ctx, x, x_adapter, weight, bias, lora_A, lora_B, row_order, col_order, num_blocks, scale):
        out = F.linear(x, weight, bias)
        x_perm = x_adapter.index_select(1, col_order)  # kept in the input dtype: saved for backward as is
        x_perm_c = x_perm.to(lora_A.dtype)
        y_perm = x_perm_c.new_empty(x.shape[0], weight.shape[0])
        for _, _, rows, cols, A_k, B_k, anchor in _block_views(
            weight, lora_A, lora_B, row_order, col_order, num_blocks, scale
        ):
            y_perm[:, rows] = x_perm_c[:, cols] @ ((B_k @ A_k) * anchor).T
        out.index_add_(1, row_order, y_perm.to(out.dtype))
        ctx.save_for_backward(x_perm, weight, lora_A, lora_B, row_order, col_order)
        ctx.num_blocks, ctx.scale, ctx.same_input = num_blocks, scale, x_adapter is x
        ctx.x_adapter_dtype = x_adapter.dtype
        device = x.device.type  # backward runs under the forward's autocast state (what custom_bwd does, any device)
        ctx.autocast = (device, torch.get_autocast_dtype(device), torch.is_autocast_enabled(device))
        return out

    @staticmethod
    def backward(ctx, grad_out):
        device, dtype, enabled = ctx.autocast
        with torch.autocast(device_type=device, dtype=dtype, enabled=enabled):
            return SMoABlockwiseFunction._backward(ctx, grad_out)

    @staticmethod
    def _backward(ctx, grad_out):
        x_perm, weight, lora_A, lora_B, row_order, col_order = ctx.saved_tensors
        need_x, need_xa, _, need_b, need_A, need_B = ctx.needs_input_grad[:6]
        grad_x = grad_out @ weight if need_x else None
        grad_bias = grad_out.sum(0) if need_b else None
        grad_xa = grad_A = grad_B = None
        if need_xa or need_A or need_B:
            dy_perm = grad_out.index_select(1, row_order).to(lora_A.dtype)
            x_perm = x_perm.to(lora_A.dtype) if (need_A or need_B) else None
            dx_perm = dy_perm.new_empty(grad_out.shape[0], weight.shape[1]) if need_xa else None
            grad_A = torch.zeros_like(lora_A) if need_A else None
            grad_B = torch.zeros_like(lora_B) if need_B else None
            for R_k, C_k, rows, cols, A_k, B_k, anchor in _block_views(
                weight, lora_A, lora_B, row_order, col_order, ctx.num_blocks, ctx.scale
            ):
                if need_xa:
                    dx_perm[:, cols] = dy_perm[:, rows] @ ((B_k @ A_k) * anchor)
                if need_A or need_B:
                    h_k = (dy_perm[:, rows].T @ x_perm[:, cols]) * anchor
                    if need_A:
                        grad_A[:, C_k] = (B_k.T @ h_k).to(grad_A.dtype)  # autocast may compute in half
                    if need_B:
                        grad_B[R_k, :] = (h_k @ A_k.T).to(grad_B.dtype)
            if need_xa:
                dx_perm = dx_perm.to(ctx.x_adapter_dtype)
                if ctx.same_input and grad_x is not None:  # one tensor: add the adapter part in place, once
                    grad_x.index_add_(1, col_order, dx_perm.to(grad_x.dtype))
                else:
                    grad_xa = dx_perm.new_zeros(dx_perm.shape).index_add_(1, col_order, dx_perm)
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
