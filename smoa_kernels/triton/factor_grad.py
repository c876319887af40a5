"""The factor gradient ``dÂ``, ``dB̂`` from the diagonal blocks of ``G = dYᵀ x_a`` (permuted coordinates, G never
written; deterministic partial buffers + one sum)."""

from __future__ import annotations

import torch

from smoa_kernels.triton import configs
from smoa_kernels.triton.configs import tl, triton


def _smoa_factor_grad_kernel(
    DY_PERM,
    XA_PERM,
    W,
    A,
    B,
    ROW_ORDER,
    COL_ORDER,
    DA_PART,
    DB_PART,
    n_rows,
    d_out,
    d_in,
    rank,
    num_blocks,
    n_bucket,
    scale,
    stride_dyn,
    stride_dyo,
    stride_xn,
    stride_xc,
    stride_wo,
    stride_wc,
    stride_at,
    stride_ac,
    stride_bo,
    stride_bt,
    stride_dap_tile,
    stride_dap_t,
    stride_dap_c,
    stride_dbp_tile,
    stride_dbp_o,
    stride_dbp_t,
    DOT_PRECISION: tl.constexpr,
    RANK_PAD: tl.constexpr,
    RANK_CHUNK: tl.constexpr,
    BLOCK_O: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """One (row tile, column tile) of diagonal block k = program_id(1), in permuted coordinates.

    ``G = dY_permᵀ x_a,perm`` over all N, then ``H = s·G ⊙ W0[row_order, col_order]`` and the contractions
    ``DB_PART[col_tile, row_order[i], :] = H Âᵀ`` and ``DA_PART[row_tile, :, col_order[c]] = B̂ᵀ H`` (G never stored).
    """
    pid = tl.program_id(0)
    k = tl.program_id(1)
    rows_base = d_out // num_blocks
    rows_extra = d_out % num_blocks
    cols_base = d_in // num_blocks
    cols_extra = d_in % num_blocks
    # Block k's bands in the sorted orders (tensor_split: the first `extra` blocks hold one more).
    row_start = k * rows_base + tl.minimum(k, rows_extra)
    row_size = rows_base + (k < rows_extra).to(tl.int32)
    col_start = k * cols_base + tl.minimum(k, cols_extra)
    col_size = cols_base + (k < cols_extra).to(tl.int32)
    # The grid covers the largest band; programs past a smaller band are fully masked.
    tiles_c_max = (cols_base + (cols_extra > 0).to(tl.int32) + BLOCK_C - 1) // BLOCK_C
    pid_o = pid // tiles_c_max
    pid_c = pid % tiles_c_max

    local_o = pid_o * BLOCK_O + tl.arange(0, BLOCK_O)
    local_c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    mask_o = local_o < row_size
    mask_c = local_c < col_size
    perm_o = (row_start + local_o).to(tl.int64)
    perm_c = (col_start + local_c).to(tl.int64)

    acc = tl.full((BLOCK_O, BLOCK_C), 0.0, tl.float32)
    for n_start in range(0, n_rows, BLOCK_N):
        offs_n = (n_start + tl.arange(0, BLOCK_N)).to(tl.int64)
        mask_n = offs_n < n_rows
        dy_t = tl.load(
            DY_PERM + offs_n[None, :] * stride_dyn + perm_o[:, None] * stride_dyo,
            mask=mask_o[:, None] & mask_n[None, :],
            other=0.0,
        )
        xa = tl.load(
            XA_PERM + offs_n[:, None] * stride_xn + perm_c[None, :] * stride_xc,
            mask=mask_n[:, None] & mask_c[None, :],
            other=0.0,
        )
        acc = tl.dot(dy_t, xa, acc, input_precision=DOT_PRECISION)

    # Epilogue: original coordinates of this tile, then H = s·G ⊙ W0 and the two factor contractions.
    rows = tl.load(ROW_ORDER + perm_o, mask=mask_o, other=0)
    cols = tl.load(COL_ORDER + perm_c, mask=mask_c, other=0)
    tile_mask = mask_o[:, None] & mask_c[None, :]
    anchor = tl.load(W + rows[:, None] * stride_wo + cols[None, :] * stride_wc, mask=tile_mask, other=0.0)
    h = acc * anchor.to(tl.float32) * scale
    # The contractions walk the rank in chunks of RANK_CHUNK (16, the smallest dot) so the operand tiles do not grow
    # with r_k. For the common r_k <= 16 the bound is a constant and the single-iteration loop folds away (a real
    # loop, or several unrolled chunks, costs registers and spills).
    if RANK_PAD == RANK_CHUNK:
        rank_stop = RANK_CHUNK
    else:
        rank_stop = rank
    for t_start in range(0, rank_stop, RANK_CHUNK):
        offs_t = t_start + tl.arange(0, RANK_CHUNK)
        mask_t = offs_t < rank
        a = tl.load(
            A + offs_t[:, None] * stride_at + cols[None, :] * stride_ac,
            mask=mask_t[:, None] & mask_c[None, :],
            other=0.0,
        ).to(tl.float32)
        b = tl.load(
            B + rows[:, None] * stride_bo + offs_t[None, :] * stride_bt,
            mask=mask_o[:, None] & mask_t[None, :],
            other=0.0,
        ).to(tl.float32)
        grad_b = tl.dot(h, tl.trans(a), input_precision="ieee")
        grad_a = tl.dot(tl.trans(b), h, input_precision="ieee")
        tl.store(
            DB_PART
            + pid_c.to(tl.int64) * stride_dbp_tile
            + rows[:, None] * stride_dbp_o
            + offs_t[None, :] * stride_dbp_t,
            grad_b,
            mask=mask_o[:, None] & mask_t[None, :],
        )
        tl.store(
            DA_PART
            + pid_o.to(tl.int64) * stride_dap_tile
            + offs_t[:, None] * stride_dap_t
            + cols[None, :] * stride_dap_c,
            grad_a,
            mask=mask_t[:, None] & mask_c[None, :],
        )


def _factor_grads(
    grad_out: torch.Tensor,
    x_adapter: torch.Tensor,
    weight: torch.Tensor,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    row_order: torch.Tensor,
    col_order: torch.Tensor,
    num_blocks: int,
    scale: float,
    *,
    dy_perm: torch.Tensor | None = None,
    xa_perm: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(dÂ, dB̂)`` from the diagonal blocks of ``G = dYᵀ x_a`` (deterministic: partial buffers + one sum).

    ``dy_perm`` / ``xa_perm``: the already gathered ``dY[:, row_order]`` / ``x_a[:, col_order]`` (the permuted path
    has them); ``x_adapter`` may then be None."""
    n_rows = grad_out.shape[0]
    d_out, d_in = weight.shape
    rank = lora_A.shape[0]
    if n_rows == 0 or rank == 0:
        return torch.zeros_like(lora_A), torch.zeros_like(lora_B)
    # One gather each makes every diagonal block a contiguous band (KERNELS.md §2).
    if dy_perm is None:
        dy_perm = grad_out.index_select(1, row_order)
    if xa_perm is None:
        xa_perm = x_adapter.index_select(1, col_order)
    max_rows = -(-d_out // num_blocks)
    max_cols = -(-d_in // num_blocks)
    # Sized for the smallest tiles in the config list, so any autotuned config fits; unused slots stay zero.
    tiles_o = triton.cdiv(max_rows, configs._min_config_block("factor_grad", "BLOCK_O"))
    tiles_c = triton.cdiv(max_cols, configs._min_config_block("factor_grad", "BLOCK_C"))
    da_part = torch.zeros((tiles_o, rank, d_in), dtype=torch.float32, device=grad_out.device)
    db_part = torch.zeros((tiles_c, d_out, rank), dtype=torch.float32, device=grad_out.device)

    def grid(meta):
        return (triton.cdiv(max_rows, meta["BLOCK_O"]) * triton.cdiv(max_cols, meta["BLOCK_C"]), num_blocks)

    configs.launch(
        "factor_grad",
        grid,
        dy_perm,
        xa_perm,
        weight,
        lora_A,
        lora_B,
        row_order,
        col_order,
        da_part,
        db_part,
        n_rows,
        d_out,
        d_in,
        rank,
        num_blocks,
        configs._n_bucket(n_rows),
        float(scale),
        dy_perm.stride(0),
        dy_perm.stride(1),
        xa_perm.stride(0),
        xa_perm.stride(1),
        weight.stride(0),
        weight.stride(1),
        lora_A.stride(0),
        lora_A.stride(1),
        lora_B.stride(0),
        lora_B.stride(1),
        da_part.stride(0),
        da_part.stride(1),
        da_part.stride(2),
        db_part.stride(0),
        db_part.stride(1),
        db_part.stride(2),
        DOT_PRECISION=configs._dot_precision(grad_out.dtype),
        RANK_PAD=configs._rank_pad(rank),
        RANK_CHUNK=configs.MIN_DOT,
    )
    return da_part.sum(0).to(lora_A.dtype), db_part.sum(0).to(lora_B.dtype)
