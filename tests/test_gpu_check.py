"""``smoa gpu-check``: the CPU smoke run of its plumbing (CI), and its comparison with the cost model."""

from __future__ import annotations

import json

import pytest

from smoa import gpu_check
from smoa.cli import build_parser
from smoa_kernels import cost_model


def test_smoke_run_writes_csv_png_json_and_a_ten_line_summary(tmp_path):
    data = gpu_check.run_gpu_check(smoke=True, output_dir=tmp_path, log=lambda text: None)
    written = json.loads((tmp_path / "gpu_check.json").read_text())
    assert written["kind"].startswith("cpu-smoke") and written["environment"]["gpu"] is None
    assert (tmp_path / "smoa_bench.csv").is_file() and any(p.endswith(".png") for p in written["plots"])
    assert "collected" in written["tests"]["summary"] and written["tests"]["rc"] == 0
    rows = written["bench_rows"]
    assert {r["provider"] for r in rows} >= set(gpu_check.BASE_PROVIDERS)
    assert {r["mode"] for r in rows} == set(gpu_check.MODES)
    assert {r["N"] for r in rows} == set(gpu_check.SMOKE["tokens"])
    # the CUDA-only Triton providers are skipped on the CPU, never given a time
    assert all(
        r.get("median_ms") is None and r["status"].startswith("skipped")
        for r in rows
        if r["provider"].startswith("smoa-triton")
    )
    ok = [r for r in rows if r["status"] == "ok"]
    assert ok and all(r["median_ms"] > 0 and r["peak_mem_mib"] is not None for r in ok)
    assert len(written["model_comparison"]) == len(ok)
    lines = (tmp_path / "summary.txt").read_text().splitlines()
    assert lines == data["lines"] and 5 <= len(lines) <= 10
    assert "CPU" in lines[0] and "not GPU figures" in lines[0]
    assert not data["failed"]


def _row(provider, mode, n, k, median_ms, variant=""):
    return {"provider": provider, "variant": variant, "mode": mode, "N": n, "K": k, "r": 32, "d_in": 4096,
            "d_out": 4096, "dtype": "bfloat16", "status": "ok", "median_ms": median_ms,
            "peak_mem_mib": 1.0}  # fmt: skip


def test_model_comparison_ratios_and_misses():
    def model(method, mode, n, k):
        return 1e3 * cost_model.estimate(method, mode, n, 4096, 4096, 32, k, 2, "h100")

    rows = [
        _row("frozen", "full", 8192, 2, 1.1 * model("frozen", "full", 8192, 2)),
        _row("hira", "inference", 256, 4, 1.5 * model("hira", "inference", 256, 4)),
        _row("smoa-triton", "full", 8192, 2, 0.6 * model("smoa-blocked", "full", 8192, 2)),
        _row("smoa-triton", "inference", 16, 2, model("smoa-fused", "inference", 16, 2)),
        _row("smoa-torch", "inference", 256, 2, 1.0, variant="merged"),
        {**_row("lora-eq", "full", 256, 2, 1.0), "status": "oom", "median_ms": None},
    ]
    comparison = gpu_check.model_comparison(rows, "h100")
    assert [c["method"] for c in comparison] == ["frozen", "hira", "smoa-blocked", "smoa-fused", "frozen"]
    assert [round(c["measured_over_model"], 6) for c in comparison[:4]] == [1.1, 1.5, 0.6, 1.0]
    assert [c["miss"] for c in comparison[:4]] == [False, True, True, False]


def test_needs_a_gpu_without_smoke(monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(RuntimeError, match="--smoke"):
        gpu_check.run_gpu_check(smoke=False)


def test_registered_as_a_subcommand():
    args = build_parser().parse_args(["gpu-check", "--smoke", "--skip-tests"])
    assert args.func is gpu_check._command and args.smoke and args.skip_tests
