"""Kernel configs (the one list), kernel construction (JIT / autotune / interpreter) and the single launch point.

Every Triton kernel of smoa is launched through :func:`launch` with a name from ``KERNEL_CONFIGS``; the kernels' source
functions are found through ``KERNEL_SOURCES``. The compile gate imports this module for the configs and captures
launches with :func:`capture_launches`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import importlib
import os
import threading
import types
from collections.abc import Iterator

import torch

try:
    import triton
    import triton.language as tl

    TRITON_IMPORT_ERROR = ""
except ImportError as _error:  # pragma: no cover - exercised only where triton is missing
    triton = None
    tl = types.SimpleNamespace(constexpr=None)  # keeps the kernel annotations evaluable
    TRITON_IMPORT_ERROR = f"triton is not importable ({_error})"

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
MIN_DOT = 16  # tl.dot needs every block dimension >= 16 on the GPU

# ----------------------------------------------------------------------------------------------------------------------
# Configs (the one list) and kernel construction
# ----------------------------------------------------------------------------------------------------------------------

# Every config shipped for each kernel. The FIRST entry valid for an activation dtype ("dtypes", optional, restricts
# an entry to those dtypes) is the single config used under TRITON_INTERPRET=1 and with
# torch.use_deterministic_algorithms(True). tools/kernel_report.py (the compile gate) compiles all of them for sm_80
# and sm_90 with the JIT's own specialisation and fails on any spill, so a config that spills is removed here (or
# limited to the dtypes where it does not) rather than shipped.
_HALF, _FP32 = ("fp16", "bf16"), ("fp32",)
KERNEL_CONFIGS: dict[str, list[dict]] = {
    # The fused single-pass GEMM (smoa_kernels/triton/fused.py), chosen from the SASS of the specialisation the JIT
    # launches (docs/kernels.md, "The fused small-N kernel"). It serves small N (the cost model sends training-sized N
    # to the blocked path): 32-row output tiles compile to mma.sync on sm_90 as on sm_80, so their main loop has no
    # warpgroup wait at all. The 64/128-row wgmma tiles were removed: Triton 3.9 drains all tensor-core work once per
    # iteration there (the rank product feeds the Hadamard), which the compile gate rejects. The first entry per dtype
    # is the interpreter's / deterministic mode's single config (the same BLOCK_N for 16-bit and fp32). Pruned for
    # spills (sm_80, Triton's own ptxas flags): 128×128×32/8 warps (7 KB with dropout), 32×16×64 at 4 stages (36–52 B in
    # dX_a), 32×32×32 in fp32 (3×TF32; 128 B with dropout on sm_90).
    "gemm": [
        {"BLOCK_O": 32, "BLOCK_N": 32, "BLOCK_R": 64, "GROUP_O": 8, "num_warps": 4, "num_stages": 4, "dtypes": _HALF},
        {"BLOCK_O": 32, "BLOCK_N": 32, "BLOCK_R": 16, "GROUP_O": 8, "num_warps": 4, "num_stages": 3, "dtypes": _FP32},
        {"BLOCK_O": 32, "BLOCK_N": 16, "BLOCK_R": 64, "GROUP_O": 8, "num_warps": 4, "num_stages": 3, "dtypes": _HALF},
        {"BLOCK_O": 32, "BLOCK_N": 64, "BLOCK_R": 64, "GROUP_O": 8, "num_warps": 4, "num_stages": 4, "dtypes": _HALF},
        # decode (N ≤ 16): 16 rows give d_out/16 programs (16×16×128 spills 8 B in dX_a, 32×16×128 28–96 B on sm_80)
        {"BLOCK_O": 16, "BLOCK_N": 16, "BLOCK_R": 64, "GROUP_O": 8, "num_warps": 2, "num_stages": 6, "dtypes": _HALF},
    ],
    # The blocked path's glue kernels (smoa_kernels/triton/blocked.py); none has a main loop over a large operand
    # except the factor epilogue's walk over a block's columns. Chosen with the compile check (registers, no spills).
    # s·ΔW_k generation: one (BLOCK_I × BLOCK_J) tile per program, rank padded to >= 16.
    "delta_blocks": [
        {"BLOCK_I": 64, "BLOCK_J": 64, "num_warps": 8, "num_stages": 1},
    ],
    # Coalesced un-permute (+ bias) of a token-minor product into original coordinates; memory-bound.
    "scatter": [
        {"BLOCK_N": 64, "BLOCK_C": 64, "num_warps": 4, "num_stages": 1},
    ],
    # The fused GEMM's block-extended factors U, V from the factors and the inverse orders (elementwise, tiny).
    "fused_operands": [
        {"BLOCK": 64, "num_warps": 4, "num_stages": 1},
    ],
    # Its reverse: an activation's columns gathered into token-minor padded bands (x, dY); memory-bound.
    "band_gather": [
        {"BLOCK_N": 64, "BLOCK_C": 64, "num_warps": 4, "num_stages": 1},
    ],
    # H = s·G ⊙ W0, dB = H Aᵀ, dA partials = Bᵀ H per block (fp32; 2 stages spilled 4 B on sm_80 with a 16-bit anchor);
    # BLOCK_O is fixed by the launcher (it sizes the
    # dA partial buffer), only the column tile is a config.
    "factor_epilogue": [
        {"BLOCK_C": 64, "num_warps": 4, "num_stages": 3},
    ],
    # The order guard, once per step: one launch clamps and inverts both orders, a second checks them (O(d) each,
    # BLOCK positions per program; both launches use one grid, so the two entries must keep the same BLOCK).
    "orders": [
        {"BLOCK": 1024, "num_warps": 4, "num_stages": 1},
    ],
    "orders_check": [
        {"BLOCK": 1024, "num_warps": 4, "num_stages": 1},
    ],
}
_LAUNCH_OPTIONS = ("num_warps", "num_stages", "dtypes", "max_rank")
_DTYPE_NAMES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}
# Where each kernel's @triton.jit-able Python function lives (imported lazily: this module imports no kernel module,
# so the compile gate and the kernel modules can both import it).
KERNEL_SOURCES = {
    "gemm": ("smoa_kernels.triton.fused", "_smoa_gemm_kernel"),
    "delta_blocks": ("smoa_kernels.triton.blocked_kernels", "_smoa_delta_blocks_kernel"),
    "scatter": ("smoa_kernels.triton.blocked_kernels", "_smoa_scatter_kernel"),
    "band_gather": ("smoa_kernels.triton.blocked_kernels", "_smoa_band_gather_kernel"),
    "fused_operands": ("smoa_kernels.triton.fused", "_smoa_fused_operands_kernel"),
    "factor_epilogue": ("smoa_kernels.triton.blocked_kernels", "_smoa_factor_epilogue_kernel"),
    "orders": ("smoa_kernels.triton.blocked_kernels", "_smoa_orders_kernel"),
    "orders_check": ("smoa_kernels.triton.blocked_kernels", "_smoa_orders_check_kernel"),
}
_GEMM_CODE_FLAGS = ("HAS_BASE", "XA_IS_X", "HAS_BIAS", "MERGED", "W_T", "DOT_PRECISION")
_AUTOTUNE_KEYS = {
    # Every constexpr that changes the fused GEMM's code is in its key (dX on a square layer must not reuse the
    # forward's config); the activation dtype is added by triton.autotune itself.
    "gemm": ["d_out", "d_red", "n_bucket", "RANK_PAD", *_GEMM_CODE_FLAGS],
    "delta_blocks": ["d_out", "d_in", "rank", "num_blocks"],
    "scatter": ["n_bucket", "d"],
    "band_gather": ["n_bucket", "d", "num_blocks"],
    "fused_operands": ["d_out", "d_red", "rank", "num_blocks", "RANK_PAD", "POSITIONS"],
    "factor_epilogue": ["n_band_rows", "n_band_cols", "rank"],
    "orders": ["d_out", "d_in"],
    "orders_check": ["d_out", "d_in"],
}
# Every kernel overwrites its outputs (no accumulation into existing values, partial-buffer layouts fixed by the
# launcher), so autotuning trials need no reset or restore.
_RESET_TO_ZERO = {name: None for name in KERNEL_CONFIGS}
_RESTORE_VALUE = {name: None for name in KERNEL_CONFIGS}
# The argument whose dtype selects the configs (args[0] of every launch).
_ACTIVATION_ARG = {
    "gemm": "X",
    "delta_blocks": "W",
    "scatter": "ZT",
    "band_gather": "X",
    "factor_epilogue": "G",
    "orders": "FLAG",
    "orders_check": "FLAG",
}


def config_dtypes(entry: dict) -> tuple[str, ...]:
    """Activation dtypes a ``KERNEL_CONFIGS`` entry is shipped for."""
    return entry.get("dtypes", ("fp32", "fp16", "bf16"))


def config_meta(entry: dict) -> dict:
    """The constexpr block sizes of a ``KERNEL_CONFIGS`` entry (without launch options)."""
    return {k: v for k, v in entry.items() if k not in _LAUNCH_OPTIONS}


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


@functools.cache
def jit_kernel(name: str, interpret: bool):
    """The ``@triton.jit`` (or interpreted) kernel ``name``; built on first use so the mode is read at launch time."""
    previous = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "1" if interpret else "0"
    try:
        return triton.jit(raw_kernel(name))
    finally:
        if previous is None:
            del os.environ["TRITON_INTERPRET"]
        else:
            os.environ["TRITON_INTERPRET"] = previous


# ----------------------------------------------------------------------------------------------------------------------
# Devices: the supported ones, and whether a config fits one
# ----------------------------------------------------------------------------------------------------------------------

# Compute capabilities the kernels are built and gated for: the compile gate compiles every launch for sm_80 and
# sm_90, and sm_86/sm_87/sm_89 (A10, Orin, L4, RTX 30xx/40xx) run the sm_80 code Triton emits for them with the same
# instructions (only their shared memory is smaller, which the fit check below accounts for). Older GPUs (T4, V100)
# lack what the kernels use (cp.async, bf16 MMA) and newer ones (sm_100, sm_120) are not compiled by the gate.
SUPPORTED_CAPABILITIES = ((8, 0), (8, 6), (8, 7), (8, 9), (9, 0))
# The least shared memory per block among them (sm_86/sm_89: 99 KB opt-in): every config of the blocked path's glue
# kernels must fit it (a compile-gate rule); the fused GEMM's configs are fitted per call (fused_fits).
MIN_SUPPORTED_SHARED_MEMORY = 101376


def device_shared_memory(device: torch.device) -> int:
    """Opt-in shared memory per block of a CUDA ``device`` in bytes (an H100's 232448 B elsewhere: the interpreter
    and the compile gate see an H100)."""
    if device.type != "cuda":
        return 232448
    return _cuda_shared_memory(device.index if device.index is not None else torch.cuda.current_device())


@functools.cache
def _cuda_shared_memory(index: int) -> int:
    return int(triton.runtime.driver.active.utils.get_device_properties(index)["max_shared_mem"])


def device_support(device: torch.device) -> tuple[bool, str]:
    """``(True, "")`` if the Triton kernels are built for ``device`` (a CPU under the interpreter included), else
    ``(False, reason)``: a compute capability outside :data:`SUPPORTED_CAPABILITIES`, or too little shared memory for
    the blocked path's glue kernels."""
    if device.type != "cuda":
        return True, ""
    capability = torch.cuda.get_device_capability(device)
    name = torch.cuda.get_device_name(device)
    if tuple(capability) not in SUPPORTED_CAPABILITIES:
        supported = ", ".join(f"sm_{major}{minor}" for major, minor in SUPPORTED_CAPABILITIES)
        return False, (f"{name} has compute capability sm_{capability[0]}{capability[1]}; the SMoA Triton kernels are "
                       f"built and checked for {supported}")  # fmt: skip
    shared = device_shared_memory(device)
    if shared < MIN_SUPPORTED_SHARED_MEMORY:
        need = MIN_SUPPORTED_SHARED_MEMORY
        return False, f"{name} has {shared} B of shared memory per block; the kernels need {need} B"
    return True, ""


def shared_memory_estimate(name: str, entry: dict, element_bytes: int, constexprs: dict) -> int | None:
    """An upper bound on the shared memory (bytes) a launch of kernel ``name`` with config ``entry`` needs, for the
    kernels whose need depends on the call (the fused GEMM: its rank pad); ``None`` for the others (their configs are
    checked against :data:`MIN_SUPPORTED_SHARED_MEMORY` by the compile gate).

    The fused GEMM pipelines, per stage beyond the first, the V tile (RANK_PAD × BLOCK_R), the W0 tile (BLOCK_O ×
    BLOCK_R) and one or two activation tiles (BLOCK_R × BLOCK_N), keeps the U tile (BLOCK_O × RANK_PAD) once and
    converts the fp32 accumulator through shared memory in the epilogue. The compile gate checks that this bound is at
    least what the compiler reports for every shipped config and launched variant (it is exact for most)."""
    if name != "gemm":
        return None
    block_o, block_n, block_r = entry["BLOCK_O"], entry["BLOCK_N"], entry["BLOCK_R"]
    rank_pad = constexprs["RANK_PAD"]
    activations = 1 if constexprs.get("XA_IS_X", True) or constexprs.get("MERGED", False) else 2
    per_stage = rank_pad * block_r + block_o * block_r + activations * block_r * block_n
    pipelined = (entry["num_stages"] - 1) * element_bytes * per_stage
    return pipelined + element_bytes * block_o * rank_pad + 4 * block_o * block_n


def fitting_configs(name: str, dtype: torch.dtype, constexprs: dict, shared_memory: int) -> list[dict]:
    """The ``KERNEL_CONFIGS[name]`` entries shipped for ``dtype`` whose shared memory fits ``shared_memory`` bytes, in
    the list's order (the first is the interpreter's and deterministic mode's single config)."""
    element_bytes = torch.empty((), dtype=dtype).element_size()
    fits = []
    for entry in KERNEL_CONFIGS[name]:
        if _DTYPE_NAMES[dtype] not in config_dtypes(entry) or "max_rank" in entry:
            continue
        need = shared_memory_estimate(name, entry, element_bytes, constexprs)
        if need is None or need <= shared_memory:
            fits.append(entry)
    return fits


# The largest rank pad (K·r_k padded to a power of two) the fused GEMM serves: its U tile (BLOCK_O × RANK_PAD) lives
# in registers and its V tile in every pipeline stage, so above 128 the shipped tiles spill or need 143–365 KB of
# shared memory (more than an A100's 163 KB at RANK_PAD = 512); such ranks take the blocked path, whose shared memory
# and registers do not grow with the rank (it walks the rank RANK_CHUNK_MAX = 32 at a time).
FUSED_MAX_RANK_PAD = 128


def fused_fits(dtype: torch.dtype, rank_pad: int, device: torch.device, *, two_activations: bool = False) -> bool:
    """Whether the fused GEMM serves this rank pad (≤ :data:`FUSED_MAX_RANK_PAD`) with some config that fits
    ``device``'s shared memory: if not, ``auto`` takes the blocked path."""
    if rank_pad > FUSED_MAX_RANK_PAD:
        return False
    return _fused_fits(dtype, rank_pad, device_shared_memory(device), two_activations)


@functools.cache
def _fused_fits(dtype: torch.dtype, rank_pad: int, shared_memory: int, two_activations: bool) -> bool:
    constexprs = {"RANK_PAD": rank_pad, "XA_IS_X": not two_activations, "MERGED": False}
    return bool(fitting_configs("gemm", dtype, constexprs, shared_memory))


# ----------------------------------------------------------------------------------------------------------------------
# Autotuning
# ----------------------------------------------------------------------------------------------------------------------

# One lock per kernel around its autotuned launches: triton's Autotuner keeps per-call state on the shared object
# (the bound arguments, the timings of a tuning in progress), so two threads launching the same kernel could mix
# them. The lock covers the host-side launch only (kernels still run asynchronously).
_AUTOTUNE_LOCKS = {name: threading.Lock() for name in KERNEL_CONFIGS}


@functools.cache
def _autotuned_kernel(name: str):
    configs = []
    for entry in KERNEL_CONFIGS[name]:
        config = triton.Config(config_meta(entry), num_warps=entry["num_warps"], num_stages=entry["num_stages"])
        config.smoa_entry = entry
        configs.append(config)

    def prune(configs, named_args, **kwargs):
        activation = named_args[_ACTIVATION_ARG[name]]
        fits = fitting_configs(name, activation.dtype, kwargs, device_shared_memory(activation.device))
        rank = named_args.get("rank", 0)
        kept = [c for c in configs if any(c.smoa_entry is e for e in fits)]
        kept = [c for c in kept if c.smoa_entry.get("max_rank") is None or rank <= c.smoa_entry["max_rank"]]
        if not kept:  # the dispatcher routes shapes without a fitting config elsewhere: reaching here is a bug
            raise RuntimeError(f"no {name} config fits the device's shared memory for {kwargs}")
        return kept

    # cache_results: the chosen config of each key is stored in Triton's cache directory (TRITON_CACHE_DIR, default
    # ~/.triton/cache), so a restarted run does not tune again.
    return triton.autotune(
        configs=configs,
        key=_AUTOTUNE_KEYS[name],
        reset_to_zero=_RESET_TO_ZERO[name],
        restore_value=_RESTORE_VALUE[name],
        prune_configs_by={"early_config_prune": prune},
        cache_results=True,
    )(jit_kernel(name, False))


def default_config(name: str, dtype: torch.dtype) -> dict:
    """The single config of kernel ``name`` for activations of ``dtype``: the first entry shipped for that dtype (and
    for every rank)."""
    return next(
        entry
        for entry in KERNEL_CONFIGS[name]
        if _DTYPE_NAMES[dtype] in config_dtypes(entry) and "max_rank" not in entry
    )


def single_config(name: str, activation: torch.Tensor, constexprs: dict) -> dict:
    """The one config of an untuned launch (interpreter, deterministic mode): :func:`default_config`, or where it does
    not fit the device's shared memory at this launch's constexprs, the first shipped config that does."""
    entry = default_config(name, activation.dtype)
    shared = device_shared_memory(activation.device)
    need = shared_memory_estimate(name, entry, activation.element_size(), constexprs)
    if need is None or need <= shared:
        return entry
    fits = fitting_configs(name, activation.dtype, constexprs, shared)
    if not fits:  # the dispatcher routes shapes without a fitting config elsewhere: reaching here is a bug
        raise RuntimeError(f"no {name} config fits the device's {shared} B of shared memory for {constexprs}")
    return fits[0]


def raw_kernel(name: str):
    """The undecorated Python function of kernel ``name`` (see ``KERNEL_SOURCES``)."""
    module, function = KERNEL_SOURCES[name]
    return getattr(importlib.import_module(module), function)


@dataclasses.dataclass
class Launch:
    """One captured kernel launch: the kernel's name, its grid and the arguments the launcher passed."""

    name: str
    grid: object
    args: tuple
    constexprs: dict


_CAPTURE: list[list[Launch]] = []


@contextlib.contextmanager
def capture_launches() -> Iterator[list[Launch]]:
    """Inside the block, :func:`launch` records every launch instead of running it (outputs stay unwritten).

    The compile gate (tools/kernel_report.py) runs the real launchers under it to get the exact arguments, and so the
    specialisation, that the JIT would see. Launch-time choices made while capturing are those of a GPU run even under
    TRITON_INTERPRET=1 (e.g. the fp32 dot precision follows ``allow_tf32``)."""
    launches: list[Launch] = []
    _CAPTURE.append(launches)
    try:
        yield launches
    finally:
        _CAPTURE.pop()


def capturing() -> bool:
    """True inside :func:`capture_launches` (kernels do not run: a launcher whose outputs feed host-side indexing
    must fill them another way there)."""
    return bool(_CAPTURE)


def _autotune_enabled() -> bool:
    """``SMOA_TRITON_AUTOTUNE=0`` launches every kernel with its single config (as the interpreter and deterministic
    mode do): no tuning runs, fewer cold compiles (``smoa gpu-check``'s test phase uses it)."""
    return os.environ.get("SMOA_TRITON_AUTOTUNE", "1").lower() not in ("0", "false", "off", "no")


def launch(name: str, grid, *args, **constexprs) -> None:
    """THE launch point of every kernel: one config (interpreter, deterministic mode) or the autotuned list."""
    if _CAPTURE:
        _CAPTURE[-1].append(Launch(name, grid, args, constexprs))
        return
    if _interpreting() or torch.are_deterministic_algorithms_enabled() or not _autotune_enabled():
        entry = single_config(name, args[0], constexprs)  # args[0]: see _ACTIVATION_ARG
        options = {"num_warps": entry["num_warps"], "num_stages": entry["num_stages"]}
        jit_kernel(name, _interpreting())[grid](*args, **constexprs, **config_meta(entry), **options)
    else:
        with _AUTOTUNE_LOCKS[name]:
            _autotuned_kernel(name)[grid](*args, **constexprs)


# tl.dot precision for fp32 operands, keyed by whether torch allows TF32 in fp32 matmuls (tf32_enabled). Without TF32
# the kernels use three TF32 products ("tf32x3", error at the level of fp32 rounding) rather than "ieee": an FMA-based
# fp32 dot spills hundreds of bytes of registers in every shipped tile (tools/kernel_report.py). 16-bit operands
# ignore it.
FP32_DOT_PRECISION = {True: "tf32", False: "tf32x3"}


def tf32_enabled() -> bool:
    """Whether torch computes fp32 CUDA matmuls in TF32, read through the API that never raises.

    torch ≥ 2.9 has two APIs: the legacy ``torch.backends.cuda.matmul.allow_tf32`` and the new ``fp32_precision``
    attributes. Once the new one was used to ask for TF32, *reading* the legacy flag raises ``RuntimeError`` ("mix of
    the legacy and new APIs"); the new attribute reflects both ("tf32" after ``allow_tf32 = True`` or
    ``set_float32_matmul_precision("high")`` too) and never raises. ``"none"`` at the matmul level inherits the global
    ``torch.backends.fp32_precision``. Older torch has only the legacy flag."""
    matmul = torch.backends.cuda.matmul
    precision = getattr(matmul, "fp32_precision", None)
    if precision is None:  # torch < 2.9: the legacy flag is the only one
        return bool(matmul.allow_tf32)
    if precision == "none":
        precision = getattr(torch.backends, "fp32_precision", "none")
    return precision == "tf32"


def _dot_precision(dtype: torch.dtype) -> str:
    if dtype != torch.float32 or (_interpreting() and not _CAPTURE):
        return "ieee"  # the interpreter computes exact fp32 whatever the flag (captured launches: as on a GPU)
    return FP32_DOT_PRECISION[tf32_enabled()]


def _rank_pad(rank: int) -> int:
    return max(MIN_DOT, triton.next_power_of_2(max(rank, 1)))


# Token-count buckets of the autotune keys: a kernel is tuned at most once per bucket (and per layer shape and code
# variant), so a run whose N wanders (packed sequences, the last batch of an epoch) re-tunes at most len(N_BUCKETS)
# times per layer shape instead of once per power of two. The fused path serves small N only (the cost model sends
# training-sized N to the blocked path), so the last bucket holds everything above 256 tokens.
N_BUCKETS = (16, 64, 256, 1 << 62)


def _n_bucket(n_rows: int) -> int:
    return next(bucket for bucket in N_BUCKETS if n_rows <= bucket)
