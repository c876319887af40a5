"""The ``smoa bench`` run: configuration and defaults, the measurement loop, and the command-line front end."""

from __future__ import annotations

import argparse
import dataclasses
import gc
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

# the provider modules beside the core one register into smoa.bench.registry on import: 4-bit bases, PEFT HiRA,
# many adapters in one batch
from smoa.bench import providers_bnb, providers_hira, providers_multi  # noqa: F401
from smoa.bench.flops import FLOOR_TABLE, MODES, flop_floor
from smoa.bench.measure import cpu_samples, peak_memory, time_callable, timing_from_samples
from smoa.bench.progress import progress_bar
from smoa.bench.providers import (
    DTYPES,
    PROVIDERS,
    TOLERANCES,
    BenchInputs,
    Case,
    build_case,
    dtype_name,
    parse_dtype,
)
from smoa.bench.report import add_ratios, append_csv, environment, format_table, plot_results

__all__ = ["CPU_DEFAULTS", "CUDA_DEFAULTS", "BenchConfig", "BenchResult", "register", "run_bench"]

LLAMA_SHAPES = ((4096, 4096), (4096, 11008), (11008, 4096), (4096, 14336), (4096, 1024))
CUDA_DEFAULTS = {
    "dtype": "bfloat16", "shapes": LLAMA_SHAPES, "tokens": (512, 2048, 8192, 16384), "ranks": (8, 32),
    "blocks": (1, 2, 4), "min_time": 0.1, "reps": 1,
}  # fmt: skip
CPU_DEFAULTS = {
    "dtype": "float32", "shapes": ((1024, 1024),), "tokens": (2048,), "ranks": (32,), "blocks": (2,),
    "min_time": 0.5, "reps": 5,
}  # fmt: skip
QUICK = {
    "cuda": {"shapes": ((4096, 4096),), "tokens": (4096,), "ranks": (32,), "blocks": (2,), "min_time": 0.025},
    "cpu": {"shapes": ((512, 512),), "tokens": (512,), "ranks": (32,), "blocks": (2,), "min_time": 0.05},
}
QUICK_REPS = 3


@dataclass
class BenchConfig:
    """What to measure. ``None`` fields take the device's defaults (:data:`CPU_DEFAULTS`/:data:`CUDA_DEFAULTS`,
    cut down by ``quick``); :meth:`resolve` fills them and raises ``ValueError`` naming any bad value."""

    device: str = "auto"
    dtype: str | None = None
    shapes: tuple[tuple[int, int], ...] | None = None  # (d_in, d_out)
    tokens: tuple[int, ...] | None = None
    ranks: tuple[int, ...] | None = None
    blocks: tuple[int, ...] | None = None
    providers: tuple[str, ...] | None = None  # None: every registered provider
    modes: tuple[str, ...] | None = None  # None: all of MODES
    min_time: float | None = None  # seconds of timed calls per measurement
    reps: int | None = None  # at least this many timed samples
    quick: bool = False
    output_dir: str | Path = "smoa-results/bench"  # in the current directory; git-ignored in this repository
    csv: bool = True
    plot: bool = True
    check: bool = True
    seed: int = 0
    threads: int | None = None  # torch intra-op threads for the run (None: torch's default)

    def resolve(self) -> BenchConfig:
        device = self.device
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        try:
            device_type = torch.device(device).type
        except RuntimeError as error:
            raise ValueError(f"device={self.device!r} is not a device ({error}); use auto, cpu or cuda[:i]") from None
        if device_type not in ("cpu", "cuda"):
            raise ValueError(f"device={self.device!r}: smoa bench measures on cpu or cuda")
        if device_type == "cuda" and not torch.cuda.is_available():
            raise ValueError(f"device={self.device!r} was requested but torch.cuda.is_available() is False")
        defaults = dict(CUDA_DEFAULTS if device_type == "cuda" else CPU_DEFAULTS)
        if self.quick:
            defaults.update(QUICK[device_type], reps=QUICK_REPS)
        values = {name: getattr(self, name) for name in defaults}
        filled = {name: defaults[name] if value is None else value for name, value in values.items()}
        resolved = dataclasses.replace(
            self,
            device=device,
            providers=_runnable_providers(device) if self.providers is None else tuple(self.providers),
            modes=MODES if self.modes is None else tuple(self.modes),
            # a CPU smoke run times milliseconds: one thread, or a descheduled OpenMP partner decides the ratios
            threads=1 if self.threads is None and self.quick and device_type == "cpu" else self.threads,
            **{name: tuple(value) if isinstance(value, list) else value for name, value in filled.items()},
        )
        resolved._validate()
        return resolved

    def _validate(self) -> None:
        parse_dtype(self.dtype)
        for name in self.providers:
            if name not in PROVIDERS:
                raise ValueError(f"provider {name!r} is unknown; choose from {', '.join(PROVIDERS)}")
        for mode in self.modes:
            if mode not in MODES:
                raise ValueError(f"mode {mode!r} is unknown; choose from {', '.join(MODES)}")
        for name in ("tokens", "ranks", "blocks"):
            values = getattr(self, name)
            if not values or any(isinstance(v, bool) or not isinstance(v, int) or v < 1 for v in values):
                raise ValueError(f"{name}={values!r} must be a non-empty list of positive integers")
        if not self.shapes:
            raise ValueError("shapes must not be empty")
        for shape in self.shapes:
            if len(shape) != 2 or any(not isinstance(v, int) or v < 1 for v in shape):
                raise ValueError(f"shape {shape!r} must be (d_in, d_out) with positive integers")
            for num_blocks in self.blocks:
                if num_blocks > min(shape):
                    raise ValueError(f"blocks K={num_blocks} exceeds min(d_in, d_out)={min(shape)} of shape {shape}")
        for r in self.ranks:
            for num_blocks in self.blocks:
                if r % num_blocks:
                    raise ValueError(f"rank r={r} is not divisible by blocks K={num_blocks}: SMoA gives each block r/K")
        if not self.min_time > 0:
            raise ValueError(f"min_time={self.min_time!r} must be > 0 seconds")
        if self.threads is not None and not (isinstance(self.threads, int) and self.threads >= 1):
            raise ValueError(f"threads={self.threads!r} must be an integer >= 1")
        if not (isinstance(self.reps, int) and self.reps >= 1):
            raise ValueError(f"reps={self.reps!r} must be an integer >= 1")

    def command(self) -> str:
        """The explicit ``smoa bench`` command line that reproduces this (resolved) configuration."""
        parts = [
            "smoa bench", f"--device {self.device}", f"--dtype {self.dtype}",
            "--shapes " + ",".join(f"{a}x{b}" for a, b in self.shapes),
            "--tokens " + ",".join(map(str, self.tokens)), "--rank " + ",".join(map(str, self.ranks)),
            "--blocks " + ",".join(map(str, self.blocks)), "--providers " + ",".join(self.providers),
            "--modes " + ",".join(self.modes), f"--min-time {self.min_time:g}", f"--reps {self.reps}",
            f"--seed {self.seed}",
        ]  # fmt: skip
        if self.threads is not None:
            parts.append(f"--threads {self.threads}")
        if not self.check:
            parts.append("--no-check")
        return " ".join(parts)


def _runnable_providers(device: str) -> tuple[str, ...]:
    """The default provider list: every registered provider that can run on ``device`` (no rows of "skipped")."""
    return tuple(name for name, provider in PROVIDERS.items() if provider.unavailable(torch.device(device)) is None)


@dataclass
class BenchResult:
    rows: list[dict] = field(default_factory=list)
    csv_path: Path | None = None
    plots: list[Path] = field(default_factory=list)
    interrupted: bool = False

    @property
    def failed(self) -> list[dict]:
        """Rows whose status is an error or a correctness mismatch (OOM and skips are not failures)."""
        return [row for row in self.rows if row["status"].startswith(("error", "mismatch"))]


def _status_of(error: BaseException) -> str:
    if isinstance(error, torch.OutOfMemoryError):
        return "oom"
    message = str(error).strip().splitlines()[0] if str(error).strip() else ""
    return f"error: {type(error).__name__}: {message[:200]}"


def _free(device: torch.device, collect: bool = False) -> None:
    """Give cached CUDA memory back (tensors are freed by refcount already; a full ``gc.collect``, for reference
    cycles, costs ~0.5 s once peft/transformers are imported, so it runs once per shape only)."""
    if device.type == "cuda":
        if collect:
            gc.collect()
        torch.cuda.empty_cache()


@dataclass
class _Task:
    """One built case waiting to be timed in ``modes``; ``fields[mode]`` collects the row's measured columns."""

    case: Case
    modes: tuple[str, ...]
    fields: dict[str, dict]
    samples: dict[str, list[float]] = field(default_factory=dict)


def _checked_fields(case: Case, modes: tuple[str, ...], check: bool) -> dict[str, dict]:
    """The correctness guard: ``{mode: fields}`` with status ``ok``, or ``mismatch`` (then nothing is timed)."""
    error = saved = None
    status = "ok"
    if check:
        error, saved = case.check()
        tolerance = TOLERANCES[case.inputs.dtype]
        if not error <= tolerance:
            status = f"mismatch: max relative error {error:.3g} > tolerance {tolerance:g} against the oracle"
    saved_mib = None if saved is None else saved / 2**20
    return {m: {"status": status, "max_rel_err": error, "saved_mib": None if m == "inference" else saved_mib}
            for m in modes}  # fmt: skip


def _measure_tasks(tasks: list[_Task], config: BenchConfig, device: torch.device, passes: int, tick, log) -> None:
    """Time every (task, mode) in ``passes`` interleaved passes (CPU; one pass with ``do_bench`` on CUDA), then
    measure its peak memory once. A failure (e.g. out of memory) becomes that measurement's status."""
    for index in range(passes):
        for task in tasks:
            for mode in task.modes:
                fields = task.fields[mode]
                if fields["status"] != "ok":
                    tick(1)
                    continue
                fn = None
                try:
                    fn = task.case.step(mode)
                    if device.type == "cuda":
                        fields.update(dataclasses.asdict(time_callable(fn, device, config.min_time, config.reps)))
                    else:
                        samples = cpu_samples(fn, config.min_time / passes, warmup=index == 0)
                        task.samples.setdefault(mode, []).extend(samples)
                    if index == passes - 1:
                        memory, kind = peak_memory(fn, device)
                        fields.update(peak_mem_mib=None if memory is None else memory / 2**20, mem_kind=kind)
                except Exception as failure:  # one measurement's failure is its status; the run goes on
                    fields["status"] = _status_of(failure)
                    if not isinstance(failure, torch.OutOfMemoryError):
                        log(f"smoa bench: {task.case.label} {mode} failed: {_status_of(failure)}")
                finally:
                    fn = None
                tick(1)
    for task in tasks:
        for mode, samples in task.samples.items():
            if task.fields[mode]["status"] == "ok":
                task.fields[mode].update(dataclasses.asdict(timing_from_samples(samples)))


def run_bench(
    config: BenchConfig | None = None, *, stdout=None, progress: bool = True, log: Callable[[str], None] | None = None
) -> BenchResult:
    """Run the benchmark ``config`` describes; print the table to ``stdout`` (``None``: don't), append the CSV and
    draw the plots under ``config.output_dir``. Failures of one provider are recorded as its status and the run goes
    on; on Ctrl-C what was measured is still written (``result.interrupted``)."""
    config = (config or BenchConfig()).resolve()
    threads = torch.get_num_threads()
    if config.threads is not None:
        torch.set_num_threads(config.threads)
    try:
        return _run(config, stdout, progress, log or (lambda text: print(text, file=sys.stderr)))
    finally:
        torch.set_num_threads(threads)


def _run(config: BenchConfig, stdout, progress: bool, log: Callable[[str], None]) -> BenchResult:
    device, dtype = torch.device(config.device), parse_dtype(config.dtype)
    env = {**environment(device), "command": config.command()}
    timestamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    providers = [PROVIDERS[name] for name in config.providers]
    unavailable = {p.name: p.unavailable(device) for p in providers}
    for name, reason in unavailable.items():
        if reason:
            log(f"smoa bench: skipping {name}: {reason}")
    cores, load = os.cpu_count() or 1, env.get("load_avg_1m")
    if device.type == "cpu" and load is not None and load > cores:
        log(f"smoa bench: load average {load} on {cores} cores: other processes compete for the CPU and the timings "
            "will be noisy (--threads 1 is steadier; the load is recorded in the CSV)")  # fmt: skip

    def variants(provider):
        yield "", config.modes
        if provider.merged_variant and "inference" in config.modes:
            yield "merged", ("inference",)

    combos = [(r, k) for r in config.ranks for k in config.blocks]
    passes = config.reps if device.type == "cpu" else 1  # CPU: interleaved passes (see _measure_tasks)
    per_group = sum(len(modes) for p in providers for _, modes in variants(p))
    total = len(config.shapes) * len(config.tokens) * len(combos) * per_group * passes
    result = BenchResult()
    csv_path = Path(config.output_dir) / "smoa_bench.csv"
    cache: dict[tuple, dict] = {}  # (provider, what it depends on, shape, N, variant) → {mode: fields}, reused
    bar = progress_bar(total, progress, sys.stderr, log)

    def measurement_key(provider, d_in, d_out, tokens, r, num_blocks, variant) -> tuple:
        return (provider.name, *provider.measurement_key(r, num_blocks), d_in, d_out, tokens, variant)

    def flush_group(d_in: int, d_out: int, tokens: int, r: int, num_blocks: int) -> None:
        """Rows of one (shape, N, r, K) group from the cache: ratios, then appended to the results and the CSV."""
        rows = []
        for provider in providers:
            rank = provider.rank(r, num_blocks)
            for variant, modes in variants(provider):
                measured = cache.get(measurement_key(provider, d_in, d_out, tokens, r, num_blocks, variant), {})
                for mode in modes:
                    fields = dict(measured.get(mode, {"status": "interrupted"}))
                    if fields["status"] == "ok" and "median_ms" not in fields:
                        fields["status"] = "interrupted"
                    floor = flop_floor(provider.family, mode, tokens, d_in, d_out, rank, num_blocks,
                                       merged=variant == "merged")  # fmt: skip
                    rows.append({
                        "timestamp": timestamp, "provider": provider.name, "variant": variant, "mode": mode,
                        "d_in": d_in, "d_out": d_out, "dtype": dtype_name(dtype), "N": tokens, "r": r,
                        "K": num_blocks, "adapter_rank": rank,
                        "trainable_params": _trainable_params(provider.family, rank, r, d_in, d_out),
                        "floor_gflop": floor / 1e9, **env, **fields,
                    })  # fmt: skip
        add_ratios(rows)
        result.rows.extend(rows)
        if config.csv:
            result.csv_path = append_csv(result.csv_path or csv_path, rows)

    current = None
    try:
        for d_in, d_out in config.shapes:
            base, base_error, smoa_layers = None, None, {}
            try:
                base = BenchInputs.make_base(d_in, d_out, dtype, device, config.seed)
            except (torch.OutOfMemoryError, RuntimeError) as error:
                base_error = _status_of(error)
            for tokens in config.tokens:
                inputs, inputs_error = None, base_error
                if base is not None:
                    try:
                        inputs = BenchInputs.with_tokens(base, tokens, config.seed, smoa_layers)
                    except (torch.OutOfMemoryError, RuntimeError) as error:
                        inputs_error = _status_of(error)
                for r, num_blocks in combos:
                    current = (d_in, d_out, tokens, r, num_blocks)
                    bar.set_postfix_str(f"{d_in}x{d_out} N={tokens} r={r} K={num_blocks}")
                    tasks = _build_group(providers, variants, inputs, inputs_error, unavailable, current, cache,
                                         measurement_key, config.check, log)  # fmt: skip
                    bar.update(per_group * passes - sum(len(task.modes) for task in tasks) * passes)
                    _measure_tasks(tasks, config, device, passes, bar.update, log)
                    tasks = None
                    if inputs is not None:
                        inputs.oracle_cache.clear()
                    _free(device)
                    flush_group(*current)
                    current = None
                inputs = None
                _free(device)
            smoa_layers.clear()
            base = None
            _free(device, collect=True)
    except KeyboardInterrupt:
        result.interrupted = True
        if current is not None:
            flush_group(*current)
        log("smoa bench: interrupted — writing what was measured")
    finally:
        bar.close()
    return _finish(result, config, device, stdout)


def _build_group(providers, variants, inputs, inputs_error, unavailable, group, cache, measurement_key, check, log):
    """Build and check every case of one (shape, N, r, K) group not already in ``cache``; return those to time.
    Skips, build failures and mismatches go straight into ``cache`` as statuses."""
    d_in, d_out, tokens, r, num_blocks = group
    tasks: list[_Task] = []
    for provider in providers:
        built: Case | None = None
        for variant, modes in variants(provider):
            key = measurement_key(provider, d_in, d_out, tokens, r, num_blocks, variant)
            if key in cache:
                continue
            if unavailable[provider.name] or inputs_error:
                cache[key] = {m: {"status": inputs_error or f"skipped: {unavailable[provider.name]}"} for m in modes}
                continue
            try:
                built = built or build_case(provider, inputs, r, num_blocks)
                case = built if variant == "" else dataclasses.replace(built, variant=variant)
                cache[key] = _checked_fields(case, modes, check)
            except Exception as error:  # a provider that cannot be built or checked is reported, not fatal
                cache[key] = {m: {"status": _status_of(error)} for m in modes}
                if not isinstance(error, torch.OutOfMemoryError):
                    log(f"smoa bench: {provider.name} failed: {_status_of(error)}")
                continue
            if all(fields["status"] == "ok" for fields in cache[key].values()):
                tasks.append(_Task(case, modes, cache[key]))
    return tasks


def _finish(result: BenchResult, config: BenchConfig, device: torch.device, stdout) -> BenchResult:
    """Print the table, draw the plots, say where everything went."""
    if stdout is not None:
        print(format_table(result.rows), file=stdout)
    if config.plot and result.rows:
        suffix = f"_t{torch.get_num_threads()}" if device.type == "cpu" else ""
        result.plots = plot_results(result.rows, Path(config.output_dir), device.type, suffix)
    if stdout is not None:
        if result.csv_path:
            print(f"\nCSV (appended): {result.csv_path}", file=stdout)
        for path in result.plots:
            print(f"plot: {path}", file=stdout)
        print(f"command: {config.command()}", file=stdout)
    return result


def _trainable_params(family: str, rank: int, r: int, d_in: int, d_out: int) -> int:
    """Trainable tensors' size: LoRA/HiRA ρ(d_in + d_out); SMoA r/K (d_in + d_out) (SPEC §2); frozen 0."""
    return 0 if family == "frozen" else rank * (d_in + d_out)


# ---- command line ----------------------------------------------------------------------------------------------------
def _int_list(text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(part) for part in text.split(",") if part.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of integers") from None
    if not values or any(v < 1 for v in values):
        raise argparse.ArgumentTypeError(f"{text!r} must list positive integers")
    return values


def _shape_list(text: str) -> tuple[tuple[int, int], ...]:
    shapes = []
    for part in (p.strip().lower() for p in text.split(",") if p.strip()):
        pieces = part.replace("→", "x").replace("->", "x").split("x")
        try:
            d_in, d_out = (int(v) for v in pieces)
        except ValueError:
            raise argparse.ArgumentTypeError(f"shape {part!r} must be D_INxD_OUT, e.g. 4096x11008") from None
        if d_in < 1 or d_out < 1:
            raise argparse.ArgumentTypeError(f"shape {part!r} must have positive sizes")
        shapes.append((d_in, d_out))
    if not shapes:
        raise argparse.ArgumentTypeError(f"{text!r} lists no shapes")
    return tuple(shapes)


def _choices(choices: Callable[[], tuple[str, ...]], what: str) -> Callable[[str], tuple[str, ...]]:
    def parse(text: str) -> tuple[str, ...]:
        names = tuple(part.strip() for part in text.split(",") if part.strip())
        valid = choices()
        for name in names:
            if name not in valid:
                raise argparse.ArgumentTypeError(f"unknown {what} {name!r}; choose from {', '.join(valid)}")
        if not names:
            raise argparse.ArgumentTypeError(f"no {what} given; choose from {', '.join(valid)}")
        return names

    return parse


def _dtype(text: str) -> str:
    try:
        return dtype_name(parse_dtype(text))
    except ValueError:
        raise argparse.ArgumentTypeError(f"unknown dtype {text!r}; choose from {', '.join(DTYPES)}") from None


def _epilog() -> str:
    providers = "\n".join(f"  {p.name:<12} {p.help}" for p in PROVIDERS.values())
    floor_table = "\n".join(
        f"  {family:<18} {forward:<12} {backward:<12} {why}" for family, forward, backward, why in FLOOR_TABLE
    )
    return f"""\
providers:
{providers}
  SMoA providers also get an inference row with the adapter merged ([merged]: a plain linear layer).

modes:
  forward    y = layer(x) with autograd recording (x requires grad, as inside a network)
  backward   the gradients a training step needs (dX and the trainable factors) from a recorded forward
  full       forward + backward
  inference  no grad (torch.no_grad); SMoA unmerged and merged

before timing, every provider's output and gradients are checked against the dense formula of its method (SMoA:
the reference backend's oracle) on the benchmark inputs; a mismatch is reported as status and not timed.

columns (table and CSV): median and p20/p80 time in ms (CUDA: triton.testing.do_bench; CPU:
torch.utils.benchmark blocked_autorange with all torch threads); x frozen / x lora: median over the frozen / lora
median of the same mode; floor x: the provider's FLOP floor over frozen's (the best ratio it could reach);
TFLOP/s: floor FLOPs / median; peak MiB: peak allocated by one call above the level before it (CUDA:
max_memory_allocated; CPU: torch.profiler allocation records), saved MiB: tensors autograd keeps for backward
(x included when kept, weights and factors not); status: ok | skipped: why | oom | mismatch | error.

FLOP floors (the table below; N tokens, P = d_in*d_out, S = d_in+d_out, ρ = adapter rank,
P_K = diagonal-block area = P/K when K divides both):
{floor_table}
  full = forward + backward; inference = forward; merged = 2NP.

defaults:
  CUDA: bf16, shapes {",".join(f"{a}x{b}" for a, b in CUDA_DEFAULTS["shapes"])},
        N {",".join(map(str, CUDA_DEFAULTS["tokens"]))}, r {",".join(map(str, CUDA_DEFAULTS["ranks"]))}, \
K {",".join(map(str, CUDA_DEFAULTS["blocks"]))}, --min-time {CUDA_DEFAULTS["min_time"]:g}
  CPU:  fp32, shape 1024x1024, N 2048, r 32, K 2, --min-time {CPU_DEFAULTS["min_time"]:g}, --reps \
{CPU_DEFAULTS["reps"]} (about a minute on 2 cores)
  --quick: one small shape (CPU 512x512, N 512, one thread; CUDA 4096x4096, N 4096), short timings, 3 reps.

output (under --output-dir): smoa_bench.csv (appended, one row per measurement, with device name, thread count,
versions, timestamp and the reproducing command) and smoa_bench_<device>_<d_in>x<d_out>_<dtype>[_t<threads>].png
(time vs N, one panel per mode and (r, K), frozen in black, floors dotted). Out-of-memory and failing providers
are reported in the table and the run goes on; by default only the providers that can run on the device are run (a
CUDA-only provider named with --providers on CPU is reported as skipped with the reason). Exit status
1 if any provider failed its correctness check or raised an error.

examples:
  smoa bench                                   # this machine's defaults
  smoa bench --quick --no-plot
  smoa bench --threads 1                       # steadier on a CPU shared with other jobs
  smoa bench --device cuda --shapes 4096x4096 --tokens 2048,8192 -r 32 -K 2,4 --providers frozen,lora,smoa-triton
"""


def register(subparsers) -> argparse.ArgumentParser:
    """Add ``smoa bench`` to the ``smoa`` command."""
    parser = subparsers.add_parser(
        "bench",
        help="time SMoA against a frozen layer, PEFT LoRA/HiRA and the reference (forward, backward, full, memory)",
        description="Microbenchmark of one adapted linear layer: SMoA's backends against the frozen layer, PEFT "
        "LoRA (same rank and equal parameters), PEFT HiRA and the dense reference formulation; table on stdout, "
        "CSV appended and a PNG plot.",
        epilog=_epilog(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda or cuda:i")
    parser.add_argument("--dtype", type=_dtype, help=f"input/W0 dtype: {', '.join(DTYPES)} (default: per device)")
    parser.add_argument("--shapes", type=_shape_list, help="comma-separated D_INxD_OUT, e.g. 1024x1024,4096x1024")
    parser.add_argument("--tokens", "-N", type=_int_list, help="comma-separated N (rows of x), e.g. 512,2048")
    parser.add_argument("--rank", "-r", dest="ranks", type=_int_list, help="comma-separated total ranks r")
    parser.add_argument("--blocks", "-K", type=_int_list, help="comma-separated block counts K (r %% K == 0)")
    parser.add_argument(
        "--providers", type=_choices(lambda: tuple(PROVIDERS), "provider"),
        help=f"comma-separated subset of: {', '.join(PROVIDERS)} (default: all that can run on the device)",
    )  # fmt: skip
    parser.add_argument(
        "--modes", type=_choices(lambda: MODES, "mode"), help=f"comma-separated subset of: {', '.join(MODES)}"
    )
    parser.add_argument("--min-time", type=float, help="seconds of timed calls per measurement (default: per device)")
    parser.add_argument("--reps", type=int, help="at least this many timed samples per measurement")
    parser.add_argument("--quick", action="store_true", help="a small grid and short timings (a smoke run)")
    parser.add_argument(
        "--output-dir", default="smoa-results/bench", help="where the CSV and PNG go (default: %(default)s, in the cwd)"
    )
    parser.add_argument("--no-plot", dest="plot", action="store_false", help="do not draw the PNG")
    parser.add_argument("--no-csv", dest="csv", action="store_false", help="do not append to the CSV")
    parser.add_argument(
        "--no-check", dest="check", action="store_false", help="skip the correctness guard (not recommended)"
    )
    parser.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar on stderr")
    parser.add_argument("--seed", type=int, default=0, help="seed of W0, x, dY and the factors")
    parser.add_argument(
        "--threads", type=int, help="torch intra-op threads for the run (default: torch's, i.e. the core count)"
    )
    parser.set_defaults(func=_command)
    return parser


def _command(args: argparse.Namespace) -> int:
    config = BenchConfig(
        device=args.device, dtype=args.dtype, shapes=args.shapes, tokens=args.tokens, ranks=args.ranks,
        blocks=args.blocks, providers=args.providers, modes=args.modes, min_time=args.min_time, reps=args.reps,
        quick=args.quick, output_dir=args.output_dir, csv=args.csv, plot=args.plot, check=args.check, seed=args.seed,
        threads=args.threads,
    )  # fmt: skip
    try:
        config = config.resolve()
    except ValueError as error:
        print(f"smoa bench: error: {error}", file=sys.stderr)
        return 2
    result = run_bench(config, stdout=sys.stdout, progress=args.progress)
    if result.interrupted:
        return 130
    return 1 if result.failed else 0
