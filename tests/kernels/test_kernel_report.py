"""The compile gate (tools/kernel_report.py): its SASS reading and verdicts on hand-written listings, the binder's
specialisation, the capture of the entry point's launches, and one real compile for each arch.

The full gate over every kernel × config × arch is ``python tools/kernel_report.py`` (run by .ci/run); these tests
check that the tool measures what it says, not how today's kernels fare.
"""

from __future__ import annotations

import importlib.util
import inspect
import json
import sys
from pathlib import Path
from typing import Literal

import pytest

triton = pytest.importorskip("triton", reason="triton is not installed: nothing to compile")

TOOL = Path(__file__).resolve().parents[2] / "tools" / "kernel_report.py"


def _load_tool():
    if "kernel_report" in sys.modules:
        return sys.modules["kernel_report"]
    spec = importlib.util.spec_from_file_location("kernel_report", TOOL)
    module = importlib.util.module_from_spec(spec)
    sys.modules["kernel_report"] = module  # the worker processes unpickle its Job class by this name
    spec.loader.exec_module(module)
    return module


kr = _load_tool()
HAVE_TOOLS = all(Path(kr._bin(tool)).exists() for tool in ("ptxas-blackwell", "cuobjdump"))

# A hand-written sm_90 listing: prologue, a loop (0x0100..0x01a0) with two HGMMAs, a full wait, a 16-bit scalar load
# and an async copy, an epilogue with a forward branch, and the trailing self-branch every kernel ends with.
SASS = """
        /*0000*/                   LDC R1, c[0x0][0x28] ;                       /* 0x00000a00ff017b82 */
        /*0010*/              @!P0 BRA 0x0200 ;                                 /* 0x0000000000008947 */
        /*0100*/                   LDGSTS.E.BYPASS.128 [R3], desc[UR4][R4.64] ; /* 0x0000000004037fae */
        /*0110*/               @P5 LDG.E.U16 R64, desc[UR32][R56.64] ;          /* 0x0000002038405981 */
        /*0120*/                   WARPGROUP.ARRIVE ;                           /* 0x0000000000007b1d */
        /*0130*/                   HGMMA.64x64x16.F32.BF16 R24, gdesc[UR8], R24 ; /* 0x0000000000007b1d */
        /*0140*/                   HGMMA.64x64x16.F32.BF16 R24, gdesc[UR12], R24, gsb0 ; /* 0x00000000000079af */
        /*0150*/                   WARPGROUP.DEPBAR.LE gsb0, 0x0 ;              /* 0x000080000000791a */
        /*0160*/                   FMUL R2, R2, R3 ;                            /* 0x0000000000007b1d */
        /*0170*/                   NOP ;                                        /* 0x0000000000007b1d */
        /*0180*/                   BAR.SYNC.DEFER_BLOCKING 0x0 ;                /* 0x0000000000007b1d */
        /*0190*/                   ISETP.GE.AND P0, PT, R0, R1, PT ;            /* 0x0000000000007b1d */
        /*01a0*/              @!P0 BRA 0x0100 ;                                 /* 0x0000000000008947 */
        /*0200*/                   STG.E.128 desc[UR4][R6.64], R8 ;             /* 0x0000000000007b1d */
        /*0210*/                   EXIT ;                                       /* 0x000000000000794d */
        /*0220*/                   BRA 0x0220;                                  /* 0xfffffffc00fc7947 */
"""


def test_sass_main_loop_figures():
    figures = kr.loop_figures(kr.parse_sass(SASS))
    assert figures["loops"] == 1
    loop = figures["main_loop"]
    # 0x0100..0x01a0: 11 instructions, the NOP not counted
    assert loop["instructions"] == 10 and loop["mma"] == 2 and loop["non_mma"] == 8
    assert loop["non_mma_per_mma"] == 4.0
    assert loop["async_copies"] == 1 and loop["scalar16_loads"] == 1 and loop["barriers"] == 1
    assert loop["wgmma_waits"] == 1 and loop["full_drains"] == 1 and loop["groups_in_flight"] == 0
    pipelined = kr.loop_figures(kr.parse_sass(SASS.replace("gsb0, 0x0 ;", "gsb0, 0x1 ;")))["main_loop"]
    assert pipelined["full_drains"] == 0 and pipelined["groups_in_flight"] == 1
    # vectorised loads are not scalar 16-bit loads
    vector = SASS.replace("LDG.E.U16 R64", "LDG.E.128 R64")
    assert kr.loop_figures(kr.parse_sass(vector))["main_loop"]["scalar16_loads"] == 0


def test_kernel_without_a_loop():
    listing = "\n".join(line for line in SASS.splitlines() if "BRA 0x0100" not in line)
    figures = kr.loop_figures(kr.parse_sass(listing))
    assert figures["loops"] == 0 and figures["main_loop"] is None
    assert figures["scalar16_loads_kernel"] == 1 and figures["mma_kernel"] == 2


def _result(**loop):
    base = {"instructions": 60, "mma": 4, "non_mma": 56, "non_mma_per_mma": 14.0, "async_copies": 4,
            "tma_loads": 0, "scalar16_loads": 0, "full_drains": 0, "groups_in_flight": 1}  # fmt: skip
    return {"error": "", "spill_stores": 0, "spill_loads": 0, "shared": 1024, "scalar16_loads_kernel": 0,
            "main_loop": {**base, **loop}}  # fmt: skip


def _job(arch=90):
    return kr.Job("k", 0, {"BLOCK_M": 64, "num_warps": 4, "num_stages": 3}, arch, {}, {}, {}, {"num_warps": 4})


def test_verdicts():
    job = _job()
    yard = _result(non_mma_per_mma=10.0)
    assert kr.verdict(job, _result(), yard) == []
    assert kr.verdict(job, {**_result(), "error": "CompilationError: boom"}, yard)[0].startswith("compile error")
    assert "spills" in kr.verdict(job, {**_result(), "spill_stores": 8, "spill_loads": 8}, yard)[0]
    assert "shared memory" in kr.verdict(job, {**_result(), "shared": 300_000}, yard)[0]
    assert "scalar 16-bit" in kr.verdict(job, _result(scalar16_loads=3), yard)[0]
    assert "drains" in kr.verdict(job, _result(full_drains=2), yard)[0]
    # a drain the yardstick has too (Triton's own 3×TF32 loop) is not held against the kernel
    assert kr.verdict(job, _result(full_drains=2), _result(full_drains=2, non_mma_per_mma=10.0)) == []
    # the MMA ratio: 2× the yardstick passes, more fails
    assert kr.verdict(job, _result(non_mma_per_mma=20.0), yard) == []
    assert "yardstick" in kr.verdict(job, _result(non_mma_per_mma=20.5), yard)[0]
    # a main loop with MMAs and no yardstick is a failure, not a pass
    assert kr.verdict(job, _result(), None) == ["no yardstick compiled for this tile"]
    # kernels without a loop (glue, index gathers): compile and spill checks; scalar loads are reported, not gated
    flat = {**_result(), "main_loop": None}
    assert kr.verdict(job, flat, None) == []
    assert kr.verdict(job, {**flat, "scalar16_loads_kernel": 2}, None) == []
    assert "spills" in kr.verdict(job, {**flat, "spill_stores": 4}, None)[0]


def test_occupancy_against_the_limits():
    # 128 registers × 32 threads = 4096 per warp; 4 warps → 16384 per CTA; 65536 / 16384 = 4 CTAs
    assert kr.occupancy(128, 16384, 4, 90) == {"ctas_per_sm": 4, "limited_by": "registers"}
    # 100 KB of shared memory: 2 CTAs on sm_90 (228 KB), 1 on sm_80 (164 KB)
    assert kr.occupancy(32, 100 * 1024, 4, 90)["ctas_per_sm"] == 2
    assert kr.occupancy(32, 100 * 1024, 4, 80) == {"ctas_per_sm": 1, "limited_by": "shared memory"}
    assert kr.occupancy(16, 0, 32, 80) == {"ctas_per_sm": 2, "limited_by": "warps"}


def test_main_dot_from_ttir():
    ttir = (
        "%p = tt.dot %u, %v, %c : tensor<64x16xbf16> * tensor<16x32xbf16> -> tensor<64x32xf32> loc(#l)\n"
        "%a = tt.dot %w, %x, %acc : tensor<64x32xbf16> * tensor<32x128xbf16> -> tensor<64x128xf32> loc(#l)\n"
        "%f = tt.dot %w, %x, %acc, inputPrecision = tf32x3 : tensor<128x32xf32> * tensor<32x128xf32> -> "
        "tensor<128x128xf32>\n"
    )
    assert kr.main_dot(ttir) == {"M": 128, "N": 128, "K": 32, "dtype": "fp32", "precision": "tf32x3"}
    assert kr.main_dot(ttir.split("\n")[1]) == {"M": 64, "N": 128, "K": 32, "dtype": "bf16", "precision": "ieee"}
    assert kr.main_dot("no dots here") is None


def test_dispatch_keyword_covers_every_concrete_value():
    def entry(x, *, path: Literal["fused", "blocked", "auto"] = "auto"):
        return x

    assert kr.dispatch_keyword(entry) == ("path", ("fused", "blocked"))
    keyword, values = kr.dispatch_keyword()
    from smoa_kernels.triton import smoa_linear_triton

    assert keyword in inspect.signature(smoa_linear_triton).parameters
    assert len(values) >= 2 and "auto" not in values


def test_binder_marks_what_the_jit_marks():
    # sizes and strides divisible by 16 get tt.divisibility 16, others not; unit strides become constexpr 1
    tile = {"M": 32, "N": 32, "K": 16, "dtype": "fp16", "precision": "ieee", "num_warps": 4, "num_stages": 2}
    even = kr.yardstick_job(tile, 80)
    names = list(even.signature)
    assert even.attrs[(names.index("M"),)] == [["tt.divisibility", 16]]
    assert even.attrs[(names.index("a_ptr"),)] == [["tt.divisibility", 16]]
    assert even.signature["stride_ak"] == "constexpr" and even.constexprs[(names.index("stride_ak"),)] == 1
    import torch

    a = torch.empty(16, dtype=torch.float16)
    kwargs = {"BLOCK_M": 32, "BLOCK_N": 32, "BLOCK_K": 16, "GROUP_M": 8, "PRECISION": "ieee", "num_warps": 4,
              "num_stages": 2}  # fmt: skip
    _, _, attrs, _, _ = kr.bind(kr._yardstick_jit(), 80, (a, a, a, 4100, 4096, 4096, 4096, 1, 1, 4096, 4096, 1),
                                kwargs)  # fmt: skip
    assert attrs[(names.index("M"),)] == [] and attrs[(names.index("N"),)] == [["tt.divisibility", 16]]


SMALL = kr.Scenario("small", dtype="fp16", factor_dtype="fp32", n_tokens=64, d_out=128, d_in=96, rank=8, num_blocks=2)


def test_capture_records_launches_on_every_path_and_runs_nothing():
    keyword, values = kr.dispatch_keyword()
    from smoa_kernels.triton import configs

    for value in values:
        cap = kr.capture(SMALL, value, keyword)
        assert cap.error == "" and cap.launches, (value, cap.error)
        assert {launch.name for launch in cap.launches} <= set(configs.KERNEL_CONFIGS)
    # merged_weight with a path that cannot merge is reported as not offered, not as a failure
    caps = [kr.capture(kr.Scenario("m", dtype="fp16", n_tokens=64, d_out=128, d_in=96, rank=8, merged_weight=True),
                       value, keyword) for value in values]  # fmt: skip
    assert all(c.offered or c.error for c in caps) and any(c.offered and not c.error for c in caps)


def test_jobs_dedupe_and_respect_config_dtypes():
    keyword, values = kr.dispatch_keyword()
    from smoa_kernels.triton import configs

    caps = [kr.capture(SMALL, v, keyword) for v in values]
    quick = kr.build_jobs(caps, quick=True, archs=(80,))
    full = kr.build_jobs(caps + caps, quick=False, archs=(80, 90))
    assert quick and len(full) >= 2 * len(quick)
    assert len({job.key() for job in full}) == len(full)  # the repeated captures added nothing
    for job in full:
        assert job.dtype in configs.config_dtypes(configs.KERNEL_CONFIGS[job.kernel][job.config_index])
        assert job.programs >= 1


@pytest.mark.skipif(not HAVE_TOOLS, reason="Triton's ptxas-blackwell / cuobjdump are missing")
def test_real_compiles_for_both_archs():
    keyword, values = kr.dispatch_keyword()
    job = kr.build_jobs([kr.capture(SMALL, values[0], keyword)], quick=True, archs=(90,))[0]
    tile = {"M": 64, "N": 64, "K": 32, "dtype": "fp16", "precision": "ieee", "num_warps": 4, "num_stages": 3}
    kernel, yard80 = kr.run_jobs([job, kr.yardstick_job(tile, 80)], workers=2)
    assert kernel["error"] == "" and kernel["registers"] > 0 and kernel["ctas_per_sm"] >= 1, kernel
    assert kernel["num_warps"] == job.config["num_warps"]
    # the yardstick: a pipelined tensor-core loop with async copies, no spills, no scalar 16-bit loads
    assert yard80["error"] == "" and yard80["spill_stores"] == 0, yard80
    loop = yard80["main_loop"]
    assert loop["mma"] > 0 and loop["async_copies"] > 0 and loop["scalar16_loads"] == 0
    assert yard80["main_dot"] == {"M": 64, "N": 64, "K": 32, "dtype": "fp16", "precision": "ieee"}


def test_report_end_to_end_with_canned_compiles(monkeypatch):
    # the whole pipeline (capture → jobs → yardsticks → verdicts → table → JSON) with the compiles replaced by
    # canned figures: a clean kernel passes, one spill anywhere fails the whole gate
    def clean(job):
        loop = {"instructions": 40, "mma": 4, "non_mma": 36, "non_mma_per_mma": 9.0, "async_copies": 4, "tma_loads": 0,
                "scalar16_loads": 0, "global_loads": 4, "wgmma_waits": 1, "full_drains": 0, "groups_in_flight": 1,
                "barriers": 1, "fences": 0}  # fmt: skip
        dot = {"M": 64, "N": 64, "K": 32, "dtype": job.dtype or "fp16", "precision": "ieee"}
        return {"key": job.key(), "error": "", "registers": 96, "spill_stores": 0, "spill_loads": 0, "loops": 1,
                "scalar16_loads_kernel": 0, "mma_kernel": 4, "main_loop": loop, "main_dot": dot, "shared": 16384,
                "num_warps": 4, "ctas_per_sm": 4, "limited_by": "registers", "seconds": 0.0}  # fmt: skip

    spill_first = {"on": False}

    def fake_run_jobs(jobs, workers):
        out = [clean(job) for job in jobs]
        if spill_first["on"] and out and not jobs[0].yardstick:
            out[0] = {**out[0], "spill_stores": 4, "spill_loads": 4}
        return out

    monkeypatch.setattr(kr, "run_jobs", fake_run_jobs)
    rep = kr.report(quick=True, archs=(80, 90), scenarios=(SMALL,), log=lambda text: None)
    assert not rep["failed"] and rep["kernels"] and all(row["failures"] == [] for row in rep["kernels"])
    assert all(row["yardstick"] is not None for row in rep["kernels"])
    data = json.loads(json.dumps(kr.to_json(rep), default=str))
    assert data["schema"] == kr.SCHEMA
    assert set(data["step_estimate_vs_frozen"]["h100"]) == {"fused", "blocked"}
    assert set(data["step_estimate_vs_frozen"]["h100"]["blocked"]) == {"K=2", "K=4"}
    assert "gate passed" in kr.format_report(rep)
    spill_first["on"] = True
    rep = kr.report(quick=True, archs=(80,), scenarios=(SMALL,), log=lambda text: None)
    assert rep["failed"] and "gate FAILED" in kr.format_report(rep)
    assert sum(bool(row["failures"]) for row in rep["kernels"]) == 1
