"""``smoa gpu-check``: what anyone who is lent a GPU runs first (≤ 8 minutes on an H100 from a cold Triton cache).

1. the GPU-only tests: ``pytest tests/kernels`` (they skip on a CPU; on a GPU they add bf16, large shapes,
   torch.compile and autocast);
2. ``smoa bench`` at the canonical shapes: 4096×4096, N ∈ {256, 2048, 8192}, r = 32, K ∈ {2, 4}, bf16, providers
   frozen, lora-eq, hira, reference, smoa-torch, smoa-multi (8 adapters in one batch) and every ``smoa-triton*``
   provider registered, modes full + inference,
   with peak memory — CSV, PNG and JSON (GPU name, driver, versions) under ``benchmarks/results/gpu-<name>-<date>/``;
3. a 10-line summary comparing the measured times with the cost model (:mod:`smoa_kernels.cost_model`): the ratio
   measured / model per row, rows that miss by more than 30% flagged (the model is fixed before it is used again).

``--smoke`` runs the same plumbing on the CPU with tiny shapes (CI: tests/test_gpu_check.py): it collects the kernel
tests instead of running them and writes to a temporary directory unless ``--output-dir`` is given. Nothing is ever
written as a GPU figure unless it was measured on that GPU.

Only the standard library is imported at module level (``smoa --help`` stays fast).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

__all__ = ["CANONICAL", "MISS_THRESHOLD", "SMOKE", "model_comparison", "register", "run_gpu_check", "summary_lines"]

CANONICAL = {"dtype": "bfloat16", "shapes": ((4096, 4096),), "tokens": (256, 2048, 8192), "ranks": (32,),
             "blocks": (2, 4), "min_time": 0.05, "reps": 1}  # fmt: skip
SMOKE = {"dtype": "float32", "shapes": ((64, 48),), "tokens": (16, 32), "ranks": (4,), "blocks": (2,),
         "min_time": 0.005, "reps": 1}  # fmt: skip
BASE_PROVIDERS = ("frozen", "lora-eq", "hira", "reference", "smoa-torch", "smoa-multi")
MODES = ("full", "inference")
MISS_THRESHOLD = 0.30  # |measured / model − 1| above this flags the row
# Phase budgets (seconds), so that one slow phase cannot eat the others and the whole check fits 8 minutes on an H100
# from a cold Triton cache. The test phase JIT-compiles every kernel specialisation the tests launch: the compile gate
# compiles 106 specialisations × configs per arch (tools/kernel_report.py: 212 compiles for sm_80 + sm_90 in 48 s of
# 2 CPU cores here with a warm ptxas cache, 299 s cold and loaded); the tests reach more variants (dtypes, odd shapes:
# the ≥ 258 cold compiles counted before) and run them one process, one compile at a time. The phase sets
# SMOA_TRITON_AUTOTUNE=0 (one config per launch, as under the interpreter and deterministic mode: every shipped config
# is compile-gated, and test_every_shipped_config_is_correct forces each one), which removes the autotuner's extra
# compiles and benchmark runs; at ≈ 1 s per cold compile (an estimate for a 16-core host) 260 compiles take ≈ 4.5
# minutes, hence 300 s. Then the training check (SmolLM2 load ≈ 15 s, two backends × 3 steps), the profile (2 K ×
# 3 steps of the canonical layer) and the canonical bench (≈ 1 minute of timed calls).
PHASE_BUDGET_S = {"tests": 300, "training": 75, "profile": 45}
TEST_TIMEOUT_S = PHASE_BUDGET_S["tests"]


def _providers() -> tuple[str, ...]:
    from smoa.bench import PROVIDERS

    return tuple(p for p in PROVIDERS if p in BASE_PROVIDERS or p.startswith("smoa-triton"))


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


def environment() -> dict:
    """GPU name, driver, CUDA and package versions (the driver from ``nvidia-smi`` when it is on PATH)."""
    import torch

    env = {"date_utc": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
           "torch": torch.__version__, "cuda": torch.version.cuda, "python": sys.version.split()[0]}  # fmt: skip
    for module in ("triton", "peft", "transformers", "smoa"):
        try:
            env[module] = __import__(module).__version__
        except ImportError:
            env[module] = "not installed"
    if torch.cuda.is_available():
        env["gpu"] = torch.cuda.get_device_name(0)
        env["capability"] = ".".join(map(str, torch.cuda.get_device_capability(0)))
        env["driver"] = "unknown"
        if shutil.which("nvidia-smi"):
            proc = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                  capture_output=True, text=True)  # fmt: skip
            if proc.returncode == 0 and proc.stdout.strip():
                env["driver"] = proc.stdout.strip().splitlines()[0]
    else:
        env["gpu"] = None
    return env


def _tests_dir() -> Path | None:
    """``tests/kernels`` of the source tree this package runs from (or of the current directory)."""
    for root in (Path(__file__).resolve().parents[1], Path.cwd()):
        if (root / "tests" / "kernels").is_dir():
            return root / "tests" / "kernels"
    return None


def _failures(output: str) -> list[str]:
    """Every ``FAILED``/``ERROR`` line of pytest's short summary (``-rfE``)."""
    return [line.strip() for line in output.splitlines() if line.startswith(("FAILED ", "ERROR "))]


def run_tests(smoke: bool, log) -> dict:
    """pytest on the kernel tests, every failure reported (no ``-x``: one failure must not hide the GPU-only tests
    after it); ``--smoke``: collect only. Returns rc, the summary line, every failure and seconds."""
    where = _tests_dir()
    if where is None:
        return {"rc": None, "summary": "tests/kernels not found (installed without the source tree): skipped",
                "failures": []}  # fmt: skip
    cmd = [sys.executable, "-m", "pytest", str(where), "-q", "-p", "no:cacheprovider", "-rfE"]
    cmd += ["--collect-only"] if smoke else []
    log(f"smoa gpu-check: {' '.join(cmd[2:])}")
    start = time.time()
    # deterministic cuBLAS needs its workspace set before the process starts (test_deterministic_on_gpu); one config
    # per launch keeps the cold compiles within the phase budget (see PHASE_BUDGET_S)
    env = {"CUBLAS_WORKSPACE_CONFIG": ":4096:8", **os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "SMOA_TRITON_AUTOTUNE": "0"}  # fmt: skip
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                            cwd=where.parents[1])  # fmt: skip
    try:
        output, _ = proc.communicate(timeout=TEST_TIMEOUT_S)
        timed_out = False
    except subprocess.TimeoutExpired:
        proc.kill()
        output, _ = proc.communicate()
        timed_out = True
    lines = [line for line in (output or "").strip().splitlines() if line.strip()]
    failures = _failures(output or "")
    if timed_out:
        return {"rc": "timeout", "summary": f"timed out after {TEST_TIMEOUT_S} s ({len(failures)} failures so far)",
                "seconds": TEST_TIMEOUT_S, "failures": failures, "tail": "\n".join(lines[-30:])}  # fmt: skip
    summary = lines[-1].strip("= ") if lines else ""
    return {"rc": proc.returncode, "summary": summary, "seconds": round(time.time() - start, 1),
            "failures": failures, "tail": "\n".join(lines[-30:])}  # fmt: skip


def run_phase(name: str, call: str, out_dir: Path, smoke: bool, log) -> dict:
    """One phase of :mod:`smoa.gpu_check_train` (``call``: its function name) in a subprocess with the phase's
    budget: a phase that fails or times out is reported as such, and the later phases still run."""
    result_file = out_dir / f"{name}.json"
    cmd = [sys.executable, "-m", "smoa.gpu_check_train", call, str(out_dir), str(result_file)]
    cmd += ["--smoke"] if smoke else []
    budget = PHASE_BUDGET_S[name]
    log(f"smoa gpu-check: {name} phase (budget {budget} s)")
    start = time.time()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=budget, env=env)
    except subprocess.TimeoutExpired:
        return {"ok": False, "status": f"timed out after {budget} s", "seconds": budget}
    seconds = round(time.time() - start, 1)
    if proc.returncode != 0 or not result_file.exists():
        return {"ok": False, "status": f"failed (rc {proc.returncode}): {proc.stderr.strip()[-300:]}",
                "seconds": seconds}  # fmt: skip
    data = json.loads(result_file.read_text())
    ok = data.get("ok", True) if isinstance(data, dict) else True
    return {"ok": ok, "status": "ok" if ok else "outside its bounds", "seconds": seconds, "result": data}


def _method(provider: str, variant: str, mode: str, n: int, d_out: int, d_in: int, k: int, gpu: str) -> str | None:
    """The cost-model method a benchmark row measures (None: not modelled)."""
    from smoa_kernels import cost_model

    if variant == "merged":
        return "frozen"  # merged inference is a plain linear layer
    if provider in ("frozen", "lora-eq", "hira", "reference"):
        return provider
    if "blocked" in provider:
        return "smoa-blocked"
    if "fused" in provider:
        return "smoa-fused"
    if provider == "smoa-triton":  # the dispatch picks the path the model says
        return cost_model.PATHS[cost_model.choose_path(n, d_out, d_in, k, 2, gpu, mode=mode)]
    if provider == "smoa-torch":
        return "smoa-blocked"  # the torch backend runs the same blocks with torch ops
    return None


def model_comparison(rows: list[dict], gpu: str) -> list[dict]:
    """Measured / modelled time for every ok row that the cost model covers (bf16/fp16 = 2-byte, fp32 = 4-byte)."""
    from smoa_kernels import cost_model

    out = []
    for row in rows:
        if row.get("status") != "ok" or row.get("median_ms") is None:
            continue
        mode = "inference" if row["mode"] == "inference" else row["mode"]
        element_bytes = 4 if row["dtype"] in ("float32", "fp32") else 2
        if row["provider"] == "smoa-multi":  # forward only in the model: the cheaper path, as backend="auto" picks
            if mode != "inference":
                continue
            from smoa.bench.providers_multi import MULTI_ADAPTERS
            from smoa_kernels import cost_model_multi

            method = "multi-adapter"
            model_ms = 1e3 * min(cost_model_multi.estimate(m, row["N"], MULTI_ADAPTERS, row["d_out"], row["d_in"],
                                                           row["r"], row["K"], element_bytes, gpu)
                                 for m in ("multi-fused", "multi-torch"))  # fmt: skip
        else:
            method = _method(row["provider"], row.get("variant", ""), mode, row["N"], row["d_out"], row["d_in"],
                             row["K"], gpu)  # fmt: skip
            if method is None or mode not in cost_model.MODES:
                continue
            model_ms = 1e3 * cost_model.estimate(method, mode, row["N"], row["d_out"], row["d_in"], row["r"],
                                                 row["K"], element_bytes, gpu)  # fmt: skip
        ratio = row["median_ms"] / model_ms
        out.append({"provider": row["provider"], "variant": row.get("variant", ""), "mode": row["mode"],
                    "N": row["N"], "K": row["K"], "method": method, "measured_ms": row["median_ms"],
                    "model_ms": model_ms, "measured_over_model": ratio,
                    "miss": abs(ratio - 1) > MISS_THRESHOLD, "peak_mem_mib": row.get("peak_mem_mib")})  # fmt: skip
    return out


def _row(rows, provider, mode, n, k):
    return next((r for r in rows if r["provider"] == provider and r["mode"] == mode and r["N"] == n and r["K"] == k
                 and not r.get("variant") and r["status"] == "ok"), None)  # fmt: skip


def summary_lines(env: dict, tests: dict, rows: list[dict], comparison: list[dict], out_dir: Path, smoke: bool,
                  phases: dict | None = None) -> list:  # fmt: skip
    """The summary (at most 12 lines)."""
    device = env["gpu"] or "CPU (--smoke: plumbing only, the times are not GPU figures)"
    lines = [
        f"smoa gpu-check: {device}, driver {env.get('driver', '-')}, CUDA {env['cuda']}, torch {env['torch']}, "
        f"triton {env['triton']}, smoa {env['smoa']} ({env['date_utc']})",
        f"tests: {tests['summary']} (rc {tests['rc']}{', collect only' if smoke else ''})"
        + (
            f"; failed: {', '.join(f.split()[1].split('::')[-1] for f in tests.get('failures', [])[:4])}"
            + (" ..." if len(tests.get("failures", [])) > 4 else "")
            if tests.get("failures")
            else ""
        ),
    ]
    for name, phase in (phases or {}).items():
        detail = ""
        result = phase.get("result") or {}
        if name == "training" and result:
            r = result
            detail = (f": {r['model']}, {r['backend']} vs reference, loss error {r['loss_rel_error']:.1e} "
                      f"(≤ {r['loss_bound']:g}), gradients ≤ {r['grad_rel_error_max']:.1e} (≤ {r['grad_bound']:g}); "
                      f"cold step {r['cold_step_s']:.2f} s, warm {r['warm_step_s'] or 0:.3f} s")  # fmt: skip
        elif name == "profile" and result:
            detail = ": " + ", ".join(f"{k} measured {v['measured_us']:.0f} µs / model {v['model_us']:.0f} µs"
                                      for k, v in result.items())  # fmt: skip
        lines.append(f"{name}: {phase['status']} ({phase['seconds']} s){detail}")
    ok = sum(r["status"] == "ok" for r in rows)
    skipped = sorted({r["provider"] for r in rows if r["status"].startswith("skipped")})
    bad = [r for r in rows if r["status"] != "ok" and not r["status"].startswith("skipped")]
    lines.append(f"bench: {len(rows)} measurements, {ok} ok, {len(bad)} failed"
                 + (f" (first: {bad[0]['provider']} {bad[0]['mode']} N={bad[0]['N']}: {bad[0]['status'][:60]})"
                    if bad else "") + (f"; skipped: {', '.join(skipped)}" if skipped else ""))  # fmt: skip
    ns = sorted({r["N"] for r in rows}) or [0]
    ks = sorted({r["K"] for r in rows}) or [0]
    smoa_names = sorted({r["provider"] for r in rows if r["provider"].startswith("smoa-triton")})
    smoa_names += [name for name in ("smoa-torch", "reference", "lora-eq") if any(r["provider"] == name for r in rows)]
    for mode, n in (("full", ns[-1]), ("inference", ns[0])):
        for k in ks:
            frozen = _row(rows, "frozen", mode, n, k)
            cells = []
            for name in smoa_names:
                row = _row(rows, name, mode, n, k)
                if row:
                    ratio = f" ({row['median_ms'] / frozen['median_ms']:.2f}x)" if frozen else ""
                    cells.append(f"{name} {row['median_ms']:.3f}{ratio}")
            head = f"{mode} N={n} K={k}: frozen {frozen['median_ms']:.3f} ms" if frozen else f"{mode} N={n} K={k}:"
            lines.append(head + " | " + " | ".join(cells[:6]))
    misses = [c for c in comparison if c["miss"]]
    if comparison:
        ratios = sorted(c["measured_over_model"] for c in comparison)
        worst = max(comparison, key=lambda c: abs(c["measured_over_model"] - 1))
        lines.append(
            f"model: {len(comparison)} rows, median measured/model {ratios[len(ratios) // 2]:.2f}, "
            f"{len(misses)} off by > {MISS_THRESHOLD:.0%} (worst {worst['provider']} {worst['mode']} N={worst['N']} "
            f"K={worst['K']}: {worst['measured_over_model']:.2f}x){' — CPU smoke: meaningless' if smoke else ''}"
        )
    else:
        lines.append("model: no measured row to compare")
    lines.append(f"files: {out_dir}")
    return lines[:11] + lines[-1:] if len(lines) > 12 else lines


def run_gpu_check(smoke: bool = False, output_dir: str | Path | None = None, run_the_tests: bool = True,
                  log=None) -> dict:  # fmt: skip
    """Run the check; returns everything it wrote to ``gpu_check.json`` (plus ``lines``, the summary)."""
    import torch

    from smoa.bench import BenchConfig, run_bench
    from smoa_kernels import cost_model

    log = log or (lambda text: print(text, file=sys.stderr))
    if not smoke and not torch.cuda.is_available():
        raise RuntimeError("smoa gpu-check: no CUDA device here (torch.cuda.is_available() is False); "
                           "--smoke runs the plumbing on the CPU")  # fmt: skip
    start = time.time()
    env = environment()
    date = env["date_utc"][:10]
    if output_dir is None:
        if smoke:
            output_dir = tempfile.mkdtemp(prefix="smoa-gpu-check-smoke-")
        else:
            root = Path.cwd() / "benchmarks" / "results"
            output_dir = (root if root.is_dir() else Path.cwd()) / f"gpu-{_slug(env['gpu'])}-{date}"
            if output_dir.exists():  # a second run the same day: a new folder, never over a committed one
                output_dir = output_dir.with_name(f"{output_dir.name}-{env['date_utc'][11:19].replace(':', '')}")
    out_dir = Path(output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tests = run_tests(smoke, log) if run_the_tests else {"rc": None, "summary": "not run (--skip-tests)",
                                                          "failures": []}  # fmt: skip
    phases = {name: run_phase(name, call, out_dir, smoke, log)
              for name, call in (("training", "training_check"), ("profile", "profile_step"))}  # fmt: skip
    grid = SMOKE if smoke else CANONICAL
    config = BenchConfig(device="cpu" if smoke else "cuda", providers=_providers(), modes=MODES,
                         output_dir=out_dir, threads=1 if smoke else None, **grid)  # fmt: skip
    log(f"smoa gpu-check: {config.resolve().command()}")
    result = run_bench(config, stdout=None, progress=not smoke, log=log)
    rows = [{k: v for k, v in row.items()} for row in result.rows]
    gpu_class = cost_model.gpu_class_for(env["gpu"] or "h100")
    comparison = model_comparison(rows, gpu_class)
    lines = summary_lines(env, tests, rows, comparison, out_dir, smoke, phases)
    data = {
        "kind": "cpu-smoke (plumbing only: not GPU figures)" if smoke else "measured on the GPU named below",
        "environment": env, "cost_model_gpu_class": gpu_class, "tests": tests,
        "bench_command": config.resolve().command(),
        "phases": phases, "bench_rows": rows, "model_comparison": comparison, "summary": lines,
        "csv": str(result.csv_path) if result.csv_path else None, "plots": [str(p) for p in result.plots],
        "seconds": round(time.time() - start, 1),
    }  # fmt: skip
    (out_dir / "gpu_check.json").write_text(json.dumps(data, indent=1, default=str) + "\n")
    (out_dir / "summary.txt").write_text("\n".join(lines) + "\n")
    data["lines"] = lines
    data["failed"] = (bool(result.failed) or tests["rc"] not in (0, None)
                      or not all(phase["ok"] for phase in phases.values()))  # fmt: skip
    return data


def _command(args: argparse.Namespace) -> int:
    try:
        data = run_gpu_check(smoke=args.smoke, output_dir=args.output_dir, run_the_tests=not args.skip_tests)
    except RuntimeError as error:
        print(error, file=sys.stderr)
        return 2
    print("\n".join(data["lines"]))
    return 1 if data["failed"] else 0


def register(subparsers) -> argparse.ArgumentParser:
    """Add ``smoa gpu-check`` to the ``smoa`` command."""
    parser = subparsers.add_parser(
        "gpu-check",
        help="on a lent GPU, run first: GPU tests + canonical benchmark + comparison with the cost model",
        description=__doc__.split("\n\n")[0] + " Runs the GPU-only kernel tests, `smoa bench` at the canonical "
        "shapes (CSV/PNG/JSON under benchmarks/results/gpu-<name>-<date>/) and prints a 10-line summary comparing "
        "the measured times with the cost model.",
    )
    parser.add_argument("--smoke", action="store_true", help="the same plumbing on the CPU with tiny shapes (< 30 s)")
    parser.add_argument("--output-dir", help="where the files go (default: benchmarks/results/gpu-<name>-<date>/)")
    parser.add_argument("--skip-tests", action="store_true", help="do not run the kernel tests")
    parser.set_defaults(func=_command)
    return parser
