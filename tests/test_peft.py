"""smoa.peft: the PEFT registration shim, SMoAConfig/SMoAModel/Linear against the reference, adapter files, the PEFT
API (disable/set/delete/merge/unload/LoRA export) and bad input. Toy models only; real models: tests/test_training.py.
"""

from __future__ import annotations

import copy
import os
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn as nn

os.environ.setdefault("HF_HUB_OFFLINE", "1")
peft = pytest.importorskip("peft", reason="smoa.peft needs the [peft] extra (peft, transformers)")
pytest.importorskip("transformers", reason="smoa.peft needs the [peft] extra (peft, transformers)")

from peft import PeftConfig, PeftModel, PeftType, get_peft_model  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402

import smoa.peft as smoa_peft  # noqa: E402
from smoa.layer import SMoALinear  # noqa: E402
from smoa.partition import compute_orders  # noqa: E402
from smoa.peft import SMoAConfig, SMoAModel, lora_export_error  # noqa: E402
from smoa.peft.layer import Linear as SMoAPeftLinear  # noqa: E402
from smoa_kernels.reference import dense_delta_weight, smoa_linear_reference  # noqa: E402
from tests.utils import seeded  # noqa: E402

ATOL = 1e-5  # fp32, toy sizes: merge/unmerge and blockwise-vs-dense rounding


class Toy(nn.Module):
    """Odd sizes on purpose: 13 and 10 are not divisible by num_blocks=2, so the blocks are uneven (SPEC §1.4)."""

    def __init__(self, d_in: int = 13, hidden: int = 10, d_out: int = 7) -> None:
        super().__init__()
        self.lin0 = nn.Linear(d_in, hidden)
        self.act = nn.Tanh()
        self.lin1 = nn.Linear(hidden, d_out)
        self.norm = nn.LayerNorm(d_out)

    def forward(self, x):
        return self.norm(self.lin1(self.act(self.lin0(x))))


def toy(seed: int = 0, **sizes) -> Toy:
    torch.manual_seed(seeded(seed))
    return Toy(**sizes)


def smoa_model(base=None, **config) -> PeftModel:
    config = {"r": 4, "num_blocks": 2, "target_modules": ["lin0", "lin1"], "init_weights": False, **config}
    return get_peft_model(toy() if base is None else base, SMoAConfig(**config))


@pytest.fixture
def x():
    return torch.randn(6, 13, generator=torch.Generator().manual_seed(seeded(1)))


def smoa_layers(model):
    return {name: module for name, module in model.named_modules() if isinstance(module, SMoAPeftLinear)}


def expected_layer_output(layer: SMoAPeftLinear, x: torch.Tensor, adapter: str = "default") -> torch.Tensor:
    base = layer.get_base_layer()
    return smoa_linear_reference(
        x, x, base.weight, base.bias, layer.smoa_A[adapter].weight, layer.smoa_B[adapter].weight,
        layer.smoa_row_order[adapter], layer.smoa_col_order[adapter], layer.num_blocks[adapter],
        layer.scaling[adapter],
    )  # fmt: skip


# ---- the registration shim ----------------------------------------------------------------------------------------
def test_peft_type_shim_is_a_real_enum_member():
    member = PeftType.SMOA
    assert isinstance(member, PeftType) and member == "SMOA" and member.value == "SMOA"
    assert PeftType("SMOA") is member and PeftType["SMOA"] is member and member in list(PeftType)
    assert copy.deepcopy(member) is member
    import pickle

    assert pickle.loads(pickle.dumps(member)) is member


def test_registration_fills_peft_mappings_with_the_prefix_rule():
    from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING, PEFT_TYPE_TO_PREFIX_MAPPING, PEFT_TYPE_TO_TUNER_MAPPING

    assert PEFT_TYPE_TO_CONFIG_MAPPING[PeftType.SMOA] is SMoAConfig
    assert PEFT_TYPE_TO_TUNER_MAPPING[PeftType.SMOA] is SMoAModel
    # transformers' load_adapter keys on this rule
    assert PEFT_TYPE_TO_PREFIX_MAPPING[PeftType.SMOA] == SMoAModel.prefix == PeftType.SMOA.value.lower() + "_"
    smoa_peft.register()  # idempotent


def test_peft_version_is_in_the_supported_range():
    from packaging.specifiers import SpecifierSet
    from packaging.version import Version

    assert Version(peft.__version__) in SpecifierSet(smoa_peft.SUPPORTED_PEFT), (
        f"peft {peft.__version__} is outside smoa.peft's supported range {smoa_peft.SUPPORTED_PEFT}: re-check the "
        "PeftType shim and this test file, then widen the pin in pyproject.toml"
    )


def test_config_defaults_and_validation():
    config = SMoAConfig()
    assert (config.r, config.num_blocks, config.lora_alpha, config.lora_dropout) == (8, 2, None, 0.0)
    assert config.peft_type == PeftType.SMOA and not config._orders_from_checkpoint
    with pytest.raises(ValueError, match=r"block_ranks=\[1, 1\] sums to 2 but r=6"):
        SMoAConfig(r=6, num_blocks=2, block_ranks=[1, 1])
    with pytest.raises(ValueError, match=r"rank_pattern\['lin0'\]=\[3\]: .* expected num_blocks=2"):
        SMoAConfig(r=4, rank_pattern={"lin0": [3]})
    with pytest.raises(ValueError, match="bias='lora_only'"):
        SMoAConfig(bias="lora_only")
    with pytest.raises(ValueError, match="init_weights='pissa'"):
        SMoAConfig(init_weights="pissa")
    with pytest.raises(ValueError, match="ordering='svd'"):
        SMoAConfig(ordering="svd")
    with pytest.raises(ValueError, match="svd_dtype='float16'"):
        SMoAConfig(svd_dtype="float16")
    with pytest.raises(TypeError, match="num_blocks must be an int"):
        SMoAConfig(num_blocks=2.0)


# ---- outputs --------------------------------------------------------------------------------------------------------
def test_layers_match_the_reference_and_smoalinear(x):
    model = smoa_model()
    for layer in smoa_layers(model).values():
        h = torch.randn(4, layer.in_features)
        torch.testing.assert_close(layer(h), expected_layer_output(layer, h), atol=ATOL, rtol=0)
        standalone = SMoALinear.from_linear(copy.deepcopy(layer.get_base_layer()), r=4, num_blocks=2)
        standalone.load_state_dict(
            {
                "weight": layer.get_base_layer().weight,
                "bias": layer.get_base_layer().bias,
                "row_order": layer.smoa_row_order["default"],
                "col_order": layer.smoa_col_order["default"],
                "smoa_A.weight": layer.smoa_A["default"].weight,
                "smoa_B.weight": layer.smoa_B["default"].weight,
            }
        )
        torch.testing.assert_close(layer(h), standalone(h), atol=0, rtol=0)
        # the PEFT layer computes the orders exactly as SMoALinear does (same SVD, same argsort)
        fresh = SMoALinear.from_linear(copy.deepcopy(layer.get_base_layer()), r=4, num_blocks=2)
        assert torch.equal(fresh.row_order, layer.smoa_row_order["default"])
        assert torch.equal(fresh.col_order, layer.smoa_col_order["default"])


def test_default_init_is_a_no_op_and_scale_follows_lora_alpha(x):
    base_out = toy()(x)
    model = smoa_model(init_weights=True)
    torch.testing.assert_close(model(x), base_out, atol=0, rtol=0)
    model = smoa_model(lora_alpha=2, alpha_pattern={"lin1": 8}, rank_pattern={"lin1": 2})
    layers = smoa_layers(model)
    assert layers["base_model.model.lin0"].scaling["default"] == 0.5
    assert layers["base_model.model.lin1"].r["default"] == 2 and layers["base_model.model.lin1"].scaling["default"] == 4


def test_dropout_acts_on_the_adapter_path_only():
    model = smoa_model(lora_dropout=0.5)
    layer = smoa_layers(model)["base_model.model.lin0"]
    h = torch.randn(4, 13)
    model.eval()
    torch.testing.assert_close(layer(h), expected_layer_output(layer, h), atol=ATOL, rtol=0)
    model.train()
    torch.manual_seed(seeded(5))
    out = layer(h)
    torch.manual_seed(seeded(5))
    h_adapter = nn.functional.dropout(h, 0.5, training=True)
    base = layer.get_base_layer()
    expected = smoa_linear_reference(
        h, h_adapter, base.weight, base.bias, layer.smoa_A["default"].weight, layer.smoa_B["default"].weight,
        layer.smoa_row_order["default"], layer.smoa_col_order["default"], 2, 1.0,
    )  # fmt: skip
    torch.testing.assert_close(out, expected, atol=ATOL, rtol=0)


def test_a_saved_config_reused_for_a_new_adapter_still_gets_its_orders(saved, x):
    """SMoAConfig read from a checkpoint skips the SVD at attach time (the orders come with the weights); used for a
    fresh adapter instead, the orders are computed at first use, with the config's ordering."""
    path, _ = saved
    config = PeftConfig.from_pretrained(path)
    assert config._orders_from_checkpoint
    config.ordering, config.seed = "random", 3
    model = get_peft_model(toy(), config)
    layer = smoa_layers(model)["base_model.model.lin0"]
    with pytest.warns(UserWarning, match="no orders were loaded; computing them from W0 now"):
        model(x)
    assert not layer._smoa_orders_pending
    expected_rows, _ = compute_orders(layer.get_base_layer().weight, "random", seed=3)
    assert torch.equal(layer.smoa_row_order["default"], expected_rows)


def test_print_trainable_parameters_counts_r_times_sizes_over_k(capsys):
    model = smoa_model()
    trainable, _ = model.get_nb_trainable_parameters()
    assert trainable == 4 * (13 + 10) // 2 + 4 * (10 + 7) // 2  # r (d_in + d_out) / K per layer (SPEC §2)
    model.print_trainable_parameters()
    assert f"trainable params: {trainable}" in capsys.readouterr().out
    assert {n for n, p in model.named_parameters() if p.requires_grad} == {
        f"base_model.model.{layer}.smoa_{f}.default.weight" for layer in ("lin0", "lin1") for f in "AB"
    }


# ---- adapter files --------------------------------------------------------------------------------------------------
@pytest.fixture
def saved(tmp_path, x):
    model = smoa_model()
    model.save_pretrained(tmp_path)
    return tmp_path, model(x).detach()


def test_save_pretrained_writes_smoa_config_and_orders(saved):
    import json

    path, _ = saved
    config = json.loads((path / "adapter_config.json").read_text())
    assert config["peft_type"] == "SMOA" and config["r"] == 4 and config["num_blocks"] == 2
    tensors = load_file(path / "adapter_model.safetensors")
    assert set(tensors) == {
        f"base_model.model.{layer}.smoa_{name}"
        for layer in ("lin0", "lin1")
        for name in ("A.weight", "B.weight", "row_order", "col_order", "partition_info")  # K, r, shape, W0 print
    }
    assert tensors["base_model.model.lin0.smoa_row_order"].dtype == torch.int8  # smallest dtype holding 0..12
    assert PeftConfig.from_pretrained(path).__class__ is SMoAConfig


def test_from_pretrained_reproduces_outputs_exactly_without_svd(saved, x, monkeypatch):
    path, expected = saved

    def no_svd(*args, **kwargs):
        raise AssertionError("loading an SMoA adapter must not recompute the SVD")

    base = toy()
    with monkeypatch.context() as patch:
        patch.setattr(torch.linalg, "svd", no_svd)
        loaded = PeftModel.from_pretrained(base, path)
        out = loaded(x)
    torch.testing.assert_close(out, expected, atol=0, rtol=0)
    assert all(not layer._smoa_orders_pending for layer in smoa_layers(loaded).values())
    # and into an existing PeftModel as a second adapter, also without an SVD
    with monkeypatch.context() as patch:
        patch.setattr(torch.linalg, "svd", no_svd)
        loaded.load_adapter(path, adapter_name="again")
        loaded.set_adapter("again")
        torch.testing.assert_close(loaded(x), expected, atol=0, rtol=0)


@pytest.mark.parametrize("options", [{"low_cpu_mem_usage": True}, {"is_trainable": True}], ids=lambda o: next(iter(o)))
def test_from_pretrained_options(saved, x, options):
    path, expected = saved
    loaded = PeftModel.from_pretrained(toy(), path, **options)
    torch.testing.assert_close(loaded(x), expected, atol=0, rtol=0)
    trainable = {n for n, p in loaded.named_parameters() if p.requires_grad}
    assert len(trainable) == (4 if options.get("is_trainable") else 0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("init_weights", [True, False], ids=["B_zero", "B_random"])
def test_low_cpu_mem_usage_loads_a_zero_b_adapter(tmp_path, x, init_weights, dtype):
    """low_cpu_mem_usage builds the adapter on the meta device before the saved tensors arrive: the B-is-zero shortcut
    must treat a meta B as unknown (it has no values to read), for an untrained adapter (B = 0) as for a trained one,
    and with PEFT's autocast of the adapter dtype."""
    model = smoa_model(toy().to(dtype), init_weights=init_weights)
    model.save_pretrained(tmp_path)
    expected = model(x.to(dtype)).detach()
    base = toy().to(dtype)
    reference = base(x.to(dtype)).detach()
    loaded = PeftModel.from_pretrained(base, tmp_path, low_cpu_mem_usage=True, autocast_adapter_dtype=True)
    assert not any(t.is_meta for t in loaded.state_dict().values())
    out = loaded(x.to(dtype))
    torch.testing.assert_close(out, expected, atol=0, rtol=0)
    if init_weights:  # B = 0: the adapter term vanishes by construction, so the output is the base's, bit for bit
        torch.testing.assert_close(out, reference, atol=0, rtol=0)


def test_one_block_identity_order_is_peft_hira():
    """SPEC §6: K = 1 with the identity order and s = 1 is HiRA; checked against PEFT's own HiRA."""
    from peft import HiraConfig

    x = torch.randn(4, 13)
    smoa = smoa_model(r=4, num_blocks=1, ordering="identity")
    hira = get_peft_model(toy(), HiraConfig(r=4, target_modules=["lin0", "lin1"]))
    with torch.no_grad():
        for name, layer in smoa_layers(smoa).items():
            hira_layer = hira.get_submodule(name)
            hira_layer.hira_A["default"].copy_(layer.smoa_A["default"].weight)
            hira_layer.hira_B["default"].copy_(layer.smoa_B["default"].weight)
    torch.testing.assert_close(smoa(x), hira(x), atol=ATOL, rtol=0)


def test_saved_orders_win_over_a_recomputed_svd(saved, x):
    """A scrambled SVD on the loading machine must not matter: the saved orders are used (SPEC §1.5)."""
    path, _expected = saved
    tensors = load_file(path / "adapter_model.safetensors")
    layer = smoa_layers(PeftModel.from_pretrained(toy(), path))["base_model.model.lin0"]
    assert torch.equal(layer.smoa_row_order["default"], tensors["base_model.model.lin0.smoa_row_order"])


# ---- the PEFT API ---------------------------------------------------------------------------------------------------
def test_disable_adapter_gives_the_base_output(x):
    base_out = toy()(x)
    model = smoa_model()
    adapted = model(x)
    with model.disable_adapter():
        torch.testing.assert_close(model(x), base_out, atol=0, rtol=0)
    torch.testing.assert_close(model(x), adapted, atol=0, rtol=0)


def test_two_adapters_set_delete_and_both_active(x):
    model = smoa_model()
    out_default = model(x)
    model.add_adapter("other", SMoAConfig(r=2, num_blocks=1, target_modules=["lin0"], init_weights=False))
    torch.testing.assert_close(model(x), out_default, atol=0, rtol=0)  # adding does not activate
    model.set_adapter("other")
    out_other = model(x)
    assert not torch.allclose(out_other, out_default)
    assert all(p.requires_grad == (".other." in n) for n, p in model.named_parameters() if "smoa_" in n)
    # both active: every layer adds each active adapter's s·x ΔWᵀ
    model.base_model.set_adapter(["default", "other"])
    lin0 = smoa_layers(model)["base_model.model.lin0"]
    h = torch.randn(3, 13)
    both = expected_layer_output(lin0, h, "default") + expected_layer_output(lin0, h, "other")
    both = both - nn.functional.linear(h, lin0.get_base_layer().weight, lin0.get_base_layer().bias)
    torch.testing.assert_close(lin0(h), both, atol=ATOL, rtol=0)
    model.set_adapter("other")
    model.delete_adapter("other")
    assert "other" not in model.peft_config and all(
        "other" not in layer.smoa_A for layer in smoa_layers(model).values()
    )
    model.set_adapter("default")
    torch.testing.assert_close(model(x), out_default, atol=0, rtol=0)


def test_get_delta_weight_is_s_times_the_dense_delta():
    model = smoa_model(lora_alpha=2)
    for layer in smoa_layers(model).values():
        W0 = layer.get_base_layer().weight
        expected = 0.5 * dense_delta_weight(
            W0, layer.smoa_A["default"].weight, layer.smoa_B["default"].weight,
            layer.smoa_row_order["default"], layer.smoa_col_order["default"], 2,
        )  # fmt: skip
        torch.testing.assert_close(layer.get_delta_weight("default"), expected, atol=0, rtol=0)


def test_merge_unmerge_restores_w0_and_keeps_outputs(x):
    model = smoa_model()
    adapted = model(x)
    weights = {n: m.get_base_layer().weight.detach().clone() for n, m in smoa_layers(model).items()}
    deltas = {n: m.get_delta_weight("default") for n, m in smoa_layers(model).items()}
    model.merge_adapter()
    assert all(m.merged for m in smoa_layers(model).values())
    torch.testing.assert_close(model(x), adapted, atol=ATOL, rtol=0)
    for name, layer in smoa_layers(model).items():  # ΔW stays anchored on the original W0 while merged
        torch.testing.assert_close(layer.get_delta_weight("default"), deltas[name], atol=ATOL, rtol=0)
        torch.testing.assert_close(layer.get_base_layer().weight, weights[name] + deltas[name], atol=ATOL, rtol=0)
    model.unmerge_adapter()
    for name, layer in smoa_layers(model).items():
        torch.testing.assert_close(layer.get_base_layer().weight, weights[name], atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(model(x), adapted, atol=ATOL, rtol=0)


def test_merging_two_adapters_anchors_both_on_the_original_w0(x):
    model = smoa_model()
    model.add_adapter("other", SMoAConfig(r=2, num_blocks=1, target_modules=["lin0", "lin1"], init_weights=False))
    model.base_model.set_adapter(["default", "other"])
    both = model(x)
    model.merge_adapter(["default"])
    model.merge_adapter(["other"])  # merged one after the other: still W0 + s1ΔW1 + s2ΔW2
    torch.testing.assert_close(model(x), both, atol=ATOL, rtol=0)
    model.unmerge_adapter()
    torch.testing.assert_close(model(x), both, atol=ATOL, rtol=0)


def test_unmerge_is_exact_where_the_modulation_vanishes():
    """Entries where 1 + s·P = 0 are zero after the merge: unmerge restores them from the kept originals (SPEC §5)."""
    model = smoa_model(target_modules=["lin0"], num_blocks=1, r=1)
    layer = smoa_layers(model)["base_model.model.lin0"]
    W0 = layer.get_base_layer().weight.detach().clone()
    with torch.no_grad():
        layer.smoa_A["default"].weight.fill_(1.0)
        layer.smoa_B["default"].weight.fill_(-1.0)  # P = -1 everywhere, s = 1: W0 ⊙ (1 + s·P) = 0
    layer.merge()
    assert torch.count_nonzero(layer.get_base_layer().weight) == 0
    layer.unmerge()
    assert torch.equal(layer.get_base_layer().weight, W0)


def test_safe_merge_refuses_nan_and_leaves_the_weight(x):
    model = smoa_model()
    layer = smoa_layers(model)["base_model.model.lin0"]
    W0 = layer.get_base_layer().weight.detach().clone()
    with torch.no_grad():
        layer.smoa_B["default"].weight[0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaNs detected"):
        layer.merge(safe_merge=True)
    assert torch.equal(layer.get_base_layer().weight, W0) and not layer.merged


def test_merge_and_unload_returns_plain_linears_and_unload_the_base(x):
    base_out = toy()(x)
    model = smoa_model()
    adapted = model(x)
    merged = copy.deepcopy(model).merge_and_unload()
    assert type(merged.lin0) is nn.Linear and type(merged.lin1) is nn.Linear
    assert not any("smoa" in name for name, _ in merged.named_parameters())
    torch.testing.assert_close(merged(x), adapted, atol=ATOL, rtol=0)
    unloaded = model.unload()
    assert type(unloaded.lin0) is nn.Linear
    torch.testing.assert_close(unloaded(x), base_out, atol=0, rtol=0)


def test_lora_export_is_exact_at_full_rank_and_states_its_error_below(x, tmp_path):
    from peft.tuners.lora.conversion import convert_to_lora, save_as_lora

    model = smoa_model()
    with pytest.raises(ValueError, match="larger than the weight shape"):
        convert_to_lora(model, rank=11)  # lin1 is 7×10: rank 11 does not exist
    _, full = convert_to_lora(model, rank=0.99999999)  # an energy threshold: each layer gets the rank it needs
    errors_full = lora_export_error(model, full)
    assert set(errors_full) == {"base_model.model.lin0", "base_model.model.lin1"}
    assert max(errors_full.values()) < 1e-3, errors_full
    errors_low = lora_export_error(model, convert_to_lora(model, rank=1)[1])
    assert all(0.01 < error < 1 for error in errors_low.values()), errors_low  # ΔW is not rank 1: a real loss
    # save_as_lora writes a plain LoRA adapter that loads without smoa and reproduces the outputs at full rank
    save_as_lora(tmp_path, model, rank=0.99999999)
    lora = PeftModel.from_pretrained(toy(), tmp_path)
    assert lora.peft_config["default"].peft_type == PeftType.LORA
    torch.testing.assert_close(lora(x), model(x), atol=1e-3, rtol=0)


def test_gpt2_conv1d_uses_fan_in_fan_out(x):
    from transformers import GPT2Config, GPT2Model

    torch.manual_seed(seeded(0))
    config = GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=50, n_positions=16)
    base = GPT2Model(config).eval()
    ids = torch.randint(0, 50, (2, 5))
    with pytest.warns(UserWarning, match="fan_in_fan_out=False but the target module is Conv1D"):
        model = get_peft_model(copy.deepcopy(base), SMoAConfig(r=4, target_modules=["c_attn"], init_weights=False))
    layer = smoa_layers(model)["base_model.model.h.0.attn.c_attn"]
    assert layer.fan_in_fan_out and (layer.in_features, layer.out_features) == (16, 48)
    h = torch.randn(3, 16)
    W0 = layer.get_base_layer().weight.T  # Conv1D stores (fan_in, fan_out)
    expected = smoa_linear_reference(
        h, h, W0, layer.get_base_layer().bias, layer.smoa_A["default"].weight, layer.smoa_B["default"].weight,
        layer.smoa_row_order["default"], layer.smoa_col_order["default"], 2, 1.0,
    )  # fmt: skip
    torch.testing.assert_close(layer(h), expected, atol=ATOL, rtol=0)
    adapted = model(ids).last_hidden_state
    merged = model.merge_and_unload()
    assert type(merged.h[0].attn.c_attn).__name__ == "Conv1D"
    torch.testing.assert_close(merged(ids).last_hidden_state, adapted, atol=1e-4, rtol=0)


# ---- bad input ------------------------------------------------------------------------------------------------------
def state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def assert_unchanged(model: nn.Module, before: dict[str, torch.Tensor]) -> None:
    after = model.state_dict()
    assert after.keys() == before.keys()
    assert all(torch.equal(after[k], before[k]) for k in before)


def test_unknown_target_names_raise_and_leave_the_model():
    base = toy()
    before = state(base)
    with pytest.raises(ValueError, match=r"Target modules .*not found in the base model"):
        get_peft_model(base, SMoAConfig(target_modules=["q_proj"]))
    assert_unchanged(base, before)


def test_non_linear_target_raises_and_rolls_back_every_layer():
    base = toy()
    before = state(base)
    # lin0 and lin1 are wrapped before `norm` (a LayerNorm) is reached: all of it must be undone
    with pytest.raises(TypeError, match=r"'norm' is a LayerNorm; SMoA supports torch.nn.Linear"):
        get_peft_model(base, SMoAConfig(r=2, target_modules=["lin0", "lin1", "norm"]))
    assert_unchanged(base, before)
    assert type(base.lin0) is nn.Linear and not hasattr(base, "peft_config")


def test_bad_shape_for_num_blocks_names_the_argument_and_rolls_back():
    base = toy(d_out=3)
    before = state(base)
    with pytest.raises(ValueError, match=r"num_blocks=4 exceeds min\(in_features, out_features\)=3"):
        get_peft_model(base, SMoAConfig(r=4, num_blocks=4, target_modules=["lin0", "lin1"]))
    assert_unchanged(base, before)


@pytest.mark.parametrize("flag", ["is_loaded_in_8bit", "is_loaded_in_4bit"])
def test_a_model_flagged_quantized_is_dispatched_layer_by_layer(flag):
    # bitsandbytes layers go to smoa.peft.bnb (tests/test_bnb.py); the float layers of such a model stay plain layers
    base = toy()
    setattr(base, flag, True)
    model = get_peft_model(base, SMoAConfig(target_modules=["lin0"]))
    assert type(model.base_model.model.lin0).__name__ == "Linear"


def test_second_adapter_with_bad_targets_keeps_the_first(x):
    model = smoa_model()
    out = model(x)
    with pytest.raises(TypeError, match=r"SMoA supports torch.nn.Linear"):
        model.add_adapter("bad", SMoAConfig(r=2, target_modules=["lin0", "norm"]))
    assert all(set(layer.smoa_A) == {"default"} for layer in smoa_layers(model).values())
    torch.testing.assert_close(model(x), out, atol=0, rtol=0)


def test_loading_into_the_wrong_base_fails_clearly_and_leaves_it(saved, x):
    path, _ = saved
    wrong = toy(d_in=13, hidden=12)  # lin0: 12×13 here, 10×13 in the checkpoint
    before = state(wrong)
    with pytest.raises(ValueError, match=r"(?s)does not fit this model.*smoa_B\.default\.weight: shape \(10, 2\)"):
        PeftModel.from_pretrained(wrong, path)
    assert type(wrong.lin0) is nn.Linear and type(wrong.lin1) is nn.Linear and not hasattr(wrong, "peft_config")
    assert_unchanged(wrong, before)
    # into an existing PeftModel: the new adapter is dropped, the existing one untouched
    model = smoa_model(base=toy(d_in=13, hidden=12))
    out = model(x)
    with pytest.raises(ValueError, match="does not fit this model"):
        model.load_adapter(path, adapter_name="wrong")
    assert "wrong" not in model.peft_config
    torch.testing.assert_close(model(x), out, atol=0, rtol=0)


def test_tampered_orders_are_rejected(saved, tmp_path):
    path, _ = saved
    tensors = load_file(path / "adapter_model.safetensors")
    tensors["base_model.model.lin0.smoa_row_order"] = torch.zeros(10, dtype=torch.int64)
    save_file(tensors, path / "adapter_model.safetensors")
    base = toy()
    before = state(base)
    with pytest.raises(ValueError, match=r"smoa_row_order.* is not a permutation of range"):
        PeftModel.from_pretrained(base, path)
    assert_unchanged(base, before)


def test_corrupted_safetensors_fails_clearly_and_leaves_existing_adapters(saved, x):
    path, _ = saved
    data = (path / "adapter_model.safetensors").read_bytes()
    (path / "adapter_model.safetensors").write_bytes(data[: len(data) // 2])  # a truncated download
    model = smoa_model()
    out = model(x)
    weights = state(model)
    with pytest.raises(ValueError, match=r"is not a readable safetensors file .*nothing was loaded"):
        model.load_adapter(path, adapter_name="broken")
    assert "broken" not in model.peft_config
    torch.testing.assert_close(model(x), out, atol=0, rtol=0)
    assert_unchanged(model, weights)
    base = toy()
    before = state(base)
    with pytest.raises(ValueError, match="is not a readable safetensors file"):
        PeftModel.from_pretrained(base, path)
    assert type(base.lin0) is nn.Linear
    assert_unchanged(base, before)


def test_smoa_adapter_never_loads_as_lora_without_smoa(saved):
    """In a fresh interpreter that has not imported smoa, "SMOA" is unknown: loading fails, it never becomes LoRA."""
    path, _ = saved
    code = textwrap.dedent(
        f"""
        import sys, torch
        from peft import PeftConfig, PeftModel
        for load in (lambda: PeftConfig.from_pretrained({str(path)!r}),
                     lambda: PeftModel.from_pretrained(torch.nn.Sequential(torch.nn.Linear(13, 10)), {str(path)!r})):
            try:
                load()
            except Exception as error:
                assert "SMOA" in repr(error), repr(error)
            else:
                sys.exit("loaded an SMoA adapter without smoa")
        from transformers import GPT2Config, GPT2Model
        gpt2 = GPT2Model(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=50, n_positions=16))
        try:
            gpt2.load_adapter({str(path)!r})  # transformers' PeftAdapterMixin
        except Exception as error:
            assert "SMOA" in repr(error), repr(error)
        else:
            sys.exit("transformers loaded an SMoA adapter without smoa")
        assert "smoa" not in sys.modules
        """
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]


def test_target_selection_options_follow_lora():
    from transformers import GPT2Config, GPT2Model

    torch.manual_seed(seeded(0))
    base = GPT2Model(GPT2Config(n_layer=2, n_embd=16, n_head=2, vocab_size=50, n_positions=16))

    def targets(**config) -> set[str]:
        model = get_peft_model(copy.deepcopy(base), SMoAConfig(r=2, fan_in_fan_out=True, **config))
        return {name.removeprefix("base_model.model.") for name in smoa_layers(model)}

    every = {f"h.{i}.{m}" for i in range(2) for m in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")}
    assert targets(target_modules="all-linear") == every
    assert targets(target_modules=r".*\.attn\.c_attn") == {"h.0.attn.c_attn", "h.1.attn.c_attn"}
    assert targets(target_modules="all-linear", exclude_modules=["c_proj"]) == {
        "h.0.attn.c_attn", "h.1.attn.c_attn", "h.0.mlp.c_fc", "h.1.mlp.c_fc"
    }  # fmt: skip
    assert targets(target_modules=["c_attn"], layers_to_transform=[1], layers_pattern="h") == {"h.1.attn.c_attn"}


def test_smoa_peft_imports_without_peft():
    """``import smoa.peft`` (which ``import smoa`` may run) must not fail where the [peft] extra is not installed."""
    code = textwrap.dedent(
        """
        import sys
        sys.modules["peft"] = None  # makes `import peft` raise ImportError
        import smoa.peft
        assert smoa.peft.PEFT_AVAILABLE is False and isinstance(smoa.peft.PEFT_IMPORT_ERROR, ImportError)
        """
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
