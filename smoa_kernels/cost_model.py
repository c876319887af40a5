"""The one cost model of the SMoA kernels: time ≈ GEMM FLOPs at the vendor library's efficiency + bytes moved at HBM
bandwidth + launch overheads, per GPU class. Every figure it returns is an ESTIMATE (a model, not a measurement).

Each method is a list of :class:`Pass` es (one kernel launch, or a group of identical ones). A pass takes
``max(flops / (peak · efficiency), bytes / (bandwidth · bandwidth_efficiency)) + launches · launch_us`` (a roofline
per pass: a skinny or small GEMM is bandwidth-bound, a large one compute-bound); a method's time is the sum of its
passes. The efficiencies are stated in :data:`GPUS` (vendor GEMM = cuBLAS through torch; Triton GEMM = a Triton kernel
with a generated operand, lower). Methods (:data:`METHODS`), for a layer ``d_out × d_in``, N tokens, total rank r,
K blocks (r_k = r/K), dropout p = 0:

- ``frozen``: ``x W0ᵀ`` and ``dY W0`` (no weight gradient) — the 1.0 line, 4·N·d_out·d_in FLOPs per step;
- ``lora-eq``: PEFT LoRA at rank r/K (SMoA's trainable parameters): base GEMM + six skinny GEMMs + element-wise
  passes (scale, add);
- ``hira``: PEFT HiRA at rank r/K: dense ``ΔW = W0 ⊙ (B A)`` each step, a second full GEMM, the full ``dYᵀx``;
- ``reference``: the official dense SMoA formulation (``hira`` plus the block-mask passes over D²);
- ``smoa-fused``, ``smoa-blocked``: the two Triton paths, one pass per launch the code makes (order guard, operands,
  band gathers, ΔW_k generation, the GEMMs, scatters, the factor-gradient epilogue; the blocked path does exactly
  (4 + 6/K)·N·D² FLOPs per step), checked against captured launches by tests/kernels/test_launch_inventory.py.

The ``triton`` backend's dispatch (:func:`choose_path`) uses it to pick, per call, between ``"fused"`` (wins at small N,
where reading W0 dominates) and ``"blocked"`` (wins at training-sized N, where FLOPs dominate). Its predictions for the
canonical shapes are committed in ``benchmarks/results/cost_model_predictions.json`` (``python -m
smoa_kernels.cost_model --json PATH``); ``smoa gpu-check`` compares them with measured times, and a row that misses by
more than 30% means the model is fixed before it is used again.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict, dataclass, replace

__all__ = [
    "CANONICAL",
    "GPUS",
    "METHODS",
    "MODES",
    "GPUClass",
    "Pass",
    "choose_path",
    "estimate",
    "gpu_class_for",
    "passes",
    "path_times",
    "predictions",
    "step_vs_frozen",
]


@dataclass(frozen=True)
class GPUClass:
    """Peak rates of one GPU class (dense, datasheet) and the fraction of them the model assumes is reached."""

    name: str
    tflops_16bit: float  # dense bf16/fp16 tensor-core peak
    tflops_tf32: float  # dense TF32 tensor-core peak
    tflops_fp32: float  # fp32 SIMT peak (cuBLAS fp32 GEMMs with allow_tf32=False, torch's default; FMA tl.dots)
    hbm_tb_s: float
    multiprocessors: int  # SMs: one-program launches get one SM's share of the bandwidth; grids fill in waves
    clock_ghz: float  # boost clock: the L1 serves one wavefront per SM per cycle (scattered gathers, below)
    vendor_gemm_efficiency: float = 0.75  # cuBLAS at large, well-shaped GEMMs
    triton_gemm_efficiency: float = 0.60  # a Triton GEMM with a generated operand (the tutorial kernel: ≈ 0.75·cuBLAS)
    simt_efficiency: float = 0.50  # a Triton kernel's fp32 FMA dots (input_precision="ieee") of the SIMT fp32 peak
    bandwidth_efficiency: float = 0.80  # of the datasheet HBM bandwidth, for streaming passes
    launch_us: float = 5.0  # per kernel launch, including the PyTorch dispatch around it


GPUS: dict[str, GPUClass] = {
    "a100": GPUClass("A100 SXM", tflops_16bit=312.0, tflops_tf32=156.0, tflops_fp32=19.5, hbm_tb_s=2.04,
                     multiprocessors=108, clock_ghz=1.41),
    "h100": GPUClass("H100 SXM", tflops_16bit=989.0, tflops_tf32=494.0, tflops_fp32=67.0, hbm_tb_s=3.35,
                     multiprocessors=132, clock_ghz=1.98),
    "h200": GPUClass("H200 SXM", tflops_16bit=989.0, tflops_tf32=494.0, tflops_fp32=67.0, hbm_tb_s=4.8,
                     multiprocessors=132, clock_ghz=1.98),
}  # fmt: skip
METHODS = ("frozen", "lora-eq", "hira", "reference", "smoa-fused", "smoa-blocked")
MODES = ("forward", "backward", "full", "inference")
PATHS = {"fused": "smoa-fused", "blocked": "smoa-blocked"}
# The canonical shape of the performance targets: bf16, 4096×4096, r = 32.
CANONICAL = {"d_out": 4096, "d_in": 4096, "rank": 32, "tokens": (256, 2048, 8192), "blocks": (2, 4)}
FACTOR_BYTES = 4  # fp32 factors (the precision contract of SMoALinear)
INDEX_BYTES = 8  # int64 orders, inverses and band indices
SECTOR_BYTES = 32  # the DRAM/L2 access granularity: a pass moves the sectors it touches, not the elements it uses


@dataclass(frozen=True)
class Pass:
    """One pass of a method: ``launches`` kernel launches doing ``flops`` FLOPs and moving ``bytes`` bytes in all.

    ``engine``: "vendor" (a cuBLAS GEMM), "triton" (a Triton tensor-core GEMM), "simt" (a Triton kernel whose dots are
    fp32 FMAs, ``input_precision="ieee"``), "memory" (a streaming, bandwidth-bound pass), "gather" (a pass whose loads
    are 2- or 4-byte elements at scattered positions of each row), "single" (a one-program launch: one SM's share of
    the bandwidth). ``bytes`` counts the 32-byte sectors an access pattern touches. ``gathered``: elements loaded at
    scattered positions, one L1 wavefront each (the L1 serves one wavefront per SM per cycle). ``programs``: the grid
    size where it is small enough for the wave quantisation to matter (0: ignored). ``op``: the kernel each launch is,
    as :func:`smoa_kernels.launch_inventory`-style captures name them ("triton.<kernel>" for the Triton kernels of
    ``KERNEL_CONFIGS``, "aten.<op>" for a torch op)."""

    name: str
    engine: str
    flops: float
    bytes: float
    launches: int = 1
    seconds: float = 0.0
    op: str = ""
    gathered: float = 0.0
    programs: int = 0

    @property
    def ops(self) -> tuple[str, ...]:
        """The launches of this pass by kernel name (one entry per launch)."""
        return (self.op,) * self.launches


def gpu_class_for(device_name: str) -> str:
    """The :data:`GPUS` key for a CUDA device name (``torch.cuda.get_device_name()``); ``"h100"`` when unknown."""
    name = device_name.lower()
    for key in ("h200", "a100", "h100"):
        if key in name:
            return key
    return "h100"


def _gpu(gpu: str) -> GPUClass:
    if gpu not in GPUS:
        raise ValueError(f"gpu={gpu!r} is not one of {', '.join(map(repr, GPUS))}")
    return GPUS[gpu]


def _rate(g: GPUClass, element_bytes: int, engine: str) -> float:
    """FLOP/s of a GEMM pass: 16-bit tensor cores; fp32 = SIMT fp32 in cuBLAS, 3×TF32 ("tf32x3") in Triton; "simt":
    fp32 FMA dots whatever the activation dtype."""
    if engine == "simt":
        return g.tflops_fp32 * 1e12 * g.simt_efficiency
    if engine == "triton":
        peak = g.tflops_16bit if element_bytes == 2 else g.tflops_tf32 / 3
        return peak * 1e12 * g.triton_gemm_efficiency
    peak = g.tflops_16bit if element_bytes == 2 else g.tflops_fp32
    return peak * 1e12 * g.vendor_gemm_efficiency


def _timed(p: Pass, g: GPUClass, element_bytes: int) -> Pass:
    compute = p.flops / _rate(g, element_bytes, "vendor" if p.engine == "memory" else p.engine) if p.flops else 0.0
    bandwidth = g.hbm_tb_s * 1e12 * g.bandwidth_efficiency
    if p.engine == "single":
        bandwidth /= g.multiprocessors
    memory = p.bytes / bandwidth
    wavefronts = p.gathered / (g.multiprocessors * g.clock_ghz * 1e9)
    if p.programs:  # a grid of P programs on S SMs takes ceil(P/S) waves where P/S would be the ideal
        waves = -(-p.programs // g.multiprocessors)
        fill = waves * g.multiprocessors / p.programs
        compute, wavefronts = compute * fill, wavefronts * fill
    return replace(p, seconds=max(compute, memory, wavefronts) + p.launches * g.launch_us * 1e-6)


def _gemm(name: str, m: float, n: float, k: float, e: int, engine: str = "vendor", blocks: int = 1,
          out_bytes: int | None = None) -> Pass:  # fmt: skip
    """``blocks`` GEMMs ``(m×k)·(k×n)`` (one launch each): 2mnk FLOPs each, operands read once, output written once."""
    out = e if out_bytes is None else out_bytes
    return Pass(name, engine, 2.0 * m * n * k * blocks, (e * (m * k + k * n) + out * m * n) * blocks, blocks,
                op="aten.mm")  # fmt: skip


# ----------------------------------------------------------------------------------------------------------------------
# The two Triton paths: one pass per launch the code makes (tests/kernels/test_launch_inventory.py captures the launches
# of a real step and compares them with these lists by count and by name). Tiles, rank pads, band layouts and grids are
# read from the shipped code (smoa_kernels.triton.configs / .blocked), not restated. Dropout p = 0 (x_a is x).
# ----------------------------------------------------------------------------------------------------------------------


def _tiny(name: str, op: str, nbytes: float) -> Pass:
    """A launch over an O(d) or O(r·d) operand: its launch overhead is nearly all of it."""
    return Pass(name, "memory", 0, nbytes, op=op)


def _column_gather(name: str, rows: int, width: int, src_cols: int, e: int, op: str = "aten.index_select") -> Pass:
    """``t.index_select(1, index)`` of a row-major (rows × src_cols) tensor into (rows × width): every output element
    is an e-byte load at a scattered column of its row, one L1 wavefront each; every sector of the source rows is
    touched (the index covers the row), the output is written coalesced, the index read once per row (cached)."""
    return Pass(name, "gather", 0, e * rows * (src_cols + width), op=op, gathered=rows * width)


def _order_guard(d_out: int, d_in: int) -> list[Pass]:
    """The order guard, once per step: one launch clamps and inverts both orders (reads them, writes the clamped
    orders and the inverses), a second checks them (reads the orders, the clamped orders and the inverses)."""
    d = d_out + d_in
    return [
        Pass("order guard: clamp and invert", "memory", 0, INDEX_BYTES * 3 * d, op="triton.orders"),
        Pass("order guard: check (NaN flag)", "memory", 0, INDEX_BYTES * 3 * d, op="triton.orders_check"),
    ]


def _block_geometry(d_out: int, d_in: int, k: int):
    from smoa_kernels.blocks import block_bounds

    rows = [hi - lo for lo, hi in block_bounds(d_out, k)]
    cols = [hi - lo for lo, hi in block_bounds(d_in, k)]
    return rows, cols


def _delta_pass(name: str, d_out: int, d_in: int, r_k: int, k: int, e: int, anchor_only: bool) -> Pass:
    """``_smoa_delta_blocks_kernel``: per block the rank-r_k product (fp32 FMA dots, rank padded as the launcher pads
    it), the anchor W0[R_k, C_k] gathered element by element (scattered columns of every row of W0: all its sectors),
    the s·ΔW_k (or M_k) tile written in the activation dtype."""
    from smoa_kernels.triton import blocked, configs

    entry = configs.default_config("delta_blocks", _dtype(e))
    rows, cols = _block_geometry(d_out, d_in, k)
    area = sum(r * c for r, c in zip(rows, cols))
    rank_pad = 0 if anchor_only else configs._rank_pad(r_k)
    ldw = blocked._round_up(max(cols))
    programs = -(-max(rows) // entry["BLOCK_I"]) * -(-max(cols) // entry["BLOCK_J"]) * k
    factor_bytes = 0 if anchor_only else FACTOR_BYTES * r_k * (d_out + blocked.band_width(d_in, k))
    return Pass(name, "simt", 2.0 * rank_pad * area, e * (d_out * d_in + d_out * ldw) + factor_bytes,
                op="triton.delta_blocks", gathered=area, programs=programs)  # fmt: skip


def _dtype(e: int):
    import torch

    return torch.float16 if e == 2 else torch.float32


def _scatter(name: str, n: int, d: int, e: int, bias: bool) -> Pass:
    """``_smoa_scatter_kernel``: the token-minor product read along tokens, the output written along features (both
    coalesced; the inverse order read once per column tile)."""
    return Pass(name, "memory", 0, 2 * e * n * d + (e * d if bias else 0), op="triton.scatter")


def _factor_permutes(d_out: int, d_in: int, r_k: int, k: int) -> list[Pass]:
    """``permuted_factors``: Â[:, col_order] into the padded bands (through col_order's band index, made once per
    step), B̂[row_order]; fp32. Once per step: the forward hands them to the backward."""
    from smoa_kernels.triton import blocked

    width = blocked.band_width(d_in, k)
    return [
        _column_gather("Â[:, col_order] into bands (fp32)", r_k, width, d_in, FACTOR_BYTES),
        _tiny("B̂[row_order] (fp32 rows)", "aten.index_select", 2 * FACTOR_BYTES * r_k * d_out),
    ]


def _band_gather(what: str, n: int, d: int, k: int, e: int, order: str) -> Pass:
    """``_smoa_band_gather_kernel``: an activation's columns into token-minor padded bands; coalesced on both sides
    (read along the columns, written along the tokens), the inverse order read once per column tile."""
    from smoa_kernels.triton import blocked

    width, ld = blocked.band_width(d, k), blocked._round_up(n)
    return Pass(f"gather {what}[:, {order}] into token-minor bands", "memory", 0,
                e * (n * d + width * ld) + INDEX_BYTES * d * -(-n // 64), op="triton.band_gather")  # fmt: skip


def _col_band_index(d_in: int, k: int) -> Pass:
    from smoa_kernels.triton import blocked

    width = blocked.band_width(d_in, k)
    return _tiny("band index of col_order (for Â, once per step)", "aten.index_select", 2 * INDEX_BYTES * width)


def _blocked_forward(n: int, d_out: int, d_in: int, rank: int, k: int, e: int, bias: bool) -> list[Pass]:
    r_k = rank // k
    rows, cols = _block_geometry(d_out, d_in, k)
    out = [*_order_guard(d_out, d_in), _band_gather("x", n, d_in, k, e, "col_order")]
    if r_k == 0:
        return [*out, _gemm("base GEMM x·W0ᵀ (F.linear)", n, d_out, d_in, e)]
    out += [_col_band_index(d_in, k), *_factor_permutes(d_out, d_in, r_k, k)]
    out.append(_delta_pass("s·ΔW_k generation (K blocks, one launch)", d_out, d_in, r_k, k, e, False))
    out += [_gemm(f"block GEMM Zᵀ_{b} = s·ΔW_{b}·x_{b}ᵀ", rows[b], n, cols[b], e) for b in range(k)]
    out.append(_scatter("scatter Zᵀ into y (+ b)", n, d_out, e, bias))
    base = _gemm("y += x·W0ᵀ (addmm_, C read)", n, d_out, d_in, e)
    return [*out, replace(base, bytes=base.bytes + e * n * d_out, op="aten.addmm_")]


def _epilogue_passes(n: int, d_out: int, d_in: int, r_k: int, k: int, e: int, sms: int) -> list[Pass]:
    """Per block: ``G_k`` (vendor GEMM, fp32 out), then per chunk of row tiles the factor epilogue (fp32 FMA dots on a
    grid sized by ``blocked.epilogue_grid``) and the two partial reductions with their copies into the bands."""
    from smoa_kernels.triton import blocked, configs

    rows, cols = _block_geometry(d_out, d_in, k)
    rank_chunk = blocked._rank_chunk(r_k)
    rank_chunks = -(-configs._rank_pad(r_k) // rank_chunk)
    chunk_rows = blocked.EPILOGUE_CHUNK_TILES * blocked.EPILOGUE_BLOCK_O
    out = []
    for b in range(k):
        out.append(_gemm(f"G_{b} = dY_{b}ᵀ·x_{b} (fp32 out)", rows[b], cols[b], n, e, out_bytes=4))
        for lo in range(0, rows[b], chunk_rows):
            hi = min(lo + chunk_rows, rows[b])
            tiles, col_programs = blocked.epilogue_grid(hi - lo, cols[b], rank_chunks, sms)
            per = blocked._round_up(-(-cols[b] // col_programs), blocked.EPILOGUE_COLUMN_ALIGN)
            col_programs = -(-cols[b] // per)
            area = (hi - lo) * cols[b]
            da_part = 4 * tiles * r_k * cols[b]
            db_part = 4 * col_programs * (hi - lo) * r_k
            flops = area * (2 + 4 * rank_chunk * rank_chunks)  # H = s·G ⊙ M, then dB and dA rank-chunk dots
            out += [
                Pass(f"factor epilogue block {b} (H = s·G ⊙ M; dB, dA partials)", "simt", flops,
                     (4 + e) * area + da_part + db_part, op="triton.factor_epilogue",
                     programs=tiles * col_programs * rank_chunks),
                Pass(f"dA partials Σ over row tiles into the bands, block {b}", "memory", 0,
                     da_part + 4 * r_k * cols[b], op="aten.sum"),
                *([] if lo == 0 else [_tiny(f"dA chunk added, block {b}", "aten.add_", 12 * r_k * cols[b])]),
                Pass(f"dB partials Σ over column ranges into the bands, block {b}", "memory", 0,
                     db_part + 4 * (hi - lo) * r_k, op="aten.sum"),
            ]  # fmt: skip
    return out


def _original_coordinates(d_out: int, d_in: int, r_k: int) -> list[Pass]:
    """The factor gradients back from the bands to original coordinates (NaN-filled first: a non-permutation order
    leaves no stale value)."""
    f = FACTOR_BYTES
    return [
        _tiny("dÂ = full(NaN)", "aten.full", f * r_k * d_in),
        _tiny("dÂ band data columns", "aten.index_select", 2 * f * r_k * d_in),
        _tiny("dÂ[:, col_order] = …", "aten.index_put_", 2 * f * r_k * d_in),
        _tiny("dB̂ = full(NaN)", "aten.full", f * r_k * d_out),
        _tiny("dB̂[row_order] = …", "aten.index_put_", 2 * f * r_k * d_out),
    ]


def _factor_grads(n, d_out, d_in, r_k, k, e, sms: int) -> list[Pass]:
    out = []  # the permuted factors come from the forward
    out.append(_delta_pass("anchor gather M_k = W0[R_k, C_k] (for the epilogue)", d_out, d_in, r_k, k, e, True))
    return [*out, *_epilogue_passes(n, d_out, d_in, r_k, k, e, sms), *_original_coordinates(d_out, d_in, r_k)]


def _blocked_backward(n: int, d_out: int, d_in: int, rank: int, k: int, e: int, bias: bool, sms: int) -> list[Pass]:
    r_k = rank // k
    rows, cols = _block_geometry(d_out, d_in, k)
    out = [_band_gather("dY", n, d_out, k, e, "row_order")]  # orders and permuted factors: from the forward
    if r_k == 0:
        out.append(_gemm("dX = dY·W0", n, d_in, d_out, e))
    else:
        out.append(_delta_pass("s·ΔW_k regeneration", d_out, d_in, r_k, k, e, False))
        out += [_gemm(f"block GEMM Uᵀ_{b} = s·ΔW_{b}ᵀ·dY_{b}ᵀ", cols[b], n, rows[b], e) for b in range(k)]
        out.append(_scatter("scatter Uᵀ into dX", n, d_in, e, False))
        base = _gemm("dX += dY·W0 (addmm_, C read)", n, d_in, d_out, e)
        out.append(replace(base, bytes=base.bytes + e * n * d_in, op="aten.addmm_"))
    if bias:
        out.append(Pass("db = Σ dY", "memory", 0, e * n * d_out, op="aten.sum"))
    if r_k == 0:
        return out
    out.append(_band_gather("x", n, d_in, k, e, "col_order"))  # x is saved, not its bands: gathered again
    return [*out, *_factor_grads(n, d_out, d_in, r_k, k, e, sms)]


def _fused_gemm(name: str, n: int, d_out: int, d_red: int, rank: int, k: int, e: int, has_base: bool) -> list[Pass]:
    """``_smoa_fused_operands_kernel`` (the block-extended factors U, V from the factors and the inverse orders, one
    launch) and ``_smoa_gemm_kernel``: base dot and the adapter dot on every weight tile, the rank product U·V
    regenerated once per token tile, at the tile and rank pad of the shipped single config."""
    from smoa_kernels.triton import configs

    entry = configs.default_config("gemm", _dtype(e))
    rank_pad = configs._rank_pad(rank)
    red_pad = -(-d_red // 16) * 16
    tiles_n = -(-n // entry["BLOCK_N"])
    programs = -(-d_out // entry["BLOCK_O"]) * tiles_n
    operands = Pass("fused operands U, V (one launch)", "memory", 0,
                    FACTOR_BYTES * rank * (d_out + d_red) // max(k, 1) + INDEX_BYTES * (d_out + d_red)
                    + e * rank_pad * (d_out + red_pad), op="triton.fused_operands")  # fmt: skip
    dots = (2 if has_base else 1) * 2.0 * n * d_out * d_red
    regen = 2.0 * d_out * d_red * rank_pad * tiles_n
    traffic = e * (d_out * d_red + 2 * n * d_red + n * d_out) + e * rank_pad * (d_out + d_red)
    return [operands, Pass(name, "triton", dots + regen, traffic, op="triton.gemm", programs=programs)]


def _fused_forward(n: int, d_out: int, d_in: int, rank: int, k: int, e: int, bias: bool, keep: bool) -> list[Pass]:
    gemm = _fused_gemm("fused GEMM (base + adapter dot, ΔW in registers)", n, d_out, d_in, rank, k, e, True)
    out = [*_order_guard(d_out, d_in), *gemm]
    if keep:  # training: what the backward's factor gradient needs, made once per step
        out += [_col_band_index(d_in, k), *_factor_permutes(d_out, d_in, rank // k, k)]
    return out


def _fused_backward(n: int, d_out: int, d_in: int, rank: int, k: int, e: int, bias: bool, sms: int) -> list[Pass]:
    r_k = rank // k
    out = [_band_gather("dY", n, d_out, k, e, "row_order")]  # orders and permuted factors: from the forward
    out += _fused_gemm("fused dX GEMM (base + adapter dot)", n, d_in, d_out, rank, k, e, True)
    if bias:
        out.append(Pass("db = Σ dY", "memory", 0, e * n * d_out, op="aten.sum"))
    out.append(_band_gather("x", n, d_in, k, e, "col_order"))
    return [*out, *_factor_grads(n, d_out, d_in, r_k, k, e, sms)]


def _forward(method: str, n: int, d_out: int, d_in: int, rank: int, k: int, e: int, bias: bool,
             keep: bool = True) -> list[Pass]:  # fmt: skip
    w = d_out * d_in
    rho = rank // k  # lora-eq / hira rank: SMoA's trainable parameters
    base = _gemm("base GEMM x·W0ᵀ", n, d_out, d_in, e)
    if method == "frozen":
        return [base]
    if method == "lora-eq":
        return [
            base,
            _gemm("x·Aᵀ", n, rho, d_in, e),
            _gemm("(x·Aᵀ)·Bᵀ", n, d_out, rho, e),
            Pass("scale", "memory", 0, 2 * e * n * d_out),
            Pass("y += adapter", "memory", 0, 3 * e * n * d_out),
        ]
    if method in ("hira", "reference"):
        out = [
            _gemm("P = B·A (dense)", d_out, d_in, rho, e),
            Pass("ΔW = W0 ⊙ P", "memory", 0, 3 * e * w),
        ]
        if method == "reference":
            out.append(Pass("ΔW ⊙ block mask", "memory", 0, 3 * e * w))
        return [*out, base, _gemm("x·ΔWᵀ (second full GEMM)", n, d_out, d_in, e),
                Pass("y += s·adapter", "memory", 0, 3 * e * n * d_out)]  # fmt: skip
    if method == "smoa-fused":
        return _fused_forward(n, d_out, d_in, rank, k, e, bias, keep)
    if method == "smoa-blocked":
        return _blocked_forward(n, d_out, d_in, rank, k, e, bias)
    raise ValueError(f"method={method!r} is not one of {', '.join(map(repr, METHODS))}")


def _backward(
    method: str, n: int, d_out: int, d_in: int, rank: int, k: int, e: int, bias: bool, sms: int = 132
) -> list[Pass]:
    w = d_out * d_in
    rho = rank // k
    dx = _gemm("dX = dY·W0", n, d_in, d_out, e)
    db = [Pass("db = Σ dY", "memory", 0, e * n * d_out)] if bias else []
    if method == "frozen":
        return [dx, *db]
    if method == "lora-eq":
        return [
            dx, *db,
            Pass("dY·s", "memory", 0, 2 * e * n * d_out),
            _gemm("dh = (s·dY)·B", n, rho, d_out, e),
            _gemm("dB = (s·dY)ᵀ·h", d_out, rho, n, e),
            _gemm("dA = dhᵀ·x", rho, d_in, n, e),
            _gemm("dX_a = dh·A", n, d_in, rho, e),
            Pass("dX += dX_a", "memory", 0, 3 * e * n * d_in),
        ]  # fmt: skip
    if method in ("hira", "reference"):
        out = [
            dx, *db,
            _gemm("dY·ΔW (second full GEMM)", n, d_in, d_out, e),
            Pass("dX += adapter", "memory", 0, 3 * e * n * d_in),
            _gemm("dΔW = dYᵀ·x (full)", d_out, d_in, n, e),
            Pass("dP = s·dΔW ⊙ W0", "memory", 0, 3 * e * w),
        ]  # fmt: skip
        if method == "reference":
            out.append(Pass("dP ⊙ block mask", "memory", 0, 3 * e * w))
        return [*out, _gemm("dB = dP·Aᵀ", d_out, rho, d_in, e), _gemm("dA = Bᵀ·dP", rho, d_in, d_out, e)]
    if method == "smoa-fused":
        return _fused_backward(n, d_out, d_in, rank, k, e, bias, sms)
    if method == "smoa-blocked":
        return _blocked_backward(n, d_out, d_in, rank, k, e, bias, sms)
    raise ValueError(f"method={method!r} is not one of {', '.join(map(repr, METHODS))}")


def _check_ints(**values: int) -> None:
    for name, value in values.items():
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name}={value!r} must be a positive integer")


def passes(
    method: str,
    mode: str,
    n_tokens: int,
    d_out: int,
    d_in: int,
    rank: int,
    num_blocks: int,
    element_bytes: int = 2,
    gpu: str = "h100",
    bias: bool = False,
) -> list[Pass]:
    """The modelled passes (with their estimated ``seconds``) of ``method`` in ``mode`` (:data:`MODES`; "full" is
    forward + backward, "inference" the forward without saving anything)."""
    _check_ints(n_tokens=n_tokens, d_out=d_out, d_in=d_in, rank=rank, num_blocks=num_blocks)
    if element_bytes not in (2, 4):
        raise ValueError(f"element_bytes={element_bytes!r} must be 2 (bf16/fp16) or 4 (fp32)")
    if mode not in MODES:
        raise ValueError(f"mode={mode!r} is not one of {', '.join(map(repr, MODES))}")
    if method not in METHODS:
        raise ValueError(f"method={method!r} is not one of {', '.join(map(repr, METHODS))}")
    g = _gpu(gpu)
    args = (method, n_tokens, d_out, d_in, rank, num_blocks, element_bytes, bias)
    out = []
    if mode in ("forward", "full", "inference"):
        out += _forward(*args, mode != "inference")  # a training forward keeps what its backward needs
    if mode in ("backward", "full"):
        out += _backward(*args, g.multiprocessors)
    return [_timed(p, g, element_bytes) for p in out]


def estimate(method: str, mode: str, n_tokens: int, d_out: int, d_in: int, rank: int, num_blocks: int,
             element_bytes: int = 2, gpu: str = "h100", bias: bool = False) -> float:  # fmt: skip
    """Estimated seconds of ``method`` in ``mode`` (the sum of its :func:`passes`). A model, not a measurement."""
    return sum(p.seconds for p in passes(method, mode, n_tokens, d_out, d_in, rank, num_blocks, element_bytes, gpu,
                                         bias))  # fmt: skip


def path_times(
    n_tokens: int,
    d_out: int,
    d_in: int,
    num_blocks: int,
    element_bytes: int = 2,
    gpu: str = "h100",
    *,
    rank: int | None = None,
    mode: str = "full",
) -> dict[str, float]:
    """Estimated seconds of each Triton path, ``{"fused": t, "blocked": t}``, for ``mode`` ("full": a training step,
    the default; "inference"/"forward": the forward only). ``rank``: the total rank r (default 16·K; it barely
    matters)."""
    rank = 16 * num_blocks if rank is None else rank
    return {
        path: estimate(method, mode, n_tokens, d_out, d_in, rank, num_blocks, element_bytes, gpu)
        for path, method in PATHS.items()
    }


def choose_path(
    n_tokens: int,
    d_out: int,
    d_in: int,
    num_blocks: int,
    element_bytes: int = 2,
    gpu: str = "h100",
    *,
    rank: int | None = None,
    mode: str = "full",
) -> str:
    """``"fused"`` or ``"blocked"``, whichever the model says is faster for this call (``mode``: "full" when the call
    will be differentiated, "inference" under ``torch.no_grad``). Ties go to "fused"."""
    times = path_times(n_tokens, d_out, d_in, num_blocks, element_bytes, gpu, rank=rank, mode=mode)
    return "blocked" if times["blocked"] < times["fused"] else "fused"


def step_vs_frozen(method: str, n_tokens: int, d_out: int, d_in: int, rank: int, num_blocks: int,
                   element_bytes: int = 2, gpu: str = "h100") -> float:  # fmt: skip
    """Estimated training step of ``method`` over the frozen layer's step 4·N·d_out·d_in at the vendor efficiency
    (the 1.0 line of the targets)."""
    frozen = 4.0 * n_tokens * d_out * d_in / _rate(_gpu(gpu), element_bytes, "vendor")
    return estimate(method, "full", n_tokens, d_out, d_in, rank, num_blocks, element_bytes, gpu) / frozen


def predictions(gpus: tuple[str, ...] = tuple(GPUS)) -> dict:
    """The model's predictions at the canonical shapes (:data:`CANONICAL`, bf16) for every method, forward and full
    step, per GPU class: what is committed in ``benchmarks/results/cost_model_predictions.json``."""
    c = CANONICAL
    rows = []
    for gpu in gpus:
        for n in c["tokens"]:
            for k in c["blocks"]:
                for method in METHODS:
                    row = {"gpu": gpu, "method": method, "d_out": c["d_out"], "d_in": c["d_in"], "N": n,
                           "r": c["rank"], "K": k, "dtype": "bf16"}  # fmt: skip
                    for mode in ("forward", "full"):
                        row[f"{mode}_ms"] = 1e3 * estimate(method, mode, n, c["d_out"], c["d_in"], c["rank"], k, 2, gpu)
                    row["full_x_frozen"] = step_vs_frozen(method, n, c["d_out"], c["d_in"], c["rank"], k, 2, gpu)
                    rows.append(row)
    return {
        "label": "MODEL ESTIMATE (smoa_kernels.cost_model), not a measurement",
        "gpus": {key: asdict(GPUS[key]) for key in gpus},
        "rows": rows,
    }


def markdown_table(gpu: str = "h100") -> str:
    """The docs/kernels.md table: estimated full step (× frozen) and forward ms per method at the canonical shapes."""
    rows = [row for row in predictions((gpu,))["rows"]]
    lines = ["| N | K | " + " | ".join(METHODS) + " |", "|---|---|" + "---|" * len(METHODS)]
    for n in CANONICAL["tokens"]:
        for k in CANONICAL["blocks"]:
            cells = []
            for method in METHODS:
                row = next(r for r in rows if r["N"] == n and r["K"] == k and r["method"] == method)
                cells.append(f"{row['full_ms']:.3f} ({row['full_x_frozen']:.2f}×) / {row['forward_ms']:.3f}")
            lines.append(f"| {n} | {k} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Print (and write) the cost model's predictions (estimates).")
    parser.add_argument("--json", metavar="PATH", help="write the predictions as JSON")
    parser.add_argument("--markdown", metavar="GPU", choices=tuple(GPUS), help="print the docs table for GPU")
    args = parser.parse_args(argv)
    data = predictions()
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(data, handle, indent=1)
            handle.write("\n")
    if args.markdown:
        print(markdown_table(args.markdown))
    else:
        print(f"{data['label']}\n{'gpu':<6}{'method':<14}{'N':>6}{'K':>3}{'fwd ms':>9}{'step ms':>9}{'× frozen':>10}")
        for row in data["rows"]:
            print(f"{row['gpu']:<6}{row['method']:<14}{row['N']:>6}{row['K']:>3}{row['forward_ms']:>9.3f}"
                  f"{row['full_ms']:>9.3f}{row['full_x_frozen']:>10.2f}")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
