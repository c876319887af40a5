"""The oracle itself, checked against independent derivations of SPEC §2/§3/§6 (not against its own code)."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from smoa_kernels.blocks import block_bounds, block_ids, block_sizes
from smoa_kernels.reference import blocks_to_lora, dense_delta_weight, lora_to_blocks, smoa_linear_reference
from tests.utils import make_problem, seeded


@settings(max_examples=60, deadline=None)
@given(n=st.integers(1, 300), num_blocks=st.integers(1, 8))
def test_block_sizes_match_tensor_split(n, num_blocks):
    expected = [len(c) for c in torch.tensor_split(torch.arange(n), num_blocks)]
    assert block_sizes(n, num_blocks) == expected
    bounds = block_bounds(n, num_blocks)
    assert [stop - start for start, stop in bounds] == expected
    assert bounds[0][0] == 0 and bounds[-1][1] == n


@settings(max_examples=40, deadline=None)
@given(n=st.integers(1, 200), num_blocks=st.integers(1, 6), seed=st.integers(0, 1000))
def test_block_ids_follow_tensor_split(n, num_blocks, seed):
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seeded(seed)))
    ids = block_ids(order, num_blocks)
    for k, chunk in enumerate(torch.tensor_split(order, num_blocks)):
        assert bool((ids[chunk] == k).all())
    assert ids.dtype == torch.int32 and ids.shape == (n,)


def test_k1_identity_is_hira():
    # SPEC §6: K = 1 with identity order is ΔW = (BA) ⊙ W0 — HiRA — so y = x W0ᵀ + b + s·x((BA)⊙W0)ᵀ
    p = make_problem(5, 7, 6, num_blocks=1, rank_per_block=3, dtype=torch.float64, requires_grad=False)
    p["row_order"], p["col_order"] = torch.arange(6), torch.arange(7)
    W0, A, B, s = p["weight"], p["lora_A"], p["lora_B"], p["scale"]
    expected = p["x"] @ (W0 + s * (B @ A) * W0).T + p["bias"]
    actual = smoa_linear_reference(p["x"], p["x"], W0, p["bias"], A, B, p["row_order"], p["col_order"], 1, s)
    torch.testing.assert_close(actual, expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize(
    "d_out, d_in, num_blocks", [(6, 6, 2), (7, 5, 3), (4, 9, 4)]
)  # square; rows > cols; cols > rows
def test_ones_anchor_identity_order_is_block_diagonal_mini_loras(d_out, d_in, num_blocks):
    # SPEC §6: anchors replaced by ones with the identity order give block-diagonal mini-LoRAs (MeLoRA-like),
    # built here with torch.block_diag from the per-block products (first n mod K blocks one larger).
    p = make_problem(1, d_in, d_out, num_blocks, rank_per_block=2, dtype=torch.float64, requires_grad=False)
    rows, cols = torch.arange(d_out), torch.arange(d_in)
    row_sizes = [len(c) for c in torch.tensor_split(rows, num_blocks)]
    col_sizes = [len(c) for c in torch.tensor_split(cols, num_blocks)]
    A_blocks = torch.split(p["lora_A"], col_sizes, dim=1)
    B_blocks = torch.split(p["lora_B"], row_sizes, dim=0)
    expected = torch.block_diag(*[B_k @ A_k for A_k, B_k in zip(A_blocks, B_blocks)])
    ones = torch.ones(d_out, d_in, dtype=torch.float64)
    actual = dense_delta_weight(ones, p["lora_A"], p["lora_B"], rows, cols, num_blocks)
    # two sums of r_k = 2 products, in whatever order each matmul takes: within γ_2 of Σ|B_k||A_k|, entry by entry
    magnitude = torch.block_diag(*[B_k.abs() @ A_k.abs() for A_k, B_k in zip(A_blocks, B_blocks)])
    assert bool(((actual - expected).abs() <= 4 * torch.finfo(torch.float64).eps * magnitude).all())
    assert bool((actual[magnitude == 0] == 0).all())  # off the diagonal blocks: exactly zero, by construction


@pytest.mark.parametrize("d_out, d_in, num_blocks", [(8, 8, 2), (9, 7, 3), (5, 11, 4), (6, 6, 1)])
def test_masked_lora_form_equals_block_form(d_out, d_in, num_blocks):
    # SPEC §3: ΔW = (B̂Â) ⊙ W0 ⊙ [blk_row[i] == blk_col[c]], with permuted orders (sizes not divisible by K)
    p = make_problem(1, d_in, d_out, num_blocks, rank_per_block=3, dtype=torch.float64, requires_grad=False)
    blk_row, blk_col = block_ids(p["row_order"], num_blocks), block_ids(p["col_order"], num_blocks)
    mask = (blk_row[:, None] == blk_col[None, :]).double()
    expected = (p["lora_B"] @ p["lora_A"]) * p["weight"] * mask
    actual = dense_delta_weight(p["weight"], p["lora_A"], p["lora_B"], p["row_order"], p["col_order"], num_blocks)
    torch.testing.assert_close(actual, expected, rtol=1e-13, atol=1e-13)
    # and the update is zero off the diagonal blocks
    assert bool((actual[mask == 0] == 0).all())


def test_lora_blocks_round_trip_and_official_shapes():
    # d_out=7, d_in=10, K=3: block sizes 3,2,2 rows and 4,3,3 columns — the remainder goes to the first blocks
    p = make_problem(1, 10, 7, 3, rank_per_block=2, requires_grad=False)
    blocks = lora_to_blocks(p["lora_A"], p["lora_B"], p["row_order"], p["col_order"], 3)
    assert [tuple(A.shape) for A, _ in blocks] == [(2, 4), (2, 3), (2, 3)]
    assert [tuple(B.shape) for _, B in blocks] == [(3, 2), (2, 2), (2, 2)]
    lora_A, lora_B = blocks_to_lora(blocks, p["row_order"], p["col_order"])
    assert torch.equal(lora_A, p["lora_A"]) and torch.equal(lora_B, p["lora_B"])


def test_reference_adapter_in_factor_dtype_and_output_in_input_dtype():
    # bf16 activations and base with fp32 factors: the output is bf16, the adapter term computed in fp32
    p = make_problem(4, 16, 12, 2, 2, dtype=torch.bfloat16, factor_dtype=torch.float32, requires_grad=False)
    y = smoa_linear_reference(p["x"], p["x"], p["weight"], p["bias"], p["lora_A"], p["lora_B"], p["row_order"],
                              p["col_order"], 2, p["scale"])  # fmt: skip
    assert y.dtype == torch.bfloat16
    delta = dense_delta_weight(p["weight"].double(), p["lora_A"].double(), p["lora_B"].double(), p["row_order"],
                               p["col_order"], 2)  # fmt: skip
    adapter = p["scale"] * p["x"].double() @ delta.T
    base = torch.nn.functional.linear(p["x"], p["weight"], p["bias"])  # the reference's own base term, same op
    # y = bf16(base + bf16(adapter)): two bf16 roundings, each within 2⁻⁸ of what the operands can reach (plus the
    # fp32 adapter's own rounding, far below); bounded by |base| + |adapter|, not by a computed value that may be ~0
    magnitude = float((base.double().abs() + adapter.abs()).max())
    bound = 2 * 2.0**-8 * magnitude
    assert bound < 0.25 * float(adapter.abs().max())  # a halved adapter fails the check below
    assert float(((y.double() - base.double()) - adapter).abs().max()) <= bound
