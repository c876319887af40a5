"""How ``smoa bench`` times a callable and measures its peak memory, on CUDA and on the CPU.

Time — CUDA: ``triton.testing.do_bench`` (warm-up, L2 flush between calls, CUDA events), median and 20th/80th
percentiles. CPU: ``torch.utils.benchmark.Timer.blocked_autorange`` with every intra-op thread torch uses
(``Timer`` defaults to one), median and percentiles over its blocks.

Memory — CUDA: ``torch.cuda.max_memory_allocated`` after ``reset_peak_memory_stats``, minus what was allocated before
the call (kind ``cuda-max-allocated``). CPU: the peak of torch's CPU allocations during one call, from the allocation
records of ``torch.profiler(profile_memory=True)`` summed in time order, above the level at the start of the call
(kind ``cpu-alloc-peak``). Both count only tensors allocated by the call: W0, x and the factors are excluded.
"""

from __future__ import annotations

import contextlib
import os
import statistics
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

__all__ = ["Timing", "cpu_samples", "peak_memory", "time_callable", "timing_from_samples"]


@dataclass(frozen=True)
class Timing:
    median_ms: float
    p20_ms: float
    p80_ms: float
    samples: int | None  # timed samples behind the percentiles (None: do_bench does not say)


def _quantiles(times_ms: list[float]) -> tuple[float, float, float]:
    if len(times_ms) == 1:
        return times_ms[0], times_ms[0], times_ms[0]
    cuts = statistics.quantiles(times_ms, n=10, method="inclusive")  # deciles: cuts[1] = p20, cuts[7] = p80
    return statistics.median(times_ms), cuts[1], cuts[7]


def time_callable(fn: Callable[[], Any], device: torch.device, min_time: float, reps: int = 1) -> Timing:
    """Median and p20/p80 of ``fn()`` in ms: at least ``min_time`` seconds of timed calls and ``reps`` samples."""
    device = torch.device(device)
    if device.type == "cuda":
        import triton.testing

        fn()
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        rep_ms = max(1000.0 * min_time, reps * start.elapsed_time(end))
        median, p20, p80 = triton.testing.do_bench(fn, warmup=max(25, int(rep_ms / 4)), rep=int(rep_ms) + 1,
                                                   quantiles=[0.5, 0.2, 0.8])  # fmt: skip
        return Timing(median, p20, p80, None)
    times = []
    while len(times) < reps:
        times.extend(cpu_samples(fn, min_time))
    return timing_from_samples(times)


def cpu_samples(fn: Callable[[], Any], min_time: float, warmup: bool = True) -> list[float]:
    """Per-call times in ms of ``fn()`` on the CPU: a warm-up call, then ``Timer.blocked_autorange`` blocks for at
    least ``min_time`` seconds (with all of torch's intra-op threads; ``Timer`` alone would use one)."""
    from torch.utils import benchmark

    if warmup:
        fn()  # first-call allocations and lazy initialisation stay out of the numbers
    timer = benchmark.Timer(stmt="fn()", globals={"fn": fn}, num_threads=torch.get_num_threads())
    return [1000.0 * t for t in timer.blocked_autorange(min_run_time=min_time).times]


def timing_from_samples(times_ms: list[float]) -> Timing:
    median, p20, p80 = _quantiles(times_ms)
    return Timing(median, p20, p80, len(times_ms))


@contextlib.contextmanager
def _quiet_stderr_fd():
    """Silence file descriptor 2 (Kineto logs ``profiler_start``/``profiler_stop`` lines from C++ there)."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as devnull:
            os.dup2(devnull.fileno(), 2)
            yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def _cpu_allocation_peak(fn: Callable[[], Any]) -> int:
    from torch.profiler import ProfilerActivity, profile

    with _quiet_stderr_fd():
        prof = profile(activities=[ProfilerActivity.CPU], profile_memory=True)
        prof.start()
    try:
        result = fn()
        del result
    finally:
        with _quiet_stderr_fd():
            prof.stop()
    records = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    records.sort(key=lambda e: e.start_ns())
    level = peak = 0
    for record in records:
        if str(record.device_type()).endswith("CPU"):  # DeviceType.CPU
            level += record.nbytes()
            peak = max(peak, level)
    return peak


def peak_memory(fn: Callable[[], Any], device: torch.device) -> tuple[int | None, str]:
    """``(peak bytes allocated by one call of fn above the level before it, kind)``; ``(None, why)`` if unknown."""
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        result = fn()
        torch.cuda.synchronize()
        del result
        return torch.cuda.max_memory_allocated() - before, "cuda-max-allocated"
    if device.type == "cpu":
        try:
            return _cpu_allocation_peak(fn), "cpu-alloc-peak"
        except (AttributeError, RuntimeError) as error:  # profiler internals moved: say so instead of guessing
            return None, f"unavailable ({type(error).__name__})"
    return None, f"unavailable on {device.type}"
