"""Uneven block ranks (the authors' r % K != 0 split and explicit ``block_ranks``), the ``init_weights`` variants, the
``bias`` option and the order dtype of saved files — for ``SMoALinear`` and the PEFT tuner.

Uneven ranks are stored zero-padded to r_max in the LoRA-shaped factors; the checks here build ΔW independently, block
by block from SPEC §2 with the true r_k×|C_k| / |R_k|×r_k factors, and show that the padding gets exactly zero gradient
and stays exactly zero under AdamW with weight decay on every backend (triton through the interpreter on CPU).
"""

import os

import pytest
import torch
import torch.nn.functional as F

import smoa
from smoa.factors import padding_masks, resolve_block_ranks
from tests.utils import seeded

BACKENDS = ["reference", "torch", "triton"]


@pytest.fixture
def backend(request, monkeypatch):
    if request.param == "triton":
        pytest.importorskip("triton")
        if not torch.cuda.is_available():
            monkeypatch.setenv("TRITON_INTERPRET", "1")
    return request.param


def _spec_delta(layer: smoa.SMoALinear) -> torch.Tensor:
    """ΔW from SPEC §2 with the per-block factors (true shapes r_k), independent of the padded layout."""
    W0 = layer.weight.detach().double()
    delta = torch.zeros_like(W0)
    rows = torch.tensor_split(layer.row_order, layer.num_blocks)
    cols = torch.tensor_split(layer.col_order, layer.num_blocks)
    for (A_k, B_k), R_k, C_k, r_k in zip(layer.block_factors(), rows, cols, layer.block_ranks):
        assert A_k.shape == (r_k, C_k.numel()) and B_k.shape == (R_k.numel(), r_k)
        delta[R_k[:, None], C_k[None, :]] = (B_k.double() @ A_k.double()) * W0[R_k[:, None], C_k[None, :]]
    return delta


def test_authors_split_and_explicit_ranks():
    assert resolve_block_ranks(5, 3) == (2, 2, 1)  # the remainder goes to the first blocks
    assert resolve_block_ranks(8, 2) == (4, 4)
    assert resolve_block_ranks(1, 2) == (1, 0)  # r < K: a block of rank 0 contributes nothing (SPEC §6)
    assert resolve_block_ranks(4, 2, [3, 1]) == (3, 1)


@pytest.mark.parametrize(
    "d_in, d_out, r, K, block_ranks",
    [
        (13, 10, 5, 3, None),  # r % K = 2 and neither size divisible by K
        (9, 16, 3, 2, [3, 0]),  # explicit ranks with an empty block, d_out > d_in
        (8, 8, 1, 1, None),  # K = 1: HiRA with one rank
    ],
)
@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
def test_forward_equals_the_blockwise_spec(d_in, d_out, r, K, block_ranks, backend):
    torch.manual_seed(seeded(0))
    layer = smoa.SMoALinear(d_in, d_out, r=r, num_blocks=K, alpha=2.0, init_weights=False, block_ranks=block_ranks)
    x = torch.randn(3, d_in)
    expected = x.double() @ (layer.weight.double() + (2.0 / r) * _spec_delta(layer)).T + layer.bias.double()
    with smoa.use_backend(backend):
        torch.testing.assert_close(layer(x).double(), expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(layer.delta_weight().double(), (2.0 / r) * _spec_delta(layer), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
def test_zero_padding_gets_zero_gradient_and_stays_zero_under_adamw(backend):
    torch.manual_seed(seeded(1))
    layer = smoa.SMoALinear(11, 7, r=5, num_blocks=3, init_weights=False)  # ranks (2, 2, 1): r_max = 2
    mask_A, mask_B = padding_masks(layer.block_ranks, layer.row_order, layer.col_order)
    assert int(mask_A.sum()) == 1 * 3 and int(mask_B.sum()) == 1 * 2  # block 3: |C_3| = 3, |R_3| = 2 slots padded
    start = [p.detach().clone() for p in (layer.smoa_A.weight, layer.smoa_B.weight)]
    optimizer = torch.optim.AdamW([layer.smoa_A.weight, layer.smoa_B.weight], lr=0.05, weight_decay=0.1)
    with smoa.use_backend(backend):
        for _ in range(4):
            x = torch.randn(5, 11)
            loss = layer(x).square().sum()
            optimizer.zero_grad()
            loss.backward()
            assert torch.all(layer.smoa_A.weight.grad[mask_A] == 0) and torch.all(layer.smoa_B.weight.grad[mask_B] == 0)
            assert layer.smoa_A.weight.grad[~mask_A].abs().sum() > 0
            optimizer.step()
    assert torch.all(layer.smoa_A.weight[mask_A] == 0) and torch.all(layer.smoa_B.weight[mask_B] == 0)
    assert not torch.equal(layer.smoa_A.weight[~mask_A], start[0][~mask_A])  # the real slots did train
    assert not torch.equal(layer.smoa_B.weight[~mask_B], start[1][~mask_B])


def test_block_factors_round_trip_and_refusals():
    torch.manual_seed(seeded(2))
    layer = smoa.SMoALinear(10, 9, r=5, num_blocks=2, init_weights=False)  # ranks (3, 2)
    blocks = layer.block_factors()
    assert [A.shape[0] for A, _ in blocks] == [3, 2]
    other = smoa.SMoALinear(10, 9, r=5, num_blocks=2)
    # the orders travel with factors (orders alone would re-partition the current factors: refused)
    other.load_state_dict({k: v for k, v in layer.state_dict().items() if "order" in k or "smoa_" in k}, strict=False)
    other.load_block_factors(blocks)
    x = torch.randn(4, 10)
    other.weight.data.copy_(layer.weight)
    other.bias.data.copy_(layer.bias)
    torch.testing.assert_close(other(x), layer(x))
    with pytest.raises(ValueError, match=r"blocks\[1\] has shapes"):
        other.load_block_factors([blocks[0], (blocks[1][0][:1], blocks[1][1][:, :1])])
    state = layer.state_dict()
    mask_A, _ = padding_masks(layer.block_ranks, layer.row_order, layer.col_order)
    state["smoa_A.weight"] = state["smoa_A.weight"].masked_fill(mask_A, 1.0)
    before = {k: v.clone() for k, v in other.state_dict().items()}
    with pytest.raises(ValueError, match="non-zero entries in the zero padding"):
        other.load_state_dict(state)
    assert all(torch.equal(v, before[k]) for k, v in other.state_dict().items())


# ---- init_weights ---------------------------------------------------------------------------------------------------
def test_init_weights_variants():
    torch.manual_seed(seeded(3))
    linear = torch.nn.Linear(64, 48)
    linear.weight.data.mul_(0.01)  # a small-weight layer, as in trained LLMs
    x = torch.randn(32, 64)
    base = linear(x).detach()
    gaussian = smoa.SMoALinear.from_linear(linear, r=16, num_blocks=2, init_weights="gaussian")
    assert torch.equal(gaussian.smoa_B.weight, torch.zeros_like(gaussian.smoa_B.weight))
    std = gaussian.smoa_A.weight.std().item()
    assert 0.8 / 8**0.5 < std < 1.2 / 8**0.5  # A_k ~ N(0, 1/r_k), r_k = 8
    torch.testing.assert_close(gaussian(x), base)  # B = 0: an exact no-op
    outputs = []
    for seed in (0, 1):
        torch.manual_seed(seeded(seed))
        outputs.append(smoa.SMoALinear.from_linear(linear, r=16, num_blocks=2, init_weights=False)(x).detach())
    # two random adapters differ visibly, even though W0 is small: ΔW is of W0's own magnitude
    assert (outputs[0] - outputs[1]).norm() > 0.3 * (base - linear.bias).norm()
    with pytest.raises(ValueError, match="init_weights='pissa'"):
        smoa.SMoALinear.from_linear(linear, r=4, init_weights="pissa")


# ---- orders in files ------------------------------------------------------------------------------------------------
def test_orders_are_saved_small_kept_int64_and_old_files_load(tmp_path):
    torch.manual_seed(seeded(4))
    layer = smoa.SMoALinear(130, 300, r=4, num_blocks=2, init_weights=False)
    state = layer.state_dict()
    assert state["row_order"].dtype == torch.int16 and state["col_order"].dtype == torch.int16  # 300 > 127
    assert layer.row_order.dtype == torch.int64
    torch.testing.assert_close(state["row_order"].long(), layer.row_order, rtol=0, atol=0)
    x = torch.randn(2, 130)
    for saved in (state, {k: v.long() if "order" in k else v for k, v in state.items()}):  # new and old files
        other = smoa.SMoALinear(130, 300, r=4, num_blocks=2, ordering="identity")
        other.load_state_dict(saved)
        assert other.row_order.dtype == torch.int64 and other.col_order.dtype == torch.int64
        torch.testing.assert_close(other(x), layer(x), rtol=0, atol=0)
        assigned = smoa.SMoALinear(130, 300, r=4, num_blocks=2, ordering="identity")
        assigned.load_state_dict(saved, assign=True)
        assert assigned.row_order.dtype == torch.int64


# ---- PEFT -----------------------------------------------------------------------------------------------------------
peft = pytest.importorskip("peft")


def _mlp():
    torch.manual_seed(seeded(0))
    return torch.nn.Sequential(torch.nn.Linear(13, 10), torch.nn.ReLU(), torch.nn.Linear(10, 6), torch.nn.ReLU(),
                               torch.nn.Linear(6, 4))  # fmt: skip


def test_peft_uneven_ranks_rank_pattern_and_block_ranks(tmp_path):
    from peft import PeftModel, get_peft_model

    from smoa.peft import SMoAConfig

    config = SMoAConfig(r=3, num_blocks=2, target_modules=["0", "2", "4"], init_weights=False, lora_alpha=6.0,
                        rank_pattern={"2": [1, 2]}, alpha_pattern={"2": 3.0})  # fmt: skip
    model = get_peft_model(_mlp(), config)
    layers = {name: model.base_model.model.get_submodule(name) for name in ("0", "2", "4")}
    assert layers["0"].block_ranks["default"] == (2, 1) and layers["2"].block_ranks["default"] == (1, 2)
    assert layers["0"].scaling["default"] == 6.0 / 3 and layers["2"].scaling["default"] == 3.0 / 3
    # each layer equals an SMoALinear built from the same factors and orders (the independent SPEC §2 check above)
    x = torch.randn(5, 13)
    h = x
    for name in ("0", "2", "4"):
        layer = layers[name]
        single = smoa.SMoALinear.from_linear(
            torch.nn.Linear(layer.in_features, layer.out_features), r=layer.r["default"], num_blocks=2,
            alpha=layer.lora_alpha["default"], block_ranks=list(layer.block_ranks["default"]),
        )  # fmt: skip
        single.weight.data.copy_(layer.base_layer.weight)
        single.bias.data.copy_(layer.base_layer.bias)
        single.row_order.copy_(layer.smoa_row_order["default"])
        single.col_order.copy_(layer.smoa_col_order["default"])
        single.smoa_A.weight.data.copy_(layer.smoa_A["default"].weight)
        single.smoa_B.weight.data.copy_(layer.smoa_B["default"].weight)
        expected = h.double() @ (single.weight.double() + single.scale * _spec_delta(single)).T + single.bias.double()
        h_next = layer(h)
        torch.testing.assert_close(h_next.double(), expected, rtol=1e-5, atol=1e-5)
        h = F.relu(h_next)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=0.05, weight_decay=0.1)
    for _ in range(3):
        optimizer.zero_grad()
        model(torch.randn(4, 13)).square().sum().backward()
        optimizer.step()
    for layer in layers.values():
        rows, cols = layer.smoa_row_order["default"], layer.smoa_col_order["default"]
        mask_A, mask_B = padding_masks(layer.block_ranks["default"], rows, cols)
        assert torch.all(layer.smoa_A["default"].weight[mask_A] == 0)
        assert torch.all(layer.smoa_B["default"].weight[mask_B] == 0)
    model.save_pretrained(tmp_path)
    reloaded = PeftModel.from_pretrained(_mlp(), tmp_path)
    x = torch.randn(3, 13)
    torch.testing.assert_close(reloaded(x), model(x), rtol=0, atol=0)
    explicit = get_peft_model(_mlp(), SMoAConfig(r=4, num_blocks=2, block_ranks=[3, 1], target_modules=["0"]))
    assert explicit.base_model.model[0].block_ranks["default"] == (3, 1)


def test_peft_adapter_files_hold_small_orders_and_old_int64_files_load(tmp_path):
    from peft import PeftModel, get_peft_model
    from safetensors.torch import load_file, save_file

    from smoa.peft import SMoAConfig

    model = get_peft_model(_mlp(), SMoAConfig(r=2, num_blocks=2, target_modules=["0", "2"], init_weights=False))
    model.save_pretrained(tmp_path)
    path = os.path.join(tmp_path, "adapter_model.safetensors")
    tensors = load_file(path)
    orders = {k: v for k, v in tensors.items() if "order" in k}
    assert orders and all(v.dtype == torch.int8 for v in orders.values())  # sizes ≤ 13
    x = torch.randn(3, 13)
    expected = model(x)
    reloaded = PeftModel.from_pretrained(_mlp(), tmp_path)
    assert reloaded.base_model.model[0].smoa_row_order["default"].dtype == torch.int64
    torch.testing.assert_close(reloaded(x), expected, rtol=0, atol=0)
    save_file({k: v.long() if "order" in k else v for k, v in tensors.items()}, path)  # a file of the old format
    old = PeftModel.from_pretrained(_mlp(), tmp_path)
    torch.testing.assert_close(old(x), expected, rtol=0, atol=0)


@pytest.mark.parametrize("bias", ["none", "all", "smoa_only"])
def test_peft_bias_option_trains_and_saves_the_biases_like_lora(bias, tmp_path):
    from peft import PeftModel, get_peft_model

    from smoa.peft import SMoAConfig

    model = get_peft_model(_mlp(), SMoAConfig(r=2, num_blocks=2, target_modules=["0", "2"], bias=bias))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad and n.endswith("bias")}
    expected = {
        "none": set(),
        "all": {"base_model.model.0.base_layer.bias", "base_model.model.2.base_layer.bias", "base_model.model.4.bias"},
        "smoa_only": {"base_model.model.0.base_layer.bias", "base_model.model.2.base_layer.bias"},
    }[bias]
    assert trainable == expected
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    model(torch.randn(4, 13)).square().sum().backward()
    optimizer.step()
    model.save_pretrained(tmp_path)
    reloaded = PeftModel.from_pretrained(_mlp(), tmp_path)
    x = torch.randn(3, 13)
    torch.testing.assert_close(reloaded(x), model(x), rtol=0, atol=0)  # the trained biases came back too
