"""The permuted-coordinate adapter GEMM: ``s·x_a[:, C_k] ΔW_kᵀ`` added into ``y[:, R_k]`` (and its dX twin), diagonal
blocks only, base GEMMs by cuBLAS (see the package docstring)."""

from __future__ import annotations

import torch

from smoa_kernels.triton import configs
from smoa_kernels.triton.configs import tl, triton


def _smoa_perm_adapter_kernel(
    XP,
    OUT,
    W,
    U,
    V,
    OUT_ORDER,
    RED_ORDER,
    n_rows,
    d_out,
    d_red,
    rank,
    num_blocks,
    n_bucket,
    scale,
    stride_xn,
    stride_xr,
    stride_on,
    stride_oo,
    stride_wo,
    stride_wr,
    stride_uo,
    stride_ut,
    stride_vt,
    stride_vr,
    ACCUMULATE: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    RANK_PAD: tl.constexpr,
    BLOCK_O: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_R: tl.constexpr,
):
    """Adapter term only, diagonal blocks only, in permuted coordinates. Block k = program_id(1)::

        OUT[n, OUT_ORDER[p]] (+)= s Σ_{q ∈ band k} XP[n, q] ΔW[OUT_ORDER[p], RED_ORDER[q]]     for p ∈ band k

    with ``ΔW[o, r] = (U V)[o, r] W[o, r]`` (no block mask: every (p, q) of the band pair is in block k). Forward:
    (XP, OUT, W, U, V, OUT_ORDER, RED_ORDER) = (x_a[:, col_order], y, W0, B̂, Â, row_order, col_order); dX:
    (dY[:, row_order], dx or dx_a, W0ᵀ, Âᵀ, B̂ᵀ, col_order, row_order) through transposed strides. ACCUMULATE adds to
    the OUT values already there (the cuBLAS base term); each OUT element belongs to exactly one program.
    """
    pid = tl.program_id(0)
    k = tl.program_id(1)
    out_base = d_out // num_blocks
    out_extra = d_out % num_blocks
    red_base = d_red // num_blocks
    red_extra = d_red % num_blocks
    # Block k's bands in the sorted orders (tensor_split: the first `extra` blocks hold one more).
    out_start = k * out_base + tl.minimum(k, out_extra)
    out_size = out_base + (k < out_extra).to(tl.int32)
    red_start = k * red_base + tl.minimum(k, red_extra)
    red_size = red_base + (k < red_extra).to(tl.int32)
    # The grid covers the largest band; programs past a smaller band are fully masked.
    tiles_o_max = (out_base + (out_extra > 0).to(tl.int32) + BLOCK_O - 1) // BLOCK_O
    pid_o = pid % tiles_o_max
    pid_n = pid // tiles_o_max

    local_o = pid_o * BLOCK_O + tl.arange(0, BLOCK_O)
    mask_o = local_o < out_size
    offs_n = pid_n.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < n_rows
    out_idx = tl.load(OUT_ORDER + (out_start + local_o).to(tl.int64), mask=mask_o, other=0)
    offs_t = tl.arange(0, RANK_PAD)
    mask_t = offs_t < rank
    dot_dtype = XP.dtype.element_ty

    u = tl.load(
        U + out_idx[:, None] * stride_uo + offs_t[None, :] * stride_ut,
        mask=mask_o[:, None] & mask_t[None, :],
        other=0.0,
    ).to(dot_dtype)

    acc = tl.full((BLOCK_O, BLOCK_N), 0.0, tl.float32)
    for r_start in range(0, red_size, BLOCK_R):
        local_r = r_start + tl.arange(0, BLOCK_R)
        mask_r = local_r < red_size
        perm_r = (red_start + local_r).to(tl.int64)
        red_idx = tl.load(RED_ORDER + perm_r, mask=mask_r, other=0)
        w = tl.load(
            W + out_idx[:, None] * stride_wo + red_idx[None, :] * stride_wr,
            mask=mask_o[:, None] & mask_r[None, :],
            other=0.0,
        )
        v = tl.load(
            V + offs_t[:, None] * stride_vt + red_idx[None, :] * stride_vr,
            mask=mask_t[:, None] & mask_r[None, :],
            other=0.0,
        ).to(dot_dtype)
        # Gathered activations: the band is contiguous. xᵀ tile, so the generated weight tile is the left operand.
        xp_t = tl.load(
            XP + offs_n[None, :] * stride_xn + perm_r[:, None] * stride_xr,
            mask=mask_r[:, None] & mask_n[None, :],
            other=0.0,
        )
        product = tl.dot(u, v, input_precision=DOT_PRECISION)
        scaled_delta = product * w.to(tl.float32) * scale
        acc = tl.dot(scaled_delta.to(dot_dtype), xp_t, acc, input_precision=DOT_PRECISION)

    out_ptrs = OUT + offs_n[None, :] * stride_on + out_idx[:, None] * stride_oo
    out_mask = mask_o[:, None] & mask_n[None, :]
    if ACCUMULATE:
        acc += tl.load(out_ptrs, mask=out_mask, other=0.0).to(tl.float32)
    tl.store(out_ptrs, acc.to(OUT.dtype.element_ty), mask=out_mask)


def _perm_adapter(
    x_perm: torch.Tensor,
    out: torch.Tensor,
    weight: torch.Tensor,
    out_factor: torch.Tensor,
    red_factor: torch.Tensor,
    out_order: torch.Tensor,
    red_order: torch.Tensor,
    num_blocks: int,
    scale: float,
    *,
    transpose: bool,
    accumulate: bool,
) -> torch.Tensor:
    """Launch ``_smoa_perm_adapter_kernel`` into ``out`` (original coordinates). ``transpose=False``: forward
    (``x_perm = x_a[:, col_order]``, weight d_out×d_in, out_factor B̂, red_factor Â, out_order = row_order).
    ``transpose=True``: dX (``x_perm = dY[:, row_order]``, same tensors through swapped strides, out_order =
    col_order). ``accumulate=False`` overwrites ``out`` (every element of it is written exactly once)."""
    n_rows = x_perm.shape[0]
    if transpose:
        d_out, d_red = weight.shape[1], weight.shape[0]
        stride_wo, stride_wr = weight.stride(1), weight.stride(0)
        stride_uo, stride_ut = out_factor.stride(1), out_factor.stride(0)  # U = Âᵀ
        stride_vt, stride_vr = red_factor.stride(1), red_factor.stride(0)  # V = B̂ᵀ
        rank = out_factor.shape[0]
    else:
        d_out, d_red = weight.shape
        stride_wo, stride_wr = weight.stride(0), weight.stride(1)
        stride_uo, stride_ut = out_factor.stride(0), out_factor.stride(1)
        stride_vt, stride_vr = red_factor.stride(0), red_factor.stride(1)
        rank = out_factor.shape[1]
    if n_rows == 0:
        return out
    if rank == 0:  # the adapter contributes nothing
        return out if accumulate else out.zero_()
    max_out = -(-d_out // num_blocks)

    def grid(meta):
        return (triton.cdiv(max_out, meta["BLOCK_O"]) * triton.cdiv(n_rows, meta["BLOCK_N"]), num_blocks)

    configs.launch(
        "perm_adapter",
        grid,
        x_perm,
        out,
        weight,
        out_factor,
        red_factor,
        out_order,
        red_order,
        n_rows,
        d_out,
        d_red,
        rank,
        num_blocks,
        configs._n_bucket(n_rows),
        float(scale),
        x_perm.stride(0),
        x_perm.stride(1),
        out.stride(0),
        out.stride(1),
        stride_wo,
        stride_wr,
        stride_uo,
        stride_ut,
        stride_vt,
        stride_vr,
        ACCUMULATE=accumulate,
        DOT_PRECISION=configs._dot_precision(x_perm.dtype),
        RANK_PAD=configs._rank_pad(rank),
    )
    return out
