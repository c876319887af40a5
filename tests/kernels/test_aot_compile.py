"""Ahead-of-time compile of the Triton kernels for sm_80/sm_90 (tools/aot_compile_check.py) on a subset, in CI.

Catches kernels that stop compiling for a real GPU or start spilling registers, on machines without one. The full
matrix (every config, variant, dtype) is ``python tools/aot_compile_check.py``.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

triton = pytest.importorskip("triton", reason="triton is not installed: nothing to compile")

TOOL = Path(__file__).resolve().parents[2] / "tools" / "aot_compile_check.py"


def _load_tool():
    spec = importlib.util.spec_from_file_location("aot_compile_check", TOOL)
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("aot_compile_check", module)
    spec.loader.exec_module(module)
    return module


aot = _load_tool()
if not aot._ptxas().exists():
    pytest.skip(f"{aot._ptxas()} is missing: no ptxas to report registers and spills", allow_module_level=True)


def test_default_configs_compile_without_spills():
    # The first config of each kernel (--quick), the main launch variants, fp32 (3×TF32 dots) and bf16 activations with
    # fp32 factors where the config ships for them, on both archs.
    jobs = [
        job
        for job in aot.build_jobs(quick=True)
        if job.variant in ("fwd", "dx", "factor_grad") and (job.act, job.factor) in (("fp32", "fp32"), ("bf16", "fp32"))
    ]
    assert {job.arch for job in jobs} == {80, 90}
    assert {job.kernel for job in jobs} == {"gemm", "perm_adapter", "factor_grad"}
    assert {job.act for job in jobs} == {"fp32", "bf16"}
    results = aot.run_jobs(jobs, workers=2)
    table = aot.format_table(results)
    assert not aot.failures(results), table
    assert all(r.registers > 0 and r.shared > 0 for r in results), table
    # Hopper should get warpgroup MMA for the 16-bit GEMMs; the fused GEMM's small-N default (32-row tiles) compiles
    # to mma.sync by design (no warpgroup waits in its loop; README, "The fused small-N kernel")
    assert all(r.wgmma for r in results if r.job.arch == 90 and r.job.act == "bf16" and r.job.kernel != "gemm"), table


def test_spills_and_errors_are_failures():
    config = {"BLOCK_O": 64, "BLOCK_N": 64, "BLOCK_R": 32, "GROUP_O": 8, "num_warps": 4, "num_stages": 3}
    job = aot.Job("gemm", "fwd", 0, config, "fp32", "fp32", 80)
    clean = aot.Result(job, registers=100, spill_stores=0, spill_loads=0, shared=1024)
    spilled = aot.Result(job, registers=255, spill_stores=24, spill_loads=16, shared=1024)
    broken = aot.Result(job, error="CompilationError: boom")
    too_much_shared = aot.Result(job, registers=100, spill_stores=0, spill_loads=0, shared=10**6)
    assert aot.failures([clean, spilled, broken, too_much_shared]) == [spilled, broken, too_much_shared]
    assert "SPILL" in aot.format_table([spilled]) and "SMEM" in aot.format_table([too_much_shared])
