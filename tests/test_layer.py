"""SMoALinear: the nn.Linear drop-in — init, parameter count, state, block factors, merge, dtypes, bad input."""

import math

import pytest
import torch
import torch.nn as nn

import smoa
from smoa import SMoALinear
from smoa_kernels.reference import dense_delta_weight, smoa_linear_reference
from tests.utils import assert_close, seeded


def make_layer(d_in=12, d_out=10, r=4, num_blocks=2, dtype=torch.float32, seed=0, **kwargs):
    torch.manual_seed(seeded(seed))
    linear = nn.Linear(d_in, d_out, dtype=dtype)
    return linear, SMoALinear.from_linear(linear, r=r, num_blocks=num_blocks, init_weights=False, **kwargs)


def reference_output(layer, x):
    return smoa_linear_reference(x, x, layer.weight, layer.bias, layer.smoa_A.weight, layer.smoa_B.weight,
                                 layer.row_order, layer.col_order, layer.num_blocks, layer.scale)  # fmt: skip


@pytest.mark.parametrize("d_in, d_out, r, K", [(12, 10, 4, 2), (7, 13, 3, 3), (16, 16, 8, 1), (9, 9, 4, 4)])
def test_no_op_at_init_and_parameter_count(d_in, d_out, r, K):
    linear = nn.Linear(d_in, d_out)
    layer = SMoALinear.from_linear(linear, r=r, num_blocks=K)
    x = torch.randn(5, d_in)
    assert torch.equal(layer(x), linear(x))  # B = 0: an exact no-op
    trainable = sum(p.numel() for p in layer.parameters() if p.requires_grad)
    assert trainable == r * (d_in + d_out) // K  # SPEC §2: the count of LoRA at rank r/K
    assert {n for n, p in layer.named_parameters() if p.requires_grad} == {"smoa_A.weight", "smoa_B.weight"}


def test_kaiming_init_per_block_fan_in():
    # A_k ~ U(-1/√|C_k|, 1/√|C_k|) (kaiming_uniform with a=√5): with d_in = 400, K = 2, |C_k| = 200
    layer = SMoALinear.from_linear(nn.Linear(400, 8), r=64, num_blocks=2)
    bound = 1 / math.sqrt(200)
    for A_k, B_k in layer.block_factors():
        assert A_k.abs().max() <= bound
        assert A_k.abs().max() > 0.9 * bound  # 6400 draws: the range is used
        assert A_k.std() > 0.5 * bound
        assert bool((B_k == 0).all())


def test_from_linear_shares_and_freezes_weight():
    linear, layer = make_layer()
    assert layer.weight is linear.weight and layer.bias is linear.bias
    assert not layer.weight.requires_grad and not layer.bias.requires_grad
    assert layer.row_order.dtype == torch.long and layer.col_order.dtype == torch.long


def test_direct_constructor_new_layer():
    layer = SMoALinear(20, 6, r=4, num_blocks=2, bias=False, dtype=torch.float64)
    assert layer.bias is None and layer.weight.shape == (6, 20) and not layer.weight.requires_grad
    assert layer.smoa_A.weight.dtype == torch.float64
    y = layer(torch.randn(3, 20, dtype=torch.float64))
    assert y.shape == (3, 6)


@pytest.mark.parametrize("backend", ["reference", "torch"])
def test_forward_matches_reference_with_leading_dims(backend):
    _, layer = make_layer(backend=backend)
    x = torch.randn(2, 3, 5, 12)
    y = layer(x)
    assert y.shape == (2, 3, 5, 10)
    expected = reference_output(layer, x)
    assert_close(y, expected, scale=expected.abs().max().item())
    # and the adapter does something: not equal to the base layer
    assert not torch.allclose(y, nn.functional.linear(x, layer.weight, layer.bias))


def test_training_gradients_match_reference():
    _, layer = make_layer(d_in=15, d_out=11, r=6, num_blocks=3, backend="torch")
    x = torch.randn(7, 15)
    layer(x).pow(2).sum().backward()
    fast = (layer.smoa_A.weight.grad.clone(), layer.smoa_B.weight.grad.clone())
    layer.zero_grad()
    reference_output(layer, x).pow(2).sum().backward()
    for g_fast, g_ref in zip(fast, (layer.smoa_A.weight.grad, layer.smoa_B.weight.grad)):
        assert_close(g_fast, g_ref, scale=g_ref.abs().max().item())
    assert layer.weight.grad is None  # W0 frozen


@pytest.mark.parametrize("base_dtype", [torch.bfloat16, torch.float16])
def test_half_base_with_fp32_factors_returns_input_dtype(base_dtype):
    _, layer = make_layer(d_in=32, d_out=24, dtype=base_dtype, backend="torch")
    assert layer.smoa_A.weight.dtype == torch.float32
    x = torch.randn(4, 32).to(base_dtype).requires_grad_(True)
    y = layer(x)
    assert y.dtype == base_dtype
    y.float().sum().backward()
    assert x.grad.dtype == base_dtype and layer.smoa_A.weight.grad.dtype == torch.float32
    expected = reference_output(layer, x.detach())
    assert_close(y, expected, dtype=base_dtype, scale=expected.abs().max().item())


def test_dropout_only_on_adapter_path_and_identity_in_eval():
    _, layer = make_layer(dropout=0.5, backend="torch")
    x = torch.randn(64, 12)
    layer.eval()
    expected_eval = reference_output(layer, x)
    assert_close(layer(x), expected_eval, scale=expected_eval.abs().max().item())  # eval: dropout is the identity
    layer.train()
    torch.manual_seed(seeded(5))
    y_train = layer(x)
    torch.manual_seed(seeded(5))
    x_dropped = nn.functional.dropout(x, 0.5, training=True)
    expected = smoa_linear_reference(x, x_dropped, layer.weight, layer.bias, layer.smoa_A.weight,
                                     layer.smoa_B.weight, layer.row_order, layer.col_order, 2, layer.scale)  # fmt: skip
    assert_close(y_train, expected, scale=expected.abs().max().item())
    assert not torch.allclose(y_train, reference_output(layer, x))


def test_state_dict_round_trip_is_bit_exact_without_svd(monkeypatch):
    _, layer = make_layer(d_in=24, d_out=18, r=6, num_blocks=3)
    x = torch.randn(5, 24)
    state = layer.state_dict()
    assert {"row_order", "col_order", "smoa_A.weight", "smoa_B.weight"} <= set(state)
    fresh = SMoALinear(24, 18, r=6, num_blocks=3, ordering="identity")  # built without any SVD
    monkeypatch.setattr(torch.linalg, "svd", lambda *a, **k: pytest.fail("load must not recompute the SVD"))
    fresh.load_state_dict(state)
    assert torch.equal(fresh.row_order, layer.row_order) and torch.equal(fresh.col_order, layer.col_order)
    assert torch.equal(fresh(x), layer(x))


def test_block_factors_round_trip_and_official_layout():
    _, layer = make_layer(d_in=11, d_out=7, r=6, num_blocks=3)
    blocks = layer.block_factors()
    assert [tuple(A.shape) for A, _ in blocks] == [(2, 4), (2, 4), (2, 3)]  # |C_k| = 4, 4, 3
    assert [tuple(B.shape) for _, B in blocks] == [(3, 2), (2, 2), (2, 2)]  # |R_k| = 3, 2, 2
    x = torch.randn(3, 11)
    y = layer(x)
    other = SMoALinear.from_linear(nn.Linear(11, 7), r=6, num_blocks=3)
    other.weight.data.copy_(layer.weight)
    other.bias.data.copy_(layer.bias)
    other.row_order.copy_(layer.row_order)
    other.col_order.copy_(layer.col_order)
    other.load_block_factors(blocks)
    assert torch.equal(other(x), y)
    # each block's ΔW is (B_k A_k) ⊙ W0[R_k, C_k] in the authors' layout
    delta = layer.delta_weight()
    for (A_k, B_k), R_k, C_k in zip(blocks, torch.tensor_split(layer.row_order, 3),
                                    torch.tensor_split(layer.col_order, 3)):  # fmt: skip
        torch.testing.assert_close(
            delta[R_k[:, None], C_k], layer.scale * (B_k @ A_k) * layer.weight[R_k[:, None], C_k]
        )


def test_delta_weight_is_the_adapter_contribution():
    _, layer = make_layer(dtype=torch.float64, alpha=2.0)
    x = torch.randn(4, 12, dtype=torch.float64)
    y = layer(x)
    base = nn.functional.linear(x, layer.weight, layer.bias)
    torch.testing.assert_close(y - base, x @ layer.delta_weight().T)
    assert layer.scale == 0.5


# unmerge restores W0 to rounding: two roundings (merge, unmerge) of W0's dtype, relative to each entry
@pytest.mark.parametrize("dtype, rtol", [(torch.float64, 4e-16), (torch.float32, 2**-23), (torch.bfloat16, 2**-7)])
def test_merge_unmerge(dtype, rtol):
    linear, layer = make_layer(d_in=40, d_out=36, r=8, num_blocks=2, dtype=dtype)
    with torch.no_grad():
        layer.smoa_B.weight.mul_(3)  # a large update: relative changes of W0 well above bf16 rounding
    original = linear.weight.detach().clone()
    x = torch.randn(6, 40, dtype=dtype)
    y_unmerged = layer(x)
    layer.merge()
    assert layer.merged and "merged=True" in repr(layer)
    y_merged = layer(x)
    assert_close(y_merged, y_unmerged, dtype=dtype, scale=y_unmerged.abs().max().item() * (8 if dtype ==
                 torch.bfloat16 else 1))  # fmt: skip
    assert not torch.equal(linear.weight, original)  # the merge wrote into the shared weight
    layer.merge()  # a second merge is a no-op
    layer.unmerge()
    assert not layer.merged
    torch.testing.assert_close(linear.weight, original, rtol=rtol, atol=0)
    assert_close(layer(x), y_unmerged, dtype=dtype, scale=y_unmerged.abs().max().item())


def test_merged_output_is_exactly_a_plain_linear():
    linear, layer = make_layer()
    layer.merge()
    x = torch.randn(3, 12)
    assert torch.equal(layer(x), nn.functional.linear(x, linear.weight, linear.bias))


def test_unmerge_restores_entries_the_merge_annihilated():
    # K = 1, r = 1, A = 1, B = -1/s: 1 + s·P = 0 everywhere, so the merged weight is all zero;
    # unmerge cannot divide back and must restore W0 from what the merge kept aside.
    linear = nn.Linear(6, 5)
    layer = SMoALinear.from_linear(linear, r=1, num_blocks=1, alpha=2.0)
    with torch.no_grad():
        layer.smoa_A.weight.fill_(1.0)
        layer.smoa_B.weight.fill_(-1.0 / layer.scale)
        linear.weight[0, 0] = 0.0  # a zero entry of W0 stays zero (0/0 must not become NaN)
    original = linear.weight.detach().clone()
    layer.merge()
    assert bool((linear.weight == 0).all())
    layer.unmerge()
    assert torch.equal(linear.weight, original)


def test_extra_repr_shows_configuration():
    _, layer = make_layer(alpha=16, ordering="random", backend="torch")
    text = repr(layer)
    for token in ("in_features=12", "out_features=10", "r=4", "num_blocks=2", "alpha=16", "ordering=random",
                  "backend=torch"):  # fmt: skip
        assert token in text


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        ({"r": 0}, ValueError, "r=0"),
        ({"r": 2.0}, TypeError, "r must be an int"),
        ({"num_blocks": 0}, ValueError, "num_blocks=0"),
        ({"num_blocks": 11, "r": 11}, ValueError, r"num_blocks=11 exceeds min\(in_features, out_features\)=10"),
        ({"r": 5, "num_blocks": 2, "block_ranks": [2, 2]}, ValueError, r"block_ranks=\[2, 2\] sums to 4 but r=5"),
        ({"r": 3, "num_blocks": 2, "block_ranks": [3]}, ValueError, "has 1 entries, expected num_blocks=2"),
        ({"r": 3, "num_blocks": 2, "block_ranks": [4, -1]}, ValueError, "every entry must be an int >= 0"),
        ({"init_weights": "pissa"}, ValueError, "init_weights='pissa'"),
        ({"dropout": 1.0}, ValueError, "dropout=1.0"),
        ({"dropout": -0.1}, ValueError, "dropout=-0.1"),
        ({"alpha": 0}, ValueError, "alpha=0"),
        ({"alpha": float("nan")}, ValueError, "alpha=nan"),
        ({"ordering": "svd"}, ValueError, "ordering='svd'"),
        ({"backend": "cuda"}, ValueError, "backend='cuda'"),
    ],
)
def test_bad_arguments(kwargs, error, match):
    args = {"r": 4, "num_blocks": 2} | kwargs
    with pytest.raises(error, match=match):
        SMoALinear.from_linear(nn.Linear(12, 10), **args)


def test_bad_base_weight_and_module():
    with pytest.raises(TypeError, match=r"torch\.nn\.Linear, got Conv1d"):
        SMoALinear.from_linear(nn.Conv1d(3, 3, 1), r=2)
    linear = nn.Linear(4, 4)
    with torch.no_grad():
        linear.weight[1, 2] = float("nan")
    with pytest.raises(ValueError, match="NaN or Inf"):
        SMoALinear.from_linear(linear, r=2)


def test_wrong_input_feature_size():
    _, layer = make_layer()
    with pytest.raises(ValueError, match=r"input has 11 features .* expected 12"):
        layer(torch.randn(2, 11))


def test_bad_state_dicts_are_rejected_before_loading():
    _, layer = make_layer()
    before = {k: v.clone() for k, v in layer.state_dict().items()}
    bad_order = dict(before, row_order=torch.tensor([0, 0, 1, 2, 3, 4, 5, 6, 7, 8]))
    with pytest.raises(ValueError, match="row_order is not a permutation"):
        layer.load_state_dict(bad_order)
    short_order = dict(before, col_order=torch.arange(11))
    with pytest.raises(ValueError, match=r"col_order must be a permutation of range\(12\)"):
        layer.load_state_dict(short_order)
    other_rank = dict(before, **{"smoa_A.weight": torch.zeros(4, 12)})
    with pytest.raises(ValueError, match=r"smoa_A.weight has shape \(4, 12\), expected \(2, 12\)"):
        layer.load_state_dict(other_rank)
    for key, value in layer.state_dict().items():
        assert torch.equal(value, before[key]), key  # nothing was loaded


def test_load_block_factors_rejects_wrong_shapes():
    _, layer = make_layer()
    blocks = layer.block_factors()
    with pytest.raises(ValueError, match="blocks has 1 entries, expected num_blocks=2"):
        layer.load_block_factors(blocks[:1])
    blocks[1] = (blocks[1][0][:, :-1], blocks[1][1])
    with pytest.raises(ValueError, match=r"blocks\[1\] has shapes"):
        layer.load_block_factors(blocks)


def test_delta_weight_refused_while_merged():
    _, layer = make_layer()
    layer.merge()
    with pytest.raises(RuntimeError, match="unmerge"):
        layer.delta_weight()


def test_k1_identity_layer_is_hira():
    # SPEC §6: K = 1 → ΔW = (BA) ⊙ W0 whatever the order
    linear, layer = make_layer(r=3, num_blocks=1, dtype=torch.float64)
    A, B = layer.smoa_A.weight, layer.smoa_B.weight
    torch.testing.assert_close(layer.delta_weight(), layer.scale * (B @ A) * linear.weight)
    torch.testing.assert_close(
        dense_delta_weight(linear.weight, A, B, layer.row_order, layer.col_order, 1),
        dense_delta_weight(linear.weight, A, B, torch.arange(10), torch.arange(12), 1),
    )


def test_use_backend_switches_layers_without_their_own():
    _, layer = make_layer()
    x = torch.randn(3, 12)
    with smoa.use_backend("reference"):
        y_ref = layer(x)
    with smoa.use_backend("torch"):
        y_torch = layer(x)
    assert_close(y_torch, y_ref, scale=y_ref.abs().max().item())
