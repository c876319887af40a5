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
    # launches (README, "The fused small-N kernel"). It serves small N (the cost model sends training-sized N to the
    # blocked path): 32-row output tiles compile to mma.sync on sm_90 as on sm_80, so their main loop has no warpgroup
    # wait at all. The 64/128-row wgmma tiles were removed: Triton 3.9 drains all tensor-core work once per iteration
    # there (the rank product feeds the Hadamard), which the compile gate rejects. The first entry per dtype is the
    # interpreter's / deterministic mode's single config (the same BLOCK_N for 16-bit and fp32). Pruned for spills
    # (sm_80, Triton's own ptxas flags): 128×128×32/8 warps (7 KB with dropout), 32×16×64 at 4 stages (36–52 B in
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
    # H = s·G ⊙ W0, dB = H Aᵀ, dA partials = Bᵀ H per block (fp32; 2 stages spilled 4 B on sm_80 with a 16-bit anchor);
    # BLOCK_O is fixed by the launcher (it sizes the
    # dA partial buffer), only the column tile is a config.
    "factor_epilogue": [
        {"BLOCK_C": 64, "num_warps": 4, "num_stages": 3},
    ],
    # The order guard: one program clamps, inverts and checks both orders (O(d), once per call).
    "orders": [
        {"BLOCK": 1024, "num_warps": 4, "num_stages": 1},
    ],
}
_LAUNCH_OPTIONS = ("num_warps", "num_stages", "dtypes", "max_rank")
_DTYPE_NAMES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}
# Where each kernel's @triton.jit-able Python function lives (imported lazily: this module imports no kernel module,
# so the compile gate and the kernel modules can both import it).
KERNEL_SOURCES = {
    "gemm": ("smoa_kernels.triton.fused", "_smoa_gemm_kernel"),
    "delta_blocks": ("smoa_kernels.triton.blocked", "_smoa_delta_blocks_kernel"),
    "scatter": ("smoa_kernels.triton.blocked", "_smoa_scatter_kernel"),
    "factor_epilogue": ("smoa_kernels.triton.blocked", "_smoa_factor_epilogue_kernel"),
    "orders": ("smoa_kernels.triton.blocked", "_smoa_orders_kernel"),
}
_GEMM_CODE_FLAGS = ("HAS_BASE", "XA_IS_X", "HAS_BIAS", "MERGED", "W_T", "DOT_PRECISION")
_AUTOTUNE_KEYS = {
    # Every constexpr that changes the fused GEMM's code is in its key (dX on a square layer must not reuse the
    # forward's config); the activation dtype is added by triton.autotune itself.
    "gemm": ["d_out", "d_red", "n_bucket", "RANK_PAD", *_GEMM_CODE_FLAGS],
    "delta_blocks": ["d_out", "d_in", "rank", "num_blocks"],
    "scatter": ["n_bucket", "d"],
    "factor_epilogue": ["n_band_rows", "n_band_cols", "rank"],
    "orders": ["d_out", "d_in"],
}
# Every kernel overwrites its outputs (no accumulation into existing values, partial-buffer layouts fixed by the
# launcher), so autotuning trials need no reset or restore.
_RESET_TO_ZERO = {name: None for name in KERNEL_CONFIGS}
_RESTORE_VALUE = {name: None for name in KERNEL_CONFIGS}
# The argument whose dtype selects the configs (args[0] of every launch).
_ACTIVATION_ARG = {"gemm": "X", "delta_blocks": "W", "scatter": "ZT", "factor_epilogue": "G", "orders": "FLAG"}


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


@functools.cache
def _autotuned_kernel(name: str):
    configs = []
    for entry in KERNEL_CONFIGS[name]:
        config = triton.Config(config_meta(entry), num_warps=entry["num_warps"], num_stages=entry["num_stages"])
        config.smoa_dtypes, config.smoa_max_rank = config_dtypes(entry), entry.get("max_rank")
        configs.append(config)

    def prune(configs, named_args, **kwargs):
        dtype = _DTYPE_NAMES[named_args[_ACTIVATION_ARG[name]].dtype]
        rank = named_args.get("rank", 0)
        return [
            config
            for config in configs
            if dtype in config.smoa_dtypes and (config.smoa_max_rank is None or rank <= config.smoa_max_rank)
        ]

    return triton.autotune(
        configs=configs,
        key=_AUTOTUNE_KEYS[name],
        reset_to_zero=_RESET_TO_ZERO[name],
        restore_value=_RESTORE_VALUE[name],
        prune_configs_by={"early_config_prune": prune},
    )(jit_kernel(name, False))


def default_config(name: str, dtype: torch.dtype) -> dict:
    """The single config of kernel ``name`` for activations of ``dtype``: the first entry shipped for that dtype (and
    for every rank)."""
    return next(
        entry
        for entry in KERNEL_CONFIGS[name]
        if _DTYPE_NAMES[dtype] in config_dtypes(entry) and "max_rank" not in entry
    )


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


def launch(name: str, grid, *args, **constexprs) -> None:
    """THE launch point of every kernel: one config (interpreter, deterministic mode) or the autotuned list."""
    if _CAPTURE:
        _CAPTURE[-1].append(Launch(name, grid, args, constexprs))
        return
    if _interpreting() or torch.are_deterministic_algorithms_enabled():
        entry = default_config(name, args[0].dtype)  # args[0]: see _ACTIVATION_ARG
        options = {"num_warps": entry["num_warps"], "num_stages": entry["num_stages"]}
        jit_kernel(name, _interpreting())[grid](*args, **constexprs, **config_meta(entry), **options)
    else:
        _autotuned_kernel(name)[grid](*args, **constexprs)


# tl.dot precision for fp32 operands, keyed by torch.backends.cuda.matmul.allow_tf32. Without TF32 the kernels use
# three TF32 products ("tf32x3", error at the level of fp32 rounding) rather than "ieee": an FMA-based fp32 dot spills
# hundreds of bytes of registers in every shipped tile (tools/kernel_report.py). 16-bit operands ignore it.
FP32_DOT_PRECISION = {True: "tf32", False: "tf32x3"}


def _dot_precision(dtype: torch.dtype) -> str:
    if dtype != torch.float32 or (_interpreting() and not _CAPTURE):
        return "ieee"  # the interpreter computes exact fp32 whatever the flag (captured launches: as on a GPU)
    return FP32_DOT_PRECISION[bool(torch.backends.cuda.matmul.allow_tf32)]


def _rank_pad(rank: int) -> int:
    return max(MIN_DOT, triton.next_power_of_2(max(rank, 1)))


def _n_bucket(n_rows: int) -> int:
    return triton.next_power_of_2(max(n_rows, 1))
