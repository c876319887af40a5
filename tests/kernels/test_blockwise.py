"""The blockwise PyTorch path (``torch`` backend) against the dense reference: forward and every gradient."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from smoa_kernels.blockwise import smoa_linear_blockwise
from smoa_kernels.reference import smoa_linear_reference
from tests.utils import assert_close, call, grads, make_problem, seeded

SHAPES = [
    # (N, d_in, d_out, K, r_k)
    (1, 8, 8, 2, 4),  # N = 1: a single token
    (17, 24, 24, 3, 4),  # square, 24 divisible by K = 3
    (9, 10, 7, 3, 2),  # d_out < d_in, neither divisible by K = 3 (remainders on the first blocks)
    (5, 7, 13, 4, 1),  # d_out > d_in, r_k = 1, not divisible by K = 4
    (6, 9, 9, 1, 16),  # K = 1 (HiRA), r_k = 16 > d/2
    (4, 4, 4, 4, 3),  # K = min(d_in, d_out): 1×1 blocks
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("N, d_in, d_out, K, r_k", SHAPES)
def test_forward_and_grads_match_reference(N, d_in, d_out, K, r_k, dtype):
    problem = make_problem(N, d_in, d_out, K, r_k, dtype=dtype)
    expected = call(smoa_linear_reference, problem)
    actual = call(smoa_linear_blockwise, problem)
    scale = expected.abs().max().item()
    assert_close(actual, expected, scale=scale)
    expected_grads, actual_grads = grads(expected, problem), grads(actual, problem)
    assert set(actual_grads) == {"x", "bias", "lora_A", "lora_B"}
    for name, value in expected_grads.items():
        assert_close(actual_grads[name], value, scale=value.abs().max().item())


@pytest.mark.parametrize("N, d_in, d_out, K, r_k", [(3, 5, 4, 2, 2), (1, 6, 7, 3, 1), (2, 4, 4, 1, 3)])
def test_gradcheck_fp64(N, d_in, d_out, K, r_k):
    p = make_problem(N, d_in, d_out, K, r_k, dtype=torch.float64)
    x_adapter = torch.randn(N, d_in, dtype=torch.float64, requires_grad=True)  # a distinct dropout(x)

    def fn(x, x_adapter, bias, lora_A, lora_B):
        return smoa_linear_blockwise(x, x_adapter, p["weight"], bias, lora_A, lora_B, p["row_order"],
                                     p["col_order"], K, p["scale"])  # fmt: skip

    assert torch.autograd.gradcheck(fn, (p["x"], x_adapter, p["bias"], p["lora_A"], p["lora_B"]))


def test_dropout_input_gets_its_own_gradient():
    # dropout(x) differs from x: the base term's gradient flows to x, the adapter's to x_adapter
    p = make_problem(6, 10, 9, 2, 3, dtype=torch.float64)
    mask = (torch.rand(6, 10, generator=torch.Generator().manual_seed(seeded(3))) > 0.3).double() / 0.7
    outs = {}
    for name, fn in (("ref", smoa_linear_reference), ("fast", smoa_linear_blockwise)):
        x = p["x"].detach().clone().requires_grad_(True)
        y = fn(x, x * mask, p["weight"], p["bias"], p["lora_A"], p["lora_B"], p["row_order"], p["col_order"], 2, 0.5)
        (gx,) = torch.autograd.grad(y, [x], torch.ones_like(y))
        outs[name] = (y, gx)
    torch.testing.assert_close(outs["fast"][0], outs["ref"][0], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(outs["fast"][1], outs["ref"][1], rtol=1e-12, atol=1e-12)


def test_leading_dims_bias_none_and_noncontiguous_input():
    p = make_problem(1, 12, 10, 2, 2, bias=False, requires_grad=False)
    x = torch.randn(3, 12, 4).transpose(1, 2)  # 3-D and non-contiguous
    args = (p["weight"], None, p["lora_A"], p["lora_B"], p["row_order"], p["col_order"], 2, 1.0)
    expected = smoa_linear_reference(x, x, *args)
    actual = smoa_linear_blockwise(x, x, *args)
    assert actual.shape == (3, 4, 10)
    assert_close(actual, expected, scale=expected.abs().max().item())


@pytest.mark.parametrize("base_dtype", [torch.bfloat16, torch.float16])
def test_half_base_with_fp32_factors(base_dtype):
    p = make_problem(8, 32, 24, 2, 4, dtype=base_dtype, factor_dtype=torch.float32)
    expected = call(smoa_linear_reference, p)
    actual = call(smoa_linear_blockwise, p)
    assert actual.dtype == base_dtype
    assert_close(actual, expected, dtype=base_dtype, scale=expected.abs().max().item())
    ge, ga = grads(expected, p), grads(actual, p)
    assert ga["lora_A"].dtype == torch.float32 and ga["x"].dtype == base_dtype
    for name in ge:
        assert_close(ga[name], ge[name], dtype=base_dtype, scale=ge[name].abs().max().item())


def test_only_factor_gradients_requested():
    # a frozen first layer: x does not require grad, only the factors do
    p = make_problem(5, 9, 8, 3, 2)
    p["x"].requires_grad_(False)
    p["bias"].requires_grad_(False)
    y = call(smoa_linear_blockwise, p)
    ga = grads(y, p)
    ge = grads(call(smoa_linear_reference, p), p)
    assert set(ga) == {"lora_A", "lora_B"}
    for name in ge:
        assert_close(ga[name], ge[name], scale=ge[name].abs().max().item())


@settings(max_examples=25, deadline=None)
@given(
    N=st.integers(1, 9),
    d_in=st.integers(1, 20),
    d_out=st.integers(1, 20),
    K=st.integers(1, 5),
    r_k=st.integers(1, 5),
    seed=st.integers(0, 2**16),
)
def test_random_shapes_fp64(N, d_in, d_out, K, r_k, seed):
    K = min(K, d_in, d_out)
    p = make_problem(N, d_in, d_out, K, r_k, dtype=torch.float64, seed=seed)
    expected, actual = call(smoa_linear_reference, p), call(smoa_linear_blockwise, p)
    torch.testing.assert_close(actual, expected, rtol=1e-10, atol=1e-10)
    ge, ga = grads(expected, p), grads(actual, p)
    for name in ge:
        torch.testing.assert_close(ga[name], ge[name], rtol=1e-10, atol=1e-10)


def _saved_numels(fn, problem):
    """Element counts of the tensors autograd saves for backward, except views of the frozen weight itself."""
    weight_ptr = problem["weight"].untyped_storage().data_ptr()
    numels = []

    def pack(t):
        if t.untyped_storage().data_ptr() != weight_ptr:
            numels.append(t.numel())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        call(fn, problem)
    return numels


def test_nothing_weight_sized_saved_for_backward():
    # N = 8 tokens, 64×64 weight: anything of ≥ d_out·d_in/4 elements saved would be a ΔW-sized temporary
    problem = make_problem(8, 64, 64, 2, 4)
    limit = 64 * 64 // 4
    assert max(_saved_numels(smoa_linear_blockwise, problem)) < limit
    assert max(_saved_numels(smoa_linear_reference, problem)) >= 64 * 64  # the dense oracle does save ΔW


def test_cpu_autocast_bf16_matches_reference_under_autocast():
    # fp32 base and factors under bf16 autocast: forward in bf16, backward under the same autocast state
    p = make_problem(6, 16, 12, 2, 3)
    outs = {}
    for name, fn in (("ref", smoa_linear_reference), ("fast", smoa_linear_blockwise)):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = call(fn, p)
        assert y.dtype == torch.bfloat16
        outs[name] = (y, grads(y, p))
    (y_ref, g_ref), (y_fast, g_fast) = outs["ref"], outs["fast"]
    assert_close(y_fast, y_ref, dtype=torch.bfloat16, scale=y_ref.abs().max().item())
    for name, value in g_ref.items():
        assert g_fast[name].dtype == p[name].dtype == torch.float32
        assert_close(g_fast[name], value, dtype=torch.bfloat16, scale=value.abs().max().item())


# N large enough that the step merges W_eff = W0 + s·ΔW (fp32/fp64, no dropout, no autocast, and the D² transient no
# larger than the band transient N·(d_in + d_out)/K): same results and gradients as the unmerged path
MERGED_SHAPES = [(64, 24, 24, 3, 4), (40, 10, 7, 3, 2), (48, 7, 13, 4, 1), (30, 9, 9, 1, 16), (16, 4, 4, 4, 3)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("N, d_in, d_out, K, r_k", MERGED_SHAPES)
def test_merged_step_matches_reference(N, d_in, d_out, K, r_k, dtype):
    from smoa_kernels.blockwise import _use_merged

    problem = make_problem(N, d_in, d_out, K, r_k, dtype=dtype)
    x, w, A, B = problem["x"], problem["weight"], problem["lora_A"], problem["lora_B"]
    assert _use_merged(x, None, w, A, B, K)
    assert not _use_merged(x, x.detach().clone(), w, A, B, K)  # dropout: the exact unmerged path
    expected = call(smoa_linear_reference, problem)
    actual = call(smoa_linear_blockwise, problem)
    assert_close(actual, expected, scale=expected.abs().max().item())
    expected_grads, actual_grads = grads(expected, problem), grads(actual, problem)
    assert set(actual_grads) == {"x", "bias", "lora_A", "lora_B"}
    for name, value in expected_grads.items():
        assert_close(actual_grads[name], value, scale=value.abs().max().item())


def test_merged_step_gradcheck_fp64():
    p = make_problem(24, 5, 4, 2, 2, dtype=torch.float64)

    def fn(x, bias, lora_A, lora_B):
        return smoa_linear_blockwise(x, x, p["weight"], bias, lora_A, lora_B, p["row_order"], p["col_order"], 2,
                                     p["scale"])  # fmt: skip

    assert torch.autograd.gradcheck(fn, (p["x"], p["bias"], p["lora_A"], p["lora_B"]))


def test_merged_step_saves_nothing_weight_sized():
    # W_eff is regenerated in the backward, never saved: besides x itself (and W0) only O(d) tensors are saved
    problem = make_problem(64, 64, 64, 2, 4)  # 64·64·2 = 64·(64 + 64): merged
    x_ptr = problem["x"].untyped_storage().data_ptr()
    saved = []

    def pack(t):
        if t.untyped_storage().data_ptr() not in (x_ptr, problem["weight"].untyped_storage().data_ptr()):
            saved.append(t.numel())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        call(smoa_linear_blockwise, problem)
    assert max(saved) < 64 * 64 // 4
