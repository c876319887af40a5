"""The blocked SMoA path (training-sized N): full-weight GEMMs and per-block adapter GEMMs in the vendor library,
five small Triton kernels for the glue (order guard, band gather, ΔW_k / anchor generation, scatter, factor-gradient
epilogue). Exactly the floor's FLOPs, (4 + 6/K)·N·D² per training step.

Notation as in SPEC §2–§4 (block k: rows ``R_k = row_order[r0_k:r1_k]``, columns ``C_k = col_order[c0_k:c1_k]``,
``A_k = Â[:, C_k]``, ``B_k = B̂[R_k, :]``, anchor ``M_k = W0[R_k, C_k]``)::

    forward    x_band   = x_a[:, col_order]                  (_smoa_band_gather_kernel: token-minor padded bands)
               s·ΔW_k   = s·(B_k A_k) ⊙ M_k                   (_smoa_delta_blocks_kernel, all K blocks, one launch)
               Zᵀ[R_k]  = s·ΔW_k · x_band,kᵀ                  (torch.mm per block into rows of a d_out×N buffer)
               y        = scatter(Zᵀ) + b  ;  y += x W0ᵀ      (_smoa_scatter_kernel, then cuBLAS addmm_ in place)
    backward   dy_band  = dY[:, row_order]                   (_smoa_band_gather_kernel, once per backward)
               Uᵀ[C_k]  = s·ΔW_kᵀ · dy_band,kᵀ                (ΔW_k regenerated, never saved)
               dx       = scatter(Uᵀ) ; dx += dY W0           (dx_a = scatter(Uᵀ) and dx = dY W0 with dropout)
               G_k      = dy_band,kᵀ · x_band,k               (torch.mm per block, fp32 output)
               H_k      = s·G_k ⊙ M_k ; dB_k = H_k A_kᵀ ; dA_k = B_kᵀ H_k   (_smoa_factor_epilogue_kernel)
               db       = Σ_n dY

Band layout: every band of the gathered activations (and of the permuted factors ``Â[:, col_order]``) is padded to a
multiple of ``ALIGN`` = 16 elements, so every band a GEMM or a kernel reads starts 16-element aligned (cuBLAS gets
aligned operands; the kernels' contiguous loads vectorise). The padding repeats a valid column and is never read as
data. Buffers the kernels index with a row stride (``ΔW``, ``Zᵀ``/``Uᵀ``) get leading dimensions rounded up to 16.

Why vendor GEMM + a separate scatter (and not the scatter fused into a Triton GEMM's epilogue): by
:mod:`smoa_kernels.cost_model`'s efficiencies (vendor GEMM 80% of peak, a Triton GEMM 60%), the adapter GEMM
(2·N·D²/K FLOPs, 0.17 ms at N = 8192, D = 4096, K = 2 on an H100 — an estimate) would lose ≈ 58 µs in a Triton
GEMM, while the separate scatter costs the write and re-read of Zᵀ (2·N·D elements, ≈ 50 µs at 80% of HBM
bandwidth) and stays coalesced on both sides (y along its columns, Zᵀ along tokens). A tie at best for the Triton
GEMM, and the vendor side needs no tuning per GPU; so the vendor GEMM. Same for the factor gradient: G_k in fp32
from the vendor GEMM plus the fused epilogue moves 2·D²/K fp32 elements (≈ 24 µs at D = 4096, K = 2) against
≈ 58 µs lost by a Triton GEMM at N = 8192; at small N the fused single-pass path is chosen anyway.

Order guard: every order is clamped into range on the device before any use (index_select,
scatter, the kernels' anchor gathers, which clamp again), so no tensor content can make a kernel read out of bounds;
and :func:`prepare_orders` computes, without a host sync, a flag that is NaN unless both orders are permutations. The
ΔW_k / anchor generation multiplies by it (the fused path multiplies the factors), so a non-permutation order makes
the whole output and every gradient NaN instead of a plausible wrong answer. Orders are validated with a clear error
where they enter (SMoALinear, PEFT loading).
"""

from __future__ import annotations

import dataclasses
import functools

import torch

from smoa_kernels.blocks import block_bounds, padded_band_sources, padded_band_starts
from smoa_kernels.triton import configs
from smoa_kernels.triton.configs import triton

ALIGN = 16  # band starts and leading dimensions in elements (Triton specialises integers divisible by 16)
RANK_CHUNK_MAX = 32  # the rank-64 fp32 tiles spilled on sm_80 and sm_90 in the compile check
EPILOGUE_BLOCK_O = 32  # rows per row tile of the factor epilogue (fixed here: the launcher's grid is made of them)
EPILOGUE_WAVES = 2  # the factor epilogue's grid fills the device this many times (see epilogue_grid)
# Row tiles per factor-epilogue launch: a block with more rows is done in chunks, so the dA partial buffer (one
# r_k × |C_k| fp32 slot per row tile of a launch) stays ≤ EPILOGUE_CHUNK_TILES·r_k·|C_k| whatever |R_k| (for a
# 128256 × 8192 lm_head at K = 1, r = 32: 67 MB, where one slot per row tile of the whole block took 4.2 GB).
EPILOGUE_CHUNK_TILES = 64
EPILOGUE_COLUMN_ALIGN = 64  # a program's column range is a multiple of this (of every shipped BLOCK_C)


def _round_up(n: int, multiple: int = ALIGN) -> int:
    return -(-n // multiple) * multiple


def band_width(n: int, num_blocks: int) -> int:
    """Width of the padded band layout of ``n`` coordinates in K blocks (≤ n + (ALIGN − 1)·K)."""
    return padded_band_starts(n, num_blocks, ALIGN)[-1]


# ----------------------------------------------------------------------------------------------------------------------
# Orders, band layout and the launchers
# ----------------------------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Orders:
    """Both orders clamped into range, their inverses, and the poison flag (a 0-d fp32 tensor: 1.0, or NaN unless
    both orders are permutations); all on the device, computed by two launches without a host sync."""

    row: torch.Tensor
    col: torch.Tensor
    inv_row: torch.Tensor
    inv_col: torch.Tensor
    flag: torch.Tensor
    factor_bands: tuple | None = None  # (lora_A, lora_B, a_bands, b_bands) of this step, see permuted_factors
    col_band_index: torch.Tensor | None = None  # col_order at the padded band layout's positions (band_index)
    row_band_index: torch.Tensor | None = None

    def band_index(self, which: str, num_blocks: int) -> torch.Tensor:
        """The order (``"row"`` or ``"col"``) at the positions of the padded band layout: the index every band gather
        of that order uses, made once per step (kept on this object, which forward hands to backward)."""
        name = f"{which}_band_index"
        index = getattr(self, name)
        if index is None:
            order = getattr(self, which)
            index = order.index_select(0, _band_sources(order.numel(), num_blocks, order.device))
            setattr(self, name, index)
        return index


def prepare_orders(row_order: torch.Tensor, col_order: torch.Tensor) -> Orders:
    """Clamp, invert and check the orders on the device (see the module docstring's "Order guard")."""
    row_order, col_order = row_order.contiguous(), col_order.contiguous()  # the kernel reads them densely
    flag = torch.empty((), dtype=torch.float32, device=row_order.device)
    row, col = torch.empty_like(row_order), torch.empty_like(col_order)
    inv_row, inv_col = torch.empty_like(row_order), torch.empty_like(col_order)
    args = (flag, row_order, col_order, row, col, inv_row, inv_col, row.numel(), col.numel())

    def grid(meta):
        return (triton.cdiv(row.numel(), meta["BLOCK"]) + triton.cdiv(col.numel(), meta["BLOCK"]),)

    configs.launch("orders", grid, *args)  # clamp and invert (program 0 sets the flag to 1.0)
    configs.launch("orders_check", grid, *args)  # then poison the flag for any defect (the inverses are complete)
    if configs.capturing():  # the launch was only recorded; later host-side index_selects need real permutations
        flag.fill_(1.0)
        for order, clamped, inverse in ((row_order, row, inv_row), (col_order, col, inv_col)):
            clamped.copy_(order.clamp(0, order.numel() - 1))
            inverse.scatter_(0, clamped, torch.arange(order.numel(), device=order.device, dtype=order.dtype))
    return Orders(row, col, inv_row, inv_col, flag)


@functools.cache
def _band_sources(n: int, num_blocks: int, device: torch.device) -> torch.Tensor:
    # keyed by shape and device only (no data): the positions of the padded band layout in the sorted order
    return torch.tensor(padded_band_sources(n, num_blocks, ALIGN), dtype=torch.int64, device=device)


@functools.cache
def _band_data_positions(n: int, num_blocks: int, device: torch.device) -> torch.Tensor:
    # the positions of the padded band layout that hold data (not padding), in sorted order
    starts = padded_band_starts(n, num_blocks, ALIGN)
    positions = [starts[k] + i for k, (lo, hi) in enumerate(block_bounds(n, num_blocks)) for i in range(hi - lo)]
    return torch.tensor(positions, dtype=torch.int64, device=device)


def gather_bands(t: torch.Tensor, order, num_blocks: int, dim: int = 1) -> torch.Tensor:
    """``t`` gathered along ``dim`` by ``order`` into the padded band layout (band k starts at a multiple of 16).
    ``order``: a 1-D index tensor, or ``(orders, "row" | "col")`` to use that order's band index made once per step."""
    if isinstance(order, tuple):
        orders, which = order
        return t.index_select(dim, orders.band_index(which, num_blocks))
    index = order.index_select(0, _band_sources(order.numel(), num_blocks, order.device))
    return t.index_select(dim, index)


def gather_bands_t(t: torch.Tensor, orders: Orders, which: str, num_blocks: int) -> torch.Tensor:
    """``t`` (N × d, token-major) gathered by the ``which`` ("row" / "col") order into token-minor padded bands:
    a (band_width × ldN) tensor, ldN = N rounded up to 16, whose row ``starts[k] + i`` is ``t[:, order[lo_k + i]]``
    (tokens N..ldN are zeros, padding rows unwritten and never read). One coalesced launch
    (``_smoa_band_gather_kernel``); what every band GEMM and the factor gradient read."""
    n_rows, d = t.shape
    inverse = orders.inv_row if which == "row" else orders.inv_col
    out = torch.empty((band_width(d, num_blocks), _round_up(n_rows)), dtype=t.dtype, device=t.device)
    if n_rows == 0:
        return out

    def grid(meta):
        return (triton.cdiv(out.shape[1], meta["BLOCK_N"]), triton.cdiv(d, meta["BLOCK_C"]))

    configs.launch("band_gather", grid, t, out, inverse, n_rows, d, num_blocks, configs._n_bucket(n_rows),
                   t.stride(0), t.stride(1), out.stride(0), ALIGN_C=ALIGN)  # fmt: skip
    return out


def _rank_chunk(rank: int) -> int:
    """Ranks per dot step: the padded rank up to RANK_CHUNK_MAX (larger fp32 tiles spill; see KERNEL_CONFIGS)."""
    return min(configs._rank_pad(rank), RANK_CHUNK_MAX)


def _dot_precision(dtype: torch.dtype) -> str:
    return "ieee"  # fp32 operands: exact FMA products (a small pass, no tensor cores needed); 16-bit: unused


def delta_blocks(
    weight: torch.Tensor,
    a_bands: torch.Tensor | None,
    b_bands: torch.Tensor | None,
    orders: Orders,
    num_blocks: int,
    scale: float,
) -> torch.Tensor:
    """``s·ΔW_k`` for all K blocks in one launch: a (d_out × ldw) buffer in the activation dtype whose rows follow the
    row order and whose block k is ``[r0_k:r1_k, :|C_k|]`` (the transient: ≈ D²/K elements). ``a_bands=None``: the
    anchors ``M_k`` themselves, in the same layout."""
    d_out, d_in = weight.shape
    anchor_only = a_bands is None
    if anchor_only:  # the factor pointers are not read
        a_bands, b_bands, scale = weight, weight, 1.0
    rank = 0 if anchor_only else a_bands.shape[0]
    max_rows, max_cols = -(-d_out // num_blocks), -(-d_in // num_blocks)
    delta = torch.empty((d_out, _round_up(max_cols)), dtype=weight.dtype, device=weight.device)

    def grid(meta):
        return (triton.cdiv(max_rows, meta["BLOCK_I"]) * triton.cdiv(max_cols, meta["BLOCK_J"]), num_blocks)

    configs.launch(
        "delta_blocks",
        grid,
        weight,
        a_bands,
        b_bands,
        orders.row,
        orders.col,
        delta,
        orders.flag,
        d_out,
        d_in,
        rank,
        num_blocks,
        float(scale),
        weight.stride(0),
        weight.stride(1),
        a_bands.stride(0),
        a_bands.stride(1),
        b_bands.stride(0),
        b_bands.stride(1),
        delta.stride(0),
        ALIGN_C=ALIGN,
        RANK_PAD=configs._rank_pad(rank),
        RANK_CHUNK=_rank_chunk(rank),
        DOT_PRECISION=_dot_precision(a_bands.dtype),
        ANCHOR_ONLY=anchor_only,
    )
    return delta


def scatter(zt: torch.Tensor, inv_order: torch.Tensor, n_rows: int, bias: torch.Tensor | None) -> torch.Tensor:
    """``out[n, c] = zt[inv_order[c], n] (+ bias[c])``, a fresh contiguous (n_rows × d) tensor in zt's dtype."""
    d = inv_order.numel()
    out = torch.empty((n_rows, d), dtype=zt.dtype, device=zt.device)

    def grid(meta):
        return (triton.cdiv(n_rows, meta["BLOCK_N"]), triton.cdiv(d, meta["BLOCK_C"]))

    configs.launch(
        "scatter",
        grid,
        zt,
        out,
        bias if bias is not None else out,
        inv_order,
        n_rows,
        d,
        configs._n_bucket(n_rows),
        zt.stride(0),
        out.stride(0),
        HAS_BIAS=bias is not None,
    )
    return out


def _block_products(delta: torch.Tensor, bands: torch.Tensor, n_rows: int, d_in: int, num_blocks: int, *,
                    transpose: bool):  # fmt: skip
    """Per block, by the vendor library: forward (``bands`` = token-minor x_a bands) ``Zᵀ[R_k] = s·ΔW_k · x_band,kᵀ``
    (d_out × ldN, rows in row order); ``transpose=True`` (``bands`` = dY bands) ``Uᵀ[C_k] = s·ΔW_kᵀ · dy_band,kᵀ``
    (d_in × ldN, rows in column order). Every operand is contiguous along its last dimension."""
    d_out = delta.shape[0]
    out = torch.empty((d_in if transpose else d_out, _round_up(n_rows)), dtype=bands.dtype, device=bands.device)
    starts = padded_band_starts(d_out if transpose else d_in, num_blocks, ALIGN)
    for k, ((r0, r1), (c0, c1)) in enumerate(zip(block_bounds(d_out, num_blocks), block_bounds(d_in, num_blocks))):
        block = delta[r0:r1, : c1 - c0]
        if transpose:  # dY band: |R_k| × N, 16-aligned start
            torch.mm(block.t(), bands[starts[k] : starts[k] + (r1 - r0), :n_rows], out=out[c0:c1, :n_rows])
        else:  # x_a band: |C_k| × N, 16-aligned start
            torch.mm(block, bands[starts[k] : starts[k] + (c1 - c0), :n_rows], out=out[r0:r1, :n_rows])
    return out


def permuted_factors(
    lora_A: torch.Tensor, lora_B: torch.Tensor, orders: Orders, num_blocks: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(Â[:, col_order] in the padded band layout, B̂[row_order])`` in fp32 (tiny: r_k·D; every kernel forms its
    products in fp32). Computed once per step: kept on ``orders``, which the forward hands to the backward (the
    backward then uses exactly the factors and orders the forward used)."""
    cached = orders.factor_bands
    if cached is not None and cached[0] is lora_A and cached[1] is lora_B:
        return cached[2], cached[3]
    a_bands = gather_bands(lora_A, (orders, "col"), num_blocks, dim=1).float()
    b_bands = lora_B.index_select(0, orders.row).float()
    orders.factor_bands = (lora_A, lora_B, a_bands, b_bands)
    return a_bands, b_bands


def blocked_forward(
    x: torch.Tensor,
    x_adapter: torch.Tensor | None,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    orders: Orders,
    num_blocks: int,
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(y, x_band)``: ``y = x W0ᵀ + b + s·x_a ΔWᵀ`` with the adapter on the diagonal blocks only; ``x_band`` is
    ``x_a`` gathered into the padded band layout (what the factor gradient reads; saved for backward)."""
    n_rows, d_in = x.shape
    xa = x if x_adapter is None else x_adapter
    xa_bands = gather_bands_t(xa, orders, "col", num_blocks)
    if n_rows == 0 or lora_A.shape[0] == 0:
        return torch.nn.functional.linear(x, weight, bias), xa_bands
    a_bands, b_bands = permuted_factors(lora_A, lora_B, orders, num_blocks)
    delta = delta_blocks(weight, a_bands, b_bands, orders, num_blocks, scale)
    zt = _block_products(delta, xa_bands, n_rows, d_in, num_blocks, transpose=False)
    del delta  # the ΔW transient lives only for the K block GEMMs
    y = scatter(zt, orders.inv_row, n_rows, bias)
    del zt
    # the base term last, through cuBLAS's C input: x W0ᵀ + (adapter + b), accumulated in fp32 and rounded once
    y.addmm_(x, weight.t())
    return y, xa_bands


def blocked_input_grads(
    grad_out: torch.Tensor,
    dy_bands: torch.Tensor,
    weight: torch.Tensor,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    orders: Orders,
    num_blocks: int,
    scale: float,
    *,
    adapter_is_x: bool,
    need_x: bool,
    need_xa: bool,
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """``(dx, dx_a)``: ``dx = dY W0 (+ s·dY ΔW when x_a is x)``, ``dx_a = s·dY ΔW`` (dropout), diagonal blocks only."""
    n_rows = grad_out.shape[0]
    d_in = weight.shape[1]
    need_adapter = need_xa or (adapter_is_x and need_x)
    if not need_adapter:
        return (grad_out @ weight if need_x else None), None
    if n_rows == 0 or lora_A.shape[0] == 0:
        adapter = grad_out.new_zeros((n_rows, d_in))
    else:
        a_bands, b_bands = permuted_factors(lora_A, lora_B, orders, num_blocks)
        delta = delta_blocks(weight, a_bands, b_bands, orders, num_blocks, scale)
        ut = _block_products(delta, dy_bands, n_rows, d_in, num_blocks, transpose=True)
        del delta
        adapter = scatter(ut, orders.inv_col, n_rows, None)
        del ut
    if adapter_is_x:
        return adapter.addmm_(grad_out, weight), None
    return (grad_out @ weight if need_x else None), adapter


def _fp32_mm(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a @ b`` with fp32 output and accumulation: 16-bit inputs on CUDA through ``torch.mm(..., out_dtype=float32)``
    (cuBLAS, fp32 accumulate, no input copies); elsewhere (the CPU interpreter tests) through fp32 copies."""
    if a.dtype == torch.float32:
        return torch.mm(a, b)
    if a.is_cuda:
        try:
            return torch.mm(a, b, out_dtype=torch.float32)
        except (RuntimeError, NotImplementedError):  # a build without the fp32-output kernel (not seen; be safe)
            pass
    return torch.mm(a.float(), b.float())


@functools.cache
def _multiprocessors(device: torch.device) -> int:
    """Streaming multiprocessors of ``device`` (an H100's 132 where there is no CUDA device: the interpreter and the
    compile gate then see an H100's grid)."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 132


def epilogue_grid(rows: int, cols: int, rank_chunks: int, multiprocessors: int) -> tuple[int, int]:
    """``(row_tiles, col_programs)`` of one factor-epilogue launch over ``rows`` (≤ EPILOGUE_CHUNK_TILES row tiles) of
    a block with ``cols`` columns: column programs (never more than the 64-column tiles) are added until the grid gives
    ``EPILOGUE_WAVES`` waves on the device (at 4096², K = 2: 64 row tiles × 5 column ranges = 320 programs on an
    H100's 132 SMs, where one program per row tile gave 64)."""
    row_tiles = triton.cdiv(rows, EPILOGUE_BLOCK_O)
    wanted = triton.cdiv(EPILOGUE_WAVES * multiprocessors, row_tiles * rank_chunks)
    return row_tiles, max(1, min(triton.cdiv(cols, 64), wanted))


def factor_grads(
    dy_bands: torch.Tensor,
    xa_bands: torch.Tensor,
    n_rows: int,
    weight: torch.Tensor,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    orders: Orders,
    num_blocks: int,
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(dÂ, dB̂)`` in the factors' dtype: per block ``G_k`` by the vendor GEMM (fp32), then the fused epilogue.
    ``dy_bands``, ``xa_bands``: token-minor bands (:func:`gather_bands_t`) of ``n_rows`` tokens."""
    d_out, d_in = weight.shape
    rank = lora_A.shape[0]
    if n_rows == 0 or rank == 0:
        return torch.zeros_like(lora_A), torch.zeros_like(lora_B)
    a_bands, b_bands = permuted_factors(lora_A, lora_B, orders, num_blocks)
    grad_a_bands = torch.empty_like(a_bands)  # padding columns stay unread
    grad_b_bands = torch.empty_like(b_bands)
    row_starts = padded_band_starts(d_out, num_blocks, ALIGN)
    col_starts = padded_band_starts(d_in, num_blocks, ALIGN)
    # The anchors M_k gathered once, contiguous (the same transient slot as ΔW_k, which is freed by now), so that the
    # epilogue's main loop reads them with vector loads instead of gathering W0 element by element.
    anchors = delta_blocks(weight, None, None, orders, num_blocks, 1.0)
    rank_chunks = triton.cdiv(configs._rank_pad(rank), _rank_chunk(rank))
    for k, ((r0, r1), (c0, c1)) in enumerate(zip(block_bounds(d_out, num_blocks), block_bounds(d_in, num_blocks))):
        rows_k, cols_k = r1 - r0, c1 - c0
        dy_k = dy_bands[row_starts[k] : row_starts[k] + rows_k, :n_rows]
        xa_k = xa_bands[col_starts[k] : col_starts[k] + cols_k, :n_rows]
        g = _fp32_mm(dy_k, xa_k.t())  # |R_k| × |C_k|, fp32, contiguous
        a_k = a_bands[:, col_starts[k] : col_starts[k] + cols_k]
        chunk_rows = EPILOGUE_CHUNK_TILES * EPILOGUE_BLOCK_O
        for lo in range(0, rows_k, chunk_rows):
            hi = min(lo + chunk_rows, rows_k)
            row_tiles, col_programs = epilogue_grid(hi - lo, cols_k, rank_chunks, _multiprocessors(g.device))
            cols_per_program = _round_up(triton.cdiv(cols_k, col_programs), EPILOGUE_COLUMN_ALIGN)
            col_programs = triton.cdiv(cols_k, cols_per_program)
            da_part = torch.empty((row_tiles, rank, cols_k), dtype=torch.float32, device=g.device)
            db_part = torch.empty((col_programs, hi - lo, rank), dtype=torch.float32, device=g.device)
            g_chunk, b_chunk = g[lo:hi], b_bands[r0 + lo : r0 + hi]
            configs.launch(
                "factor_epilogue",
                (row_tiles, col_programs, rank_chunks),
                g_chunk,
                anchors[r0 + lo : r0 + hi],
                a_k,
                b_chunk,
                db_part,
                da_part,
                hi - lo,
                cols_k,
                rank,
                cols_per_program,
                float(scale),
                g.stride(0),
                anchors.stride(0),
                a_k.stride(0),
                b_bands.stride(0),
                db_part.stride(0),
                db_part.stride(1),
                da_part.stride(0),
                da_part.stride(1),
                RANK_CHUNK=_rank_chunk(rank),
                BLOCK_O=EPILOGUE_BLOCK_O,
            )
            band = grad_a_bands[:, col_starts[k] : col_starts[k] + cols_k]
            if lo == 0:  # the reductions write into the bands (strided out=): no copies
                torch.sum(da_part, 0, out=band)
            else:
                band.add_(da_part.sum(0))
            torch.sum(db_part, 0, out=grad_b_bands[r0 + lo : r0 + hi])
        del g
    # back to original coordinates (tiny, r_k·D): the bands' data columns are the sorted order itself
    data = _band_data_positions(d_in, num_blocks, weight.device)
    nan = float("nan")  # every element is written when the orders are permutations (otherwise all is NaN anyway)
    grad_A = torch.full(lora_A.shape, nan, dtype=torch.float32, device=lora_A.device)
    grad_A[:, orders.col] = grad_a_bands.index_select(1, data)
    grad_B = torch.full(lora_B.shape, nan, dtype=torch.float32, device=lora_B.device)
    grad_B[orders.row] = grad_b_bands
    return grad_A.to(lora_A.dtype), grad_B.to(lora_B.dtype)
