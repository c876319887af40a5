"""smoa.accelerate / smoa.apply_smoa_to_hira: PEFT's own HiRA layers routed through smoa, checked against PEFT's
own unpatched forward (the same model, the same seed) — outputs and every gradient — and against the dense formula
``y = x W0ᵀ + b + dropout(x) (W0 ⊙ BA)ᵀ`` written out here; plus the merged-weight K = 1 function on its own."""

from __future__ import annotations

import copy
import os

import pytest
import torch
import torch.nn as nn

os.environ.setdefault("HF_HUB_OFFLINE", "1")
pytest.importorskip("peft", reason="smoa.hira accelerates PEFT's HiRA (the [peft] extra)")

from peft import HiraConfig, get_peft_model
from peft.tuners.hira.layer import Linear as HiraLinear
from transformers.pytorch_utils import Conv1D

import smoa
from smoa.hira import _ORDERS_ATTR, is_accelerated
from smoa_kernels.merged_weight import smoa_linear_merged_weight_k1
from smoa_kernels.reference import smoa_linear_reference
from tests.utils import TOLERANCES, seeded


class Net(nn.Module):
    def __init__(self, d_in: int, hidden: int, d_out: int, conv1d: bool = False) -> None:
        super().__init__()
        self.lin0 = Conv1D(hidden, d_in) if conv1d else nn.Linear(d_in, hidden)  # Conv1D(nf=d_out, nx=d_in)
        self.act = nn.Tanh()
        self.lin1 = nn.Linear(hidden, d_out, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin1(self.act(self.lin0(x)))


def _model(dtype, d_in=11, hidden=6, d_out=5, conv1d=False, dropout=0.0, r=3, seed=0):
    torch.manual_seed(seeded(seed))
    base = Net(d_in, hidden, d_out, conv1d).to(dtype)
    config = HiraConfig(r=r, target_modules=["lin0", "lin1"], hira_dropout=dropout, init_weights=False)
    model = get_peft_model(base, config)
    with torch.no_grad():  # HiRA's init_weights=False leaves randn factors: make the adapter term O(base term)
        for name, param in model.named_parameters():
            if "hira_" in name:
                param.mul_(0.5)
    return model.to(dtype)


def _step(model, x, seed=0):
    """Output and gradients of (x, every trainable tensor) for a fixed random cotangent; dropout seeded."""
    x = x.detach().clone().requires_grad_(True)
    torch.manual_seed(seeded(seed))
    y = model(x)
    params = [p for p in model.parameters() if p.requires_grad]
    grads = torch.autograd.grad(y, [x, *params], torch.ones_like(y) + y.detach().sin())
    return y.detach(), grads


def _assert_same(a, b, dtype):
    atol, rtol = TOLERANCES[dtype]
    torch.testing.assert_close(a[0], b[0], atol=atol, rtol=rtol)
    assert len(a[1]) == len(b[1])
    for ga, gb in zip(a[1], b[1]):
        torch.testing.assert_close(ga, gb, atol=atol * max(1.0, float(gb.abs().max())), rtol=rtol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize(
    "shape, tokens, conv1d",
    [
        ((11, 6, 5), 4, False),  # d_out ≠ d_in on both layers
        ((8, 8, 8), 1, False),  # N = 1, square
        ((5, 9, 2), 3, True),  # transformers Conv1D (fan_in_fan_out): W0 stored transposed
    ],
)
@pytest.mark.parametrize("backend", [None, "torch", "reference"])
def test_accelerated_equals_peft_forward_and_gradients(dtype, shape, tokens, conv1d, backend):
    model = _model(dtype, *shape, conv1d=conv1d)
    x = torch.randn(2, tokens, shape[0], dtype=dtype)
    expected = _step(model, x)
    smoa.accelerate(model, backend=backend)
    assert all(is_accelerated(m) for m in model.modules() if isinstance(m, HiraLinear))
    _assert_same(_step(model, x), expected, dtype)
    smoa.unaccelerate(model)
    assert not any(is_accelerated(m) for m in model.modules() if isinstance(m, HiraLinear))
    _assert_same(_step(model, x), expected, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_matches_the_dense_hira_formula(dtype):
    """Independent of PEFT: y = x W0ᵀ + b + x (W0 ⊙ B A)ᵀ for one accelerated layer."""
    model = _model(dtype)
    smoa.accelerate(model)
    layer = model.base_model.model.lin0
    x = torch.randn(3, 11, dtype=dtype)
    W0, b = layer.base_layer.weight, layer.base_layer.bias
    delta = W0 * (layer.hira_B["default"] @ layer.hira_A["default"])
    atol, rtol = TOLERANCES[dtype]
    torch.testing.assert_close(layer(x), x @ W0.T + b + x @ delta.T, atol=atol, rtol=rtol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_dropout_masks_and_gradients_match_peft(dtype):
    """Train mode, p = 0.3: PEFT's dropout module is called in PEFT's order, so the seeded masks are the same."""
    model = _model(dtype, dropout=0.3).train()
    x = torch.randn(4, 11, dtype=dtype)
    expected = _step(model, x, seed=7)
    smoa.accelerate(model)
    got = _step(model, x, seed=7)
    _assert_same(got, expected, dtype)
    assert not torch.allclose(got[0], _step(model.eval(), x)[0])  # the masks did something


@pytest.mark.parametrize("dropout", [0.0, 0.3])
def test_two_active_adapters_match_peft(dropout):
    dtype = torch.float64
    model = _model(dtype, dropout=dropout).train()
    model.add_adapter("other", HiraConfig(r=2, target_modules=["lin0"], hira_dropout=dropout, init_weights=False))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "hira_" in name and ".other" in name:
                param.mul_(0.5)
    model.base_model.set_adapter(["default", "other"])
    x = torch.randn(4, 11, dtype=dtype)
    expected = _step(model, x, seed=3)
    smoa.accelerate(model)
    _assert_same(_step(model, x, seed=3), expected, dtype)


def test_disable_adapter_merge_unmerge_and_state_dict_unchanged():
    dtype = torch.float64
    model = _model(dtype)
    x = torch.randn(3, 11, dtype=dtype)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with model.disable_adapter():
        base_out = model(x)
    adapted = model(x)
    smoa.accelerate(model)
    assert model.state_dict().keys() == state.keys()
    assert all(torch.equal(model.state_dict()[k], v) for k, v in state.items())
    assert not any(_ORDERS_ATTR in k for k in model.state_dict())
    with model.disable_adapter():
        torch.testing.assert_close(model(x), base_out, atol=1e-12, rtol=0)
    torch.testing.assert_close(model(x), adapted, atol=1e-12, rtol=1e-12)
    model.merge_adapter()
    torch.testing.assert_close(model(x), adapted, atol=1e-12, rtol=1e-12)
    model.unmerge_adapter()
    torch.testing.assert_close(model(x), adapted, atol=1e-12, rtol=1e-12)
    assert all(torch.allclose(model.state_dict()[k], v, atol=1e-12, rtol=0) for k, v in state.items())
    merged = copy.deepcopy(model).merge_and_unload()
    torch.testing.assert_close(merged(x), adapted, atol=1e-12, rtol=1e-12)


def test_identity_orders_are_cached_per_layer():
    model = smoa.accelerate(_model(torch.float32, dropout=0.5).train(), backend="torch")  # blockwise path
    layer = model.base_model.model.lin0
    model(torch.randn(2, 11))
    first = layer.__dict__[_ORDERS_ATTR]
    model(torch.randn(2, 11))
    assert layer.__dict__[_ORDERS_ATTR][0] is first[0] and layer.__dict__[_ORDERS_ATTR][1] is first[1]
    assert torch.equal(first[0], torch.arange(6)) and torch.equal(first[1], torch.arange(11))


def test_class_patch_applies_to_models_wrapped_later_and_reverts():
    dtype = torch.float64
    x = torch.randn(3, 11, dtype=dtype)
    expected = _step(_model(dtype), x)
    smoa.apply_smoa_to_hira()
    try:
        model = _model(dtype)
        assert all(is_accelerated(m) for m in model.modules() if isinstance(m, HiraLinear))
        _assert_same(_step(model, x), expected, dtype)
    finally:
        smoa.revert_smoa_to_hira()
    assert not is_accelerated(model.base_model.model.lin0)


def test_bad_input_is_refused():
    with pytest.raises(ValueError, match="no PEFT HiRA Linear"):
        smoa.accelerate(nn.Linear(3, 3))
    with pytest.raises(ValueError, match="backend='fast'"):
        smoa.accelerate(_model(torch.float32), backend="fast")
    with pytest.raises(TypeError, match="model must be a torch"):
        smoa.accelerate("model")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("scale", [1.0, 0.5])
def test_merged_weight_k1_against_the_reference(dtype, scale):
    gen = torch.Generator().manual_seed(seeded(0))
    d_in, d_out, rank = 7, 4, 3  # d_out ≠ d_in
    x = torch.randn(2, 5, d_in, dtype=dtype, generator=gen, requires_grad=True)
    weight = torch.randn(d_out, d_in, dtype=dtype, generator=gen)
    bias = torch.randn(d_out, dtype=dtype, generator=gen, requires_grad=True)
    A = torch.randn(rank, d_in, dtype=dtype, generator=gen, requires_grad=True)
    B = torch.randn(d_out, rank, dtype=dtype, generator=gen, requires_grad=True)
    rows, cols = torch.arange(d_out), torch.arange(d_in)
    cotangent = torch.randn(2, 5, d_out, dtype=dtype, generator=gen)
    y = smoa_linear_merged_weight_k1(x, weight, bias, A, B, scale)
    ref = smoa_linear_reference(x, x, weight, bias, A, B, rows, cols, 1, scale)
    atol, rtol = TOLERANCES[dtype]
    torch.testing.assert_close(y, ref, atol=atol, rtol=rtol)
    for g, e in zip(
        torch.autograd.grad(y, [x, bias, A, B], cotangent), torch.autograd.grad(ref, [x, bias, A, B], cotangent)
    ):
        torch.testing.assert_close(g, e, atol=atol * 10, rtol=rtol)
    with pytest.raises(ValueError, match="one dtype"):
        smoa_linear_merged_weight_k1(x.detach().bfloat16(), weight, bias, A, B, scale)


def test_bench_provider_hira_smoa_is_the_accelerated_peft_layer():
    from smoa.bench import TOLERANCES as BENCH_TOLERANCES
    from smoa.bench import BenchInputs, build_case

    inputs = BenchInputs.make(d_in=24, d_out=16, tokens=5, dtype=torch.float32, device="cpu")  # d_out ≠ d_in
    case = build_case("hira-smoa", inputs, r=8, num_blocks=2)
    assert isinstance(case.module, HiraLinear) and is_accelerated(case.module)
    error, saved = case.check()  # output and gradients against the dense HiRA formula (SPEC §6)
    assert error < BENCH_TOLERANCES[torch.float32]
    _, saved_peft = build_case("hira", inputs, r=8, num_blocks=2).check()
    assert saved < saved_peft  # PEFT keeps the d_out×d_in products for its backward; smoa keeps x only


def test_a_trainable_base_weight_still_gets_its_gradient():
    """smoa's backends treat W0 as frozen; a user who unfroze it gets PEFT's forward (and dW0) instead."""
    dtype = torch.float64
    model = _model(dtype)
    layer = model.base_model.model.lin0
    layer.base_layer.weight.requires_grad_(True)
    x = torch.randn(3, 11, dtype=dtype)
    expected = torch.autograd.grad(model(x).sum(), layer.base_layer.weight)[0]
    smoa.accelerate(model)
    got = torch.autograd.grad(model(x).sum(), layer.base_layer.weight)[0]
    torch.testing.assert_close(got, expected, atol=1e-12, rtol=1e-12)


def test_bf16_base_with_fp32_factors_matches_peft_to_bf16_rounding():
    """PEFT keeps HiRA factors in fp32 over a bf16 base (autocast_adapter_dtype): the blockwise path computes the
    adapter term in fp32 as PEFT does; the results differ by bf16 rounding of the sum only."""
    torch.manual_seed(seeded(0))
    base = Net(11, 6, 5).to(torch.bfloat16)
    model = get_peft_model(base, HiraConfig(r=3, target_modules=["lin0", "lin1"], init_weights=False))
    assert model.base_model.model.lin0.hira_A["default"].dtype == torch.float32
    x = torch.randn(4, 11).to(torch.bfloat16)
    expected = _step(model, x)
    smoa.accelerate(model)
    got = _step(model, x)
    atol, rtol = TOLERANCES[torch.bfloat16]
    for a, b in zip([got[0], *got[1]], [expected[0], *expected[1]]):
        torch.testing.assert_close(a.float(), b.float(), atol=atol * max(1.0, float(b.abs().max())), rtol=rtol)
