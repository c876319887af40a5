"""Nothing half-done: a load, merge or call that raises leaves parameters, buffers, ``requires_grad`` flags, the
module tree, the outputs and the files on disk exactly as before — several members of every class of failure, each
checked with one full snapshot (:func:`full_snapshot`), not only by its message. Also the non-finite-input contract
(where the adapter term is zero by construction the output is the base layer's, bit for bit) on every backend, the
load/merge messages (key, expected, found, what to do) and what a saved folder says to a reader without smoa.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn as nn

import smoa
from smoa import SMoALinear, apply_smoa
from smoa.model import merge_smoa

os.environ.setdefault("HF_HUB_OFFLINE", "1")
pytest.importorskip("peft")
pytest.importorskip("transformers")

from peft import LoHaConfig, LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file, save_file

from smoa.peft import SMoAConfig
from smoa.peft.config import REQUIRES_FIELD, SAVED_PEFT_TYPE
from smoa.peft.layer import Linear as SMoAPeftLinear

X = torch.randn(5, 12, generator=torch.Generator().manual_seed(7))
BACKENDS = ["reference", "torch", "triton"]


# ---- the snapshot: what "exactly as before" means ------------------------------------------------------------------
def bits(t: torch.Tensor) -> torch.Tensor:
    """A tensor's bit pattern (so NaN == the same NaN and -0.0 != 0.0)."""
    t = t.detach().contiguous().cpu()
    if not t.is_floating_point():
        return t
    return t.view({1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()])


def file_tree(folder: Path | None) -> dict[str, bytes]:
    if folder is None:
        return {}
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(Path(folder).rglob("*")) if p.is_file()}


def full_snapshot(model: nn.Module, forward=None, folder: Path | None = None) -> dict:
    """Named parameters and buffers (bit patterns, dtype, device, ``requires_grad``), the module tree as (qualified
    name, type) pairs, ``training`` flags, state-dict keys, the output of ``forward(model)`` and the files of
    ``folder`` (names and bytes)."""
    named = model.named_parameters(remove_duplicate=False)
    params = {n: (bits(p), p.dtype, p.device, p.requires_grad) for n, p in named}
    buffers = {n: (bits(b), b.dtype, b.device) for n, b in model.named_buffers(remove_duplicate=False)}
    out = None
    if forward is not None:
        with torch.no_grad():
            out = bits(forward(model))
    return {
        "params": params,
        "buffers": buffers,
        "tree": [(n, type(m)) for n, m in model.named_modules(remove_duplicate=False)],
        "training": [(n, m.training) for n, m in model.named_modules(remove_duplicate=False)],
        "keys": list(model.state_dict().keys()),
        "out": out,
        "forward": forward,
        "folder": folder,
        "files": file_tree(folder),
    }


def assert_as_before(model: nn.Module, snap: dict) -> None:
    now = full_snapshot(model, snap["forward"], snap["folder"])
    assert now["tree"] == snap["tree"]
    assert now["keys"] == snap["keys"]
    assert now["training"] == snap["training"]
    assert now["params"].keys() == snap["params"].keys()
    for name, (value, dtype, device, flag) in snap["params"].items():
        got = now["params"][name]
        assert (got[1], got[2], got[3]) == (dtype, device, flag), name
        assert torch.equal(got[0], value), name
    assert now["buffers"].keys() == snap["buffers"].keys()
    for name, (value, dtype, device) in snap["buffers"].items():
        got = now["buffers"][name]
        assert (got[1], got[2]) == (dtype, device) and torch.equal(got[0], value), name
    if snap["out"] is not None:
        assert torch.equal(now["out"], snap["out"])
    assert now["files"] == snap["files"]


def test_the_snapshot_sees_each_kind_of_change():
    """The helper itself: every kind of change it promises to see makes the assertion fail."""
    changes = [
        lambda m: m.lin0.weight.data.__setitem__((0, 0), float("nan")),
        lambda m: m.lin0.weight.requires_grad_(False),
        lambda m: setattr(m, "extra", nn.Identity()),
        lambda m: m.register_buffer("b", torch.zeros(1)),
        lambda m: m.lin1.train(not m.lin1.training),
        lambda m: m.lin0.to(torch.float64),  # (the forward would then fail: compared without it)
    ]
    for index, change in enumerate(changes):
        model = toy()
        snap = full_snapshot(model, run if index < len(changes) - 1 else None)
        change(model)
        with pytest.raises(AssertionError):
            assert_as_before(model, snap)


# ---- small models -----------------------------------------------------------------------------------------------
class Two(nn.Module):
    def __init__(self, d_in: int = 12, hidden: int = 10) -> None:
        super().__init__()
        self.lin0, self.act, self.lin1 = nn.Linear(d_in, hidden), nn.Tanh(), nn.Linear(hidden, d_in)

    def forward(self, x):
        return self.lin1(self.act(self.lin0(x)))


class Three(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin0, self.lin1, self.lin2 = nn.Linear(12, 10), nn.Linear(10, 11), nn.Linear(11, 12)

    def forward(self, x):
        return self.lin2(torch.tanh(self.lin1(torch.tanh(self.lin0(x)))))


def toy(seed: int = 0, **kwargs) -> Two:
    torch.manual_seed(seed)
    return Two(**kwargs)


def run(model):
    return model(X)


def smoa_config(**changes) -> SMoAConfig:
    defaults = {"r": 4, "num_blocks": 2, "target_modules": ["lin0", "lin1"], "init_weights": False}
    return SMoAConfig(**(defaults | changes))


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("folders")
    get_peft_model(toy(), smoa_config()).save_pretrained(root / "smoa")
    get_peft_model(toy(hidden=14), smoa_config()).save_pretrained(root / "smoa-h14")  # other shapes
    get_peft_model(toy(), LoraConfig(r=2, target_modules=["lin0", "lin1"], init_lora_weights=False)).save_pretrained(
        root / "lora"
    )
    get_peft_model(toy(), LoHaConfig(r=2, target_modules=["lin0", "lin1"], init_weights=False)).save_pretrained(
        root / "loha"
    )
    return root


def copy_of(folders: Path, name: str, tmp_path: Path) -> Path:
    target = tmp_path / name
    shutil.copytree(folders / name, target)
    return target


def edit_tensors(folder: Path, edit) -> None:
    tensors = load_file(folder / "adapter_model.safetensors")
    edit(tensors)
    save_file(tensors, folder / "adapter_model.safetensors")


def nan_in(key_end: str):
    def edit(tensors):
        key = next(k for k in tensors if k.endswith(key_end))
        tensors[key] = tensors[key].clone()
        tensors[key].view(-1)[-1] = float("nan")

    return edit


def repeated_index(key_end: str):
    def edit(tensors):
        key = next(k for k in tensors if k.endswith(key_end))
        order = tensors[key].clone()
        order[0] = order[1]
        tensors[key] = order

    return edit


# ---- 1. PeftModel.from_pretrained / load_adapter: a failed load changes nothing ----------------------------------
def _truncate(folder: Path) -> None:
    data = (folder / "adapter_model.safetensors").read_bytes()
    (folder / "adapter_model.safetensors").write_bytes(data[: len(data) // 2])


FROM_PRETRAINED = [
    # (id, folder, edit of the copied folder, config= argument, pattern)
    ("lora-folder+SMoAConfig", "lora", None, smoa_config, r"config=SMoAConfig\(\.\.\.\) but .* holds no SMoA tensors"),
    ("loha-folder+SMoAConfig", "loha", None, smoa_config, r"holds no SMoA tensors.*peft_type='LOHA'"),
    ("other-shapes+SMoAConfig", "smoa-h14", None, smoa_config, r"shape \(14, 2\) found in the checkpoint, \(10, 2\)"),
    ("other-shapes", "smoa-h14", None, None, r"shape \(14, 2\) found in the checkpoint, \(10, 2\) expected"),
    ("truncated+SMoAConfig", "smoa", _truncate, smoa_config, r"is not a readable safetensors file"),
    ("truncated", "smoa", _truncate, None, r"is not a readable safetensors file"),
    ("nan+SMoAConfig", "smoa", nan_in("lin1.smoa_B.weight"), smoa_config, r"lin1\.smoa_B\.weight in .* holds 1 NaN"),
    ("bad-orders+SMoAConfig", "smoa", repeated_index("lin1.smoa_row_order"), smoa_config, r"1 repeated"),
    ("other-partition+SMoAConfig", "smoa", None, lambda: smoa_config(r=2, num_blocks=1), r"num_blocks=2 in the"),
    ("smoa-folder+LoraConfig", "smoa", None, lambda: LoraConfig(r=4, target_modules=["lin0", "lin1"]),
     r"config=LoraConfig\(\.\.\.\) but .* holds an SMoA adapter"),
]  # fmt: skip


@pytest.mark.parametrize("name, edit, config, pattern", [c[1:] for c in FROM_PRETRAINED],
                         ids=[c[0] for c in FROM_PRETRAINED])  # fmt: skip
def test_failed_from_pretrained_leaves_the_model_and_files(folders, tmp_path, name, edit, config, pattern):
    folder = copy_of(folders, name, tmp_path)
    if edit is not None:
        edit(folder) if edit is _truncate else edit_tensors(folder, edit)
    model = toy()
    model.lin1.weight.requires_grad_(False)  # flags PEFT would change on the way
    model.lin0.bias.requires_grad_(False)
    snap = full_snapshot(model, run, folder)
    with pytest.raises(ValueError, match=pattern):
        kwargs = {} if config is None else {"config": config()}
        PeftModel.from_pretrained(model, folder, **kwargs)
    assert_as_before(model, snap)


@pytest.mark.parametrize("name, edit", [("smoa-h14", None), ("smoa", nan_in("lin0.smoa_A.weight")),
                                        ("smoa", repeated_index("lin0.smoa_col_order")), ("smoa", _truncate)],
                         ids=["other-shapes", "nan", "bad-orders", "truncated"])  # fmt: skip
def test_failed_peft_load_adapter_leaves_the_peft_model(folders, tmp_path, name, edit):
    folder = copy_of(folders, name, tmp_path)
    if edit is not None:
        edit(folder) if edit is _truncate else edit_tensors(folder, edit)
    model = PeftModel.from_pretrained(toy(), folders / "smoa", is_trainable=True)
    snap = full_snapshot(model, run, folder)
    active = model.active_adapter
    with pytest.raises(ValueError):
        model.load_adapter(folder, adapter_name="other")
    assert_as_before(model, snap)
    assert model.active_adapter == active and list(model.peft_config) == ["default"]


def test_a_good_load_after_a_failed_one_works(folders, tmp_path):
    model = toy()
    with pytest.raises(ValueError):
        PeftModel.from_pretrained(model, folders / "smoa-h14")
    loaded = PeftModel.from_pretrained(model, folders / "smoa")
    reference = PeftModel.from_pretrained(toy(), folders / "smoa")
    with torch.no_grad():
        assert torch.equal(loaded(X), reference(X))


# ---- 2. transformers' load_adapter ----------------------------------------------------------------------------------
def tiny_bert(hidden: int = 16, seed: int = 0):
    from transformers import BertConfig, BertModel

    torch.manual_seed(seed)
    config = BertConfig(hidden_size=hidden, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
                        vocab_size=50, max_position_embeddings=16)  # fmt: skip
    return BertModel(config).eval()


IDS = torch.arange(8).view(1, 8)


def bert_out(model):
    return model(input_ids=IDS).last_hidden_state


@pytest.fixture(scope="module")
def bert_folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("bert")
    config = SMoAConfig(r=4, num_blocks=2, target_modules=["query", "value"], init_weights=False)
    get_peft_model(tiny_bert(), config).save_pretrained(root / "smoa")
    get_peft_model(tiny_bert(hidden=24), config).save_pretrained(root / "smoa-h24")
    get_peft_model(tiny_bert(), LoraConfig(r=2, target_modules=["query", "key"], init_lora_weights=False)
                   ).save_pretrained(root / "lora")  # fmt: skip
    return root


QUERY = "query.smoa_row_order"
TRANSFORMERS_LOADS = [
    # (id, what the model already carries, source folder, edit, as adapter_state_dict)
    ("bad-orders-file", None, "smoa", repeated_index(QUERY), False),
    ("bad-orders-state-dict-over-lora", "lora", "smoa", repeated_index(QUERY), True),
    ("bad-orders-file-over-lora", "lora", "smoa", repeated_index(QUERY), False),
    ("bad-orders-state-dict-over-smoa", "smoa", "smoa", repeated_index("value.smoa_col_order"), True),
    ("nan-state-dict-over-smoa", "smoa", "smoa", nan_in("value.smoa_B.weight"), True),
    ("other-shapes-over-smoa", "smoa", "smoa-h24", None, False),
    ("other-shapes-over-lora", "lora", "smoa-h24", None, False),
]


@pytest.mark.parametrize("carries, name, edit, as_state_dict", [c[1:] for c in TRANSFORMERS_LOADS],
                         ids=[c[0] for c in TRANSFORMERS_LOADS])  # fmt: skip
def test_failed_transformers_load_adapter_leaves_the_model(bert_folders, tmp_path, carries, name, edit, as_state_dict):
    folder = copy_of(bert_folders, name, tmp_path)
    tensors = load_file(folder / "adapter_model.safetensors")
    if edit is not None:
        edit(tensors)
        save_file(tensors, folder / "adapter_model.safetensors")
    model = tiny_bert()
    if carries is not None:
        model.load_adapter(str(bert_folders / carries), adapter_name="first")
    snap = full_snapshot(model, bert_out, folder)
    with pytest.raises(ValueError):
        if as_state_dict:
            model.load_adapter(str(bert_folders / name), adapter_name="x", adapter_state_dict=tensors)
        else:
            model.load_adapter(str(folder), adapter_name="x")
    assert_as_before(model, snap)
    assert set(getattr(model, "peft_config", {})) == ({"first"} if carries else set())


# ---- 3. merges: every layer or none ---------------------------------------------------------------------------------
def _poison(layer, value: float) -> None:
    factor = layer.smoa_A["default"].weight if isinstance(layer.smoa_A, nn.ModuleDict) else layer.smoa_A.weight
    with torch.no_grad():
        factor[0, 0] = value


def peft_two():
    return get_peft_model(toy(), smoa_config())


def peft_three():
    torch.manual_seed(0)
    return get_peft_model(Three(), smoa_config(target_modules=["lin0", "lin1", "lin2"]))


MERGES = [
    # (id, model factory, layer to poison, value, the call)
    ("merge_and_unload-nan-2nd-of-2", peft_two, "lin1", float("nan"), lambda m: m.merge_and_unload(safe_merge=True)),
    ("merge_and_unload-inf-3rd-of-3", peft_three, "lin2", float("inf"), lambda m: m.merge_and_unload(safe_merge=True)),
    ("merge_and_unload-nan-2nd-of-3", peft_three, "lin1", float("nan"), lambda m: m.merge_and_unload(safe_merge=True)),
    ("merge_adapter-nan-2nd-of-2", peft_two, "lin1", float("nan"), lambda m: m.merge_adapter(safe_merge=True)),
    ("merge_adapter-inf-3rd-of-3", peft_three, "lin2", float("inf"), lambda m: m.merge_adapter(safe_merge=True)),
    ("base_model.merge_adapter", peft_three, "lin2", 3e38, lambda m: m.base_model.merge_adapter(safe_merge=True)),
]


@pytest.mark.parametrize("make, poisoned, value, call", [c[1:] for c in MERGES], ids=[c[0] for c in MERGES])
def test_a_refused_peft_merge_changes_nothing(make, poisoned, value, call):
    model = make()
    _poison(model.base_model.model.get_submodule(poisoned), value)
    snap = full_snapshot(model, lambda m: m(X))
    with pytest.raises(ValueError, match=rf"NaNs detected in the merged weights .*layer '{poisoned}'; no layer"):
        call(model)
    assert_as_before(model, snap)
    assert not any(m.merged for m in model.modules() if isinstance(m, SMoAPeftLinear))


def test_a_peft_merge_over_an_already_merged_adapter_is_given_back_exactly():
    model = get_peft_model(toy(), smoa_config())
    model.add_adapter("second", smoa_config())
    model.merge_adapter(["default"])  # every layer already holds "default"
    _poison(model.base_model.model.lin1, float("nan"))  # poisons "default" of lin1 (recorded at its merge)
    with torch.no_grad():
        model.base_model.model.lin1.smoa_B["second"].weight[0, 0] = float("inf")
    snap = full_snapshot(model, lambda m: m(X))
    with pytest.raises(ValueError, match="no layer was merged"):
        model.merge_adapter(["second"], safe_merge=True)
    assert_as_before(model, snap)
    assert all(m.merged_adapters == ["default"] for m in model.modules() if isinstance(m, SMoAPeftLinear))


def apply_two():
    model = toy()
    apply_smoa(model, ["lin0", "lin1"], r=4, num_blocks=2, init_weights=False)
    return model


def apply_three():
    torch.manual_seed(0)
    model = Three()
    apply_smoa(model, ["lin0", "lin1", "lin2"], r=4, num_blocks=2, init_weights=False)
    return model


@pytest.mark.parametrize("make, poisoned, value",
                         [(apply_two, "lin1", float("nan")), (apply_three, "lin2", -float("inf")),
                          (apply_three, "lin1", float("nan"))],
                         ids=["nan-2nd-of-2", "inf-3rd-of-3", "nan-2nd-of-3"])  # fmt: skip
def test_a_refused_merge_smoa_changes_nothing(make, poisoned, value):
    model = make()
    _poison(model.get_submodule(poisoned), value)
    snap = full_snapshot(model, run)
    with pytest.raises(ValueError, match=rf"merge_smoa: layer '{poisoned}': NaNs detected"):
        merge_smoa(model, safe_merge=True)
    assert_as_before(model, snap)


def test_merge_smoa_refused_by_a_layer_whose_w0_another_wrapper_merged_changes_nothing():
    model = apply_two()
    other = SMoALinear.from_linear(nn.Linear(10, 12), r=4, num_blocks=2, init_weights=False)
    other.weight, other.bias = model.lin1.weight, model.lin1.bias  # a second wrapper on lin1's weight
    other._merge_token = "other"
    other.merged = False
    other.merge()
    snap = full_snapshot(model)
    with pytest.raises(RuntimeError, match=r"merge_smoa: layer 'lin1'.*another SMoA layer's merged update"):
        merge_smoa(model)
    assert_as_before(model, snap)


# ---- 4. load_state_dict of a model holding SMoA layers: validated before torch copies anything ---------------------
def seq_model():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(12, 12), nn.Linear(12, 10))
    apply_smoa(model, ["1"], r=4, num_blocks=2, init_weights=False)
    return model, "1."


def nested_model():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(12, 12), nn.Sequential(nn.Linear(12, 12), nn.Sequential(nn.Linear(12, 10))))
    apply_smoa(model, ["1.1.0"], r=4, num_blocks=2, init_weights=False)
    return model, "1.1.0."


def peft_seq_model():
    torch.manual_seed(0)
    model = get_peft_model(nn.Sequential(nn.Linear(12, 12), nn.Linear(12, 10)), smoa_config(target_modules=["1"]))
    return model, "base_model.model.1."


def _bad_orders(sd, p):
    sd[p + ("row_order" if p + "row_order" in sd else "smoa_row_order.default")] = torch.zeros(10, dtype=torch.long)


def _wrong_shape(sd, p):
    key = p + ("smoa_B.weight" if p + "smoa_B.weight" in sd else "smoa_B.default.weight")
    sd[key] = torch.zeros(sd[key].shape[0] + 1, sd[key].shape[1])


def _nan_factor(sd, p):
    key = p + ("smoa_A.weight" if p + "smoa_A.weight" in sd else "smoa_A.default.weight")
    sd[key] = sd[key].clone()
    sd[key][0, 0] = float("nan")


@pytest.mark.parametrize("strict", [True, False])
@pytest.mark.parametrize("fault", [_bad_orders, _wrong_shape, _nan_factor], ids=["bad-orders", "wrong-shape", "nan"])
@pytest.mark.parametrize("make", [seq_model, nested_model, peft_seq_model], ids=["sequential", "nested", "peft"])
def test_a_refused_load_state_dict_copies_nothing(make, fault, strict):
    model, prefix = make()
    state = {
        key: value.clone() + 1 if value.is_floating_point() else value.clone()
        for key, value in model.state_dict().items()
    }  # fmt: skip  every plain tensor changes too
    fault(state, prefix)
    snap = full_snapshot(model, run)
    with pytest.raises(ValueError):
        model.load_state_dict(state, strict=strict)
    assert_as_before(model, snap)


def test_a_refused_load_into_a_submodule_copies_nothing():
    model, _ = nested_model()
    inner = model[1]  # a module inside the patched model: its own load is guarded too
    state = {key: value.clone() + 1 if value.is_floating_point() else value.clone()
             for key, value in inner.state_dict().items()}  # fmt: skip
    _bad_orders(state, "1.0.")
    snap = full_snapshot(model, run)
    with pytest.raises(ValueError, match=r"1\.0\.row_order is not a permutation"):
        inner.load_state_dict(state)
    assert_as_before(model, snap)


def test_a_load_into_a_merged_layer_after_a_plain_one_copies_nothing():
    model, _ = seq_model()
    model[1].merge()
    state = {key: value.clone() + 1 if value.is_floating_point() else value.clone()
             for key, value in model.state_dict().items()}  # fmt: skip
    snap = full_snapshot(model, run)
    with pytest.raises(RuntimeError, match="is merged"):
        model.load_state_dict(state)
    assert_as_before(model, snap)


def test_a_good_load_state_dict_still_loads():
    model, _ = nested_model()
    source, _ = nested_model()
    with torch.no_grad():
        for p in source.parameters():
            p.add_(0.25)
    model.load_state_dict(source.state_dict())
    with torch.no_grad():
        assert torch.equal(model(X), source(X))


# ---- 7. non-finite inputs: where the adapter term is zero by construction, the base layer's output ----------------
@pytest.fixture
def backend(request, monkeypatch):
    if request.param == "triton":
        pytest.importorskip("triton")
        if not torch.cuda.is_available():
            monkeypatch.setenv("TRITON_INTERPRET", "1")
    return request.param


def nonfinite_input(dtype, d_in: int = 12) -> torch.Tensor:
    x = torch.randn(4, d_in, generator=torch.Generator().manual_seed(3)).to(dtype)
    x[0, 0], x[1, 5], x[2, 2], x[2, 7] = float("inf"), float("nan"), float("inf"), -float("inf")
    return x


@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("grad", [False, True], ids=["no-grad", "grad"])
def test_smoa_at_init_gives_the_base_output_bit_for_bit(backend, dtype, grad):
    torch.manual_seed(0)
    linear = nn.Linear(12, 10).to(dtype)
    layer = SMoALinear.from_linear(copy.deepcopy(linear), r=4, num_blocks=2, backend=backend)
    x = nonfinite_input(dtype)
    with torch.set_grad_enabled(grad):
        out = layer(x)
    assert torch.isnan(linear(x)).sum() < out.numel()  # the input reaches the output as inf, not only NaN
    assert torch.equal(bits(out), bits(linear(x)))


@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
def test_block_with_zero_rank_gives_the_base_rows_bit_for_bit(backend):
    torch.manual_seed(0)
    linear = nn.Linear(12, 10)
    layer = SMoALinear.from_linear(copy.deepcopy(linear), r=4, num_blocks=2, block_ranks=[0, 4], init_weights=False,
                                   backend=backend)  # fmt: skip
    x = nonfinite_input(torch.float32)
    with torch.no_grad():
        out, base = layer(x), linear(x)
    rows = torch.tensor_split(layer.row_order, 2)[0]
    assert torch.equal(bits(out[:, rows]), bits(base[:, rows]))
    finite = torch.randn(3, 12)
    other = torch.tensor_split(layer.row_order, 2)[1]
    with torch.no_grad():
        assert not torch.equal(layer(finite)[:, other], linear(finite)[:, other])  # the live block does adapt


@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
def test_the_factors_still_train_from_zero_b(backend):
    """At B = 0 the value is the base output, the gradient the full forward's: equal to the one computed without the
    zero-B path, and one optimizer step makes the adapter live."""
    torch.manual_seed(0)
    fast = SMoALinear.from_linear(nn.Linear(12, 10), r=4, num_blocks=2, backend=backend)
    plain = copy.deepcopy(fast)
    plain._zero_B_stamp = None  # the same layer without the knowledge that B = 0
    x = torch.randn(6, 12)
    for layer in (fast, plain):
        (layer(x) ** 2).sum().backward()
    assert fast.smoa_B.weight.grad.abs().sum() > 0
    torch.testing.assert_close(fast.smoa_B.weight.grad, plain.smoa_B.weight.grad, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(fast.smoa_A.weight.grad, plain.smoa_A.weight.grad, atol=1e-6, rtol=1e-5)
    torch.optim.SGD(fast.parameters(), lr=0.1).step()
    with torch.no_grad():
        assert not torch.equal(fast(x), torch.nn.functional.linear(x, fast.weight, fast.bias))


@pytest.mark.parametrize(
    "write",
    [
        lambda B: B.add_(0.5),
        lambda B: B.data.copy_(torch.full_like(B, 0.5)),  # bypasses the version counter
        lambda B: setattr(B, "data", torch.full_like(B, 0.5)),
    ],
    ids=["in-place", "data-copy", "data-swap"],
)
def test_a_b_written_after_init_is_used(write):
    torch.manual_seed(0)
    layer = SMoALinear.from_linear(nn.Linear(12, 10), r=4, num_blocks=2)
    with torch.no_grad():
        write(layer.smoa_B.weight)
        out = layer(X)
    expected = torch.nn.functional.linear(X, layer.weight, layer.bias) + X @ layer.delta_weight().T
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)


def test_a_loaded_zero_b_and_a_cast_keep_the_contract():
    torch.manual_seed(0)
    trained = SMoALinear.from_linear(nn.Linear(12, 10), r=4, num_blocks=2, init_weights=False)
    layer = SMoALinear.from_linear(nn.Linear(12, 10), r=4, num_blocks=2, init_weights=False)
    state = trained.adapter_state_dict()
    state["smoa_B.weight"] = torch.zeros_like(state["smoa_B.weight"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # another W0
        layer.load_state_dict(state, strict=False)
    layer.double()
    x = nonfinite_input(torch.float64)
    with torch.no_grad():
        assert torch.equal(bits(layer(x)), bits(torch.nn.functional.linear(x, layer.weight, layer.bias)))


@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_peft_model_at_init_gives_the_base_output_bit_for_bit(backend, dtype):
    if backend == "triton" and dtype == torch.bfloat16 and not torch.cuda.is_available():
        pytest.skip("the Triton interpreter has no bf16")
    base = toy().to(dtype)
    reference = copy.deepcopy(base)
    with smoa.use_backend(backend):
        model = get_peft_model(base, smoa_config(init_weights=True))  # half factors are upcast to fp32 by PEFT
        x = nonfinite_input(dtype)
        for grad in (False, True):
            with torch.set_grad_enabled(grad):
                assert torch.equal(bits(model(x)), bits(reference(x)))


def test_peft_zero_rank_rows_and_a_second_zero_adapter():
    base = toy()
    reference = copy.deepcopy(base)
    model = get_peft_model(base, smoa_config(block_ranks=[0, 4], target_modules=["lin0"]))
    model.add_adapter("zero", smoa_config(target_modules=["lin0"], init_weights=True))
    model.base_model.set_adapter(["default", "zero"])
    layer = model.base_model.model.lin0
    x = nonfinite_input(torch.float32)
    with torch.no_grad():
        out, base_out = layer(x), reference.lin0(x)
    rows = torch.tensor_split(layer.smoa_row_order["default"], 2)[0]
    assert torch.equal(bits(out[:, rows]), bits(base_out[:, rows]))


# ---- 8. messages: the key, the expected and the found value, what to do -----------------------------------------
def test_load_errors_say_key_expected_found_and_what_to_do():
    layer = SMoALinear.from_linear(nn.Linear(12, 10), r=4, num_blocks=2, init_weights=False)
    state = layer.adapter_state_dict()
    bad = dict(state, row_order=torch.tensor([0, 0, 2, 3, 4, 5, 6, 7, 8, 9]))
    with pytest.raises(ValueError) as error:
        layer.load_state_dict(bad, strict=False)
    message = str(error.value)
    for part in ("row_order", "expected a permutation of range(10)", "found shape (10,)", "1 repeated",
                 "1 of range(10) missing", "re-save"):  # fmt: skip
        assert part in message, (part, message)

    info = state["partition_info"].clone()
    info[1] = 3  # K
    with pytest.raises(ValueError) as error:
        layer.load_state_dict(dict(state, partition_info=info), strict=False)
    message = str(error.value)
    for part in ("partition_info", "num_blocks=3 in the checkpoint but 2 here", "set num_blocks=3"):
        assert part in message, (part, message)

    nan = dict(state, **{"smoa_A.weight": state["smoa_A.weight"].clone().fill_(float("nan"))})
    count = state["smoa_A.weight"].numel()
    pattern = rf"smoa_A\.weight holds {count} NaN/Inf values \({count} NaN, 0 Inf\) of {count}; expected finite"
    with pytest.raises(ValueError, match=pattern):
        layer.load_state_dict(nan, strict=False)


def test_peft_load_errors_name_the_folder_key_and_both_shapes(folders):
    with pytest.raises(ValueError) as error:
        PeftModel.from_pretrained(toy(), folders / "smoa-h14")
    message = str(error.value)
    for part in (str(folders / "smoa-h14"), "lin0.smoa_B.default.weight", "(14, 2) found in the checkpoint",
                 "(10, 2) expected by this model", "load it with the config and base model"):  # fmt: skip
        assert part in message, (part, message)


def test_safe_merge_error_names_the_non_finite_factor():
    layer = SMoALinear.from_linear(nn.Linear(12, 10), r=4, num_blocks=2, init_weights=False)
    with torch.no_grad():
        layer.smoa_B.weight[0, 0] = float("inf")
    with pytest.raises(ValueError, match=r"expected 0; cause: non-finite factor entries: 1 in B"):
        layer.merge(safe_merge=True)


# ---- 9. a saved folder says which package reads it --------------------------------------------------------------
def test_saved_folder_says_smoa_is_needed_and_still_loads(tmp_path):
    model = get_peft_model(toy(), smoa_config())
    model.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["peft_type"] == "SMOA" and "pip install smoa" in config[REQUIRES_FIELD]
    assert "import smoa" in (tmp_path / "README.md").read_text()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the extra field is not an "unexpected keyword" for SMoAConfig
        loaded = PeftModel.from_pretrained(toy(), tmp_path)
    assert not hasattr(loaded.peft_config["default"], REQUIRES_FIELD)
    with torch.no_grad():
        assert torch.equal(loaded(X), model(X))


def test_a_folder_whose_peft_type_names_smoa_loads(tmp_path):
    model = get_peft_model(toy(), smoa_config())
    model.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    (tmp_path / "adapter_config.json").write_text(json.dumps(config | {"peft_type": SAVED_PEFT_TYPE}))
    loaded = PeftModel.from_pretrained(toy(), tmp_path)
    with torch.no_grad():
        assert torch.equal(loaded(X), model(X))


def test_peft_b_loaded_as_zero_and_b_loaded_non_zero():
    from peft import get_peft_model_state_dict, set_peft_model_state_dict

    base = toy()
    reference = copy.deepcopy(base)
    model = get_peft_model(base, smoa_config())  # random B: not known zero
    state = get_peft_model_state_dict(model)
    trained = {key: value.clone() for key, value in state.items()}
    for key in [k for k in state if ".smoa_B." in k]:
        state[key] = torch.zeros_like(state[key])
    set_peft_model_state_dict(model, state)
    x = nonfinite_input(torch.float32)
    with torch.no_grad():
        assert torch.equal(bits(model(x)), bits(reference(x)))
    set_peft_model_state_dict(model, trained)  # a live B again: the adapter is used
    with torch.no_grad():
        assert not torch.equal(model(X), reference(X))


@pytest.mark.parametrize("kind", ["4bit", "8bit"])
def test_a_refused_merge_over_a_quantized_base_changes_nothing(kind):
    """Over bitsandbytes bases a merge re-quantizes (it replaces the weight): the refused merge gives back the former
    quantized weights of the layers merged before the refusing one."""
    bnb = pytest.importorskip("bitsandbytes")
    torch.manual_seed(0)
    model = Two(d_in=64, hidden=64)
    for name in ("lin0", "lin1"):
        linear = model.get_submodule(name)
        if kind == "4bit":
            quantized = bnb.nn.Linear4bit(64, 64, compute_dtype=torch.float32, quant_type="nf4")
            quantized.weight = bnb.nn.Params4bit(linear.weight.detach().clone(), requires_grad=False, quant_type="nf4")
        else:
            quantized = bnb.nn.Linear8bitLt(64, 64, has_fp16_weights=False)
            quantized.weight = bnb.nn.Int8Params(linear.weight.detach().clone(), requires_grad=False,
                                                 has_fp16_weights=False)  # fmt: skip
        quantized.bias = nn.Parameter(linear.bias.detach().clone(), requires_grad=False)
        setattr(model, name, quantized.to("cpu"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peft_model = get_peft_model(model, smoa_config())
        x = torch.randn(3, 64)
        _poison(peft_model.base_model.model.lin1, float("nan"))
        snap = full_snapshot(peft_model, lambda m: m(x))
        with pytest.raises(ValueError, match=r"NaNs detected in the merged weights.*layer 'lin1'; no layer was merged"):
            peft_model.merge_and_unload(safe_merge=True)
    assert_as_before(peft_model, snap)
