"""The cost model (smoa_kernels.cost_model) against independent derivations: the FLOP counts of KERNELS.md §1, the
roofline of one pass from the GPU table, the dispatch's cross-over, bad input, and the committed predictions."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from smoa_kernels import cost_model as cm

D, N, R = 4096, 8192, 32
PREDICTIONS = Path(__file__).resolve().parents[2] / "benchmarks" / "results" / "cost_model_predictions.json"


def _gemm_flops(method: str, mode: str, k: int, n: int = N, d_out: int = D, d_in: int = D) -> float:
    return sum(p.flops for p in cm.passes(method, mode, n, d_out, d_in, R, k) if p.engine in ("vendor", "triton"))


@pytest.mark.parametrize("k", [1, 2, 4])
def test_flops_match_the_floor_table(k):
    from smoa_kernels.triton import configs

    nd2 = N * D * D
    assert _gemm_flops("frozen", "full", k) == 4 * nd2
    # blocked: exactly the floor (4 + 6/K)·N·D² in the tensor-core GEMMs; the rank-r_k terms are fp32 FMA (SIMT)
    # passes: two ΔW_k generations (rank padded to >= 16) and the epilogue (H, then dB and dA, rank padded)
    assert _gemm_flops("smoa-blocked", "full", k) == pytest.approx((4 + 6 / k) * nd2, rel=1e-12)
    pad = configs._rank_pad(R // k)
    simt = sum(p.flops for p in cm.passes("smoa-blocked", "full", N, D, D, R, k) if p.engine == "simt")
    assert simt == pytest.approx(2 * (2 * D * D / k * pad) + D * D / k * (2 + 4 * pad), rel=1e-12)
    # fused: (8 + 2/K)·N·D² plus, in each of its two GEMM passes, the in-register rank product U·V (rank pad of the
    # block-extended factors, K·r_k = r padded) once per token tile of the shipped single config (KERNELS.md §3)
    tile = configs.default_config("gemm", __import__("torch").float16)["BLOCK_N"]
    regeneration = 2 * (2 * D * D * configs._rank_pad(R) * (N // tile))
    assert _gemm_flops("smoa-fused", "full", k) == pytest.approx((8 + 2 / k) * nd2 + regeneration, rel=1e-12)
    # hira/reference: base + second full GEMM forward, two in dX, the full dΔW: 10·N·D² (+ the rank-ρ products)
    assert _gemm_flops("hira", "full", k) == pytest.approx(10 * nd2, rel=0.01)
    assert _gemm_flops("reference", "full", k) == _gemm_flops("hira", "full", k)


def test_pass_time_is_a_roofline_plus_launches():
    g = cm.GPUS["h100"]
    # a compute-bound pass: the frozen forward at N = 8192 (bytes ≪ FLOPs / ridge)
    (base,) = cm.passes("frozen", "forward", N, D, D, R, 2)
    assert base.seconds == pytest.approx(
        2 * N * D * D / (g.tflops_16bit * 1e12 * g.vendor_gemm_efficiency) + g.launch_us * 1e-6
    )
    # a scattered column gather (index_select along dim 1): every sector of the source rows read, the output written,
    # and one L1 wavefront per 2-byte element (one wavefront per SM per cycle) -- that, not HBM, bounds it
    scattered = cm._timed(cm._column_gather("x[:, order]", N, D, D, 2), g, 2)
    assert scattered.engine == "gather" and scattered.bytes == 2 * N * (D + D) and scattered.gathered == N * D
    hbm = scattered.bytes / (g.hbm_tb_s * 1e12 * g.bandwidth_efficiency)
    l1 = N * D / (g.multiprocessors * g.clock_ghz * 1e9)
    assert l1 > 2 * hbm and scattered.seconds == pytest.approx(l1 + 5e-6)
    # the blocked path's band gathers are the coalesced kernel: a streaming pass (read x, write the bands)
    gather = next(p for p in cm.passes("smoa-blocked", "forward", N, D, D, R, 2) if p.name.startswith("gather"))
    assert gather.op == "triton.band_gather" and gather.engine == "memory" and not gather.gathered
    assert gather.bytes == pytest.approx(2 * 2 * N * D, rel=0.05)  # plus the inverse order, once per token tile
    assert gather.seconds == pytest.approx(gather.bytes / (g.hbm_tb_s * 1e12 * g.bandwidth_efficiency) + 5e-6)
    # full = forward + backward; inference = forward
    for method in cm.METHODS:
        full = cm.estimate(method, "full", N, D, D, R, 2)
        assert full == pytest.approx(
            cm.estimate(method, "forward", N, D, D, R, 2) + cm.estimate(method, "backward", N, D, D, R, 2)
        )
        # inference keeps nothing for a backward: the fused path then skips the factor permutes
        inference, forward = (
            cm.estimate(method, "inference", N, D, D, R, 2),
            cm.estimate(method, "forward", N, D, D, R, 2),
        )
        assert inference == forward if method != "smoa-fused" else inference < forward
    # fp32 GEMMs in cuBLAS run at the SIMT fp32 peak (allow_tf32=False): far slower than bf16
    assert cm.estimate("frozen", "full", N, D, D, R, 2, element_bytes=4) > 10 * cm.estimate(
        "frozen", "full", N, D, D, R, 2
    )


def test_a100_is_slower_and_h200_has_more_bandwidth():
    for method in cm.METHODS:
        h100 = cm.estimate(method, "full", N, D, D, R, 2, gpu="h100")
        assert cm.estimate(method, "full", N, D, D, R, 2, gpu="a100") > 2 * h100
        assert cm.estimate(method, "full", 16, D, D, R, 2, gpu="h200") < cm.estimate(method, "full", 16, D, D, R, 2)


def test_choose_path_crosses_over_once():
    # small N: W0 traffic dominates, the fused single pass wins; training-sized N: the blocked path's FLOPs win
    assert cm.choose_path(16, D, D, 2, mode="inference") == "fused"
    assert cm.choose_path(8192, D, D, 2) == "blocked"
    assert cm.choose_path(8192, D, D, 4, mode="inference") == "blocked"
    for k in (2, 4):
        for mode in ("inference", "full"):
            picks = [cm.choose_path(n, D, D, k, mode=mode) for n in (1, 16, 64, 256, 512, 1024, 2048, 4096, 8192)]
            first_blocked = picks.index("blocked")
            assert set(picks[first_blocked:]) == {"blocked"}, picks
    times = cm.path_times(8192, D, D, 2)
    assert set(times) == {"fused", "blocked"} and times["blocked"] < times["fused"]


def test_step_vs_frozen_uses_the_vendor_frozen_step():
    g = cm.GPUS["h100"]
    frozen_step = 4 * N * D * D / (g.tflops_16bit * 1e12 * g.vendor_gemm_efficiency)
    ratio = cm.step_vs_frozen("smoa-blocked", N, D, D, R, 2)
    assert ratio == pytest.approx(cm.estimate("smoa-blocked", "full", N, D, D, R, 2) / frozen_step)
    # the frozen layer itself is 1.0 up to its two launches and the bandwidth-bound part
    assert 1.0 < cm.step_vs_frozen("frozen", N, D, D, R, 2) < 1.05


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"gpu": "v100"}, "gpu"),
        ({"mode": "train"}, "mode"),
        ({"method": "dora"}, "method"),
        ({"n_tokens": 0}, "n_tokens"),
        ({"num_blocks": 1.5}, "num_blocks"),
        ({"element_bytes": 3}, "element_bytes"),
    ],
)
def test_bad_input_names_the_argument(kwargs, name):
    args = {"method": "smoa-blocked", "mode": "full", "n_tokens": N, "d_out": D, "d_in": D, "rank": R,
            "num_blocks": 2, **kwargs}  # fmt: skip
    with pytest.raises(ValueError, match=name):
        cm.passes(**args)


def test_gpu_class_for_device_names():
    assert cm.gpu_class_for("NVIDIA H100 80GB HBM3") == "h100"
    assert cm.gpu_class_for("NVIDIA A100-SXM4-80GB") == "a100"
    assert cm.gpu_class_for("NVIDIA H200") == "h200"
    assert cm.gpu_class_for("NVIDIA L4") == "h100"


def test_committed_predictions_are_the_models():
    committed = json.loads(PREDICTIONS.read_text())
    assert "not a measurement" in committed["label"]
    assert committed == json.loads(json.dumps(cm.predictions())), (
        "benchmarks/results/cost_model_predictions.json is stale: python -m smoa_kernels.cost_model --json "
        "benchmarks/results/cost_model_predictions.json"
    )


def test_docs_table_is_the_models():
    docs = (Path(__file__).resolve().parents[2] / "docs" / "kernels.md").read_text()
    assert cm.markdown_table("h100") in docs, (
        "the table in docs/kernels.md is stale: python -m smoa_kernels.cost_model --markdown h100"
    )
