"""The fast pure-PyTorch SMoA path (the ``torch`` backend; the CPU/MPS production path).

Works block by block in permuted coordinates (SPEC §3, KERNELS.md §2): block k reads the columns ``C_k`` of its input
and writes the rows ``R_k`` of its output, so only the K diagonal blocks are ever touched — no dense d_out×d_in ΔW,
no mask, and the weight-side gradient costs ``2ND²/K`` instead of ``2ND²``. Per block k, with ``M_k = W0[R_k, C_k]``::

    forward   ΔW_k = (B_k A_k) ⊙ M_k                 y[:, R_k] += s · x_a[:, C_k] ΔW_kᵀ
    backward  dx_a[:, C_k] += s · dY[:, R_k] ΔW_k      (ΔW_k regenerated, never saved)
              H_k  = s · (dY[:, R_k]ᵀ x_a[:, C_k]) ⊙ M_k
              dB_k = H_k A_kᵀ        dA_k = B_kᵀ H_k
    base      y = x W0ᵀ + b,  dx = dY W0,  db = Σ dY

FLOPs per step: (4 + 6/K)·N·D² (the exact floor of KERNELS.md §1) plus O(N·D) gathers. Memory: saved for backward
are ``x_a`` itself (``x`` when there is no dropout: nothing new), W0 and the factors — nothing D²-sized, no permuted
copy. Every gathered slice (``x_a[:, C_k]``, ``dY[:, R_k]``, the per-block products) lives only inside one loop step,
so the transient overhead is about N·D/K elements; the scale s is folded into the anchor, the smallest operand.
With no dropout (``x_a is x``) the adapter's input gradient is added in place into the base one.
Precision follows :mod:`smoa_kernels.reference`: base in the input dtype, adapter in the factors' dtype.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from smoa_kernels.blocks import block_bounds

__all__ = ["SMoABlockwiseFunction", "smoa_linear_blockwise"]


def _blocks(weight, lora_A, lora_B, row_order, col_order, num_blocks, scale):
    """Yield ``(R_k, C_k, A_k, B_k, s·M_k)`` per block: original indices, the block's factors and its anchor gathered
    in the factors' dtype with the scale folded in (|R_k|×|C_k|, the smallest operand, where s costs least)."""
    for (r0, r1), (c0, c1) in zip(
        block_bounds(row_order.numel(), num_blocks), block_bounds(col_order.numel(), num_blocks)
    ):
        R_k, C_k = row_order[r0:r1], col_order[c0:c1]
        anchor = weight.index_select(0, R_k)[:, C_k].to(lora_A.dtype) * scale
        yield R_k, C_k, lora_A[:, C_k], lora_B[R_k, :], anchor


class SMoABlockwiseFunction(torch.autograd.Function):
    """2-D autograd.Function. ``x_adapter=None`` means ``x`` itself (no dropout): the whole input gradient is then
    returned on ``x`` (Dynamo cannot trace a Function given the same tensor twice)."""

    @staticmethod
    def forward(ctx, x, x_adapter, weight, bias, lora_A, lora_B, row_order, col_order, num_blocks, scale):
        ctx.same_input = x_adapter is None
        x_adapter = x if x_adapter is None else x_adapter
        out = F.linear(x, weight, bias)
        for R_k, C_k, A_k, B_k, anchor in _blocks(weight, lora_A, lora_B, row_order, col_order, num_blocks, scale):
            x_k = x_adapter.index_select(1, C_k).to(lora_A.dtype)
            out.index_add_(1, R_k, (x_k @ ((B_k @ A_k) * anchor).T).to(out.dtype))
        ctx.save_for_backward(x_adapter, weight, lora_A, lora_B, row_order, col_order)
        ctx.num_blocks, ctx.scale = num_blocks, scale
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
        x_adapter, weight, lora_A, lora_B, row_order, col_order = ctx.saved_tensors
        need_x, need_xa, _, need_b, need_A, need_B = ctx.needs_input_grad[:6]
        need_xa = need_xa or (ctx.same_input and need_x)
        grad_x = grad_out @ weight if need_x else None
        grad_bias = grad_out.sum(0) if need_b else None
        grad_xa = grad_A = grad_B = None
        if need_xa:  # one tensor: the adapter part is added in place into the base gradient
            grad_xa = grad_x if ctx.same_input and grad_x is not None else torch.zeros_like(x_adapter)
        if need_A:
            grad_A = torch.zeros_like(lora_A)
        if need_B:
            grad_B = torch.zeros_like(lora_B)
        if need_xa or need_A or need_B:
            blocks = _blocks(weight, lora_A, lora_B, row_order, col_order, ctx.num_blocks, ctx.scale)
            for R_k, C_k, A_k, B_k, anchor in blocks:
                dy_k = grad_out.index_select(1, R_k).to(lora_A.dtype)
                if need_xa:
                    grad_xa.index_add_(1, C_k, (dy_k @ ((B_k @ A_k) * anchor)).to(grad_xa.dtype))
                if need_A or need_B:
                    h_k = (dy_k.T @ x_adapter.index_select(1, C_k).to(lora_A.dtype)) * anchor
                    if need_A:  # autocast may have computed these in half precision
                        grad_A[:, C_k] = (B_k.T @ h_k).to(grad_A.dtype)
                    if need_B:
                        grad_B[R_k, :] = (h_k @ A_k.T).to(grad_B.dtype)
        if grad_xa is grad_x:
            grad_xa = None
        return grad_x, grad_xa, None, grad_bias, grad_A, grad_B, None, None, None, None


def smoa_linear_blockwise(x, x_adapter, weight, bias, lora_A, lora_B, row_order, col_order, num_blocks, scale):
    """Same signature and result as :func:`smoa_kernels.reference.smoa_linear_reference`, any leading dims."""
    lead = x.shape[:-1]
    x2d = x.reshape(-1, x.shape[-1])
    xa2d = None if x_adapter is x else x_adapter.reshape(-1, x.shape[-1])
    y = SMoABlockwiseFunction.apply(
        x2d, xa2d, weight, bias, lora_A, lora_B, row_order, col_order, num_blocks, float(scale)
    )
    return y.reshape(*lead, weight.shape[0])
