"""The one cost model of the SMoA kernels: time ≈ GEMM FLOPs at the vendor library's efficiency + bytes moved at HBM
bandwidth + launch overheads, per GPU class. Every figure it returns is an ESTIMATE (a model, not a measurement).

The ``triton`` backend's dispatch (:func:`choose_path`) uses it to pick, per call, between

- ``"fused"``: the single-pass kernel (ΔW generated in registers, one pass over W0 per GEMM) — wins at small N, where
  reading W0 dominates;
- ``"blocked"``: the full-weight GEMMs in the vendor library plus the adapter on the K contiguous diagonal blocks
  (ΔW_k generated once per block per step) — wins at training-sized N, where FLOPs dominate.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["GPUS", "GPUClass", "choose_path", "path_times"]


@dataclass(frozen=True)
class GPUClass:
    """Peak rates of one GPU class and the fraction of them the kernels are modelled to reach."""

    name: str
    tflops_16bit: float  # dense bf16/fp16 tensor-core peak
    tflops_tf32: float  # dense TF32 tensor-core peak (fp32 activations)
    hbm_tb_s: float
    vendor_gemm_efficiency: float = 0.80  # cuBLAS at large, well-shaped GEMMs
    triton_gemm_efficiency: float = 0.60  # a generated-operand Triton GEMM
    bandwidth_efficiency: float = 0.80
    launch_us: float = 5.0


GPUS: dict[str, GPUClass] = {
    "h100": GPUClass("H100 SXM", tflops_16bit=989.0, tflops_tf32=494.0, hbm_tb_s=3.35),
    "a100": GPUClass("A100 SXM", tflops_16bit=312.0, tflops_tf32=156.0, hbm_tb_s=2.0),
}


def _flops_rate(gpu: GPUClass, element_bytes: int, efficiency: float) -> float:
    peak = gpu.tflops_16bit if element_bytes == 2 else gpu.tflops_tf32
    return peak * 1e12 * efficiency


def path_times(
    n_tokens: int, d_out: int, d_in: int, num_blocks: int, element_bytes: int = 2, gpu: str = "h100"
) -> dict[str, float]:
    """Modelled forward-pass seconds of each path (``{"fused": t, "blocked": t}``); the backward scales alike."""
    g = GPUS[gpu]
    weight = d_out * d_in
    bw = g.hbm_tb_s * 1e12 * g.bandwidth_efficiency
    act = n_tokens * (d_in + d_out) * element_bytes
    # fused: one pass over W0 (and the activations), base + adapter dot on every tile in a Triton GEMM
    fused = 4 * n_tokens * weight / _flops_rate(g, element_bytes, g.triton_gemm_efficiency)
    fused = max(fused, (weight * element_bytes + act) / bw) + g.launch_us * 1e-6
    # blocked: base GEMM + K block GEMMs in the vendor library; gather x, generate ΔW_k, scatter-add into y
    gemm = (2 * n_tokens * weight + 2 * n_tokens * weight / num_blocks) / _flops_rate(
        g, element_bytes, g.vendor_gemm_efficiency
    )
    traffic = (weight + 2 * weight / num_blocks) * element_bytes + 2 * n_tokens * d_in * element_bytes
    traffic += 3 * n_tokens * d_out * element_bytes  # adapter output written, read, y read-modify-written
    blocked = gemm + traffic / bw + (3 + 2 * num_blocks) * g.launch_us * 1e-6
    return {"fused": fused, "blocked": blocked}


def choose_path(
    n_tokens: int, d_out: int, d_in: int, num_blocks: int, element_bytes: int = 2, gpu: str = "h100"
) -> str:
    """``"fused"`` or ``"blocked"``, whichever the model says is faster for this call."""
    times = path_times(n_tokens, d_out, d_in, num_blocks, element_bytes, gpu)
    return min(times, key=times.get)
