"""Ahead-of-time compile check of the SMoA Triton kernels for sm_80 (A100) and sm_90 (H100), no GPU needed.

Compiles every kernel of :mod:`smoa_kernels.triton` in every config of ``KERNEL_CONFIGS``, every launch variant
(forward, forward with dropout, merged forward, dX, dX_a; the permuted adapter GEMM's forward, dX, dX_a; factor
gradient) and every dtype combination the launchers
accept, with the specialisation the JIT would use for contiguous tensors (unit strides as constants, 16-divisible
pointers and leading strides) and the rank padded to 16 (r_k <= 16); plus the rank padded to 64 (GEMMs) / 32 (the
factor gradient's rank loop) for forward, dX and factor gradient in fp32, TF32 and bf16. Registers and spills come
from ``ptxas-blackwell -v`` (shipped with Triton in ``triton/backends/nvidia/bin``; Triton 3.9 emits PTX 9.4, which
only that ptxas reads) on the generated PTX; shared memory from the compiled metadata; "wgmma" says whether the sm_90
PTX uses Hopper's warpgroup MMA.

Exit status: 0 when everything compiles without spills, 1 on any compile error, spill, or shared-memory request above
the arch's limit (a config that spills is pruned from ``KERNEL_CONFIGS`` rather than shipped).

    python tools/aot_compile_check.py            # full matrix (a few minutes on 2 cores)
    python tools/aot_compile_check.py --quick    # the default (first) configs, fp32 and bf16/fp32 only
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

from smoa_kernels.triton.configs import FP32_DOT_PRECISION, KERNEL_CONFIGS, config_dtypes, config_meta, default_config

ARCHS = (80, 90)
# (activation/weight dtype, factor dtype) pairs the launchers accept.
# "fp32" is fp32 activations with torch's default allow_tf32=False (3×TF32 dots); "tf32" is fp32 activations with
# allow_tf32=True (one TF32 dot). The two compile to different code, so both are checked.
DTYPE_COMBOS = (
    ("fp32", "fp32"), ("tf32", "fp32"), ("fp16", "fp16"), ("fp16", "fp32"), ("bf16", "bf16"), ("bf16", "fp32"),
)  # fmt: skip
QUICK_DTYPE_COMBOS = (("fp32", "fp32"), ("bf16", "fp32"))
# Launch variants of the GEMM kernel: constexpr flags and whether strides are those of the transposed (dX) pass.
GEMM_VARIANTS = {
    "fwd": {"HAS_BASE": True, "XA_IS_X": True, "HAS_BIAS": True, "MERGED": False, "transpose": False},
    "fwd_dropout": {"HAS_BASE": True, "XA_IS_X": False, "HAS_BIAS": True, "MERGED": False, "transpose": False},
    "fwd_merged": {"HAS_BASE": True, "XA_IS_X": True, "HAS_BIAS": True, "MERGED": True, "transpose": False},
    "dx": {"HAS_BASE": True, "XA_IS_X": True, "HAS_BIAS": False, "MERGED": False, "transpose": True},
    "dx_adapter": {"HAS_BASE": False, "XA_IS_X": True, "HAS_BIAS": False, "MERGED": False, "transpose": True},
}
# Launch variants of the permuted-coordinate adapter GEMM (coordinates="permuted"): forward and dX accumulate into the
# cuBLAS base term; dX_a (dropout) overwrites its output.
PERM_VARIANTS = {
    "fwd": {"ACCUMULATE": True, "transpose": False},
    "dx": {"ACCUMULATE": True, "transpose": True},
    "dx_adapter": {"ACCUMULATE": False, "transpose": True},
}
RANK_PAD = 16  # the common case (r_k <= 16): the whole matrix is compiled with it
# Larger ranks, checked on a subset of variants and dtypes: the GEMM's rank-padded tiles grow with RANK_PAD (64 is the
# largest checked, r_k <= 64); the factor gradient switches to a rank loop above 16, identical for every larger pad.
EXTRA_RANK_PADS = {"gemm": 64, "perm_adapter": 64, "factor_grad": 32}
EXTRA_RANK_VARIANTS = ("fwd", "dx", "factor_grad")
EXTRA_RANK_COMBOS = (("fp32", "fp32"), ("tf32", "fp32"), ("bf16", "fp32"), ("bf16", "bf16"))
SHARED_LIMIT = {80: 166912, 90: 232448}  # bytes of shared memory one block may use (A100: 163 KB, H100: 227 KB)


@dataclass
class Job:
    kernel: str
    variant: str
    config_index: int
    config: dict
    act: str
    factor: str
    arch: int
    rank_pad: int = RANK_PAD


@dataclass
class Result:
    job: Job
    registers: int = -1
    spill_stores: int = -1
    spill_loads: int = -1
    shared: int = -1
    wgmma: bool | None = None
    error: str = ""
    seconds: float = 0.0


def _ptxas() -> Path:
    import triton

    return Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas-blackwell"


def _gemm_source(jit_fn, job: Job):
    from triton.compiler import ASTSource

    flags = GEMM_VARIANTS[job.variant]
    act = f"*{_storage(job.act)}"
    # The launcher passes block-extended factors U, V in the activation dtype (smoa_kernels/triton/fused.py).
    signature = {
        "X": act, "XA": act, "OUT": act, "BIAS": act, "W": act, "U": act, "V": act,
        "n_rows": "i32", "d_out": "i32", "d_red": "i32", "rank": "i32", "n_bucket": "i32",
    }  # fmt: skip
    # Contiguous tensors: x, x_a, out, W0 (d_out×d_in), U, V. Unit strides are specialised to the constant 1 by the
    # JIT; which W0 stride is unit depends on whether the pass reads W0 transposed (dX).
    if flags["transpose"]:
        unit = {"stride_xr", "stride_xar", "stride_oo", "stride_wo"}
    else:
        unit = {"stride_xr", "stride_xar", "stride_oo", "stride_wr"}
    strides = [
        "stride_xn", "stride_xr", "stride_xan", "stride_xar", "stride_on", "stride_oo",
        "stride_wo", "stride_wr", "stride_uo", "stride_vt",
    ]  # fmt: skip
    constexprs = {}
    for name in strides:
        signature[name] = "constexpr" if name in unit else "i32"
        if name in unit:
            constexprs[name] = 1
    meta = config_meta(job.config)
    const_flags = {k: v for k, v in flags.items() if k != "transpose"}
    const_flags["W_T"] = flags["transpose"]
    precision = {"DOT_PRECISION": _precision(job.act), "RANK_PAD": job.rank_pad}
    for name, value in {**const_flags, **precision, **meta}.items():
        signature[name] = "constexpr"
        constexprs[name] = value
    # Pointers are 16-byte aligned; row strides (d_in, d_out multiples of 16 in the large shapes; U's RANK_PAD and V's
    # padded d_red by construction) divisible by 16.
    divisible = [n for n, t in signature.items() if t.startswith("*")] + [n for n in strides if n not in unit]
    return ASTSource(fn=jit_fn, signature=signature, constexprs=constexprs, attrs=_attrs(jit_fn, divisible))


def _perm_adapter_source(jit_fn, job: Job):
    from triton.compiler import ASTSource

    flags = PERM_VARIANTS[job.variant]
    act, factor = f"*{_storage(job.act)}", f"*{job.factor}"
    signature = {
        "XP": act, "OUT": act, "W": act, "U": factor, "V": factor, "OUT_ORDER": "*i64", "RED_ORDER": "*i64",
        "n_rows": "i32", "d_out": "i32", "d_red": "i32", "rank": "i32", "num_blocks": "i32", "n_bucket": "i32",
        "scale": "fp32",
    }  # fmt: skip
    # Contiguous tensors: the gathered activations and the output (rows of d features), W0, B̂, Â as in _gemm_source.
    if flags["transpose"]:
        unit = {"stride_xr", "stride_oo", "stride_wo", "stride_uo", "stride_vt"}
    else:
        unit = {"stride_xr", "stride_oo", "stride_wr", "stride_ut", "stride_vr"}
    strides = [
        "stride_xn", "stride_xr", "stride_on", "stride_oo", "stride_wo", "stride_wr", "stride_uo", "stride_ut",
        "stride_vt", "stride_vr",
    ]  # fmt: skip
    constexprs = {}
    for name in strides:
        signature[name] = "constexpr" if name in unit else "i32"
        if name in unit:
            constexprs[name] = 1
    meta = config_meta(job.config)
    const_flags = {k: v for k, v in flags.items() if k != "transpose"}
    precision = {"DOT_PRECISION": _precision(job.act), "RANK_PAD": job.rank_pad}
    for name, value in {**const_flags, **precision, **meta}.items():
        signature[name] = "constexpr"
        constexprs[name] = value
    divisible = [n for n, t in signature.items() if t.startswith("*")] + [
        n for n in strides if n not in unit and n not in ("stride_uo", "stride_vt", "stride_ut", "stride_vr")
    ]
    return ASTSource(fn=jit_fn, signature=signature, constexprs=constexprs, attrs=_attrs(jit_fn, divisible))


def _factor_grad_source(jit_fn, job: Job):
    from triton.compiler import ASTSource

    act, factor = f"*{_storage(job.act)}", f"*{job.factor}"
    signature = {
        "DY_PERM": act, "XA_PERM": act, "W": act, "A": factor, "B": factor,
        "ROW_ORDER": "*i64", "COL_ORDER": "*i64", "DA_PART": "*fp32", "DB_PART": "*fp32",
        "n_rows": "i32", "d_out": "i32", "d_in": "i32", "rank": "i32", "num_blocks": "i32", "n_bucket": "i32",
        "scale": "fp32",
    }  # fmt: skip
    strides = [
        "stride_dyn", "stride_dyo", "stride_xn", "stride_xc", "stride_wo", "stride_wc", "stride_at", "stride_ac",
        "stride_bo", "stride_bt", "stride_dap_tile", "stride_dap_t", "stride_dap_c", "stride_dbp_tile",
        "stride_dbp_o", "stride_dbp_t",
    ]  # fmt: skip
    unit = {"stride_dyo", "stride_xc", "stride_wc", "stride_ac", "stride_bt", "stride_dap_c", "stride_dbp_t"}
    constexprs = {}
    for name in strides:
        signature[name] = "constexpr" if name in unit else "i32"
        if name in unit:
            constexprs[name] = 1
    meta = config_meta(job.config)
    precision = {"DOT_PRECISION": _precision(job.act), "RANK_PAD": job.rank_pad, "RANK_CHUNK": 16}
    for name, value in {**precision, **meta}.items():
        signature[name] = "constexpr"
        constexprs[name] = value
    divisible = [n for n, t in signature.items() if t.startswith("*")] + [
        n for n in strides if n not in unit and n not in ("stride_bo",)
    ]
    return ASTSource(fn=jit_fn, signature=signature, constexprs=constexprs, attrs=_attrs(jit_fn, divisible))


def _storage(act: str) -> str:
    """Element type of the activations for an activation label ("tf32" is fp32 storage)."""
    return "fp32" if act == "tf32" else act


def _precision(act: str) -> str:
    """The kernels' DOT_PRECISION for an activation label (see smoa_kernels.triton.configs.FP32_DOT_PRECISION)."""
    if act in ("fp32", "tf32"):
        return FP32_DOT_PRECISION[act == "tf32"]
    return "ieee"


def _attrs(jit_fn, names):
    return {(jit_fn.arg_names.index(n),): [["tt.divisibility", 16]] for n in names}


def _ptxas_report(ptx: str, arch: int) -> tuple[int, int, int]:
    """(registers, spill store bytes, spill load bytes) from ``ptxas -v``."""
    target = "sm_90a" if arch == 90 else f"sm_{arch}"
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "kernel.ptx"
        path.write_text(ptx)
        proc = subprocess.run(
            [str(_ptxas()), f"-arch={target}", "-v", str(path), "-o", str(Path(tmp) / "kernel.cubin")],
            capture_output=True,
            text=True,
        )
    if proc.returncode != 0:
        raise RuntimeError(f"ptxas failed: {proc.stderr.strip()[-500:]}")
    text = proc.stderr + proc.stdout
    registers = int(re.search(r"Used (\d+) registers", text).group(1))
    stores = int(re.search(r"(\d+) bytes spill stores", text).group(1))
    loads = int(re.search(r"(\d+) bytes spill loads", text).group(1))
    return registers, stores, loads


def compile_one(job: Job) -> Result:
    """Compile one (kernel, variant, config, dtype, arch) and measure it; never raises."""
    start = time.time()
    result = Result(job)
    try:
        import triton
        from triton.backends.compiler import GPUTarget

        from smoa_kernels.triton import configs as triton_smoa

        jit_fn = triton_smoa.jit_kernel(job.kernel, False)
        builders = {"gemm": _gemm_source, "perm_adapter": _perm_adapter_source, "factor_grad": _factor_grad_source}
        source = builders[job.kernel](jit_fn, job)
        options = {"num_warps": job.config["num_warps"], "num_stages": job.config["num_stages"]}
        compiled = triton.compile(source, target=GPUTarget("cuda", job.arch, 32), options=options)
        ptx = compiled.asm["ptx"]
        result.registers, result.spill_stores, result.spill_loads = _ptxas_report(ptx, job.arch)
        result.shared = int(compiled.metadata.shared)
        result.wgmma = ("wgmma" in ptx) if job.arch == 90 else None
    except Exception as error:  # reported in the table; the exit status says it failed
        result.error = f"{type(error).__name__}: {str(error).strip().splitlines()[-1] if str(error).strip() else ''}"
    result.seconds = time.time() - start
    return result


def build_jobs(quick: bool = False, archs=ARCHS) -> list[Job]:
    combos = QUICK_DTYPE_COMBOS if quick else DTYPE_COMBOS
    jobs = []
    for kernel, configs in KERNEL_CONFIGS.items():
        variants = {"gemm": list(GEMM_VARIANTS), "perm_adapter": list(PERM_VARIANTS)}.get(kernel, ["factor_grad"])
        quick_configs = {id(default_config(kernel, dtype)) for dtype in (torch.float32, torch.bfloat16)}
        for index, config in enumerate(configs):
            if quick and id(config) not in quick_configs:
                continue
            for variant in variants:
                for act, factor in combos:
                    if _storage(act) not in config_dtypes(config):
                        continue
                    # factor dtype only changes the factor loads: the full product is checked for fwd/dx
                    if variant == "factor_grad" or _storage(act) == factor or variant in ("fwd", "dx"):
                        for arch in archs:
                            jobs.append(Job(kernel, variant, index, config, act, factor, arch))
                # r_k > 16 where the config ships for it (not in --quick)
                if (
                    quick
                    or config.get("max_rank", 10**9) < EXTRA_RANK_PADS[kernel]
                    or variant not in EXTRA_RANK_VARIANTS
                ):
                    continue
                for act, factor in EXTRA_RANK_COMBOS:
                    if _storage(act) in config_dtypes(config):
                        for arch in archs:
                            jobs.append(Job(kernel, variant, index, config, act, factor, arch, EXTRA_RANK_PADS[kernel]))
    return jobs


def run_jobs(jobs: list[Job], workers: int) -> list[Result]:
    if workers <= 1:
        return [compile_one(job) for job in jobs]
    with ProcessPoolExecutor(max_workers=workers) as pool:
        return list(pool.map(compile_one, jobs, chunksize=1))


def _config_label(config: dict) -> str:
    blocks = "x".join(str(v) for k, v in config.items() if k.startswith("BLOCK"))
    return f"{blocks} w{config['num_warps']} s{config['num_stages']}"


def format_table(results: list[Result]) -> str:
    header = f"{'kernel':<12}{'variant':<12}{'cfg':<4}{'config':<18}{'dtype':<11}{'rank':<5}{'arch':<6}"
    header += f"{'regs':>5}{'spill st/ld':>13}{'smem':>8}{'wgmma':>7}  status"
    lines = [header, "-" * len(header)]
    for r in results:
        j = r.job
        wgmma = "-" if r.wgmma is None else ("yes" if r.wgmma else "no")
        status = r.error or ("SPILL" if _spills(r) else "SMEM" if _over_shared(r) else "ok")
        lines.append(
            f"{j.kernel:<12}{j.variant:<12}{j.config_index:<4}{_config_label(j.config):<18}"
            f"{j.act + '/' + j.factor:<11}{j.rank_pad:<5}{'sm_' + str(j.arch):<6}{r.registers:>5}"
            f"{f'{r.spill_stores}/{r.spill_loads}':>13}{r.shared:>8}{wgmma:>7}  {status}"
        )
    return "\n".join(lines)


def _spills(r: Result) -> bool:
    return r.spill_stores != 0 or r.spill_loads != 0


def _over_shared(r: Result) -> bool:
    return r.shared > SHARED_LIMIT[r.job.arch]


def failures(results: list[Result]) -> list[Result]:
    """Compile errors, spills, and launches needing more shared memory than the arch has."""
    return [r for r in results if r.error or _spills(r) or _over_shared(r)]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="default configs only, fp32 and bf16/fp32 only")
    parser.add_argument("--arch", type=int, choices=ARCHS, action="append", help="restrict to one arch (repeatable)")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="parallel compile processes")
    args = parser.parse_args(argv)
    import triton

    jobs = build_jobs(quick=args.quick, archs=tuple(args.arch or ARCHS))
    start = time.time()
    results = run_jobs(jobs, args.workers)
    print(format_table(results))
    bad = failures(results)
    print(
        f"\n{len(results)} compiles in {time.time() - start:.0f} s (triton {triton.__version__}, torch "
        f"{torch.__version__}, ptxas {_ptxas().name}); {len(bad)} failed or spilled"
    )
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
