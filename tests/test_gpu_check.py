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
    # every ok row is modelled, but the multi-adapter training rows (the model of many adapters is forward only)
    modelled = [r for r in ok if not (r["provider"] == "smoa-multi" and r["mode"] == "full")]
    assert len(written["model_comparison"]) == len(modelled) and len(modelled) < len(ok)
    lines = (tmp_path / "summary.txt").read_text().splitlines()
    assert lines == data["lines"] and 5 <= len(lines) <= 12
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


def test_smoke_run_trains_against_the_reference_and_profiles_beside_the_model(tmp_path):
    data = gpu_check.run_gpu_check(smoke=True, output_dir=tmp_path, log=lambda text: None)
    training = data["phases"]["training"]
    assert training["ok"], training["status"]
    result = training["result"]
    assert result["backend"] == "torch" and len(result["losses"]) == result["steps"] == 3
    assert all(loss == loss and loss > 0 for loss in result["losses"])  # finite and positive
    assert result["loss_rel_error"] <= result["loss_bound"] and result["grad_rel_error_max"] <= result["grad_bound"]
    assert result["grad_tensors"] > 0 and result["cold_step_s"] > 0 and result["warm_step_s"] > 0
    profile = data["phases"]["profile"]
    assert profile["ok"] and set(profile["result"]) == {"K=2", "K=4"}
    for k in (2, 4):
        table = (tmp_path / f"profile_K{k}.md").read_text()
        assert "| measured kernel |" in table and "Cost model" in table and "CPU smoke" in table
        rows = (tmp_path / f"profile_K{k}.csv").read_text().splitlines()
        assert len(rows) > 3 and rows[0].startswith("measured kernel,calls,total_us")
    assert any(line.startswith("training: ok") for line in data["lines"])


def test_every_test_failure_is_reported_not_only_the_first(tmp_path, monkeypatch):
    kernels = tmp_path / "tests" / "kernels"
    kernels.mkdir(parents=True)
    (kernels / "test_fails.py").write_text(
        "def test_one():\n    assert False\n\ndef test_two():\n    assert 1 == 2\n\ndef test_three():\n    pass\n"
    )
    monkeypatch.setattr(gpu_check, "_tests_dir", lambda: kernels)
    tests = gpu_check.run_tests(smoke=False, log=lambda text: None)
    assert tests["rc"] == 1 and "2 failed, 1 passed" in tests["summary"]
    assert [f.split("::")[-1].split()[0] for f in tests["failures"]] == ["test_one", "test_two"]
    lines = gpu_check.summary_lines(gpu_check.environment(), tests, [], [], tmp_path, smoke=False)
    assert "test_one" in lines[1] and "test_two" in lines[1]


def test_the_test_phase_sets_what_the_gpu_tests_need(tmp_path, monkeypatch):
    kernels = tmp_path / "tests" / "kernels"
    kernels.mkdir(parents=True)
    (kernels / "test_env.py").write_text(
        "import os\n\ndef test_env():\n"
        "    assert os.environ['CUBLAS_WORKSPACE_CONFIG'] and os.environ['SMOA_TRITON_AUTOTUNE'] == '0'\n"
    )
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    monkeypatch.setattr(gpu_check, "_tests_dir", lambda: kernels)
    assert gpu_check.run_tests(smoke=False, log=lambda text: None)["rc"] == 0


def test_a_phase_over_its_budget_is_reported_and_the_next_phases_run(tmp_path, monkeypatch):
    monkeypatch.setitem(gpu_check.PHASE_BUDGET_S, "training", 0.01)
    data = gpu_check.run_gpu_check(smoke=True, output_dir=tmp_path, run_the_tests=False, log=lambda text: None)
    assert data["phases"]["training"]["status"].startswith("timed out") and not data["phases"]["training"]["ok"]
    assert data["phases"]["profile"]["ok"] and data["bench_rows"]
    assert data["failed"]  # a timed-out phase fails the check
