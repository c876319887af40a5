"""The Triton kernels of the blocked SMoA path (launched by :mod:`smoa_kernels.triton.blocked`, which says what each
computes and why; built and configured through :mod:`smoa_kernels.triton.configs`' ``KERNEL_CONFIGS``): the ΔW_k /
anchor generation, the scatter, the coalesced band gather, the factor-gradient epilogue and the two-launch order
guard. Plain functions here; ``configs`` turns them into JIT kernels with their shipped configs.
"""

from __future__ import annotations

from smoa_kernels.triton.configs import tl

# ----------------------------------------------------------------------------------------------------------------------
# Kernels
# ----------------------------------------------------------------------------------------------------------------------


def _smoa_delta_blocks_kernel(
    W,
    A_BANDS,
    B_BANDS,
    ROW_ORDER,
    COL_ORDER,
    DW,
    FLAG,
    d_out,
    d_in,
    rank,
    num_blocks,
    scale,
    stride_wo,
    stride_wi,
    stride_at,
    stride_ac,
    stride_bo,
    stride_bt,
    stride_dwo,
    ALIGN_C: tl.constexpr,
    RANK_PAD: tl.constexpr,
    RANK_CHUNK: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    ANCHOR_ONLY: tl.constexpr,
    BLOCK_I: tl.constexpr,
    BLOCK_J: tl.constexpr,
):
    """``DW[r0_k + i, j] = s · (B_k A_k)[i, j] · W0[R_k[i], C_k[j]]`` for block k = program_id(1), in the activation
    dtype: the rank-r_k product (``tl.dot``, rank padded to RANK_PAD ≥ 16), the Hadamard with the gathered anchor and
    the block assembly in one pass. ``A_BANDS = Â[:, col_order]`` in the padded band layout (band k starts at a
    multiple of ALIGN_C), ``B_BANDS = B̂[row_order]``; rows of DW follow the row order (band k at r0_k).
    ``ANCHOR_ONLY``: write the gathered anchor ``M_k`` itself (exact copies of W0's entries, for the factor
    epilogue)."""
    pid = tl.program_id(0)
    k = tl.program_id(1)
    rows_base = d_out // num_blocks
    rows_extra = d_out % num_blocks
    cols_base = d_in // num_blocks
    cols_extra = d_in % num_blocks
    # tensor_split bands: the first `extra` blocks hold one more element.
    row_start = k * rows_base + tl.minimum(k, rows_extra)
    row_size = rows_base + (k < rows_extra).to(tl.int32)
    col_start = k * cols_base + tl.minimum(k, cols_extra)
    col_size = cols_base + (k < cols_extra).to(tl.int32)
    # Padded start of band k in A_BANDS: bands of cols_base + 1 (the first `extra`), then of cols_base, each rounded up.
    long_pad = (cols_base + 1 + ALIGN_C - 1) // ALIGN_C * ALIGN_C
    short_pad = (cols_base + ALIGN_C - 1) // ALIGN_C * ALIGN_C
    col_pad_start = tl.minimum(k, cols_extra) * long_pad + tl.maximum(k - cols_extra, 0) * short_pad
    col_pad_start = tl.multiple_of(col_pad_start, ALIGN_C)  # true by construction of the padded layout
    # The grid covers the largest band; programs past a smaller band are fully masked.
    tiles_j = (cols_base + (cols_extra > 0).to(tl.int32) + BLOCK_J - 1) // BLOCK_J
    pid_i = pid // tiles_j
    pid_j = pid % tiles_j

    local_i = pid_i * BLOCK_I + tl.arange(0, BLOCK_I)
    local_j = pid_j * BLOCK_J + tl.arange(0, BLOCK_J)
    mask_i = local_i < row_size
    mask_j = local_j < col_size
    # Loads and stores of the band layout are masked at the padded band width (a multiple of ALIGN_C, so the masks are
    # uniform over a vector: 128-bit accesses); the padding is allocated and never read as data.
    mask_j_pad = local_j < (col_size + ALIGN_C - 1) // ALIGN_C * ALIGN_C
    band_i = (row_start + local_i).to(tl.int64)
    a_cols = (col_pad_start + local_j).to(tl.int64)

    # The rank-r_k product, RANK_CHUNK ranks at a time (rank padded to RANK_PAD >= 16 with masked loads).
    product = tl.full((BLOCK_I, BLOCK_J), 0.0, tl.float32)
    for t_start in range(0, 0 if ANCHOR_ONLY else RANK_PAD, RANK_CHUNK):
        offs_t = t_start + tl.arange(0, RANK_CHUNK)
        mask_t = offs_t < rank
        b = tl.load(
            B_BANDS + band_i[:, None] * stride_bo + offs_t[None, :] * stride_bt,
            mask=mask_i[:, None] & mask_t[None, :],
            other=0.0,
        )
        a = tl.load(
            A_BANDS + offs_t[:, None] * stride_at + a_cols[None, :] * stride_ac,
            mask=mask_t[:, None] & mask_j_pad[None, :],
            other=0.0,
        )
        product = tl.dot(b, a, product, input_precision=DOT_PRECISION)
    # The anchor gather (the only gather of W0): indices clamped so no order content can address outside W0.
    rows = tl.load(ROW_ORDER + band_i, mask=mask_i, other=0)
    cols = tl.load(COL_ORDER + (col_start + local_j).to(tl.int64), mask=mask_j, other=0)
    rows = tl.minimum(tl.maximum(rows, 0), d_out - 1)
    cols = tl.minimum(tl.maximum(cols, 0), d_in - 1)
    tile_mask = mask_i[:, None] & mask_j[None, :]
    anchor = tl.load(W + rows[:, None] * stride_wo + cols[None, :] * stride_wi, mask=tile_mask, other=0.0)
    flag = tl.load(FLAG)  # the order guard: 1.0, or NaN for a non-permutation order (poisons every use of ΔW / M)
    if ANCHOR_ONLY:
        delta = anchor.to(tl.float32) * flag
    else:
        delta = product * anchor.to(tl.float32) * (scale * flag)  # 0 outside the band (anchor masked to 0)
    store_mask = mask_i[:, None] & (local_j < stride_dwo)[None, :]  # DW's row stride: a multiple of 16
    tl.store(DW + band_i[:, None] * stride_dwo + local_j[None, :], delta.to(DW.dtype.element_ty), mask=store_mask)


def _smoa_scatter_kernel(
    ZT,
    OUT,
    BIAS,
    INV_ORDER,
    n_rows,
    d,
    n_bucket,
    stride_zt,
    stride_on,
    HAS_BIAS: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    """``OUT[n, c] = ZT[INV_ORDER[c], n] (+ BIAS[c])``: un-permute a permuted-coordinate, token-minor product into
    original coordinates. Both sides are coalesced: OUT along its columns c, ZT along tokens n (each ZT row segment of
    BLOCK_N tokens is contiguous); Triton converts between the two layouts in shared memory."""
    pid_n = tl.program_id(0)
    pid_c = tl.program_id(1)
    offs_n = pid_n.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_c = pid_c.to(tl.int64) * BLOCK_C + tl.arange(0, BLOCK_C)
    mask_n = offs_n < n_rows
    mask_c = offs_c < d
    inv = tl.load(INV_ORDER + offs_c, mask=mask_c, other=0)
    inv = tl.minimum(tl.maximum(inv, 0), d - 1)
    tile_mask = mask_n[:, None] & mask_c[None, :]
    # ZT's rows are padded to stride_zt (a multiple of 16) tokens: masking the load there keeps it vectorised
    load_mask = (offs_n < stride_zt)[:, None] & mask_c[None, :]
    value = tl.load(ZT + inv[None, :] * stride_zt + offs_n[:, None], mask=load_mask, other=0.0).to(tl.float32)
    if HAS_BIAS:
        value += tl.load(BIAS + offs_c, mask=mask_c, other=0.0).to(tl.float32)[None, :]
    tl.store(OUT + offs_n[:, None] * stride_on + offs_c[None, :], value.to(OUT.dtype.element_ty), mask=tile_mask)


def _smoa_band_gather_kernel(
    X,
    XT,
    INV_ORDER,
    n_rows,
    d,
    num_blocks,
    n_bucket,
    stride_xn,
    stride_xc,
    stride_xt,
    ALIGN_C: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    """``XT[band_pos(INV_ORDER[c]), n] = X[n, c]``: gather the columns of a token-major activation into token-minor
    padded bands (row p of band k holds column ``order[start_k + p]``), the scatter kernel's pattern in reverse. Both
    sides are coalesced: X along its columns c, XT along tokens n (Triton converts between the two layouts in shared
    memory). Tokens ``n_rows ≤ n < stride_xt`` (XT's row stride, a multiple of 16) are written as zeros, so the store
    mask stays uniform over vectors; padding rows of the bands are never written nor read as data."""
    pid_n = tl.program_id(0)
    pid_c = tl.program_id(1)
    offs_n = pid_n.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_c = pid_c.to(tl.int64) * BLOCK_C + tl.arange(0, BLOCK_C)
    mask_c = offs_c < d
    value = tl.load(X + offs_n[:, None] * stride_xn + offs_c[None, :] * stride_xc,
                    mask=(offs_n < n_rows)[:, None] & mask_c[None, :], other=0.0)  # fmt: skip
    # the sorted position of column c (clamped: no order content can address outside XT), then its band position:
    # tensor_split bands (the first `extra` hold base + 1), each band's start rounded up to a multiple of ALIGN_C
    p = tl.load(INV_ORDER + offs_c, mask=mask_c, other=0)
    p = tl.minimum(tl.maximum(p, 0), d - 1)
    base = d // num_blocks
    extra = d % num_blocks
    long_span = extra * (base + 1)
    k = tl.where(p < long_span, p // (base + 1), extra + (p - long_span) // tl.maximum(base, 1))
    start = k * base + tl.minimum(k, extra)
    long_pad = (base + 1 + ALIGN_C - 1) // ALIGN_C * ALIGN_C
    short_pad = (base + ALIGN_C - 1) // ALIGN_C * ALIGN_C
    pad_start = tl.minimum(k, extra) * long_pad + tl.maximum(k - extra, 0) * short_pad
    rows = pad_start + (p - start)
    store_mask = (offs_n < stride_xt)[:, None] & mask_c[None, :]
    tl.store(XT + rows[None, :] * stride_xt + offs_n[:, None], value, mask=store_mask)


def _smoa_factor_epilogue_kernel(
    G,
    M,
    A_BAND,
    B_BAND,
    DB_PART,
    DA_PART,
    n_band_rows,
    n_band_cols,
    rank,
    cols_per_program,
    scale,
    stride_go,
    stride_mo,
    stride_at,
    stride_bo,
    stride_dbp_split,
    stride_dbp_o,
    stride_dap_tile,
    stride_dap_t,
    RANK_CHUNK: tl.constexpr,
    BLOCK_O: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    """The factor gradient of one chunk of a block's rows from ``G_k = dy_bandᵀ x_band`` (fp32, unit column stride).

    Program (i, j, t) owns row tile i (BLOCK_O rows), RANK_CHUNK ranks and the j-th contiguous range of
    ``cols_per_program`` columns (a multiple of 64, so of BLOCK_C, and the masks stay uniform over vectors):
    ``H = s·G ⊙ M_k`` (the anchor ``M_k = W0[R_k, C_k]`` read contiguous from the buffer the generation kernel
    gathered it into), ``Σ_c H Aᵀ`` for its rows into ``DB_PART[j, rows]`` and ``B_kᵀ H`` for its rows into
    ``DA_PART[i, :, cols]``. Every slot is written once per launch (nothing accumulates into earlier values, so
    autotuning trials and reruns need no reset); the launcher sums both partial buffers over their first axis:
    deterministic, no atomics. fp32 throughout."""
    pid = tl.program_id(0)
    pid_c = tl.program_id(1)
    local_o = pid * BLOCK_O + tl.arange(0, BLOCK_O)
    mask_o = local_o < n_band_rows
    offs_t = tl.program_id(2) * RANK_CHUNK + tl.arange(0, RANK_CHUNK)  # this program's ranks
    mask_t = offs_t < rank
    n_cols_pad = (n_band_cols + 15) // 16 * 16  # A_BAND is a view into the padded band layout
    col_lo = pid_c * cols_per_program
    local_o64 = local_o.to(tl.int64)
    b = tl.load(
        B_BAND + local_o64[:, None] * stride_bo + offs_t[None, :], mask=mask_o[:, None] & mask_t[None, :], other=0.0
    )
    grad_b = tl.full((BLOCK_O, RANK_CHUNK), 0.0, tl.float32)
    for c_start in range(0, cols_per_program, BLOCK_C):
        local_c = col_lo + c_start + tl.arange(0, BLOCK_C)
        mask_c = local_c < n_band_cols
        tile_mask = mask_o[:, None] & mask_c[None, :]
        g = tl.load(G + local_o64[:, None] * stride_go + local_c[None, :], mask=tile_mask, other=0.0)
        pad_mask = local_c < n_cols_pad
        m_mask = mask_o[:, None] & pad_mask[None, :]
        anchor = tl.load(M + local_o64[:, None] * stride_mo + local_c[None, :], mask=m_mask, other=0.0)
        h = g * anchor.to(tl.float32) * scale
        a = tl.load(
            A_BAND + offs_t[:, None] * stride_at + local_c[None, :],
            mask=mask_t[:, None] & pad_mask[None, :],
            other=0.0,
        )
        grad_b = tl.dot(h, tl.trans(a), grad_b, input_precision="ieee")
        grad_a = tl.dot(tl.trans(b), h, input_precision="ieee")
        tl.store(
            DA_PART + pid.to(tl.int64) * stride_dap_tile + offs_t[:, None] * stride_dap_t + local_c[None, :],
            grad_a,
            mask=mask_t[:, None] & mask_c[None, :],
        )
    tl.store(
        DB_PART + pid_c.to(tl.int64) * stride_dbp_split + local_o64[:, None] * stride_dbp_o + offs_t[None, :],
        grad_b,
        mask=mask_o[:, None] & mask_t[None, :],
    )


def _smoa_orders_kernel(
    FLAG,
    ROW_ORDER,
    COL_ORDER,
    ROW_OUT,
    COL_OUT,
    INV_ROW,
    INV_COL,
    d_out,
    d_in,
    BLOCK: tl.constexpr,
):
    """The order guard, first launch: both orders clamped into range (``ROW_OUT``, ``COL_OUT``) and inverted
    (``INV[clamped[p]] = p``), BLOCK positions per program (programs over the row order, then over the column order);
    program 0 sets ``FLAG`` = 1.0. The check is a second launch (:func:`_smoa_orders_check_kernel`): the inverses are
    complete only when every program of this one has run."""
    pid = tl.program_id(0)
    tiles_row = (d_out + BLOCK - 1) // BLOCK
    if pid == 0:
        tl.store(FLAG, 1.0)
    if pid < tiles_row:
        p = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        m = p < d_out
        o = tl.load(ROW_ORDER + p, mask=m, other=0)
        c = tl.minimum(tl.maximum(o, 0), d_out - 1)
        tl.store(ROW_OUT + p, c, mask=m)
        tl.store(INV_ROW + c, p, mask=m)
    else:
        p = (pid - tiles_row).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        m = p < d_in
        o = tl.load(COL_ORDER + p, mask=m, other=0)
        c = tl.minimum(tl.maximum(o, 0), d_in - 1)
        tl.store(COL_OUT + p, c, mask=m)
        tl.store(INV_COL + c, p, mask=m)


def _smoa_orders_check_kernel(
    FLAG,
    ROW_ORDER,
    COL_ORDER,
    ROW_OUT,
    COL_OUT,
    INV_ROW,
    INV_COL,
    d_out,
    d_in,
    BLOCK: tl.constexpr,
):
    """The order guard, second launch (same grid): ``FLAG`` = NaN wherever an order is not a permutation — an entry
    that needed clamping, or whose clamped value's inverse does not map back to its position (a repeated index).
    Every program that finds a defect stores the same NaN, so the races are benign; nothing else writes FLAG here."""
    pid = tl.program_id(0)
    tiles_row = (d_out + BLOCK - 1) // BLOCK
    if pid < tiles_row:
        p = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        m = p < d_out
        o = tl.load(ROW_ORDER + p, mask=m, other=0)
        c = tl.load(ROW_OUT + p, mask=m, other=0)
        back = tl.load(INV_ROW + c, mask=m, other=0)
    else:
        p = (pid - tiles_row).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        m = p < d_in
        o = tl.load(COL_ORDER + p, mask=m, other=0)
        c = tl.load(COL_OUT + p, mask=m, other=0)
        back = tl.load(INV_COL + c, mask=m, other=0)
    tl.store(FLAG + p * 0, float("nan"), mask=m & ((o != c) | (back != p)))
