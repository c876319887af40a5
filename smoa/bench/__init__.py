"""``smoa bench``: what an SMoA layer costs per step against a frozen layer, PEFT LoRA/HiRA and the dense reference.

One file per concern: :mod:`~smoa.bench.flops` (the FLOP floors, KERNELS.md §1), :mod:`~smoa.bench.providers`
(the benchmarked layers on shared inputs, their oracles, the modes), :mod:`~smoa.bench.measure` (time and memory on
CUDA and CPU), :mod:`~smoa.bench.report` (CSV, table, plot), :mod:`~smoa.bench.run` (the loop and the command) and
:mod:`~smoa.bench.command` (the light ``smoa bench`` registration). Names below are imported on first use.

Python API::

    from smoa.bench import BenchConfig, run_bench
    result = run_bench(BenchConfig(device="cpu", shapes=((1024, 1024),), tokens=(2048,), ranks=(32,), blocks=(2,)))
    result.rows  # one dict per measurement, the CSV's columns
"""

import importlib

_EXPORTS = {
    **dict.fromkeys(("FLOOR_TABLE", "MODES", "flop_floor", "forward_backward_flops"), "smoa.bench.flops"),
    **dict.fromkeys(("Timing", "peak_memory", "time_callable"), "smoa.bench.measure"),
    **dict.fromkeys(
        ("PROVIDERS", "TOLERANCES", "BenchInputs", "Case", "Provider", "build_case", "register_provider"),
        "smoa.bench.providers",
    ),
    **dict.fromkeys(("CSV_COLUMNS", "format_table", "plot_results"), "smoa.bench.report"),
    **dict.fromkeys(
        ("CPU_DEFAULTS", "CUDA_DEFAULTS", "BenchConfig", "BenchResult", "register", "run_bench"), "smoa.bench.run"
    ),
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'smoa.bench' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
