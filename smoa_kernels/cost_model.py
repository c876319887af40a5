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
- ``smoa-fused``: the single-pass Triton kernel (base + adapter dot on every weight tile, ΔW generated in registers):
  4·N·D² per GEMM pass, (8 + 2/K)·N·D² per training step, all at the Triton efficiency;
- ``smoa-blocked``: the full-weight GEMMs in the vendor library plus the adapter on the K contiguous diagonal blocks:
  forward = base GEMM + gather x_a + ΔW_k generation + K block GEMMs + scatter-add into y; backward = ``dY W0`` +
  gather dY + re-gather x (saved as is, not its bands) + ΔW_k regeneration + anchor gather + K block GEMMs for dX +
  scatter-add into dx + K ``G_k = dY_kᵀ x_k`` GEMMs (fp32 out)
  + the factor-gradient epilogue (reads G_k and W0_k, rank-r_k contractions): exactly (4 + 6/K)·N·D² FLOPs.

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
    tflops_fp32: float  # fp32 SIMT peak (cuBLAS fp32 GEMMs with allow_tf32=False, torch's default)
    hbm_tb_s: float
    vendor_gemm_efficiency: float = 0.75  # cuBLAS at large, well-shaped GEMMs
    triton_gemm_efficiency: float = 0.60  # a Triton GEMM with a generated operand (the tutorial kernel: ≈ 0.75·cuBLAS)
    bandwidth_efficiency: float = 0.80  # of the datasheet HBM bandwidth, for streaming passes
    launch_us: float = 5.0  # per kernel launch, including the PyTorch dispatch around it


GPUS: dict[str, GPUClass] = {
    "a100": GPUClass("A100 SXM", tflops_16bit=312.0, tflops_tf32=156.0, tflops_fp32=19.5, hbm_tb_s=2.04),
    "h100": GPUClass("H100 SXM", tflops_16bit=989.0, tflops_tf32=494.0, tflops_fp32=67.0, hbm_tb_s=3.35),
    "h200": GPUClass("H200 SXM", tflops_16bit=989.0, tflops_tf32=494.0, tflops_fp32=67.0, hbm_tb_s=4.8),
}
METHODS = ("frozen", "lora-eq", "hira", "reference", "smoa-fused", "smoa-blocked")
MODES = ("forward", "backward", "full", "inference")
PATHS = {"fused": "smoa-fused", "blocked": "smoa-blocked"}
# The canonical shape of the performance targets: bf16, 4096×4096, r = 32.
CANONICAL = {"d_out": 4096, "d_in": 4096, "rank": 32, "tokens": (256, 2048, 8192), "blocks": (2, 4)}
FACTOR_BYTES = 4  # fp32 factors (the precision contract of SMoALinear)
TRITON_TILE_N = 128  # token tile of the fused kernel: each weight tile's ΔW is regenerated N/TRITON_TILE_N times
RANK_PAD = 16  # the fused kernel pads the rank-r_k product to at least 16


@dataclass(frozen=True)
class Pass:
    """One pass of a method: ``launches`` kernel launches doing ``flops`` FLOPs and moving ``bytes`` bytes in all.
    ``engine``: "vendor" (cuBLAS GEMM), "triton" (a Triton GEMM) or "memory" (a streaming, bandwidth-bound pass)."""

    name: str
    engine: str
    flops: float
    bytes: float
    launches: int = 1
    seconds: float = 0.0


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
    """FLOP/s of a GEMM pass: 16-bit tensor cores; fp32 = SIMT fp32 in cuBLAS, 3×TF32 ("tf32x3") in Triton."""
    if engine == "triton":
        peak = g.tflops_16bit if element_bytes == 2 else g.tflops_tf32 / 3
        return peak * 1e12 * g.triton_gemm_efficiency
    peak = g.tflops_16bit if element_bytes == 2 else g.tflops_fp32
    return peak * 1e12 * g.vendor_gemm_efficiency


def _timed(p: Pass, g: GPUClass, element_bytes: int) -> Pass:
    compute = p.flops / _rate(g, element_bytes, "triton" if p.engine == "triton" else "vendor") if p.flops else 0.0
    memory = p.bytes / (g.hbm_tb_s * 1e12 * g.bandwidth_efficiency)
    return replace(p, seconds=max(compute, memory) + p.launches * g.launch_us * 1e-6)


def _gemm(name: str, m: float, n: float, k: float, e: int, engine: str = "vendor", blocks: int = 1,
          out_bytes: int | None = None) -> Pass:  # fmt: skip
    """``blocks`` GEMMs ``(m×k)·(k×n)`` (one launch each): 2mnk FLOPs each, operands read once, output written once."""
    out = e if out_bytes is None else out_bytes
    return Pass(name, engine, 2.0 * m * n * k * blocks, (e * (m * k + k * n) + out * m * n) * blocks, blocks)


def _forward(method: str, n: int, d_out: int, d_in: int, rank: int, k: int, e: int, bias: bool) -> list[Pass]:
    f, w, r_k = FACTOR_BYTES, d_out * d_in, rank // k
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
        regen = 2.0 * w * RANK_PAD * max(1.0, n / TRITON_TILE_N)  # each weight tile rebuilt by N/tile programs
        return [
            Pass("fused GEMM (base + adapter dot, ΔW in registers)", "triton", 4.0 * n * w + regen,
                 e * (w + n * d_in + n * d_out) + f * rank * (d_in + d_out) / k),
        ]  # fmt: skip
    if method == "smoa-blocked":
        return [
            base,
            Pass("gather x_a[:, col_order]", "memory", 0, 2 * e * n * d_in),
            Pass("ΔW_k generation (K blocks, one kernel)", "triton", 2.0 * w / k * r_k,
                 2 * e * w / k + f * r_k * (d_in + d_out)),
            _gemm("block GEMMs x_k·ΔW_kᵀ", n, d_out / k, d_in / k, e, blocks=k),
            Pass("scatter-add into y", "memory", 0, 3 * e * n * d_out),
        ]  # fmt: skip
    raise ValueError(f"method={method!r} is not one of {', '.join(map(repr, METHODS))}")


def _backward(method: str, n: int, d_out: int, d_in: int, rank: int, k: int, e: int, bias: bool) -> list[Pass]:
    f, w, r_k = FACTOR_BYTES, d_out * d_in, rank // k
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
        regen = 2.0 * w * RANK_PAD * max(1.0, n / TRITON_TILE_N)
        return [
            Pass("fused dX GEMM (base + adapter dot)", "triton", 4.0 * n * w + regen,
                 e * (w + n * d_in + n * d_out) + f * rank * (d_in + d_out) / k),
            *db,
            Pass("gather dY, x_a", "memory", 0, 2 * e * n * (d_in + d_out)),
            Pass("factor gradient (G_k tiles + epilogue)", "triton", 2.0 * n * w / k + 4.0 * w * r_k / k,
                 e * (n * (d_in + d_out) + w / k) + 2 * f * rank * (d_in + d_out) / k),
        ]  # fmt: skip
    if method == "smoa-blocked":
        return [
            dx, *db,
            Pass("gather dY[:, row_order]", "memory", 0, 2 * e * n * d_out),
            # without dropout x itself is saved (shared by q/k/v, like LoRA), so its bands are gathered again
            Pass("re-gather x[:, col_order] (x saved, not its bands)", "memory", 0, 2 * e * n * d_in),
            Pass("ΔW_k regeneration", "triton", 2.0 * w / k * r_k, 2 * e * w / k + f * r_k * (d_in + d_out)),
            Pass("anchor gather M_k = W0[R_k, C_k] (for the epilogue)", "triton", 0, 2 * e * w / k),
            _gemm("block GEMMs dY_k·ΔW_k", n, d_in / k, d_out / k, e, blocks=k),
            Pass("scatter-add into dX", "memory", 0, 3 * e * n * d_in),
            _gemm("G_k = dY_kᵀ·x_k (fp32 out)", d_out / k, d_in / k, n, e, blocks=k, out_bytes=4),
            Pass("factor-gradient epilogue (H = G_k ⊙ s·W0_k; dB_k, dA_k)", "triton", 4.0 * w * r_k / k,
                 (4 + e) * w / k + 2 * f * r_k * (d_in + d_out)),
        ]  # fmt: skip
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
        out += _forward(*args)
    if mode in ("backward", "full"):
        out += _backward(*args)
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
