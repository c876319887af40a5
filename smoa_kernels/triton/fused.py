"""The fused single-pass SMoA GEMM (original coordinates): forward ``y = x W0ᵀ + b + s·x_a ΔWᵀ`` and dX, with the ΔW
tile generated in registers from the W0 tile the GEMM loads anyway (see the package docstring)."""

from __future__ import annotations

import torch

from smoa_kernels.triton import configs
from smoa_kernels.triton.configs import tl, triton


def _smoa_gemm_kernel(
    X,
    XA,
    OUT,
    BIAS,
    W,
    U,
    V,
    IDS_OUT,
    IDS_RED,
    n_rows,
    d_out,
    d_red,
    rank,
    n_bucket,
    scale,
    stride_xn,
    stride_xr,
    stride_xan,
    stride_xar,
    stride_on,
    stride_oo,
    stride_wo,
    stride_wr,
    stride_uo,
    stride_ut,
    stride_vt,
    stride_vr,
    HAS_BASE: tl.constexpr,
    XA_IS_X: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    MERGED: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    RANK_PAD: tl.constexpr,
    BLOCK_O: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_R: tl.constexpr,
    GROUP_O: tl.constexpr,
):
    """``OUT[n,o] = Σ_r X[n,r] W[o,r] + s Σ_r XA[n,r] ΔW[o,r] + bias[o]``, ``ΔW[o,r] = (U V)[o,r] W[o,r] [same blk]``.

    Forward: (X, W, U, V, IDS_OUT, IDS_RED) = (x, W0, B̂, Â, blk_row, blk_col). dX: (dY, W0ᵀ, Âᵀ, B̂ᵀ, blk_col, blk_row),
    passed as transposed strides. HAS_BASE=False drops the W0 dot (the dropout case's separate dX_a pass);
    MERGED=True adds ``s·ΔW`` to the W0 tile before a single dot (opt-in fast path, requires XA_IS_X).
    """
    pid = tl.program_id(0)
    num_pid_o = (d_out + BLOCK_O - 1) // BLOCK_O
    num_pid_n = (n_rows + BLOCK_N - 1) // BLOCK_N
    # Grouped ordering (Triton tutorial 03): consecutive programs share weight tiles in L2.
    num_pid_in_group = GROUP_O * num_pid_n
    group_id = pid // num_pid_in_group
    first_pid_o = group_id * GROUP_O
    group_size_o = min(num_pid_o - first_pid_o, GROUP_O)
    pid_o = first_pid_o + ((pid % num_pid_in_group) % group_size_o)
    pid_n = (pid % num_pid_in_group) // group_size_o

    offs_o = pid_o.to(tl.int64) * BLOCK_O + tl.arange(0, BLOCK_O)
    offs_n = pid_n.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_o = offs_o < d_out
    mask_n = offs_n < n_rows
    offs_t = tl.arange(0, RANK_PAD)
    mask_t = offs_t < rank
    dot_dtype = X.dtype.element_ty

    # The out-side factor tile and block ids are loop invariants: load them once.
    u = tl.load(
        U + offs_o[:, None] * stride_uo + offs_t[None, :] * stride_ut, mask=mask_o[:, None] & mask_t[None, :], other=0.0
    ).to(dot_dtype)
    ids_o = tl.load(IDS_OUT + offs_o, mask=mask_o, other=-1)

    acc = tl.full((BLOCK_O, BLOCK_N), 0.0, tl.float32)
    for r_start in range(0, d_red, BLOCK_R):
        offs_r = (r_start + tl.arange(0, BLOCK_R)).to(tl.int64)
        mask_r = offs_r < d_red
        w = tl.load(
            W + offs_o[:, None] * stride_wo + offs_r[None, :] * stride_wr,
            mask=mask_o[:, None] & mask_r[None, :],
            other=0.0,
        )
        # xᵀ tile (BLOCK_R × BLOCK_N): the generated weight tile stays the left operand.
        x_t = tl.load(
            X + offs_n[None, :] * stride_xn + offs_r[:, None] * stride_xr,
            mask=mask_r[:, None] & mask_n[None, :],
            other=0.0,
        )
        v = tl.load(
            V + offs_t[:, None] * stride_vt + offs_r[None, :] * stride_vr,
            mask=mask_t[:, None] & mask_r[None, :],
            other=0.0,
        ).to(dot_dtype)
        ids_r = tl.load(IDS_RED + offs_r, mask=mask_r, other=-2)
        product = tl.dot(u, v, input_precision=DOT_PRECISION)
        same_block = ids_o[:, None] == ids_r[None, :]
        scaled_delta = tl.where(same_block, product * w.to(tl.float32) * scale, 0.0)
        if MERGED:
            w_eff = (w.to(tl.float32) + scaled_delta).to(dot_dtype)
            acc = tl.dot(w_eff, x_t, acc, input_precision=DOT_PRECISION)
        else:
            if HAS_BASE:
                acc = tl.dot(w, x_t, acc, input_precision=DOT_PRECISION)
            if XA_IS_X:
                xa_t = x_t
            else:
                xa_t = tl.load(
                    XA + offs_n[None, :] * stride_xan + offs_r[:, None] * stride_xar,
                    mask=mask_r[:, None] & mask_n[None, :],
                    other=0.0,
                )
            acc = tl.dot(scaled_delta.to(dot_dtype), xa_t, acc, input_precision=DOT_PRECISION)

    if HAS_BIAS:
        acc += tl.load(BIAS + offs_o, mask=mask_o, other=0.0).to(tl.float32)[:, None]
    tl.store(
        OUT + offs_n[None, :] * stride_on + offs_o[:, None] * stride_oo,
        acc.to(OUT.dtype.element_ty),
        mask=mask_o[:, None] & mask_n[None, :],
    )


def _gemm(
    x: torch.Tensor,
    x_adapter: torch.Tensor | None,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    out_factor: torch.Tensor,
    red_factor: torch.Tensor,
    ids_out: torch.Tensor,
    ids_red: torch.Tensor,
    scale: float,
    *,
    transpose: bool,
    has_base: bool,
    merged: bool,
) -> torch.Tensor:
    """Launch ``_smoa_gemm_kernel``. ``transpose=False``: forward (weight d_out×d_in, out_factor B̂ d_out×r_k,
    red_factor Â r_k×d_in). ``transpose=True``: dX (same tensors, read through swapped strides)."""
    n_rows = x.shape[0]
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
    out = torch.empty((n_rows, d_out), dtype=x.dtype, device=x.device)
    if n_rows == 0:
        return out
    if rank == 0:  # r_k = 0: every factor load is masked; give the kernel a real (non-null) pointer anyway
        out_factor = red_factor = torch.zeros((1, 1), dtype=out_factor.dtype, device=x.device)
    xa = x if x_adapter is None else x_adapter

    def grid(meta):
        return (triton.cdiv(d_out, meta["BLOCK_O"]) * triton.cdiv(n_rows, meta["BLOCK_N"]),)

    configs.launch(
        "gemm",
        grid,
        x,
        xa,
        out,
        bias if bias is not None else out,
        weight,
        out_factor,
        red_factor,
        ids_out,
        ids_red,
        n_rows,
        d_out,
        d_red,
        rank,
        configs._n_bucket(n_rows),
        float(scale),
        x.stride(0),
        x.stride(1),
        xa.stride(0),
        xa.stride(1),
        out.stride(0),
        out.stride(1),
        stride_wo,
        stride_wr,
        stride_uo,
        stride_ut,
        stride_vt,
        stride_vr,
        HAS_BASE=has_base,
        XA_IS_X=x_adapter is None,
        HAS_BIAS=bias is not None,
        MERGED=merged,
        DOT_PRECISION=configs._dot_precision(x.dtype),
        RANK_PAD=configs._rank_pad(rank),
    )
    return out
