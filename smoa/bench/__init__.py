"""``smoa bench``: what an SMoA layer costs per step against a frozen layer, PEFT LoRA/HiRA and the dense reference.

One file per concern: :mod:`~smoa.bench.flops` (the FLOP floors, KERNELS.md §1), :mod:`~smoa.bench.registry`
(what a provider is; the table providers register into), :mod:`~smoa.bench.providers` (the benchmarked layers on
shared inputs, their oracles, the modes; the 4-bit and PEFT-HiRA providers in modules beside it),
:mod:`~smoa.bench.measure` (time and memory on CUDA and CPU), :mod:`~smoa.bench.report` (CSV, table, plot),
:mod:`~smoa.bench.run` (the loop and the command; it imports every provider module) and :mod:`~smoa.bench.command`
(the light ``smoa bench`` registration). Names below are imported on first use.

Python API::

    from smoa.bench import BenchConfig, run_bench
    result = run_bench(BenchConfig(device="cpu", shapes=((1024, 1024),), tokens=(2048,), ranks=(32,), blocks=(2,)))
    result.rows  # one dict per measurement, the CSV's columns
"""

import importlib

_EXPORTS = {
    **dict.fromkeys(("FLOOR_TABLE", "MODES", "flop_floor", "forward_backward_flops"), "smoa.bench.flops"),
    **dict.fromkeys(("Timing", "peak_memory", "time_callable"), "smoa.bench.measure"),
    **dict.fromkeys(("Provider", "register_provider"), "smoa.bench.registry"),
    **dict.fromkeys(("CSV_COLUMNS", "format_table", "plot_results"), "smoa.bench.report"),
    **dict.fromkeys(
        # smoa.bench.run imports every provider module: the table and build_case know every provider from here
        ("CPU_DEFAULTS", "CUDA_DEFAULTS", "PROVIDERS", "TOLERANCES", "BenchInputs", "Case", "build_case"),
        "smoa.bench.run",
    ),
    **dict.fromkeys(("BenchConfig", "BenchResult", "register", "run_bench"), "smoa.bench.run"),
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
