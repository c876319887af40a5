"""The fused single-pass SMoA GEMM for small N (original coordinates): one pass over W0 per call.

Math. Forward ``y = x W0ᵀ + b + s·x_a ΔWᵀ`` with ``ΔW = (B̂ Â) ⊙ W0 ⊙ [blk_row[o] == blk_col[c]]`` (SPEC §3); dX
``dY (W0 + s·ΔW)`` with the same tensors read through swapped strides; ``has_base=False`` gives ``s·dY ΔW`` alone (the
dropout case's dX_a); ``merged=True`` forms ``W0 + s·ΔW`` before one dot. Per output tile the kernel streams W0 tiles
(BLOCK_O × BLOCK_R) and activation tiles, and generates the s·ΔW tile in registers from the W0 tile it loads anyway.

Design (what makes the loop cheap):
- Block-extended factors, built once per call by the launcher in the activation dtype: ``U[o, k·r_k + t] =
  s·B̂[o, t]·[blk_row[o] = k]`` (d_out × RANK_PAD) and ``V[k·r_k + t, c] = Â[t, c]·[blk_col[c] = k]`` (RANK_PAD ×
  d_red, rows padded to 16 elements), zero-padded to RANK_PAD = next_pow2(max(K·r_k, 16)). Then ``U V = s·(B̂Â) ⊙
  blockmask`` exactly, so the loop has no block ids, no compare/select, no scale multiply and no fp32 → 16-bit
  conversion of factor tiles; every load is a contiguous, 16-byte aligned row (cp.async, no scalar 16-bit loads).
  Price: the rank product has K·r_k (= the total rank r) instead of r_k columns: r/(2·BLOCK_N) of the main dots'
  tensor-core work, hidden at small N, where W0 traffic bounds the kernel.
- Per iteration: ``P = U_tile · V_tile`` (one small dot), ``Δ = P ⊙ W0_tile`` in the activation dtype (packed
  HMUL2: P and the product are each rounded once, so the tile's error is relative to ΔW, not to W0), then
  ``acc += W0_tile · xᵀ`` and ``acc_Δ += Δ · x_aᵀ`` into two accumulators. Two accumulators make both big dots
  "properly async" for Triton's wgmma pipeliner (a dot whose result feeds another dot in the same iteration gets a
  full drain after it); they are summed after the loop.
- Small-N tiles (32 output rows) compile to mma.sync on sm_90 as on sm_80: no warpgroup waits at all. The 64/128-row
  tiles use wgmma and keep one drain per iteration: the rank product's result feeds the Hadamard, which Triton 3.9
  only allows after ``wgmma.wait_group 0``.
- ``tl.assume(d_red > 0)``: without it the zero-trip path initialises the accumulators outside the loop and ptxas
  serialises every wgmma of the transposed pass (C7515). The launcher handles d_red = 0 itself.
The measured static figures (registers, spills, CTAs/SM, MMA and other instructions per iteration, waits) are in the
docs/kernels.md, "The fused small-N kernel".
"""

from __future__ import annotations

import functools

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
    n_rows,
    d_out,
    d_red,
    rank,
    n_bucket,
    stride_xn,
    stride_xr,
    stride_xan,
    stride_xar,
    stride_on,
    stride_oo,
    stride_wo,
    stride_wr,
    stride_uo,
    stride_vt,
    HAS_BASE: tl.constexpr,
    XA_IS_X: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    MERGED: tl.constexpr,
    W_T: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    RANK_PAD: tl.constexpr,
    BLOCK_O: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_R: tl.constexpr,
    GROUP_O: tl.constexpr,
):
    """``OUT[n,o] = Σ_r X[n,r] W[o,r] + Σ_r XA[n,r] P[o,r] W[o,r] + bias[o]``, ``P = U V`` (module docstring).

    Forward: (X, W, U, V) = (x, W0, U(B̂), V(Â)); dX: (dY, W0ᵀ via strides, U(Âᵀ), V(B̂ᵀ)). ``rank`` (r_k) is only
    read by the autotuner's pruning; ``W_T`` (W read transposed) and the other flags are in the autotune key.
    """
    pid = tl.program_id(0)
    num_pid_o = (d_out + BLOCK_O - 1) // BLOCK_O
    num_pid_n = (n_rows + BLOCK_N - 1) // BLOCK_N
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
    offs_k = tl.arange(0, BLOCK_R)
    dot_dtype = X.dtype.element_ty

    u = tl.load(U + offs_o[:, None] * stride_uo + offs_t[None, :], mask=mask_o[:, None], other=0.0)
    w_ptrs = W + offs_o[:, None] * stride_wo + offs_k[None, :] * stride_wr
    x_ptrs = X + offs_n[None, :] * stride_xn + offs_k[:, None] * stride_xr
    xa_ptrs = XA + offs_n[None, :] * stride_xan + offs_k[:, None] * stride_xar
    v_ptrs = V + offs_t[:, None] * stride_vt + offs_k[None, :]

    acc = tl.full((BLOCK_O, BLOCK_N), 0.0, tl.float32)
    acc_d = tl.full((BLOCK_O, BLOCK_N), 0.0, tl.float32)
    tl.assume(d_red > 0)  # the launcher never launches d_red = 0: no zero-trip path (ptxas C7515 serialised it)
    for r_start in range(0, d_red, BLOCK_R):
        mask_r = offs_k < d_red - r_start
        v = tl.load(v_ptrs, mask=mask_r[None, :], other=0.0)
        p = tl.dot(u, v, input_precision=DOT_PRECISION)
        w = tl.load(w_ptrs, mask=mask_o[:, None] & mask_r[None, :], other=0.0)
        x_t = tl.load(x_ptrs, mask=mask_r[:, None] & mask_n[None, :], other=0.0)
        delta = p.to(dot_dtype) * w
        if MERGED:
            acc = tl.dot(w + delta, x_t, acc, input_precision=DOT_PRECISION)
        else:
            if XA_IS_X:
                xa_t = x_t
            else:
                xa_t = tl.load(xa_ptrs, mask=mask_r[:, None] & mask_n[None, :], other=0.0)
            acc_d = tl.dot(delta, xa_t, acc_d, input_precision=DOT_PRECISION)
            if HAS_BASE:
                acc = tl.dot(w, x_t, acc, input_precision=DOT_PRECISION)
        v_ptrs += BLOCK_R
        w_ptrs += BLOCK_R * stride_wr
        x_ptrs += BLOCK_R * stride_xr
        xa_ptrs += BLOCK_R * stride_xar

    acc += acc_d
    if HAS_BIAS:
        acc += tl.load(BIAS + offs_o, mask=mask_o, other=0.0).to(tl.float32)[:, None]
    tl.store(
        OUT + offs_n[None, :] * stride_on + offs_o[:, None] * stride_oo,
        acc.to(OUT.dtype.element_ty),
        mask=mask_o[:, None] & mask_n[None, :],
    )


def _smoa_fused_operands_kernel(
    U,
    V,
    OUT_FACTOR,
    RED_FACTOR,
    IDS_OUT,
    IDS_RED,
    FLAG,
    d_out,
    d_red,
    rank,
    num_blocks,
    scale,
    stride_fo,
    stride_ft,
    stride_rt,
    stride_rc,
    stride_u,
    stride_v,
    red_pad,
    POSITIONS: tl.constexpr,
    RANK_PAD: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """The fused GEMM's block-extended factors in one launch (``fused`` module docstring), every element written:
    ``U[o, k·r + t] = s·flag·F_out[o, t]·[blk_out(o) = k]``, ``V[k·r + t, c] = F_red[t, c]·[blk_red(c) = k]``, zeros
    in the padding (columns of U and rows of V past K·r, columns of V past d_red). ``POSITIONS``: ``IDS[i]`` is the
    position of coordinate i in its order (an inverse order) and ``blk(i)`` its tensor_split band, computed here (no
    block-id buffers); else ``IDS`` holds the block ids themselves. Either is clamped into range first.
    Programs ``[0, cdiv(d_out, BLOCK))`` write rows of U, the rest columns of V. ``flag`` (1.0, or NaN unless both
    orders are permutations) poisons every row of U, so every entry of ``U V`` is NaN for a bad order."""
    pid = tl.program_id(0)
    programs_u = (d_out + BLOCK - 1) // BLOCK
    j = tl.arange(0, RANK_PAD)  # column of U / row of V
    k_j = j // tl.maximum(rank, 1)
    t_j = j - k_j * rank
    live_j = j < num_blocks * rank
    flag = tl.load(FLAG)
    if pid < programs_u:
        n = d_out
        offs = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        inv = tl.load(IDS_OUT + offs, mask=offs < n, other=0)
    else:
        n = d_red
        offs = (pid - programs_u).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        inv = tl.load(IDS_RED + offs, mask=offs < n, other=0)
    if POSITIONS:
        p = tl.minimum(tl.maximum(inv, 0), n - 1)
        base = n // num_blocks
        extra = n % num_blocks
        long_span = extra * (base + 1)
        blk = tl.where(p < long_span, p // (base + 1), extra + (p - long_span) // tl.maximum(base, 1))
    else:
        blk = tl.minimum(tl.maximum(inv, 0), num_blocks - 1)
    hit = (blk[:, None] == k_j[None, :]) & live_j[None, :] & (offs < n)[:, None]
    if pid < programs_u:
        f = tl.load(OUT_FACTOR + offs[:, None] * stride_fo + t_j[None, :] * stride_ft, mask=hit, other=0.0)
        value = tl.where(hit, f.to(tl.float32) * (scale * flag), 0.0)
        tl.store(U + offs[:, None] * stride_u + j[None, :], value.to(U.dtype.element_ty), mask=(offs < d_out)[:, None])
    else:
        f = tl.load(RED_FACTOR + t_j[None, :] * stride_rt + offs[:, None] * stride_rc, mask=hit, other=0.0)
        value = tl.where(hit, f.to(tl.float32), 0.0)
        tl.store(
            V + j[None, :] * stride_v + offs[:, None], value.to(V.dtype.element_ty), mask=(offs < red_pad)[:, None]
        )


@functools.cache
def _one(device: torch.device) -> torch.Tensor:
    return torch.ones((), dtype=torch.float32, device=device)  # the flag of a call without an order guard


def _block_factors(out_factor, red_factor, ids_out, ids_red, scale, num_blocks, rank_pad, dtype, red_pad, flag=None,
                   positions=False):  # fmt: skip
    """The block-extended factors (module docstring): U (d_out × rank_pad), V (rank_pad × red_pad), contiguous, in
    ``dtype``, with ``U V[:, :d_red] = s·(out_factor red_factor) ⊙ [blk_out == blk_red]`` and zeros elsewhere, in one
    launch (``_smoa_fused_operands_kernel``). ``ids_*``: block ids, or with ``positions`` the inverse orders (block ids
    computed in the kernel). ``flag`` (a 0-d fp32 tensor, 1.0 or NaN): multiplied into U (a NaN in every row of U
    makes every entry of U V NaN)."""
    d_out, rank = out_factor.shape
    d_red = red_factor.shape[1]
    device = out_factor.device
    u = torch.empty((d_out, rank_pad), dtype=dtype, device=device)
    v = torch.empty((rank_pad, red_pad), dtype=dtype, device=device)
    flag = _one(device) if flag is None else flag

    def grid(meta):
        return (triton.cdiv(d_out, meta["BLOCK"]) + triton.cdiv(red_pad, meta["BLOCK"]),)

    configs.launch("fused_operands", grid, u, v, out_factor, red_factor, ids_out, ids_red, flag, d_out, d_red, rank,
                   num_blocks, float(scale), out_factor.stride(0), out_factor.stride(1), red_factor.stride(0),
                   red_factor.stride(1), u.stride(0), v.stride(0), red_pad, POSITIONS=positions,
                   RANK_PAD=rank_pad)  # fmt: skip
    return u, v


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
    num_blocks: int | None = None,
    flag: torch.Tensor | None = None,
    positions: bool = False,
) -> torch.Tensor:
    """Launch ``_smoa_gemm_kernel``. ``transpose=False``: forward (weight d_out×d_in, out_factor B̂ d_out×r_k,
    red_factor Â r_k×d_in, ids = blk_row / blk_col). ``transpose=True``: dX (same tensors, read through swapped
    strides; pass Â, B̂, blk_col, blk_row). ``num_blocks`` (K): pass it to avoid a device-to-host sync (``ids.max()``).
    ``flag``: the order guard's 0-d poison flag (1.0 or NaN), multiplied into the block-extended U. ``positions``:
    ``ids_out`` / ``ids_red`` are the inverse orders (positions), not block ids (``num_blocks`` is then required).

    Per call (no per-tile work): the block-extended factors U, V (module docstring) in the activation dtype, and x /
    x_a made contiguous if their last stride is not 1 (N·d elements, small next to W0 at small N)."""
    n_rows = x.shape[0]
    if transpose:
        d_out, d_red = weight.shape[1], weight.shape[0]
        stride_wo, stride_wr = weight.stride(1), weight.stride(0)
        out_factor, red_factor = out_factor.t(), red_factor.t()  # U side: Âᵀ (d_in × r_k); V side: B̂ᵀ
    else:
        d_out, d_red = weight.shape
        stride_wo, stride_wr = weight.stride(0), weight.stride(1)
    out = torch.empty((n_rows, d_out), dtype=x.dtype, device=x.device)
    if n_rows == 0 or d_out == 0:
        return out
    if d_red == 0:  # an empty reduction: the kernel assumes at least one iteration
        return out.copy_((bias if bias is not None else out.new_zeros(d_out)).expand(n_rows, d_out))
    if num_blocks is None:
        num_blocks = int(max(int(ids_out.max()), int(ids_red.max()))) + 1 if ids_out.numel() else 1
    rank = out_factor.shape[1]
    rank_pad = configs._rank_pad(num_blocks * rank)
    red_pad = -(-d_red // 16) * 16
    u, v = _block_factors(out_factor, red_factor, ids_out, ids_red, float(scale), num_blocks, rank_pad, x.dtype,
                          red_pad, flag, positions)  # fmt: skip
    if x.stride(-1) != 1:
        x = x.contiguous()
    xa = x if x_adapter is None else (x_adapter if x_adapter.stride(-1) == 1 else x_adapter.contiguous())

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
        u,
        v,
        n_rows,
        d_out,
        d_red,
        rank,
        configs._n_bucket(n_rows),
        x.stride(0),
        x.stride(1),
        xa.stride(0),
        xa.stride(1),
        out.stride(0),
        out.stride(1),
        stride_wo,
        stride_wr,
        u.stride(0),
        v.stride(0),
        HAS_BASE=has_base,
        XA_IS_X=x_adapter is None,
        HAS_BIAS=bias is not None,
        MERGED=merged,
        W_T=transpose,
        DOT_PRECISION=configs._dot_precision(x.dtype),
        RANK_PAD=rank_pad,
    )
    return out
