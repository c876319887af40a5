"""``smoa bench``: what an SMoA layer costs per step against a frozen layer, PEFT LoRA/HiRA and the dense reference.

One file per concern: :mod:`~smoa.bench.flops` (the FLOP floors, KERNELS.md §1), :mod:`~smoa.bench.providers`
(the benchmarked layers on shared inputs, their oracles, the modes), :mod:`~smoa.bench.measure` (time and memory on
CUDA and CPU), :mod:`~smoa.bench.report` (CSV, table, plot) and :mod:`~smoa.bench.run` (the loop and the command).

Python API::

    from smoa.bench import BenchConfig, run_bench
    result = run_bench(BenchConfig(device="cpu", shapes=((1024, 1024),), tokens=(2048,), ranks=(32,), blocks=(2,)))
    result.rows  # one dict per measurement, the CSV's columns
"""

from smoa.bench.flops import FLOOR_TABLE, MODES, flop_floor, forward_backward_flops
from smoa.bench.measure import Timing, peak_memory, time_callable
from smoa.bench.providers import PROVIDERS, TOLERANCES, BenchInputs, Case, Provider, build_case, register_provider
from smoa.bench.report import CSV_COLUMNS, format_table, plot_results
from smoa.bench.run import CPU_DEFAULTS, CUDA_DEFAULTS, BenchConfig, BenchResult, register, run_bench

__all__ = [
    "CPU_DEFAULTS",
    "CSV_COLUMNS",
    "CUDA_DEFAULTS",
    "FLOOR_TABLE",
    "MODES",
    "PROVIDERS",
    "TOLERANCES",
    "BenchConfig",
    "BenchInputs",
    "BenchResult",
    "Case",
    "Provider",
    "Timing",
    "build_case",
    "flop_floor",
    "format_table",
    "forward_backward_flops",
    "peak_memory",
    "plot_results",
    "register",
    "register_provider",
    "run_bench",
    "time_callable",
]
