"""Fused Triton kernels for the SMoA linear layer: kernels, launchers, the autograd.Function and the custom ops.

The math (SPEC §2–§4, LoRA-shaped form of §3, ``Â``: r_k×d_in, ``B̂``: d_out×r_k, original coordinates)::

    P  = B̂ Â                                   (rank-r_k product, never materialised beyond one tile)
    ΔW = P ⊙ W0 ⊙ [blk_row[i] == blk_col[c]]    (generated tile by tile in registers)
    y  = x W0ᵀ + b + s · x_a ΔWᵀ                 (x_a = dropout(x), or x itself)

    dx   = dY W0            (+ s · dY ΔW when x_a is x: one fused pass over W0)
    dx_a = s · dY ΔW        (its own pass when dropout gives a distinct x_a)
    H_k  = s · (dY[:, R_k]ᵀ x_a[:, C_k]) ⊙ W0[R_k, C_k]      (diagonal blocks of G = dYᵀ x_a only)
    dB_k = H_k A_kᵀ      dA_k = B_kᵀ H_k      db = Σ_n dY

Design, from ../shared/KERNELS.md's cost model. Forward and dX run in one of two coordinate systems, chosen per call
by ``smoa_linear_triton(..., coordinates=...)``; the factor gradient always runs in permuted coordinates.

* ``coordinates="original"`` (**the default**) — **forward and dX in original coordinates** (``_smoa_gemm_kernel``).
  Each program owns an output tile, walks the reduction dimension and, per step, loads the W0 tile the base GEMM needs
  anyway, the matching ``B̂``/``Â`` tiles (rank padded to ≥ 16 with masked loads) and two int32 block-id vectors, builds
  ``s·ΔW`` in registers (``tl.dot(B̂, Â) * W0``, masked to ``blk_row == blk_col``) and accumulates ``W0·xᵀ + sΔW·x_aᵀ``
  into ONE fp32 accumulator. All loads are coalesced (no gathers, no mask buffer, no d_out×d_in temporary). The weight
  tile is the left-hand ``tl.dot`` operand (``yᵀ_tile = W_tile @ xᵀ_tile``) so Hopper can feed the generated tile from
  registers. dX is the same kernel with the roles of rows and columns swapped (strides transposed), so there is one GEMM
  kernel to tune and to check. Cost: 4·N·D² per pass (base + adapter dot) plus the ΔW regeneration (each weight tile is
  rebuilt by N/BLOCK_N programs: RANK_PAD/BLOCK_N of one dot). The adapter dot touches every tile because the spectral
  orders scatter the blocks over the whole matrix — the price of staying gather-free; the permuted alternative is the
  next item.
* ``coordinates="permuted"`` — **base GEMMs by cuBLAS, adapter on the diagonal blocks only**
  (``_smoa_perm_adapter_kernel``). Forward: ``x_a[:, col_order]`` is gathered once (and saved for backward in place
  of x_a: same size, and it is exactly what the factor gradient reads), ``y = x W0ᵀ + b`` by ``F.linear``, then the
  kernel adds ``s · x_a[:, C_k] ΔW_kᵀ`` into ``y[:, R_k]``. dX: ``dY[:, row_order]`` is gathered once (shared with the
  factor gradient), ``dx = dY W0`` by cuBLAS, and the same kernel (transposed strides) adds ``s · dY[:, R_k] ΔW_k``
  into ``dx[:, C_k]`` (or writes ``dx_a`` when dropout makes it distinct). Programs are (band tile, token tile) ×
  block k; each owns the outputs ``(tokens, R_k[tile])`` and, in its epilogue, reads the base term at those
  (scattered) columns, adds its fp32 accumulator and stores — every output element is written by exactly one
  program, so it is deterministic with no atomics and no separate scatter pass. ``ΔW_k`` sub-tiles are generated in
  registers from W0 loaded at ``(row_order[p], col_order[q])`` (index vectors loaded, pointers computed) and the
  factor rows/columns at the same indices; the gathered activations are contiguous within a band. Bands of unequal
  size (``tensor_split``) are masked; the grid covers the largest band.
* **Step cost**: original: forward 4·N·D², dX 4·N·D², factor gradient 2·N·D²/K, i.e. (8 + 2/K)·N·D² against the
  floor (4 + 6/K)·N·D² of KERNELS.md §1 (1.29× it at K = 2, 1.52× at K = 4), all in Triton GEMMs. Permuted: forward
  2·N·D² (cuBLAS) + 2·N·D²/K, dX the same, factor gradient 2·N·D²/K: exactly the floor (4 + 6/K)·N·D², plus memory
  traffic the original path does not have — the two gathers (2·N·D elements written and read) and the scattered
  read-modify-write of y and dx (2·N·D elements each way) — and W0 sub-tiles loaded element-wise (uncoalesced; each
  diagonal W0 element is reloaded by N/BLOCK_N programs, mostly from L2). The ``merged_weight`` fast path below is
  (4 + 2/K)·N·D² plus the regeneration, original coordinates only.
* ``coordinates="auto"`` picks by :func:`choose_coordinates`: "permuted" when K ≥ 2 and the FLOPs saved per token and
  feature, 2·min(d_in, d_out)·(1 − 1/K), reach ``AUTO_PERMUTED_MIN_SAVED_FLOPS`` = 4096 (the ≈ 4 extra elements moved
  per token and feature cost ≈ 2400 FLOP-equivalents at H100's bf16 ridge of ≈ 300 FLOP/byte; the rest is margin
  for the uncoalesced W0 loads), e.g. D = 4096 at K = 2, D ≥ 2731 at K = 4; otherwise "original". It depends on the
  weight shape and K only (both sides scale linearly in N), so it never adds a guard on N under torch.compile. The
  threshold is modelled, not measured: ``"original"`` stays the default until the ``smoa-triton-perm`` benchmark
  provider has been timed against ``smoa-triton`` on a GPU.
* **The factor gradient runs in permuted coordinates** (``_smoa_factor_grad_kernel``): ``dY[:, row_order]`` and
  ``x_a[:, col_order]`` are gathered once (2·N·D elements), after which the diagonal blocks are contiguous bands and
  only they are computed: 2·N·D²/K FLOPs, K× less than a dense ``dYᵀx``. The G tile never leaves registers: the
  epilogue multiplies it by the (gathered, read once per tile) ``s·W0`` tile and contracts it with the factor tiles
  (``dB̂ += H Âᵀ``, ``dÂ += B̂ᵀ H``), 16 ranks at a time so that r_k > 16 does not grow the operand tiles.
* **torch.compile**: the launches live in ``torch.library`` custom ops (``smoa_kernels::triton_forward`` /
  ``triton_backward``, and ``triton_forward_permuted`` / ``triton_backward_permuted``) with shape-only fake
  implementations, called from the autograd.Function, so a compiled graph
  holds them as opaque nodes (fullgraph works); the block ids are computed with static shapes only.
* **Saved for backward**: ``x_a`` (or ``x`` when they are the same tensor — nothing extra; permuted coordinates:
  ``x_a[:, col_order]`` instead, the same size), W0, the factors, the two orders and (original coordinates) two
  int32 block-id vectors. Nothing D²-sized; ΔW is regenerated in the backward kernels.
* **Determinism**: no kernel uses atomics (the permuted adapter GEMM owns every output element it writes). In the factor
  gradient each program writes its tile's contribution to a partial buffer slot it owns (``dB̂`` partials indexed by
  column tile, ``dÂ`` partials by row tile; fp32, about ``(D/K/BLOCK)·D·r_k`` elements each) and one ``torch.sum``
  reduces them, so results are bitwise reproducible for a given config. Autotuning may pick a different config (hence a
  different summation order) on another run; with ``torch.use_deterministic_algorithms(True)`` the single default config
  is always used. No atomic path is shipped.
* **Precision**: every ``tl.dot`` accumulates in fp32. The big dots take the activation dtype (fp16/bf16 tensor cores);
  the generated ``s·ΔW`` tile is built in fp32 and rounded to the activation dtype only as a dot operand (relative
  error of the adapter term ≈ one ulp of that dtype, never relative to W0 — unlike merging ΔW into W0 first). With
  16-bit activations the factor tiles are rounded to the activation dtype for the rank-r_k product. The factor
  gradient's epilogue (H and its contraction with the factors) runs in fp32 with ``input_precision="ieee"``. For fp32
  activations the dots honour ``torch.backends.cuda.matmul.allow_tf32``: one TF32 dot when True, three ("tf32x3",
  fp32-level error) when False — an FMA-based "ieee" dot spills in every tile tried. The interpreter is always exact.
  Results are cast to the input dtype (outputs, dX) and the factors' dtype (dÂ, dB̂).
* **Opt-in fast path** (``merged_weight=True``, exact only up to rounding when x_a is x): the kernel forms
  ``W_eff = W0 + s·ΔW`` in registers and issues ONE dot per tile (2·N·D² per pass, the frozen layer's cost plus the
  rank regeneration). Rounding W_eff to bf16 drops relative updates below ≈2⁻⁹ of W0, so it is never the default.
* ``db`` and the base ``dY W0`` term when x_a is distinct use cuBLAS through torch (nothing to fuse there); in
  permuted coordinates so do ``x W0ᵀ + b`` and ``dY W0`` always. With 16-bit activations the permuted path rounds
  the base term to the activation dtype before the adapter term is added (one extra rounding of y and dx).

Run the kernels on the CPU with ``TRITON_INTERPRET=1`` (tests/kernels/test_triton_smoa.py). The interpreter mode is
read when a kernel is first launched, not at import, so importing this module never fixes the mode for other code.
"""

from __future__ import annotations

import functools
import os
import types

import torch

from smoa_kernels.blocks import block_ids

try:
    import triton
    import triton.language as tl

    _TRITON_IMPORT_ERROR = ""
except ImportError as _error:  # pragma: no cover - exercised only where triton is missing
    triton = None
    tl = types.SimpleNamespace(constexpr=None)  # keeps the kernel annotations below evaluable
    _TRITON_IMPORT_ERROR = f"triton is not importable ({_error})"

__all__ = [
    "COORDINATES",
    "KERNEL_CONFIGS",
    "SMoATritonFunction",
    "choose_coordinates",
    "is_available",
    "smoa_linear_triton",
]

_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_MIN_DOT = 16  # tl.dot needs every block dimension >= 16 on the GPU


# ----------------------------------------------------------------------------------------------------------------------
# Kernels. They call core builtins only (no @triton.jit helpers such as tl.cdiv or tl.zeros): those are decorated
# when triton is imported, so under an interpreter switched on later they would refuse to run.
# ----------------------------------------------------------------------------------------------------------------------


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


# ----------------------------------------------------------------------------------------------------------------------
# Configs (the one list) and kernel construction
# ----------------------------------------------------------------------------------------------------------------------

# Every config shipped for each kernel. The FIRST entry valid for an activation dtype ("dtypes", optional, restricts
# an entry to those dtypes) is the single config used under TRITON_INTERPRET=1 and with
# torch.use_deterministic_algorithms(True). tools/aot_compile_check.py compiles all of them for sm_80/sm_90 and fails
# on any spill, so a config that spills is removed here (or limited to the dtypes where it does not) rather than
# shipped.
_HALF, _FP32 = ("fp16", "bf16"), ("fp32",)
KERNEL_CONFIGS: dict[str, list[dict]] = {
    # Chosen with tools/aot_compile_check.py. On sm_80 ptxas caps 8-warp programs at 128 registers, so 16-bit tiles use
    # 4 warps where they can; fp32 tiles are twice as large in registers and its 3×TF32 dots need BLOCK_R = 16 (with
    # BLOCK_R = 32 every fp32 tile spills on sm_80). Pruned for spilling: 64×128×32/4 warps (8 B with fp32 factors),
    # 64×64×16/4 warps and 64×128×16/8 warps in fp32, 128×64×16/4 warps (up to 360 B).
    "gemm": [
        {"BLOCK_O": 64, "BLOCK_N": 64, "BLOCK_R": 32, "GROUP_O": 8, "num_warps": 4, "num_stages": 3, "dtypes": _HALF},
        {"BLOCK_O": 128, "BLOCK_N": 64, "BLOCK_R": 16, "GROUP_O": 8, "num_warps": 8, "num_stages": 3, "dtypes": _FP32},
        {"BLOCK_O": 128, "BLOCK_N": 64, "BLOCK_R": 32, "GROUP_O": 8, "num_warps": 4, "num_stages": 3, "dtypes": _HALF},
        {"BLOCK_O": 128, "BLOCK_N": 128, "BLOCK_R": 32, "GROUP_O": 8, "num_warps": 8, "num_stages": 3, "dtypes": _HALF},
    ],
    # Permuted-coordinate adapter GEMM (no base dot, no block mask). Its W0 sub-tiles and output tiles are addressed by
    # loaded index vectors, i.e. one 64-bit pointer per element, which costs registers the "gemm" tiles do not pay: the
    # 4-warp 16-bit tiles of "gemm" spill here (64×64×32: 48–100 B on sm_80, up to 400 B at r_k = 64; 128×64×32: 400+
    # B), so do 128×128×32/8 warps (350–780 B) and 64×64×16/4 warps at r_k = 64; 128×64×32/8 warps spills 80 B on
    # sm_80 for r_k > 16 only, 64×64×32/8 warps 40–56 B in dX with fp32 factors at r_k = 64 on sm_80 (any num_stages).
    # All pruned (or rank-restricted) with tools/aot_compile_check.py.
    "perm_adapter": [
        {"BLOCK_O": 64, "BLOCK_N": 128, "BLOCK_R": 32, "num_warps": 8, "num_stages": 3, "dtypes": _HALF},
        {"BLOCK_O": 128, "BLOCK_N": 64, "BLOCK_R": 16, "num_warps": 8, "num_stages": 3, "dtypes": _FP32},
        {
            "BLOCK_O": 64,
            "BLOCK_N": 64,
            "BLOCK_R": 32,
            "num_warps": 8,
            "num_stages": 3,
            "dtypes": _HALF,
            "max_rank": 16,
        },
        {
            "BLOCK_O": 128,
            "BLOCK_N": 64,
            "BLOCK_R": 32,
            "num_warps": 8,
            "num_stages": 3,
            "dtypes": _HALF,
            "max_rank": 16,
        },
    ],
    # 4 warps spill on sm_80 (the fp32 epilogue contractions); 64×128 spills 4–8 bytes, 128×128 about 1 KB, 128×64
    # spills 16 bytes with fp32 activations (3×TF32) on sm_80 and, for r_k > 16 (the rank loop), in 16-bit too;
    # 64×64 with BLOCK_N = 32 spills 4 bytes on sm_90 for r_k > 16. "max_rank" restricts an entry to r_k <= max_rank.
    "factor_grad": [
        {"BLOCK_O": 64, "BLOCK_C": 64, "BLOCK_N": 16, "num_warps": 8, "num_stages": 3},
        {
            "BLOCK_O": 128,
            "BLOCK_C": 64,
            "BLOCK_N": 32,
            "num_warps": 8,
            "num_stages": 3,
            "dtypes": _HALF,
            "max_rank": 16,
        },
    ],
}
_LAUNCH_OPTIONS = ("num_warps", "num_stages", "dtypes", "max_rank")
_DTYPE_NAMES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}
_RAW_KERNELS = {
    "gemm": _smoa_gemm_kernel,
    "perm_adapter": _smoa_perm_adapter_kernel,
    "factor_grad": _smoa_factor_grad_kernel,
}
_AUTOTUNE_KEYS = {
    "gemm": ["d_out", "d_red", "n_bucket", "rank"],
    "perm_adapter": ["d_out", "d_red", "n_bucket", "rank", "num_blocks"],
    "factor_grad": ["d_out", "d_in", "n_bucket", "rank"],
}
# perm_adapter accumulates into OUT (read-modify-write of the base term): autotuning must restore it between trials.
_RESET_TO_ZERO = {"gemm": None, "perm_adapter": None, "factor_grad": ["DA_PART", "DB_PART"]}
_RESTORE_VALUE = {"gemm": None, "perm_adapter": ["OUT"], "factor_grad": None}
_ACTIVATION_ARG = {"gemm": "X", "perm_adapter": "XP", "factor_grad": "DY_PERM"}


def config_dtypes(entry: dict) -> tuple[str, ...]:
    """Activation dtypes a ``KERNEL_CONFIGS`` entry is shipped for."""
    return entry.get("dtypes", ("fp32", "fp16", "bf16"))


def config_meta(entry: dict) -> dict:
    """The constexpr block sizes of a ``KERNEL_CONFIGS`` entry (without launch options)."""
    return {k: v for k, v in entry.items() if k not in _LAUNCH_OPTIONS}


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


@functools.cache
def jit_kernel(name: str, interpret: bool):
    """The ``@triton.jit`` (or interpreted) kernel ``name``; built on first use so the mode is read at launch time."""
    previous = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "1" if interpret else "0"
    try:
        return triton.jit(_RAW_KERNELS[name])
    finally:
        if previous is None:
            del os.environ["TRITON_INTERPRET"]
        else:
            os.environ["TRITON_INTERPRET"] = previous


@functools.cache
def _autotuned_kernel(name: str):
    configs = []
    for entry in KERNEL_CONFIGS[name]:
        config = triton.Config(config_meta(entry), num_warps=entry["num_warps"], num_stages=entry["num_stages"])
        config.smoa_dtypes, config.smoa_max_rank = config_dtypes(entry), entry.get("max_rank")
        configs.append(config)

    def prune(configs, named_args, **kwargs):
        dtype = _DTYPE_NAMES[named_args[_ACTIVATION_ARG[name]].dtype]
        rank = named_args["rank"]
        return [
            config
            for config in configs
            if dtype in config.smoa_dtypes and (config.smoa_max_rank is None or rank <= config.smoa_max_rank)
        ]

    return triton.autotune(
        configs=configs,
        key=_AUTOTUNE_KEYS[name],
        reset_to_zero=_RESET_TO_ZERO[name],
        restore_value=_RESTORE_VALUE[name],
        prune_configs_by={"early_config_prune": prune},
    )(jit_kernel(name, False))


def default_config(name: str, dtype: torch.dtype) -> dict:
    """The single config of kernel ``name`` for activations of ``dtype``: the first entry shipped for that dtype (and
    for every rank)."""
    return next(
        entry
        for entry in KERNEL_CONFIGS[name]
        if _DTYPE_NAMES[dtype] in config_dtypes(entry) and "max_rank" not in entry
    )


def _launch(name: str, grid, *args, **constexprs) -> None:
    """Launch ``name``: one config (interpreter, deterministic mode) or the autotuned list."""
    if _interpreting() or torch.are_deterministic_algorithms_enabled():
        entry = default_config(name, args[0].dtype)  # args[0]: the activations (X / XP / DY_PERM)
        options = {"num_warps": entry["num_warps"], "num_stages": entry["num_stages"]}
        jit_kernel(name, _interpreting())[grid](*args, **constexprs, **config_meta(entry), **options)
    else:
        _autotuned_kernel(name)[grid](*args, **constexprs)


def _min_config_block(name: str, key: str) -> int:
    return min(entry[key] for entry in KERNEL_CONFIGS[name])


# tl.dot precision for fp32 operands, keyed by torch.backends.cuda.matmul.allow_tf32. Without TF32 the kernels use
# three TF32 products ("tf32x3", error at the level of fp32 rounding) rather than "ieee": an FMA-based fp32 dot spills
# hundreds of bytes of registers in every shipped tile (tools/aot_compile_check.py). 16-bit operands ignore it.
FP32_DOT_PRECISION = {True: "tf32", False: "tf32x3"}


def _dot_precision(dtype: torch.dtype) -> str:
    if dtype != torch.float32 or _interpreting():
        return "ieee"  # the interpreter computes exact fp32 whatever the flag
    return FP32_DOT_PRECISION[bool(torch.backends.cuda.matmul.allow_tf32)]


def _rank_pad(rank: int) -> int:
    return max(_MIN_DOT, triton.next_power_of_2(max(rank, 1)))


def _n_bucket(n_rows: int) -> int:
    return triton.next_power_of_2(max(n_rows, 1))


# ----------------------------------------------------------------------------------------------------------------------
# Host-side launchers (2-D tensors, validated inputs)
# ----------------------------------------------------------------------------------------------------------------------


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

    _launch(
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
        _n_bucket(n_rows),
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
        DOT_PRECISION=_dot_precision(x.dtype),
        RANK_PAD=_rank_pad(rank),
    )
    return out


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

    _launch(
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
        _n_bucket(n_rows),
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
        DOT_PRECISION=_dot_precision(x_perm.dtype),
        RANK_PAD=_rank_pad(rank),
    )
    return out


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
    tiles_o = triton.cdiv(max_rows, _min_config_block("factor_grad", "BLOCK_O"))
    tiles_c = triton.cdiv(max_cols, _min_config_block("factor_grad", "BLOCK_C"))
    da_part = torch.zeros((tiles_o, rank, d_in), dtype=torch.float32, device=grad_out.device)
    db_part = torch.zeros((tiles_c, d_out, rank), dtype=torch.float32, device=grad_out.device)

    def grid(meta):
        return (triton.cdiv(max_rows, meta["BLOCK_O"]) * triton.cdiv(max_cols, meta["BLOCK_C"]), num_blocks)

    _launch(
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
        _n_bucket(n_rows),
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
        DOT_PRECISION=_dot_precision(grad_out.dtype),
        RANK_PAD=_rank_pad(rank),
        RANK_CHUNK=_MIN_DOT,
    )
    return da_part.sum(0).to(lora_A.dtype), db_part.sum(0).to(lora_B.dtype)


# ----------------------------------------------------------------------------------------------------------------------
# Custom ops (opaque to torch.compile; simple fake implementations) and the autograd.Function
# ----------------------------------------------------------------------------------------------------------------------


@torch.library.custom_op("smoa_kernels::triton_forward", mutates_args=())
def _forward_op(
    x: torch.Tensor,
    x_adapter: torch.Tensor | None,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    blk_row: torch.Tensor,
    blk_col: torch.Tensor,
    scale: float,
    merged: bool,
) -> torch.Tensor:
    return _gemm(
        x,
        x_adapter,
        weight,
        bias,
        lora_B,
        lora_A,
        blk_row,
        blk_col,
        scale,
        transpose=False,
        has_base=True,
        merged=merged,
    )


@_forward_op.register_fake
def _(x, x_adapter, weight, bias, lora_A, lora_B, blk_row, blk_col, scale, merged):
    return x.new_empty((x.shape[0], weight.shape[0]))


@torch.library.custom_op("smoa_kernels::triton_backward", mutates_args=())
def _backward_op(
    grad_out: torch.Tensor,
    x_saved: torch.Tensor,
    adapter_is_x: bool,
    weight: torch.Tensor,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    row_order: torch.Tensor,
    col_order: torch.Tensor,
    blk_row: torch.Tensor,
    blk_col: torch.Tensor,
    num_blocks: int,
    scale: float,
    merged: bool,
    needs: list[bool],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(dx, dx_a, db, dÂ, dB̂)``; entries not asked for by ``needs`` are empty tensors."""
    need_x, need_xa, need_bias, need_A, need_B = needs
    grad_out = grad_out.contiguous()
    grad_x = grad_xa = None
    if adapter_is_x:
        if need_x:  # dx = dY W0 + s·dY ΔW in one pass over W0
            grad_x = _gemm(
                grad_out, None, weight, None, lora_A, lora_B, blk_col, blk_row, scale,
                transpose=True, has_base=True, merged=merged,
            )  # fmt: skip
    else:
        if need_x:
            grad_x = grad_out @ weight
        if need_xa:
            grad_xa = _gemm(
                grad_out, None, weight, None, lora_A, lora_B, blk_col, blk_row, scale,
                transpose=True, has_base=False, merged=False,
            )  # fmt: skip
    grad_bias = grad_out.sum(0) if need_bias else None
    grad_A = grad_B = None
    if need_A or need_B:
        grad_A, grad_B = _factor_grads(
            grad_out, x_saved, weight, lora_A, lora_B, row_order, col_order, num_blocks, scale
        )
    # custom ops return tensors only: an unused gradient is a fresh empty tensor (distinct objects, no aliasing).
    grads = (grad_x, grad_xa, grad_bias, grad_A if need_A else None, grad_B if need_B else None)
    return tuple(grad_out.new_empty(0) if g is None else g for g in grads)


@_backward_op.register_fake
def _(grad_out, x_saved, adapter_is_x, weight, lora_A, lora_B, row_order, col_order, blk_row, blk_col, num_blocks,
      scale, merged, needs):  # fmt: skip
    need_x, need_xa, need_bias, need_A, need_B = needs
    n_rows, d_in = grad_out.shape[0], weight.shape[1]

    def maybe(flag, shape, like):
        return like.new_empty(shape) if flag else grad_out.new_empty(0)

    return (
        maybe(need_x, (n_rows, d_in), grad_out),
        maybe(need_xa and not adapter_is_x, (n_rows, d_in), grad_out),
        maybe(need_bias, (weight.shape[0],), grad_out),
        maybe(need_A, lora_A.shape, lora_A),
        maybe(need_B, lora_B.shape, lora_B),
    )


@torch.library.custom_op("smoa_kernels::triton_forward_permuted", mutates_args=())
def _forward_permuted_op(
    x: torch.Tensor,
    x_adapter: torch.Tensor | None,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    row_order: torch.Tensor,
    col_order: torch.Tensor,
    num_blocks: int,
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(y, x_a[:, col_order])``: base term by cuBLAS, adapter term on the diagonal blocks in permuted coordinates;
    the gathered x_a is returned to be saved for backward (the factor gradient needs exactly it)."""
    xa_perm = (x if x_adapter is None else x_adapter).index_select(1, col_order)
    out = torch.nn.functional.linear(x, weight, bias).contiguous()
    _perm_adapter(
        xa_perm, out, weight, lora_B, lora_A, row_order, col_order, num_blocks, scale, transpose=False, accumulate=True
    )
    return out, xa_perm


@_forward_permuted_op.register_fake
def _(x, x_adapter, weight, bias, lora_A, lora_B, row_order, col_order, num_blocks, scale):
    return x.new_empty((x.shape[0], weight.shape[0])), x.new_empty((x.shape[0], weight.shape[1]))


@torch.library.custom_op("smoa_kernels::triton_backward_permuted", mutates_args=())
def _backward_permuted_op(
    grad_out: torch.Tensor,
    xa_perm: torch.Tensor,
    adapter_is_x: bool,
    weight: torch.Tensor,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    row_order: torch.Tensor,
    col_order: torch.Tensor,
    num_blocks: int,
    scale: float,
    needs: list[bool],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(dx, dx_a, db, dÂ, dB̂)`` as :func:`_backward_op`; ``dY[:, row_order]`` is gathered once and feeds both the
    dX adapter term and the factor gradient."""
    need_x, need_xa, need_bias, need_A, need_B = needs
    grad_out = grad_out.contiguous()
    dy_perm = grad_out.index_select(1, row_order)
    grad_x = grad_xa = None
    if need_x:
        grad_x = (grad_out @ weight).contiguous()
        if adapter_is_x:  # dx = dY W0 (cuBLAS) + s·dY ΔW on the diagonal blocks, added in place
            _perm_adapter(dy_perm, grad_x, weight, lora_A, lora_B, col_order, row_order, num_blocks, scale,
                          transpose=True, accumulate=True)  # fmt: skip
    if need_xa and not adapter_is_x:
        grad_xa = grad_out.new_empty((grad_out.shape[0], weight.shape[1]))
        _perm_adapter(dy_perm, grad_xa, weight, lora_A, lora_B, col_order, row_order, num_blocks, scale,
                      transpose=True, accumulate=False)  # fmt: skip
    grad_bias = grad_out.sum(0) if need_bias else None
    grad_A = grad_B = None
    if need_A or need_B:
        grad_A, grad_B = _factor_grads(grad_out, None, weight, lora_A, lora_B, row_order, col_order, num_blocks, scale,
                                       dy_perm=dy_perm, xa_perm=xa_perm)  # fmt: skip
    grads = (grad_x, grad_xa, grad_bias, grad_A if need_A else None, grad_B if need_B else None)
    return tuple(grad_out.new_empty(0) if g is None else g for g in grads)


@_backward_permuted_op.register_fake
def _(grad_out, xa_perm, adapter_is_x, weight, lora_A, lora_B, row_order, col_order, num_blocks, scale, needs):
    need_x, need_xa, need_bias, need_A, need_B = needs
    n_rows, d_in = grad_out.shape[0], weight.shape[1]

    def maybe(flag, shape, like):
        return like.new_empty(shape) if flag else grad_out.new_empty(0)

    return (
        maybe(need_x, (n_rows, d_in), grad_out),
        maybe(need_xa and not adapter_is_x, (n_rows, d_in), grad_out),
        maybe(need_bias, (weight.shape[0],), grad_out),
        maybe(need_A, lora_A.shape, lora_A),
        maybe(need_B, lora_B.shape, lora_B),
    )


class SMoATritonFunction(torch.autograd.Function):
    """2-D autograd.Function over the custom ops. ``x_adapter=None`` means "x itself" (dropout p = 0): then dx is one
    fused pass; a distinct ``x_adapter`` gets its own gradient. W0 is frozen (no weight gradient)."""

    @staticmethod
    @torch.amp.custom_fwd(device_type="cuda")
    def forward(
        ctx, x, x_adapter, weight, bias, lora_A, lora_B, row_order, col_order, num_blocks, scale, merged,
        permuted=False,
    ):  # fmt: skip
        ctx.adapter_is_x = x_adapter is None
        ctx.has_bias = bias is not None
        ctx.num_blocks, ctx.scale, ctx.merged, ctx.permuted = num_blocks, scale, merged, permuted
        if permuted:
            out, xa_perm = torch.ops.smoa_kernels.triton_forward_permuted(
                x, x_adapter, weight, bias, lora_A, lora_B, row_order, col_order, num_blocks, scale
            )
            # x_a[:, col_order] replaces x_a (same size): the factor gradient reads exactly it.
            ctx.save_for_backward(xa_perm, weight, lora_A, lora_B, row_order, col_order)
            return out
        blk_row = block_ids(row_order, num_blocks)
        blk_col = block_ids(col_order, num_blocks)
        out = torch.ops.smoa_kernels.triton_forward(
            x, x_adapter, weight, bias, lora_A, lora_B, blk_row, blk_col, scale, merged
        )
        ctx.save_for_backward(x if x_adapter is None else x_adapter, weight, lora_A, lora_B, row_order, col_order,
                              blk_row, blk_col)  # fmt: skip
        return out

    @staticmethod
    @torch.amp.custom_bwd(device_type="cuda")
    def backward(ctx, grad_out):
        need_x, need_xa, _, need_bias, need_A, need_B = ctx.needs_input_grad[:6]
        needs = [need_x, need_xa and not ctx.adapter_is_x, need_bias and ctx.has_bias, need_A, need_B]
        if ctx.permuted:
            xa_perm, weight, lora_A, lora_B, row_order, col_order = ctx.saved_tensors
            grads = torch.ops.smoa_kernels.triton_backward_permuted(
                grad_out, xa_perm, ctx.adapter_is_x, weight, lora_A, lora_B, row_order, col_order, ctx.num_blocks,
                ctx.scale, needs,
            )  # fmt: skip
            grad_x, grad_xa, grad_bias, grad_A, grad_B = (g if flag else None for g, flag in zip(grads, needs))
            return grad_x, grad_xa, None, grad_bias, grad_A, grad_B, None, None, None, None, None, None
        x_saved, weight, lora_A, lora_B, row_order, col_order, blk_row, blk_col = ctx.saved_tensors
        grads = torch.ops.smoa_kernels.triton_backward(
            grad_out, x_saved, ctx.adapter_is_x, weight, lora_A, lora_B, row_order, col_order, blk_row, blk_col,
            ctx.num_blocks, ctx.scale, ctx.merged, needs,
        )  # fmt: skip
        grad_x, grad_xa, grad_bias, grad_A, grad_B = (g if flag else None for g, flag in zip(grads, needs))
        return grad_x, grad_xa, None, grad_bias, grad_A, grad_B, None, None, None, None, None, None


# ----------------------------------------------------------------------------------------------------------------------
# Validation and the public entry points
# ----------------------------------------------------------------------------------------------------------------------


def is_available() -> tuple[bool, str]:
    """``(True, "")`` if triton imports and CUDA is available or ``TRITON_INTERPRET=1``; else ``(False, reason)``."""
    if triton is None:
        return False, _TRITON_IMPORT_ERROR
    if torch.cuda.is_available() or _interpreting():
        return True, ""
    return False, "no CUDA device and TRITON_INTERPRET is not set to 1 (the Triton interpreter runs kernels on the CPU)"


_VERIFIED_ORDERS: dict[tuple, bool] = {}


def _check_permutation(name: str, order: torch.Tensor, n: int) -> None:
    """Orders index W0 inside the kernels: check once per tensor version that they are permutations of range(n).

    Skipped while torch.compile traces (a data-dependent check cannot be traced; eager calls have checked them)."""
    if torch.compiler.is_compiling():
        return
    key = (order.data_ptr(), order._version, order.numel(), str(order.device))
    if key in _VERIFIED_ORDERS:
        return
    expected = torch.arange(n, device=order.device, dtype=order.dtype)
    if not torch.equal(torch.sort(order).values, expected):
        raise ValueError(f"{name} is not a permutation of range({n})")
    if len(_VERIFIED_ORDERS) > 4096:
        _VERIFIED_ORDERS.clear()
    _VERIFIED_ORDERS[key] = True


def _validate(x, x_adapter, weight, bias, lora_A, lora_B, row_order, col_order, num_blocks, scale) -> None:
    """Every check that can fail, before any launch: types, devices, dtypes, shapes."""
    named = {
        "x": x,
        "x_adapter": x_adapter,
        "weight": weight,
        "lora_A": lora_A,
        "lora_B": lora_B,
        "row_order": row_order,
        "col_order": col_order,
    }
    if bias is not None:
        named["bias"] = bias
    for name, tensor in named.items():
        if not isinstance(tensor, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(tensor).__name__}")
    if isinstance(num_blocks, bool) or not isinstance(num_blocks, int):
        raise TypeError(f"num_blocks must be an int, got {num_blocks!r}")
    if isinstance(scale, bool) or not isinstance(scale, (int, float)):
        raise TypeError(f"scale must be a python float, got {scale!r}")
    if triton is None:
        raise RuntimeError(f"the triton SMoA kernels are not available: {_TRITON_IMPORT_ERROR}")
    for name, tensor in named.items():
        if tensor.device != x.device:
            raise ValueError(f"{name} is on {tensor.device} but x is on {x.device}: all tensors must share one device")
    if x.device.type == "cpu" and not _interpreting():
        raise ValueError("x is a CPU tensor: the triton kernels need CUDA tensors (or TRITON_INTERPRET=1 for testing)")
    if x.device.type not in ("cuda", "cpu"):
        raise ValueError(f"x is on {x.device}: the triton kernels run on CUDA devices only")
    if weight.dim() != 2:
        raise ValueError(f"weight must be 2-D (d_out, d_in), got shape {tuple(weight.shape)}")
    d_out, d_in = weight.shape
    if weight.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"weight.dtype={weight.dtype} is not one of float32/float16/bfloat16")
    if x.dtype != weight.dtype:
        raise TypeError(f"x.dtype={x.dtype} does not match weight.dtype={weight.dtype}")
    if x.dim() < 1 or x.shape[-1] != d_in:
        raise ValueError(f"x.shape={tuple(x.shape)}: the last dimension must be d_in={d_in}")
    if x_adapter.shape != x.shape:
        raise ValueError(f"x_adapter.shape={tuple(x_adapter.shape)} does not match x.shape={tuple(x.shape)}")
    if x_adapter.dtype != x.dtype:
        raise TypeError(f"x_adapter.dtype={x_adapter.dtype} does not match x.dtype={x.dtype}")
    if bias is not None and (bias.shape != (d_out,) or bias.dtype != weight.dtype):
        raise ValueError(
            f"bias must have shape ({d_out},) and dtype {weight.dtype}, got {tuple(bias.shape)} {bias.dtype}"
        )
    if lora_A.dtype != lora_B.dtype:
        raise TypeError(f"lora_A.dtype={lora_A.dtype} and lora_B.dtype={lora_B.dtype} differ")
    if lora_A.dtype not in (torch.float32, weight.dtype):
        raise TypeError(f"factor dtype {lora_A.dtype} must be float32 or weight.dtype={weight.dtype}")
    if lora_A.dim() != 2 or lora_A.shape[1] != d_in:
        raise ValueError(f"lora_A.shape={tuple(lora_A.shape)} must be (r_k, d_in={d_in})")
    rank = lora_A.shape[0]
    if lora_B.dim() != 2 or tuple(lora_B.shape) != (d_out, rank):
        raise ValueError(f"lora_B.shape={tuple(lora_B.shape)} must be (d_out={d_out}, r_k={rank})")
    if not 1 <= num_blocks <= min(d_in, d_out):
        raise ValueError(f"num_blocks={num_blocks} must be in [1, min(d_in, d_out)={min(d_in, d_out)}]")
    for name, order, n in (("row_order", row_order, d_out), ("col_order", col_order, d_in)):
        if order.dtype != torch.int64 or order.dim() != 1 or order.numel() != n:
            raise ValueError(f"{name} must be a 1-D int64 tensor of length {n}, got {order.dtype} {tuple(order.shape)}")
        _check_permutation(name, order, n)
    if torch.is_grad_enabled() and weight.requires_grad:
        raise ValueError("weight.requires_grad=True: the triton SMoA path treats W0 as frozen (SPEC §4)")


COORDINATES = ("original", "permuted", "auto")
# "auto" picks "permuted" when the FLOPs it saves per token and feature, 2·D·(1 − 1/K), exceed this many. Modelled, not
# yet measured (see the module docstring): the permuted path moves about 4 extra elements per token and feature (the
# gather of x_a / dY and the read-modify-write of the scattered output columns) at about 300 FLOP/byte (H100 bf16
# ridge), i.e. ≈ 2400 FLOPs, plus element-wise W0 sub-tile loads; the margin is for the latter.
AUTO_PERMUTED_MIN_SAVED_FLOPS = 4096


def choose_coordinates(coordinates: str, d_out: int, d_in: int, num_blocks: int) -> str:
    """Resolve ``coordinates`` ("auto" by the size heuristic: shapes and K only, so it never depends on N)."""
    if coordinates != "auto":
        return coordinates
    saved = 2 * min(d_out, d_in) * (1 - 1 / num_blocks)
    return "permuted" if num_blocks >= 2 and saved >= AUTO_PERMUTED_MIN_SAVED_FLOPS else "original"


def _autocast(x, x_adapter, weight, bias, lora_A, lora_B):
    """Apply an enclosing autocast the way F.linear would: activations, W0 and b to the autocast dtype; fp32 factors
    stay fp32 (the precision contract), other factors follow the activations."""
    device_type = x.device.type
    if device_type != "cuda" or not torch.is_autocast_enabled(device_type):
        return x, x_adapter, weight, bias, lora_A, lora_B
    dtype = torch.get_autocast_dtype(device_type)
    same = x_adapter is x
    x = x.to(dtype)
    x_adapter = x if same else x_adapter.to(dtype)
    weight = weight.to(dtype)
    bias = None if bias is None else bias.to(dtype)
    if lora_A.dtype != torch.float32:
        lora_A, lora_B = lora_A.to(dtype), lora_B.to(dtype)
    return x, x_adapter, weight, bias, lora_A, lora_B


def smoa_linear_triton(
    x: torch.Tensor,
    x_adapter: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    row_order: torch.Tensor,
    col_order: torch.Tensor,
    num_blocks: int,
    scale: float,
    *,
    merged_weight: bool = False,
    coordinates: str = "original",
) -> torch.Tensor:
    """Same signature and result as :func:`smoa_kernels.reference.smoa_linear_reference`, any leading dims in ``x``.

    Pass the very same tensor object as ``x`` and ``x_adapter`` for dropout p = 0 (dx is then one fused pass).
    ``merged_weight=True`` opts into the single-dot fast path (requires ``x_adapter is x``; see the module docstring
    for its rounding cost). ``coordinates``: ``"original"`` (default: fused base + adapter GEMM over every W0 tile),
    ``"permuted"`` (cuBLAS base GEMMs + the adapter on the diagonal blocks only) or ``"auto"`` (the size heuristic
    :func:`choose_coordinates`); see the module docstring for the cost model.
    """
    _validate(x, x_adapter, weight, bias, lora_A, lora_B, row_order, col_order, num_blocks, scale)
    if merged_weight and x_adapter is not x:
        raise ValueError("merged_weight=True requires x_adapter to be x itself (dropout p = 0)")
    if not isinstance(coordinates, str) or coordinates not in COORDINATES:
        raise ValueError(f"coordinates={coordinates!r} must be one of {', '.join(map(repr, COORDINATES))}")
    if coordinates == "permuted" and merged_weight:
        raise ValueError("merged_weight=True runs in original coordinates: it cannot be combined with 'permuted'")
    permuted = not merged_weight and choose_coordinates(coordinates, *weight.shape, num_blocks) == "permuted"
    x, x_adapter, weight, bias, lora_A, lora_B = _autocast(x, x_adapter, weight, bias, lora_A, lora_B)
    same = x_adapter is x
    d_in = weight.shape[1]
    lead = x.shape[:-1]
    x2 = x.reshape(-1, d_in)
    xa2 = None if same else x_adapter.reshape(-1, d_in)
    y = SMoATritonFunction.apply(
        x2, xa2, weight, bias, lora_A, lora_B, row_order, col_order, num_blocks, float(scale), bool(merged_weight),
        permuted,
    )  # fmt: skip
    return y.reshape(*lead, weight.shape[0])
