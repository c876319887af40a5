"""The compile gate of the SMoA Triton kernels: compile what actually runs, for sm_80 (A100) and sm_90 (H100), no GPU.

Generic — it knows nothing about any one kernel. It runs the public entry point
``smoa_kernels.triton.smoa_linear_triton`` forward and backward under ``TRITON_INTERPRET=1`` at representative shapes
(:data:`SCENARIOS`: the canonical bf16 / fp32-factor 4096×4096 layer at N ∈ {256, 8192}, K ∈ {2, 4}, plus fp32, TF32,
fp16, bf16 factors, dropout, bias, merged_weight, a large rank and a small odd shape) through every dispatch path the
entry offers (its ``path=`` keyword, found with :mod:`inspect`, every value but "auto"), with
``configs.capture_launches()`` recording each launch instead of running it (vendor GEMMs are skipped too: nothing is
computed). Every captured launch × every shipped config valid for its dtype and rank (``--quick``: the default config
only) is bound through Triton's own JIT binder (``create_function_from_signature`` + ``JITFunction._pack_args``, so the
divisibility marks on sizes, strides and pointers are those of the real launch; CPU tensors are 64-byte aligned like a
CUDA allocation) and compiled with ``triton.compile`` for ``GPUTarget("cuda", 80|90, 32)``.

Per compile it records: registers and spills (``ptxas-blackwell -v`` on the PTX, the flags Triton uses), shared
memory, CTAs/SM (registers, shared memory and warps against the arch's limits) and, from the SASS main loop
(``cuobjdump -sass``; the loop is a backward branch, the main one has the most tensor-core instructions): tensor-core
instructions (HGMMA on sm_90, HMMA on sm_80), async copies (LDGSTS = cp.async, UTMALDG = TMA), scalar 16-bit global
loads (``LDG.E.U16``/``S16``), tensor-core groups left in flight by the loop's waits (``WARPGROUP.DEPBAR.LE gsb0, N``:
N = 0 drains all of them), barriers, and non-MMA instructions per MMA — beside the same figures for the yardstick, a
plain tiled ``tl.dot`` GEMM (the Triton matmul tutorial's structure, :func:`_yardstick_kernel`) compiled the same way at
the kernel's largest dot tile, dtype, precision, warps and stages.

Configs whose shared memory (``configs.shared_memory_estimate``) exceeds an arch's limit are not compiled for it: the
run-time fit check never launches them there. Gate (exit status 1): a capture or compile error, a spill, more shared
memory than the arch allows, more than the run-time fit check's estimate (fused GEMM) or, for the kernels launched
whatever the call (the blocked path's glue), more than the smallest supported GPU's 99 KB
(``configs.MIN_SUPPORTED_SHARED_MEMORY``), a scalar 16-bit global load in a main loop (a kernel without a loop, e.g.
an index gather, reports its scalar loads without failing), a main loop that drains all tensor-core work every
iteration (sm_90), or more than ``MAX_RATIO_VS_YARDSTICK`` × the yardstick's non-MMA instructions per MMA (kernels
whose main loop has MMAs). It also prints the cost model's ESTIMATES (:mod:`smoa_kernels.cost_model`) per modelled
kernel pass and per training step, and ``--json PATH`` writes everything, including ``step_estimate_vs_frozen``.

    python tools/kernel_report.py                 # every config (CI; minutes on 2 cores, faster with Triton's cache)
    python tools/kernel_report.py --quick         # default configs only
    python tools/kernel_report.py --json report.json
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import hashlib
import inspect
import json
import math
import multiprocessing
import os
import re
import subprocess
import sys
import tempfile
import time
import warnings
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # Triton 3.9's default, stated (silences its warning)
# Triton's own @jit helpers (tl.cdiv, ...) are built at import time in the mode TRITON_INTERPRET says then, so the
# compiles run in fresh worker processes that import Triton compiled (run_jobs); this process switches the interpreter
# on only around the captured calls (so that CPU tensors validate).
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
import triton.language as tl  # noqa: E402  (the yardstick kernel's globals)

ARCHS = (80, 90)
MAX_RATIO_VS_YARDSTICK = 2.0  # non-MMA instructions per MMA in the main loop, against the yardstick's
# Per-SM limits (CUDA occupancy calculator): registers, shared memory per SM / per block, warps, CTAs.
LIMITS = {
    80: {"regs": 65536, "smem_sm": 167936, "smem_block": 166912, "warps": 64, "ctas": 32, "smem_reserved": 1024},
    90: {"regs": 65536, "smem_sm": 233472, "smem_block": 232448, "warps": 64, "ctas": 32, "smem_reserved": 1024},
}
SCHEMA = "smoa-kernel-report/1"  # the --json layout (docs/kernels.md, "Compile gate")
YARDSTICK_SIZE = 4096  # M = N = K of the yardstick's launch (divisible by 16, like the canonical layer)
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
_TRITON_BIN = None


@dataclasses.dataclass(frozen=True)
class Scenario:
    """One call of the entry point: ``smoa_linear_triton`` forward + backward at this shape and dtype."""

    name: str
    dtype: str = "bf16"
    factor_dtype: str = "fp32"
    n_tokens: int = 8192
    d_out: int = 4096
    d_in: int = 4096
    rank: int = 32  # total rank r (r_k = r / K per block)
    num_blocks: int = 2
    dropout: bool = False
    bias: bool = False
    merged_weight: bool = False
    tf32: bool = False  # TF32 allowed in fp32 matmuls during the call (fp32 only)
    # sizes/strides divisible by 16, as in every real model: the JIT then marks them divisible and the main loops can
    # use vector loads. An unaligned shape (e.g. d_in = 136) gets another specialisation whose scalar loads are the
    # correct code for rows that are not 16-element aligned: it is compiled and gated on errors and spills, and its
    # scalar loads and instruction ratios are reported without failing the gate.
    aligned: bool = True


SCENARIOS = (
    Scenario("canonical N=8192 K=2"),
    Scenario("canonical N=8192 K=4", num_blocks=4),
    Scenario("canonical N=256 K=2", n_tokens=256),
    Scenario("canonical N=256 K=4", n_tokens=256, num_blocks=4),
    Scenario("fp32 (3xTF32 dots)", dtype="fp32", n_tokens=256),
    Scenario("fp32 allow_tf32", dtype="fp32", n_tokens=256, tf32=True),
    Scenario("fp16, fp16 factors", dtype="fp16", factor_dtype="fp16", n_tokens=256),
    Scenario("bf16, bf16 factors", factor_dtype="bf16", n_tokens=256),
    Scenario("dropout (x_a distinct)", n_tokens=256, dropout=True),
    Scenario("bias", n_tokens=256, bias=True),
    Scenario("merged_weight", n_tokens=256, merged_weight=True),
    Scenario("r_k = 64", n_tokens=256, rank=128),
    # total ranks above the fused GEMM's FUSED_MAX_RANK_PAD = 128: the fused path refuses them (not offered) and
    # "auto" takes the blocked path, whose glue kernels walk the rank 32 at a time
    Scenario("r = 256 (K·r_k = 256)", n_tokens=256, rank=256),
    Scenario("r = 512 (r_k = 256)", n_tokens=256, rank=512),
    Scenario("odd shape 37x(136->200) K=3", n_tokens=37, d_out=200, d_in=136, rank=12, num_blocks=3, aligned=False),
)


# ---------------------------------------------------------------------------------------------------------------------
# Capture: run the entry point, record its launches (no kernel and no vendor GEMM runs)
# ---------------------------------------------------------------------------------------------------------------------
def dispatch_keyword(fn=None) -> tuple[str | None, tuple]:
    """The entry point's dispatch keyword (``path``) and every concrete value it takes ("auto" is
    a choice among the others): found from the signature, then a module constant ``PATHS`` or a
    ``Literal`` annotation. ``(None, (None,))`` when it has none."""
    import smoa_kernels.triton as package

    fn = fn or package.smoa_linear_triton
    params = inspect.signature(fn).parameters
    for keyword in ("path",):
        if keyword not in params:
            continue
        module = sys.modules[fn.__module__]
        values = None
        for name in (keyword.upper() + "S", keyword.upper()):
            for where in (module, package):
                if isinstance(getattr(where, name, None), (tuple, list)):
                    values = tuple(getattr(where, name))
                    break
            if values:
                break
        if values is None:
            annotation = str(params[keyword].annotation)
            values = tuple(re.findall(r"'([^']+)'", annotation)) or (params[keyword].default,)
        concrete = tuple(v for v in values if v != "auto") or values
        return keyword, concrete
    return None, (None,)


class _NoVendorCompute(torch.utils._python_dispatch.TorchDispatchMode):
    """Returns uninitialised outputs for matrix products (vendor GEMMs) instead of computing them on the CPU; the
    smoa custom ops are entered with the mode still active so that their inner GEMMs are skipped too."""

    SKIP = ("mm", "addmm", "bmm", "baddbmm", "matmul", "linear", "_scaled_mm", "addmm_", "baddbmm_")

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func.namespace == "smoa_kernels":
            from torch._library.custom_ops import OPDEFS

            opdef = OPDEFS.get(func._schema.name)
            if opdef is not None:
                with self:
                    return opdef._init_fn(*args, **kwargs)
        name = func.__name__.split(".")[0]
        if func.namespace == "aten" and name in self.SKIP:
            if "out" in kwargs:  # out= variants: the output buffer, unwritten
                return kwargs["out"]
            if name.endswith("_"):  # in-place variants: the first argument, unchanged
                return args[0]
            if name in ("mm", "bmm"):
                left, right = args[0], args[1]
            elif name in ("addmm", "baddbmm"):
                left, right = args[1], args[2]
            else:  # rare: let the meta kernels say the shape
                meta = [a.to("meta") if isinstance(a, torch.Tensor) else a for a in args]
                out = func(*meta, **{k: v.to("meta") if isinstance(v, torch.Tensor) else v for k, v in kwargs.items()})
                return torch.empty(out.shape, dtype=out.dtype)
            return torch.empty((*left.shape[:-1], right.shape[-1]), dtype=left.dtype)
        return func(*args, **kwargs)


@dataclasses.dataclass
class Capture:
    scenario: Scenario
    path: str | None
    launches: list = dataclasses.field(default_factory=list)
    error: str = ""
    offered: bool = True


def capture(scenario: Scenario, path: str | None, keyword: str | None) -> Capture:
    """The launches of one forward + backward of the entry point (a ValueError from the entry point means the
    combination is not offered, e.g. merged_weight with a path that cannot merge)."""
    from smoa_kernels.triton import configs, smoa_linear_triton

    result = Capture(scenario, path)
    s = scenario
    dtype, fdtype = DTYPES[s.dtype], DTYPES[s.factor_dtype]
    gen = torch.Generator().manual_seed(0)
    r_k = s.rank // s.num_blocks
    x = torch.randn(s.n_tokens, s.d_in, generator=gen).to(dtype).requires_grad_(True)
    x_a = torch.randn(s.n_tokens, s.d_in, generator=gen).to(dtype).requires_grad_(True) if s.dropout else x
    weight = torch.randn(s.d_out, s.d_in, generator=gen).to(dtype)
    bias = torch.randn(s.d_out, generator=gen).to(dtype).requires_grad_(True) if s.bias else None
    lora_A = torch.randn(r_k, s.d_in, generator=gen).to(fdtype).requires_grad_(True)
    lora_B = torch.randn(s.d_out, r_k, generator=gen).to(fdtype).requires_grad_(True)
    row_order, col_order = torch.randperm(s.d_out, generator=gen), torch.randperm(s.d_in, generator=gen)
    options = {"merged_weight": s.merged_weight} if s.merged_weight else {}
    if keyword is not None:
        options[keyword] = path
    # TF32 is set and restored through torch's new fp32_precision API (reading the legacy allow_tf32 flag raises once
    # the new API was used); configs.tf32_enabled() reads it the same way
    matmul = torch.backends.cuda.matmul
    tf32, interpret = matmul.fp32_precision, os.environ.get("TRITON_INTERPRET")
    try:
        matmul.fp32_precision = "tf32" if s.tf32 else "ieee"
        os.environ["TRITON_INTERPRET"] = "1"
        with configs.capture_launches() as launches, _NoVendorCompute():
            y = smoa_linear_triton(x, x_a, weight, bias, lora_A, lora_B, row_order, col_order, s.num_blocks, 2.0,
                                   **options)  # fmt: skip
            y.backward(torch.ones_like(y))
        result.launches = list(launches)
    except ValueError as error:
        result.offered, result.error = False, f"not offered: {error}"
    except Exception as error:  # a gate failure: the entry point cannot run this scenario
        result.error = f"{type(error).__name__}: {error}"
    finally:
        matmul.fp32_precision = tf32
        if interpret is None:
            os.environ.pop("TRITON_INTERPRET", None)
        else:
            os.environ["TRITON_INTERPRET"] = interpret
    return result


@dataclasses.dataclass(frozen=True)
class MultiScenario(Scenario):
    """One forward of ``smoa_kernels.multi_adapter.multi_adapter_linear(backend="triton")`` (inference, no backward)
    with ``adapters`` distinct adapters of total rank ``rank`` and a random index over them and -1 (base only)."""

    adapters: int = 16


# The multi-adapter fused forward (small N: decode and short prefill), captured like the entry point's launches.
MULTI_SCENARIOS = (
    MultiScenario("multi-adapter decode N=64 T=16 K=2", n_tokens=64),
    MultiScenario("multi-adapter decode N=64 T=16 K=4", n_tokens=64, num_blocks=4),
    MultiScenario("multi-adapter N=256 T=4 K=2 bias", n_tokens=256, adapters=4, bias=True),
    MultiScenario("multi-adapter N=1 T=1 K=2", n_tokens=1, adapters=1),
    MultiScenario("multi-adapter fp32 N=64 T=8", dtype="fp32", n_tokens=64, adapters=8),
    MultiScenario("multi-adapter fp16 N=64 T=8", dtype="fp16", factor_dtype="fp16", n_tokens=64, adapters=8),
    MultiScenario("multi-adapter r=64 N=64 T=8", n_tokens=64, adapters=8, rank=64),
    MultiScenario(
        "multi-adapter odd 37x(136->200) K=3 T=3",
        n_tokens=37,
        d_out=200,
        d_in=136,
        rank=12,
        num_blocks=3,
        adapters=3,
        aligned=False,
    ),
)


def capture_multi(scenario: MultiScenario) -> Capture:
    """The launches of one multi-adapter forward (see :class:`MultiScenario`)."""
    from smoa_kernels.multi_adapter import AdapterFactors, multi_adapter_linear
    from smoa_kernels.triton import configs

    result = Capture(scenario, "multi")
    s = scenario
    dtype, fdtype = DTYPES[s.dtype], DTYPES[s.factor_dtype]
    gen = torch.Generator().manual_seed(0)
    r_k = s.rank // s.num_blocks
    x = torch.randn(s.n_tokens, s.d_in, generator=gen).to(dtype)
    weight = torch.randn(s.d_out, s.d_in, generator=gen).to(dtype)
    bias = torch.randn(s.d_out, generator=gen).to(dtype) if s.bias else None
    adapters = [
        AdapterFactors(
            torch.randn(r_k, s.d_in, generator=gen).to(fdtype), torch.randn(s.d_out, r_k, generator=gen).to(fdtype), 2.0
        )
        for _ in range(s.adapters)
    ]
    index = torch.randint(-1, s.adapters, (s.n_tokens,), generator=gen)
    row_order, col_order = torch.randperm(s.d_out, generator=gen), torch.randperm(s.d_in, generator=gen)
    interpret = os.environ.get("TRITON_INTERPRET")
    try:
        os.environ["TRITON_INTERPRET"] = "1"
        with configs.capture_launches() as launches, _NoVendorCompute(), torch.no_grad():
            multi_adapter_linear(x, weight, bias, adapters, index, row_order, col_order, s.num_blocks,
                                 backend="triton")  # fmt: skip
        result.launches = list(launches)
    except ValueError as error:
        result.offered, result.error = False, f"not offered: {error}"
    except Exception as error:  # a gate failure: the multi-adapter forward cannot run this scenario
        result.error = f"{type(error).__name__}: {error}"
    finally:
        if interpret is None:
            os.environ.pop("TRITON_INTERPRET", None)
        else:
            os.environ["TRITON_INTERPRET"] = interpret
    return result


# ---------------------------------------------------------------------------------------------------------------------
# Jobs: one (launch specialisation, config, arch) each, bound through Triton's JIT binder
# ---------------------------------------------------------------------------------------------------------------------
@dataclasses.dataclass
class Job:
    kernel: str
    config_index: int
    config: dict
    arch: int
    signature: dict
    constexprs: dict
    attrs: dict
    options: dict
    dtype: str = ""
    programs: int = 0
    used_by: list = dataclasses.field(default_factory=list)  # "scenario / path" labels
    aligned: bool = True  # launched by at least one aligned scenario (see Scenario.aligned; build_jobs sets it)
    yardstick: dict | None = None  # set for yardstick jobs: the tile it stands in for
    shared_estimate: int | None = None  # configs.shared_memory_estimate: what the run-time fit check assumes

    def key(self) -> str:
        blob = repr((self.kernel, self.config_index, self.arch, sorted(self.signature.items()),
                     sorted(self.constexprs.items()), sorted(self.attrs.items()), self.yardstick))  # fmt: skip
        return hashlib.sha1(blob.encode()).hexdigest()[:16]


def _dtype_label(tensor: torch.Tensor) -> str:
    return {v: k for k, v in DTYPES.items()}.get(tensor.dtype, str(tensor.dtype))


def bind(jit_fn, arch: int, args: tuple, kwargs: dict) -> tuple[dict, dict, dict, dict, dict]:
    """``(signature, constexprs, attrs, options, bound_args)`` exactly as ``JITFunction.run`` computes them for a
    launch with these arguments on ``arch``."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import make_backend
    from triton.runtime.jit import create_function_from_signature

    backend = make_backend(GPUTarget("cuda", arch, 32))
    binder = create_function_from_signature(jit_fn.signature, jit_fn.params, backend)
    kwargs = {"debug": False, **kwargs}
    bound, specialization, options = binder(*args, **kwargs)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        options, signature, constexprs, attrs = jit_fn._pack_args(backend, kwargs, bound, specialization, options)
    return signature, constexprs, attrs, dict(options.__dict__), bound


def _programs(grid, bound: dict) -> int:
    grid = grid(bound) if callable(grid) else grid
    return int(math.prod(int(g) for g in grid))


def build_jobs(captures: list[Capture], quick: bool, archs=ARCHS) -> list[Job]:
    """One job per distinct (kernel, specialisation, config, arch) over all captured launches."""
    from smoa_kernels.triton import configs

    jobs: dict[str, Job] = {}
    for cap in captures:
        for position, launch in enumerate(cap.launches):
            label = f"{cap.scenario.name} / {cap.path} #{position}"  # #i: the call's i-th launch (fwd first)
            jit_fn = configs.jit_kernel(launch.name, False)
            # the activations: configs.launch picks the config by args[0]'s dtype
            first = next(a for a in launch.args if isinstance(a, torch.Tensor))
            dtype = _dtype_label(first)
            default = configs.default_config(launch.name, first.dtype)
            for index, entry in enumerate(configs.KERNEL_CONFIGS[launch.name]):
                if dtype not in configs.config_dtypes(entry) or (quick and entry is not default):
                    continue
                meta = configs.config_meta(entry)
                kwargs = {**launch.constexprs, **meta, "num_warps": entry["num_warps"],
                          "num_stages": entry["num_stages"]}  # fmt: skip
                estimate = configs.shared_memory_estimate(launch.name, entry, first.element_size(), launch.constexprs)
                for arch in archs:
                    if estimate is not None and estimate > LIMITS[arch]["smem_block"]:
                        continue  # the run-time fit check never launches this config on this arch
                    signature, constexprs, attrs, options, bound = bind(jit_fn, arch, launch.args, kwargs)
                    max_rank = entry.get("max_rank")
                    if max_rank is not None and bound.get("rank", 0) > max_rank:
                        break
                    job = Job(launch.name, index, entry, arch, signature, constexprs, attrs, options, dtype,
                              _programs(launch.grid, bound), aligned=False, shared_estimate=estimate)  # fmt: skip
                    job = jobs.setdefault(job.key(), job)
                    if label not in job.used_by:
                        job.used_by.append(label)
                    job.aligned |= cap.scenario.aligned
    return list(jobs.values())


# ---------------------------------------------------------------------------------------------------------------------
# The yardstick: the Triton matmul tutorial's tiled GEMM, C = A·B with both operands K-contiguous (x·Wᵀ's layout)
# ---------------------------------------------------------------------------------------------------------------------
def _yardstick_kernel(
    a_ptr, b_ptr, c_ptr, M, N, K, stride_am, stride_ak, stride_bk, stride_bn, stride_cm, stride_cn,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    PRECISION: tl.constexpr,
):  # fmt: skip
    pid = tl.program_id(axis=0)
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    num_pid_in_group = GROUP_M * num_pid_n
    group_id = pid // num_pid_in_group
    first_pid_m = group_id * GROUP_M
    group_size_m = min(num_pid_m - first_pid_m, GROUP_M)
    pid_m = first_pid_m + ((pid % num_pid_in_group) % group_size_m)
    pid_n = (pid % num_pid_in_group) // group_size_m
    offs_am = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)) % M
    offs_bn = (pid_n * BLOCK_N + tl.arange(0, BLOCK_N)) % N
    offs_k = tl.arange(0, BLOCK_K)
    a_ptrs = a_ptr + (offs_am[:, None] * stride_am + offs_k[None, :] * stride_ak)
    b_ptrs = b_ptr + (offs_k[:, None] * stride_bk + offs_bn[None, :] * stride_bn)
    accumulator = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k in range(0, tl.cdiv(K, BLOCK_K)):
        a = tl.load(a_ptrs, mask=offs_k[None, :] < K - k * BLOCK_K, other=0.0)
        b = tl.load(b_ptrs, mask=offs_k[:, None] < K - k * BLOCK_K, other=0.0)
        accumulator = tl.dot(a, b, accumulator, input_precision=PRECISION)
        a_ptrs += BLOCK_K * stride_ak
        b_ptrs += BLOCK_K * stride_bk
    c = accumulator.to(c_ptr.dtype.element_ty)
    offs_cm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_cn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    c_ptrs = c_ptr + stride_cm * offs_cm[:, None] + stride_cn * offs_cn[None, :]
    tl.store(c_ptrs, c, mask=(offs_cm[:, None] < M) & (offs_cn[None, :] < N))


@functools.cache
def _yardstick_jit():
    """The yardstick as a compiled (never interpreted) ``JITFunction``."""
    import triton

    previous = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "0"
    try:
        return triton.jit(_yardstick_kernel)
    finally:
        os.environ["TRITON_INTERPRET"] = previous if previous is not None else "1"


def yardstick_job(tile: dict, arch: int) -> Job:
    """The yardstick compiled like a launch of it at ``YARDSTICK_SIZE``³ with ``tile`` (M, N, K, dtype, precision,
    num_warps, num_stages)."""
    dtype = DTYPES[tile["dtype"]]
    a = torch.empty(16, dtype=dtype)  # the binder only reads dtype and the (64-byte aligned) address
    s = YARDSTICK_SIZE
    kwargs = {"BLOCK_M": tile["M"], "BLOCK_N": tile["N"], "BLOCK_K": tile["K"], "GROUP_M": 8,
              "PRECISION": tile["precision"], "num_warps": tile["num_warps"],
              "num_stages": tile["num_stages"]}  # fmt: skip
    signature, constexprs, attrs, options, _ = bind(_yardstick_jit(), arch, (a, a, a, s, s, s, s, 1, 1, s, s, 1),
                                                    kwargs)  # fmt: skip
    config = {k: kwargs[k] for k in ("BLOCK_M", "BLOCK_N", "BLOCK_K", "num_warps", "num_stages")}
    return Job("yardstick", 0, config, arch, signature, constexprs, attrs, options, tile["dtype"], yardstick=tile)


# ---------------------------------------------------------------------------------------------------------------------
# Compile and read one job (runs in a worker process; never raises)
# ---------------------------------------------------------------------------------------------------------------------
def _bin(tool: str) -> str:
    import triton

    return str(Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / tool)


def _cache_dir() -> Path:
    from triton import knobs

    path = Path(knobs.cache.dir) / "smoa_kernel_report"
    path.mkdir(parents=True, exist_ok=True)
    return path


def ptxas_figures(ptx: str, arch: int) -> dict:
    """Registers and spill bytes from ``ptxas -v`` with the flags Triton's own ptxas call uses."""
    gpu = "sm_90a" if arch == 90 else f"sm_{arch}"
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "k.ptx"
        src.write_text(ptx)
        proc = subprocess.run(
            [_bin("ptxas-blackwell"), "-lineinfo", "-v", "--regAllocOptLevel=2", f"--gpu-name={gpu}", str(src),
             "-o", str(Path(tmp) / "k.cubin")], capture_output=True, text=True,
        )  # fmt: skip
    if proc.returncode:
        raise RuntimeError(f"ptxas failed: {proc.stderr.strip()[-400:]}")
    text = proc.stdout + proc.stderr
    return {
        "registers": int(re.search(r"Used (\d+) registers", text).group(1)),
        "spill_stores": int(re.search(r"(\d+) bytes spill stores", text).group(1)),
        "spill_loads": int(re.search(r"(\d+) bytes spill loads", text).group(1)),
    }


_SASS_LINE = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(?:@!?U?P[T0-9]+\s+)?([A-Z][A-Z0-9_.]*)([^;]*);")
_SCALAR16 = re.compile(r"^LDG(\.[A-Z0-9]+)*\.(U16|S16)(\.|$)")


def parse_sass(sass: str) -> list[tuple[int, str, str]]:
    """``[(address, opcode, operands)]`` of a ``cuobjdump -sass`` listing."""
    return [(int(m.group(1), 16), m.group(2), m.group(3).strip()) for m in _SASS_LINE.finditer(sass)]


def _is_mma(opcode: str) -> bool:
    return opcode.startswith(("HGMMA", "HMMA", "IMMA", "QGMMA", "UTCHMMA"))


def loop_figures(instructions: list[tuple[int, str, str]]) -> dict:
    """Figures of the main loop (the backward branch whose body has the most MMAs; else the largest loop) and of the
    whole kernel. Counts are per thread's instruction stream, i.e. per warp per iteration."""
    loops = []
    for address, opcode, operands in instructions:
        if opcode.startswith("BRA"):
            target = re.search(r"0x([0-9a-f]+)", operands)
            if target and int(target.group(1), 16) < address:
                start = int(target.group(1), 16)
                loops.append([ins for ins in instructions if start <= ins[0] <= address])
    figures = {"loops": len(loops), "scalar16_loads_kernel": sum(bool(_SCALAR16.match(o)) for _, o, _ in instructions),
               "mma_kernel": sum(_is_mma(o) for _, o, _ in instructions)}  # fmt: skip
    if not loops:
        figures["main_loop"] = None
        return figures
    body = max(loops, key=lambda b: (sum(_is_mma(o) for _, o, _ in b), len(b)))
    ops = [o for _, o, _ in body if o != "NOP"]
    mma = sum(_is_mma(o) for o in ops)
    waits = [int(m.group(1), 16) for _, o, a in body if o.startswith("WARPGROUP.DEPBAR")
             for m in [re.search(r"gsb0,\s*0x([0-9a-f]+)", a)] if m]  # fmt: skip
    figures["main_loop"] = {
        "instructions": len(ops),
        "mma": mma,
        "non_mma": len(ops) - mma,
        "non_mma_per_mma": (len(ops) - mma) / mma if mma else None,
        "async_copies": sum(o.startswith("LDGSTS") for o in ops),
        "tma_loads": sum(o.startswith(("UTMALDG", "UBLKCP")) for o in ops),
        "scalar16_loads": sum(bool(_SCALAR16.match(o)) for o in ops),
        "global_loads": sum(o.startswith("LDG") for o in ops),
        "wgmma_waits": len(waits),
        "full_drains": sum(w == 0 for w in waits),
        "groups_in_flight": min(waits) if waits else None,
        "barriers": sum(o.startswith(("BAR", "BSYNC")) for o in ops),
        "fences": sum(o.startswith(("MEMBAR", "FENCE")) for o in ops),
    }
    return figures


_DOT = re.compile(r"tt\.dot\s[^:]*:\s*tensor<(\d+)x(\d+)x(\w+)>\s*\*\s*tensor<(\d+)x(\d+)x\w+>")


def main_dot(ttir: str) -> dict | None:
    """The largest ``tt.dot`` of the kernel (M, N, K, operand dtype, input precision), from its TTIR."""
    best = None
    for line in ttir.splitlines():
        m = _DOT.search(line)
        if not m:
            continue
        rows, red, dtype, _, cols = m.group(1), m.group(2), m.group(3), m.group(4), m.group(5)
        precision = re.search(r"inputPrecision\s*=\s*(\w+)", line)
        dot = {"M": int(rows), "N": int(cols), "K": int(red),
               "dtype": {"bf16": "bf16", "f16": "fp16", "f32": "fp32"}.get(dtype, dtype),
               "precision": precision.group(1) if precision else "ieee"}  # fmt: skip
        if dot["dtype"] != "fp32":
            dot["precision"] = "ieee"
        if best is None or dot["M"] * dot["N"] * dot["K"] > best["M"] * best["N"] * best["K"]:
            best = dot
    return best


def occupancy(registers: int, shared: int, num_warps: int, arch: int) -> dict:
    """CTAs per SM allowed by registers (allocated per warp in 256s), shared memory and warps."""
    lim = LIMITS[arch]
    per_warp = math.ceil(max(registers, 1) * 32 / 256) * 256
    by_regs = lim["regs"] // (per_warp * num_warps)
    by_smem = lim["smem_sm"] // (shared + lim["smem_reserved"]) if shared else lim["ctas"]
    by_warps = lim["warps"] // num_warps
    return {"ctas_per_sm": min(by_regs, by_smem, by_warps, lim["ctas"]), "limited_by":
            min((by_regs, "registers"), (by_smem, "shared memory"), (by_warps, "warps"))[1]}  # fmt: skip


def compile_one(job: Job) -> dict:
    """Compile ``job`` and read its figures (cached by PTX hash under Triton's cache dir); never raises."""
    start = time.time()
    out = {"key": job.key(), "error": ""}
    try:
        import triton
        from triton.backends.compiler import GPUTarget
        from triton.compiler import ASTSource

        from smoa_kernels.triton import configs

        jit_fn = _yardstick_jit() if job.yardstick else configs.jit_kernel(job.kernel, False)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            compiled = triton.compile(ASTSource(jit_fn, job.signature, job.constexprs, job.attrs),
                                      target=GPUTarget("cuda", job.arch, 32), options=job.options)  # fmt: skip
        ptx = compiled.asm["ptx"]
        digest = hashlib.sha1((ptx + str(job.arch) + triton.__version__).encode()).hexdigest()
        cached = _cache_dir() / f"{digest}.json"
        if cached.exists():
            figures = json.loads(cached.read_text())
        else:
            figures = ptxas_figures(ptx, job.arch)
            with tempfile.TemporaryDirectory() as tmp:
                cubin = Path(tmp) / "k.cubin"
                cubin.write_bytes(compiled.asm["cubin"])
                sass = subprocess.run([_bin("cuobjdump"), "-sass", str(cubin)], capture_output=True, text=True,
                                      check=True).stdout  # fmt: skip
            figures.update(loop_figures(parse_sass(sass)))
            figures["wgmma_ptx"] = "wgmma.mma_async" in ptx
            figures["wgmma_wait0_ptx"] = len(re.findall(r"wgmma\.wait_group\.sync\.aligned\s+0\s*;", ptx))
            figures["main_dot"] = main_dot(compiled.asm["ttir"])
            cached.write_text(json.dumps(figures))
        out.update(figures)
        out["shared"] = int(compiled.metadata.shared)
        out["num_warps"] = int(compiled.metadata.num_warps)
        out.update(occupancy(out["registers"], out["shared"], out["num_warps"], job.arch))
    except Exception as error:  # reported in the table; the gate fails on it
        text = str(error).strip()
        out["error"] = f"{type(error).__name__}: {text.splitlines()[-1][:300] if text else ''}"
    out["seconds"] = round(time.time() - start, 2)
    return out


def run_jobs(jobs: list[Job], workers: int) -> list[dict]:
    """Compile ``jobs`` in fresh ("spawn") worker processes that import Triton compiled (never interpreted), whatever
    mode this process imported it in."""
    if not jobs:
        return []
    env = {"TRITON_INTERPRET": "0"}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    for path in (str(ROOT / "tools"), str(ROOT)):  # spawned workers get this sys.path: they import this module
        if path not in sys.path:
            sys.path.append(path)
    try:
        context = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(max_workers=max(1, min(workers, len(jobs))), mp_context=context) as pool:
            return list(pool.map(compile_one, jobs, chunksize=1))
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


# ---------------------------------------------------------------------------------------------------------------------
# Gate, tables, estimates, JSON
# ---------------------------------------------------------------------------------------------------------------------
def yardstick_tile(job: Job, result: dict) -> dict | None:
    dot = result.get("main_dot")
    if not dot or not (result.get("main_loop") or {}).get("mma"):
        return None
    return {**dot, "num_warps": job.options["num_warps"], "num_stages": job.options["num_stages"]}


def _tile_key(tile: dict, arch: int) -> tuple:
    return (arch, *(tile[k] for k in ("M", "N", "K", "dtype", "precision", "num_warps", "num_stages")))


def verdict(job: Job, result: dict, yard: dict | None) -> list[str]:
    """The gate's failures for one compiled kernel (empty: it passes)."""
    from smoa_kernels.triton.configs import MIN_SUPPORTED_SHARED_MEMORY

    if result["error"]:
        return [f"compile error: {result['error']}"]
    fails = []
    if result["spill_stores"] or result["spill_loads"]:
        fails.append(f"spills {result['spill_stores']}/{result['spill_loads']} B")
    if result["shared"] > LIMITS[job.arch]["smem_block"]:
        fails.append(f"shared memory {result['shared']} B > {LIMITS[job.arch]['smem_block']}")
    if job.yardstick is None and job.shared_estimate is None and result["shared"] > MIN_SUPPORTED_SHARED_MEMORY:
        # a config launched whatever the call: it must fit the smallest supported GPU (sm_86 / sm_89, 99 KB)
        fails.append(f"shared memory {result['shared']} B > {MIN_SUPPORTED_SHARED_MEMORY} B, the least of the "
                     "supported GPUs (configs.SUPPORTED_CAPABILITIES)")  # fmt: skip
    if job.shared_estimate is not None and result["shared"] > job.shared_estimate:
        # the run-time fit check (configs.fitting_configs) would launch a config that may not fit the device
        fails.append(f"shared memory {result['shared']} B > the fit check's estimate {job.shared_estimate} B")
    loop = result.get("main_loop")
    if loop is None:  # no main loop: scalar loads are reported (ld16 column, JSON), not a gate (it is on main loops);
        return fails  # the blocked path's anchor gather W0[R_k, C_k] is element-wise by nature, once per element
    if not job.aligned:  # an unaligned shape's specialisation: compile errors and spills only (Scenario.aligned)
        return fails
    if loop["scalar16_loads"]:
        fails.append(f"{loop['scalar16_loads']} scalar 16-bit global loads in the main loop")
    yard_loop = (yard or {}).get("main_loop") or {}
    if loop["full_drains"] > yard_loop.get("full_drains", 0):
        fails.append(f"main loop drains all tensor-core work ({loop['full_drains']}× wait gsb0 0x0 per iteration, "
                     f"yardstick {yard_loop.get('full_drains', 0)}×)")  # fmt: skip
    if loop["mma"] and yard and not yard.get("error") and (yard.get("main_loop") or {}).get("non_mma_per_mma"):
        ratio = loop["non_mma_per_mma"] / yard["main_loop"]["non_mma_per_mma"]
        if ratio > MAX_RATIO_VS_YARDSTICK:
            fails.append(f"{loop['non_mma_per_mma']:.1f} non-MMA instructions per MMA = {ratio:.1f}× the yardstick's "
                         f"{yard['main_loop']['non_mma_per_mma']:.1f} (limit {MAX_RATIO_VS_YARDSTICK:g}×)")  # fmt: skip
    elif loop["mma"] and not yard:
        fails.append("no yardstick compiled for this tile")
    return fails


def _config_label(config: dict) -> str:
    blocks = "x".join(str(v) for k, v in config.items() if k.startswith("BLOCK"))
    return f"{blocks} w{config['num_warps']} s{config['num_stages']}"


def _variant_label(job: Job) -> str:
    """The launch's non-block constexprs (flags, precision, rank pad): what distinguishes its variants."""
    skip = set(job.config)
    names = [n for n in job.signature if job.signature[n] == "constexpr" and n not in skip]
    consts = {}
    for (index,), value in job.constexprs.items():
        name = list(job.signature)[index]
        if name in names and not name.startswith("stride"):
            consts[name] = value
    return ",".join(f"{k}={int(v) if isinstance(v, bool) else v}" for k, v in consts.items())


def format_row(job: Job, result: dict, yard: dict | None, fails: list[str]) -> str:
    loop = result.get("main_loop") or {}
    ratio = loop.get("non_mma_per_mma")
    yard_ratio = ((yard or {}).get("main_loop") or {}).get("non_mma_per_mma")
    cells = [
        f"{job.kernel:<13}", f"{_config_label(job.config):<19}", f"{job.dtype:<5}", f"sm_{job.arch:<3}",
        f"{result.get('registers', '-'):>4}", f"{result.get('spill_stores', '-')!s:>6}",
        f"{result.get('shared', '-')!s:>7}", f"{result.get('ctas_per_sm', '-')!s:>4}",
        f"{'yes' if loop.get('mma') else 'no' if loop else '-':>4}",
        f"{loop.get('async_copies', 0) + loop.get('tma_loads', 0) if loop else '-'!s:>5}",
        f"{loop.get('scalar16_loads', result.get('scalar16_loads_kernel', '-'))!s:>5}",
        f"{'-' if loop.get('groups_in_flight') is None else loop['groups_in_flight']!s:>4}",
        f"{loop.get('full_drains', '-')!s:>4}",
        f"{'-' if ratio is None else f'{ratio:.1f}':>6}", f"{'-' if yard_ratio is None else f'{yard_ratio:.1f}':>6}",
        f"{loop.get('non_mma', '-')!s:>5}", f"{((yard or {}).get('main_loop') or {}).get('non_mma', '-')!s:>5}",
    ]  # fmt: skip
    used = job.used_by[0] + (f" +{len(job.used_by) - 1}" if len(job.used_by) > 1 else "") if job.used_by else ""
    status = "FAIL: " + "; ".join(fails) if fails else "ok"
    return " ".join(cells) + f"  {status}   [{_variant_label(job)}] ({used})"


HEADER = (
    f"{'kernel':<13} {'config':<19} {'dtype':<5} {'arch':<6} {'regs':>4} {'spill':>6} {'smem':>7} {'CTA':>4} "
    f"{'mma':>4} {'async':>5} {'ld16':>5} {'fly':>4} {'drn':>4} {'nm/mma':>6} {'yard':>6} {'nm/it':>5} {'yard':>5}  "
    "status   [variant] (first launch using it +others)"
)
LEGEND = (
    "regs/spill: ptxas -v (spill = spill-store bytes); smem: bytes per CTA; CTA: CTAs/SM; main loop (SASS): mma = "
    "tensor-core instructions present, async = LDGSTS + TMA loads, ld16 = scalar 16-bit global loads, fly = "
    "tensor-core groups left in flight by the loop's tightest wait (sm_90), drn = full drains per iteration, "
    "nm/mma = non-MMA instructions per MMA, nm/it = non-MMA instructions per iteration, yard = the same for the "
    "yardstick tiled GEMM at the same tile; #i = the i-th launch of that call"
)


def estimates(archs_gpu: tuple[str, ...] = ("h100", "a100")) -> dict:
    """Cost-model ESTIMATES at the canonical shape: every modelled pass (≈ kernel) of each path and the training
    step over the frozen layer's step, per GPU class."""
    from smoa_kernels import cost_model as cm

    c = cm.CANONICAL
    out = {"label": "ESTIMATE from smoa_kernels.cost_model (a model, not a measurement)", "passes": {},
           "step_estimate_vs_frozen": {}}  # fmt: skip
    for gpu in archs_gpu:
        for path, method in cm.PATHS.items():
            for k in c["blocks"]:
                ratio = cm.step_vs_frozen(method, max(c["tokens"]), c["d_out"], c["d_in"], c["rank"], k, 2, gpu)
                out["step_estimate_vs_frozen"].setdefault(gpu, {}).setdefault(path, {})[f"K={k}"] = round(ratio, 3)
                passes = cm.passes(method, "full", max(c["tokens"]), c["d_out"], c["d_in"], c["rank"], k, 2, gpu)
                out["passes"].setdefault(gpu, {}).setdefault(path, {})[f"K={k}"] = [
                    {"pass": p.name, "engine": p.engine, "gflop": p.flops / 1e9, "mbytes": p.bytes / 1e6,
                     "launches": p.launches, "estimate_us": round(p.seconds * 1e6, 1)} for p in passes
                ]  # fmt: skip
    return out


def format_estimates(est: dict) -> str:
    lines = [f"\n{est['label']}: bf16, 4096x4096, N=8192, r=32, full training step"]
    for gpu, paths in est["passes"].items():
        for path, by_k in paths.items():
            for k, rows in by_k.items():
                total = sum(r["estimate_us"] for r in rows)
                ratio = est["step_estimate_vs_frozen"][gpu][path][k]
                lines.append(f"  {gpu} {path:<8} {k}: step {total:8.1f} us estimate = {ratio:.2f}x the frozen step")
                if gpu == "h100":
                    lines += [f"      {r['estimate_us']:8.1f} us  {r['engine']:<7} {r['pass']}" for r in rows]
    return "\n".join(lines)


def report(quick: bool = False, workers: int = 2, archs=ARCHS, scenarios=SCENARIOS, log=print,
           multi_scenarios=MULTI_SCENARIOS) -> dict:  # fmt: skip
    """Capture, compile, read, gate: the whole report as a dict (``failed``: the gate's verdict)."""
    import triton

    start = time.time()
    keyword, values = dispatch_keyword()
    captures = [capture(s, v, keyword) for s in scenarios for v in values]
    captures += [capture_multi(s) for s in multi_scenarios]
    jobs = build_jobs(captures, quick, archs)
    log(f"kernel_report: {sum(len(c.launches) for c in captures)} launches captured from {len(captures)} calls "
        f"({keyword}={values}) in {time.time() - start:.0f} s; {len(jobs)} compiles")  # fmt: skip
    results = dict(zip((j.key() for j in jobs), run_jobs(jobs, workers)))
    tiles = {}
    for job in jobs:
        tile = yardstick_tile(job, results[job.key()])
        if tile:
            tiles.setdefault(_tile_key(tile, job.arch), (tile, job.arch))
    yard_jobs = {key: yardstick_job(tile, arch) for key, (tile, arch) in tiles.items()}
    yard_results = dict(zip(yard_jobs, run_jobs(list(yard_jobs.values()), workers)))
    rows, failed = [], False
    for cap in captures:
        if cap.error and cap.offered:
            failed = True
    for job in sorted(jobs, key=lambda j: (j.kernel, j.config_index, j.dtype, j.arch, _variant_label(j))):
        result = results[job.key()]
        tile = yardstick_tile(job, result)
        yard = yard_results.get(_tile_key(tile, job.arch)) if tile else None
        fails = verdict(job, result, yard)
        failed |= bool(fails)
        rows.append({"kernel": job.kernel, "config_index": job.config_index, "config": job.config, "arch": job.arch,
                     "dtype": job.dtype, "variant": _variant_label(job), "programs": job.programs,
                     "used_by": job.used_by, "figures": result, "yardstick_tile": tile,
                     "yardstick": yard, "failures": fails, "_job": job})  # fmt: skip
    est = estimates()
    return {
        "schema": SCHEMA, "triton": triton.__version__, "torch": torch.__version__, "quick": quick,
        "archs": list(archs),
        "dispatch_keyword": keyword, "dispatch_values": list(values),
        "captures": [{"scenario": dataclasses.asdict(c.scenario), "path": c.path, "launches":
                      [launch.name for launch in c.launches], "error": c.error, "offered": c.offered}
                     for c in captures],
        "kernels": rows, "estimates": est, "step_estimate_vs_frozen": est["step_estimate_vs_frozen"],
        "failed": failed, "seconds": round(time.time() - start, 1),
        "gate": {"max_ratio_vs_yardstick": MAX_RATIO_VS_YARDSTICK, "limits": LIMITS},
    }  # fmt: skip


def format_report(rep: dict) -> str:
    lines = [HEADER, "-" * len(HEADER)]
    lines += [format_row(r["_job"], r["figures"], r["yardstick"], r["failures"]) for r in rep["kernels"]]
    lines.append(LEGEND)
    yards = {}
    for r in rep["kernels"]:
        if r["yardstick_tile"] and r["yardstick"]:
            yards.setdefault(_tile_key(r["yardstick_tile"], r["arch"]), r)
    if yards:
        lines.append("\nyardstick (tiled tl.dot GEMM, the matmul tutorial's structure) at the tiles above:")
        for _, r in sorted(yards.items(), key=lambda kv: str(kv[0])):
            y, loop = r["yardstick"], (r["yardstick"].get("main_loop") or {})
            t = r["yardstick_tile"]
            lines.append(f"  sm_{r['arch']} {t['M']}x{t['N']}x{t['K']} {t['dtype']}/{t['precision']} w{t['num_warps']} "
                         f"s{t['num_stages']}: regs {y.get('registers')}, spill {y.get('spill_stores')}, smem "
                         f"{y.get('shared')}, CTAs/SM {y.get('ctas_per_sm')}, mma {loop.get('mma')}, non-MMA/MMA "
                         f"{loop.get('non_mma_per_mma') or 0:.1f}, in flight {loop.get('groups_in_flight')}, drains "
                         f"{loop.get('full_drains')}{'  ' + y['error'] if y.get('error') else ''}")  # fmt: skip
    for cap in rep["captures"]:
        if cap["error"]:
            status = "skipped" if not cap["offered"] else "FAIL"
            lines.append(f"{status}: {cap['scenario']['name']} / {cap['path']}: {cap['error'][:200]}")
    lines.append(format_estimates(rep["estimates"]))
    bad = sum(bool(r["failures"]) for r in rep["kernels"])
    lines.append(f"\n{len(rep['kernels'])} kernel compiles, {bad} failing the gate; triton {rep['triton']}, "
                 f"{rep['seconds']} s; gate {'FAILED' if rep['failed'] else 'passed'}")  # fmt: skip
    return "\n".join(lines)


def to_json(rep: dict) -> dict:
    clean = dict(rep)
    clean["kernels"] = [{k: v for k, v in row.items() if k != "_job"} for row in rep["kernels"]]
    return clean


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="the default config of each kernel only")
    parser.add_argument("--json", metavar="PATH", help="write the whole report as JSON")
    parser.add_argument("--arch", type=int, choices=ARCHS, action="append", help="restrict to one arch (repeatable)")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="parallel compile processes")
    args = parser.parse_args(argv)
    rep = report(quick=args.quick, workers=args.workers, archs=tuple(args.arch or ARCHS))
    print(format_report(rep))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(to_json(rep), indent=1, default=str) + "\n")
        print(f"JSON: {args.json}")
    return 1 if rep["failed"] else 0


if __name__ == "__main__":
    with contextlib.suppress(BrokenPipeError):
        sys.exit(main())
