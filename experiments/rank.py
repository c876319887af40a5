"""``experiments rank``: how high-rank are trained updates? Reads the singular values of ΔW per adapted layer
(written by ``experiments study`` as ``spectra.json``, or by ``experiments finetune --spectra`` into its metrics JSON)
and reports, per method,

- the numerical rank: the number of singular values σ_i > ``tol``·σ_max (``tol`` = 1e-3), and
- the entropy effective rank (Roy & Vetterli, 2007): ``exp(H(p))`` with ``p_i = σ_i / Σ_j σ_j``; it equals k for k
  equal non-zero singular values and degrades smoothly as the spectrum decays,

as a markdown table (means over layers, by layer shape) and a PNG (normalised spectra of one layer per method and the
effective ranks of all layers).
"""

from __future__ import annotations

import argparse
import json
import math
import re
import statistics
from collections.abc import Sequence
from pathlib import Path

import torch

__all__ = ["RANK_TOL", "effective_rank", "numerical_rank", "rank_report", "singular_values", "spectrum_ranks"]

RANK_TOL = 1e-3
KIND_ORDER = ("query", "key", "value", "attention.output.dense", "intermediate.dense", "output.dense", "pooler.dense")


def singular_values(matrix: torch.Tensor) -> list[float]:
    """Singular values of ``matrix`` (fp64 SVD), descending."""
    return torch.linalg.svdvals(matrix.detach().to(torch.float64)).tolist()


def numerical_rank(sigma: Sequence[float], tol: float = RANK_TOL) -> int:
    """Number of singular values above ``tol``·σ_max (0 for an all-zero spectrum)."""
    top = max(sigma, default=0.0)
    if top <= 0.0:
        return 0
    return sum(1 for value in sigma if value > tol * top)


def effective_rank(sigma: Sequence[float]) -> float:
    """Entropy effective rank ``exp(-Σ p_i log p_i)``, ``p_i = σ_i / Σ σ`` (0 for an all-zero spectrum)."""
    total = sum(sigma)
    if total <= 0.0:
        return 0.0
    entropy = -sum((v / total) * math.log(v / total) for v in sigma if v > 0.0)
    return math.exp(entropy)


def spectrum_ranks(sigma: Sequence[float], tol: float = RANK_TOL) -> dict:
    return {"numerical_rank": numerical_rank(sigma, tol), "effective_rank": effective_rank(sigma), "dim": len(sigma)}


def _layer_kind(name: str) -> str:
    """``bert.encoder.layer.3.attention.self.query`` → ``query``, ``...layer.3.attention.output.dense`` →
    ``attention.output.dense``, ``...layer.3.output.dense`` → ``output.dense``, ``bert.pooler.dense`` →
    ``pooler.dense``."""
    inner = re.sub(r"^.*\blayers?\.\d+\.", "", name)
    if inner == name:  # not inside a numbered block
        inner = ".".join(name.split(".")[-2:])
    return inner.removeprefix("attention.self.")


def load_spectra(paths: Sequence[str | Path]) -> dict[str, dict[str, list[float]]]:
    """``{method: {layer: σ}}`` from study ``spectra.json`` files and/or finetune metrics JSONs with ``"spectra"``."""
    spectra: dict[str, dict[str, list[float]]] = {}
    for path in paths:
        try:
            data = json.loads(Path(path).read_text())
        except json.JSONDecodeError as error:
            raise ValueError(f"{path} is not a JSON file ({error})") from None
        if not isinstance(data, dict):
            raise ValueError(f"{path}: neither a spectra.json nor a metrics JSON with 'spectra'")
        if "spectra" in data:  # a finetune metrics file: name it after its adapter
            config = data["config"]
            name = f"{config['adapter']} r={config['r']}"
            if config["adapter"] == "smoa":
                name += f" K={config['num_blocks']} {config['ordering']}"
            spectra[name] = data["spectra"]
        elif data and all(isinstance(v, dict) for v in data.values()):
            spectra.update(data)
        else:
            raise ValueError(f"{path}: neither a spectra.json nor a metrics JSON with 'spectra'")
    return spectra


def rank_report(spectra: dict[str, dict[str, list[float]]], tol: float = RANK_TOL) -> dict:
    """Per method: per-layer ranks and their means, overall and by layer kind (query, attention.output.dense, ...)."""
    report = {}
    for method, layers in spectra.items():
        per_layer = {name: spectrum_ranks(sigma, tol) for name, sigma in layers.items()}
        by_kind: dict[str, list[dict]] = {}
        for name, ranks in per_layer.items():
            by_kind.setdefault(_layer_kind(name), []).append(ranks)
        report[method] = {
            "layers": per_layer,
            "mean_numerical_rank": statistics.fmean(r["numerical_rank"] for r in per_layer.values()),
            "mean_effective_rank": statistics.fmean(r["effective_rank"] for r in per_layer.values()),
            "by_kind": {
                kind: {
                    "layers": len(items),
                    "dim": items[0]["dim"],
                    "mean_numerical_rank": statistics.fmean(r["numerical_rank"] for r in items),
                    "mean_effective_rank": statistics.fmean(r["effective_rank"] for r in items),
                }
                for kind, items in sorted(by_kind.items())
            },
        }
    return report


def markdown(report: dict, tol: float = RANK_TOL, labels: dict | None = None) -> str:
    labels = labels or {}
    found = {kind for entry in report.values() for kind in entry["by_kind"]}
    kinds = [k for k in KIND_ORDER if k in found] + sorted(found - set(KIND_ORDER))
    dims = {kind: entry["by_kind"][kind]["dim"] for entry in report.values() for kind in entry["by_kind"]}
    lines = [
        f"Rank of the trained ΔW per layer: numerical rank (σ_i > {tol:g}·σ_max) / entropy effective rank, mean over "
        "the layers of each kind (min(d_out, d_in) in the header).",
        "",
        "| method | all layers | " + " | ".join(f"{kind} ({dims[kind]})" for kind in kinds) + " |",
        "|---|---:|" + "---:|" * len(kinds),
    ]
    for method, entry in report.items():
        cells = [
            f"{entry['by_kind'][k]['mean_numerical_rank']:.1f} / {entry['by_kind'][k]['mean_effective_rank']:.1f}"
            if k in entry["by_kind"]
            else "–"
            for k in kinds
        ]
        lines.append(
            f"| {labels.get(method, method)} | {entry['mean_numerical_rank']:.1f} / "
            f"{entry['mean_effective_rank']:.1f} | " + " | ".join(cells) + " |"
        )
    return "\n".join(lines) + "\n"


def plot(spectra: dict, report: dict, path: Path, layer: str | None = None, labels: dict | None = None) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = labels or {}
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
    first = next(iter(spectra.values()))
    layer = layer or next((n for n in first if n.endswith("layer.3.attention.self.query")), next(iter(first)))
    for method, layers in spectra.items():
        sigma = layers.get(layer)
        if not sigma or max(sigma) <= 0:
            continue
        top = max(sigma)
        left.semilogy(range(1, len(sigma) + 1), [max(v / top, 1e-12) for v in sigma], label=labels.get(method, method))
    left.axhline(RANK_TOL, color="gray", ls="--", lw=1)
    left.set_xlabel("index i")
    left.set_ylabel("σ_i / σ_max")
    left.set_ylim(1e-8, 2)
    left.set_title(f"normalised singular values of ΔW: {layer}", fontsize=9)
    left.legend(fontsize=7)
    names = list(report)
    for i, method in enumerate(names):
        values = [r["effective_rank"] for r in report[method]["layers"].values()]
        right.scatter([i] * len(values), values, s=8, alpha=0.6)
        right.scatter([i], [report[method]["mean_effective_rank"]], marker="_", s=400, color="black")
    right.set_xticks(range(len(names)), [labels.get(n, n) for n in names], rotation=30, ha="right", fontsize=8)
    right.set_yscale("log")
    right.set_ylabel("entropy effective rank (per layer; bar: mean)")
    right.set_title("effective rank of ΔW over all adapted layers", fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _labels_near(path: Path) -> dict:
    study = path.parent / "study.json"
    if path.name == "spectra.json" and study.exists():
        return {m["key"]: m["label"] for m in json.loads(study.read_text()).get("methods", [])}
    return {}


def _run(args: argparse.Namespace) -> int:
    spectra = load_spectra(args.spectra)
    if not spectra:
        raise ValueError(f"no spectra in {args.spectra}")
    labels: dict = {}
    for path in args.spectra:
        labels.update(_labels_near(Path(path)))
    report = rank_report(spectra, args.tol)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    table = markdown(report, args.tol, labels)
    (out / "rank.md").write_text(table)
    (out / "rank.json").write_text(json.dumps({"tol": args.tol, "sources": args.spectra, "report": report}, indent=1))
    plot(spectra, report, out / "rank.png", args.layer, labels)
    print(table)
    print(f"written: {out / 'rank.md'}, {out / 'rank.json'}, {out / 'rank.png'}")
    return 0


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "rank",
        help="numerical and effective rank of trained ΔW (from study spectra or `finetune --spectra`)",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("spectra", nargs="+", help="spectra.json of a study, or metrics JSONs with 'spectra'")
    parser.add_argument(
        "--out",
        default="smoa-results/rank",
        help="output folder for rank.md, rank.json, rank.png (default: %(default)s)",
    )
    parser.add_argument("--tol", type=float, default=RANK_TOL, help="numerical rank threshold relative to σ_max")
    parser.add_argument("--layer", default=None, help="layer whose spectrum is plotted (default layer 3 query)")
    parser.set_defaults(func=_run)
