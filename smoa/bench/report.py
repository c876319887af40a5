"""What ``smoa bench`` writes: the CSV rows (one per measurement), the stdout table and the PNG plot.

Every row says how it was produced (device name, thread count, torch/triton/peft/smoa versions, the command line,
a UTC timestamp). Ratios and throughput are derived here, from the measured medians and :mod:`smoa.bench.flops`.
"""

from __future__ import annotations

import csv
import math
import os
import platform
import sys
from collections.abc import Iterable
from pathlib import Path

import torch

from smoa.bench.flops import flop_floor

__all__ = ["CSV_COLUMNS", "add_ratios", "append_csv", "environment", "format_table", "plot_results"]

CSV_COLUMNS = (
    "timestamp",  # UTC, ISO 8601, one per run
    "provider",
    "variant",  # "" or "merged" (inference with the adapter merged into W0)
    "mode",  # forward | backward | full | inference
    "d_in",
    "d_out",
    "dtype",
    "N",  # tokens (rows of x)
    "r",  # total SMoA rank budget of the group
    "K",  # SMoA blocks of the group
    "adapter_rank",  # the provider's own rank ρ (lora: r, lora-eq/hira: r/K, SMoA: r/K per block, frozen: 0)
    "trainable_params",
    "status",  # ok | skipped: why | oom | mismatch: ... | error: ...
    "median_ms",
    "p20_ms",
    "p80_ms",
    "samples",  # timed samples behind the percentiles (empty for do_bench)
    "peak_mem_mib",  # peak memory allocated by one call, above the level before it
    "mem_kind",  # cuda-max-allocated | cpu-alloc-peak (torch.profiler allocation records)
    "saved_mib",  # activations autograd keeps for backward (x included when kept; weights excluded), training modes
    "tflops",  # floor FLOPs / median time: useful work per second
    "floor_gflop",  # the provider's FLOP floor for this mode (KERNELS.md §1, smoa.bench.flops)
    "floor_x_frozen",  # floor / frozen floor: the best ratio this method can reach
    "x_frozen",  # median / frozen median (same mode, shape, N, dtype)
    "x_lora",  # median / lora median (same mode, r; inference: the unmerged lora row)
    "max_rel_err",  # the correctness guard: max relative error of y and gradients against the oracle
    "device",
    "device_name",
    "threads",
    "load_avg_1m",  # the machine's 1-minute load average when the run started (other processes competing)
    "torch",
    "triton",
    "peft",
    "smoa",
    "command",
)


def _version(module: str) -> str:
    try:
        return __import__(module).__version__
    except ImportError:
        return "not installed"


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as handle:
            for line in handle:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def environment(device: torch.device) -> dict[str, object]:
    """The columns every row of a run shares: device, versions, threads, command."""
    device = torch.device(device)
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    else:
        name = f"{cpu_model()} ({os.cpu_count()} logical cores)"
    return {
        "device": str(device),
        "device_name": name,
        "threads": torch.get_num_threads(),
        "load_avg_1m": round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None,
        "torch": torch.__version__,
        "triton": _version("triton"),
        "peft": _version("peft"),
        "smoa": _version("smoa"),
        "command": " ".join(["smoa", *sys.argv[1:]]) if Path(sys.argv[0]).name == "smoa" else "(python API)",
    }


def _group_key(row: dict) -> tuple:
    return (row["d_in"], row["d_out"], row["dtype"], row["N"], row["r"], row["K"])


def add_ratios(rows: list[dict]) -> None:
    """Fill ``tflops``, ``floor_x_frozen``, ``x_frozen`` and ``x_lora`` (in place) from the rows of one run."""
    medians = {}
    floors = {}
    for row in rows:
        floors[(*_group_key(row), row["provider"], row["variant"], row["mode"])] = row["floor_gflop"]
        if row["status"] == "ok":
            medians[(*_group_key(row), row["provider"], row["variant"], row["mode"])] = row["median_ms"]
    for row in rows:
        group, mode = _group_key(row), row["mode"]
        frozen_floor = floors.get((*group, "frozen", "", mode))
        if frozen_floor is None:
            frozen_floor = flop_floor("frozen", mode, row["N"], row["d_in"], row["d_out"], 0, 1) / 1e9
        row["floor_x_frozen"] = row["floor_gflop"] / frozen_floor
        if row["status"] != "ok":
            continue
        row["tflops"] = row["floor_gflop"] / row["median_ms"]  # GFLOP / ms = TFLOP/s
        frozen = medians.get((*group, "frozen", "", mode))
        lora = medians.get((*group, "lora", "", mode))
        row["x_frozen"] = row["median_ms"] / frozen if frozen else None
        row["x_lora"] = row["median_ms"] / lora if lora else None


def _csv_value(value) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.6g}"
    return str(value)


def append_csv(path: Path, rows: Iterable[dict]) -> Path:
    """Append rows to ``path`` (header written when the file is new). A file with other columns is left alone and
    the rows go to a sibling file instead; the path actually written is returned."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    header = ",".join(CSV_COLUMNS)
    if path.exists() and path.stat().st_size > 0:
        with open(path) as handle:
            existing = handle.readline().strip()
        if existing != header:
            path = path.with_name(f"{path.stem}.v2{path.suffix}")
            return append_csv(path, rows)
    new = not path.exists() or path.stat().st_size == 0
    with open(path, "a", newline="") as handle:
        writer = csv.writer(handle)
        if new:
            writer.writerow(CSV_COLUMNS)
        for row in rows:
            writer.writerow([_csv_value(row.get(column)) for column in CSV_COLUMNS])
    return path


def _fmt(value, spec: str, missing: str = "-") -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return missing
    return format(value, spec)


def _label(row: dict) -> str:
    return f"{row['provider']} [merged]" if row["variant"] == "merged" else row["provider"]


def format_table(rows: list[dict]) -> str:
    """The readable stdout table: one block per (shape, dtype, N, r, K), rows by mode then provider."""
    headers = ("provider", "mode", "median ms", "p20-p80 ms", "x frozen", "floor x", "x lora", "TFLOP/s",
               "peak MiB", "saved MiB", "status")  # fmt: skip
    lines: list[str] = []
    notes: dict[str, str] = {}
    groups: dict[tuple, list[dict]] = {}
    for row in rows:
        groups.setdefault(_group_key(row), []).append(row)
    for (d_in, d_out, dtype, tokens, r, num_blocks), group in groups.items():
        kind = next((row["mem_kind"] for row in group if row.get("mem_kind")), "")
        first = group[0]
        lines.append(
            f"\n{d_in}->{d_out} (d_in->d_out)  {dtype}  N={tokens}  r={r}  K={num_blocks}  "
            f"on {first.get('device_name')}, threads={first.get('threads')}, load avg {first.get('load_avg_1m')}\n"
            f"[peak MiB: {kind or 'n/a'}; saved MiB: kept for backward, x included, weights not]"
        )
        table = []
        for row in group:
            status = row["status"]
            if status.startswith(("skipped", "error", "mismatch")):
                notes[f"{_label(row)}: {status.split(':', 1)[0]}"] = status
                status = status.split(":", 1)[0]
            table.append((
                _label(row), row["mode"], _fmt(row.get("median_ms"), ".3f"),
                f"{_fmt(row.get('p20_ms'), '.3f')}-{_fmt(row.get('p80_ms'), '.3f')}" if row.get("p20_ms") else "-",
                _fmt(row.get("x_frozen"), ".2f"), _fmt(row.get("floor_x_frozen"), ".2f"),
                _fmt(row.get("x_lora"), ".2f"), _fmt(row.get("tflops"), ".3f"),
                _fmt(row.get("peak_mem_mib"), ".1f"), _fmt(row.get("saved_mib"), ".1f"),
                status,
            ))  # fmt: skip
        widths = [max(len(h), *(len(t[i]) for t in table)) for i, h in enumerate(headers)]
        lines.append("  ".join(h.ljust(w) if i < 2 else h.rjust(w) for i, (h, w) in enumerate(zip(headers, widths))))
        lines.append("  ".join("-" * w for w in widths))
        for cells in table:
            lines.append("  ".join(c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths))))
    if notes:
        lines.append("\nnotes:")
        lines.extend(f"  {text}" for text in dict.fromkeys(notes.values()))
    return "\n".join(lines).lstrip("\n")


def plot_results(rows: list[dict], output_dir: Path, device_type: str, suffix: str = "") -> list[Path]:
    """One PNG per (shape, dtype): a row of panels per (r, K), one panel per mode.

    Several N: median time vs N per provider (log-log), ``frozen`` the thick black line, each provider's floor its
    dotted line. One N: horizontal bars per provider, the ``frozen`` time a dashed black line, each floor a black
    tick. A floor is drawn as the time the provider would take at the frozen layer's measured FLOP rate
    (frozen median × floor / frozen floor), so the gap between a bar (or line) and its floor is implementation cost.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    written = []
    figures: dict[tuple, list[dict]] = {}
    for row in rows:
        figures.setdefault((row["d_in"], row["d_out"], row["dtype"]), []).append(row)
    for (d_in, d_out, dtype), fig_rows in figures.items():
        configs = list(dict.fromkeys((row["r"], row["K"]) for row in fig_rows))
        modes = list(dict.fromkeys(row["mode"] for row in fig_rows))
        labels = list(dict.fromkeys(_label(row) for row in fig_rows))
        colors = {label: plt.cm.tab10(i % 10) for i, label in enumerate(label for label in labels if label != "frozen")}
        colors["frozen"] = "black"
        bars = len({row["N"] for row in fig_rows}) == 1
        figure, axes = plt.subplots(
            len(configs), len(modes), figsize=(4.4 * len(modes), (3.0 if bars else 3.4) * len(configs)), squeeze=False
        )
        device_name = fig_rows[0].get("device_name", device_type)
        title = f"smoa bench — {d_in}→{d_out}, {dtype}, {device_name}, threads={fig_rows[0].get('threads', '?')}"
        if bars:
            title += f", N={fig_rows[0]['N']}"
        figure.suptitle(title, fontsize=10)
        for i, (r, num_blocks) in enumerate(configs):
            for j, mode in enumerate(modes):
                ax = axes[i][j]
                panel = [row for row in fig_rows if (row["r"], row["K"], row["mode"]) == (r, num_blocks, mode)]
                ok = [row for row in panel if row["status"] == "ok"]
                frozen = {row["N"]: row["median_ms"] for row in ok if row["provider"] == "frozen"}
                if bars:
                    _bar_panel(ax, ok, frozen, colors)
                else:
                    _line_panel(ax, ok, frozen, labels, colors)
                ax.set_title(f"{mode}  (r={r}, K={num_blocks})", fontsize=9)
                ax.tick_params(labelsize=7)
        handles = [plt.Line2D([], [], linestyle=":", color="gray"), plt.Line2D([], [], color="black", linewidth=2.5)]
        names = ["floor: frozen time × floor / frozen floor", "frozen"]
        if bars:
            handles = [plt.Line2D([], [], marker="|", linestyle="", color="black", markersize=12),
                       plt.Line2D([], [], linestyle="--", color="black")]  # fmt: skip
        else:
            for label in labels:
                if label != "frozen":
                    handles.append(plt.Line2D([], [], color=colors[label], marker="o"))
                    names.append(label)
        figure.legend(handles, names, loc="lower center", ncol=min(5, len(names)), fontsize=8, frameon=False)
        figure.tight_layout(rect=(0, 0.05 + 0.025 * (len(names) // 5), 1, 0.94))
        path = output_dir / f"smoa_bench_{device_type}_{d_in}x{d_out}_{dtype}{suffix}.png"
        figure.savefig(path, dpi=110)
        plt.close(figure)
        written.append(path)
    return written


def _bar_panel(ax, ok: list[dict], frozen: dict, colors: dict) -> None:
    ok = [row for row in ok if row["provider"] != "frozen"]
    positions = range(len(ok))
    ax.barh(list(positions), [row["median_ms"] for row in ok], color=[colors[_label(row)] for row in ok], alpha=0.85)
    for y, row in zip(positions, ok):
        low, high = row.get("p20_ms"), row.get("p80_ms")
        if low is not None and high is not None:
            ax.plot([low, high], [y, y], color="dimgray", linewidth=1)
        if row["N"] in frozen:
            ax.plot(frozen[row["N"]] * row["floor_x_frozen"], y, marker="|", color="black", markersize=14)
    for value in frozen.values():
        ax.axvline(value, color="black", linestyle="--", linewidth=1.2)
    ax.set_yticks(list(positions), [_label(row) for row in ok], fontsize=7)
    ax.invert_yaxis()
    ax.set_xlabel("median time (ms), p20–p80 whisker", fontsize=8)
    ax.grid(True, axis="x", alpha=0.3)


def _line_panel(ax, ok: list[dict], frozen: dict, labels: list[str], colors: dict) -> None:
    for label in labels:
        points = sorted((row["N"], row) for row in ok if _label(row) == label)
        if not points:
            continue
        is_frozen = label == "frozen"
        ax.plot([n for n, _ in points], [row["median_ms"] for _, row in points], marker="o", color=colors[label],
                linewidth=2.5 if is_frozen else 1.4, zorder=3 if is_frozen else 2)  # fmt: skip
        floor = [(n, frozen[n] * row["floor_x_frozen"]) for n, row in points if n in frozen]
        if floor and not is_frozen:
            ax.plot(*zip(*floor), linestyle=":", color=colors[label], linewidth=1.2)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("N (tokens)", fontsize=8)
    ax.set_ylabel("median time (ms)", fontsize=8)
    ax.grid(True, which="both", alpha=0.3)
