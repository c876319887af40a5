"""The Triton kernels (``triton`` backend), every path ("fused", "blocked", "auto"), against the dense reference:
forward, dX, dA, dB, db (with and without dropout), the adapter term alone, dispatch, the order guard and bad input.

On a CPU-only machine the kernels run under the Triton interpreter: a module-scoped fixture sets ``TRITON_INTERPRET=1``
for this module only (the kernels read the mode at launch, so nothing leaks into other modules). On a GPU the same
tests run natively, with bf16 and larger shapes added.

Every result is compared with the reference evaluated in float64 on the very same (already rounded) inputs, so the
tolerance measures the kernel's own error: ``max|actual - expected| <= tol * max|expected|`` per tensor, with ``tol``
from the one table below. bf16 runs on the GPU only: the interpreter stores bf16 as uint16, so ``tl.dot`` on bf16 tiles
multiplies raw bits (KERNELS.md §5); fp16 exercises the same 16-bit code path on the CPU.
"""

from __future__ import annotations

import os

import pytest
import torch

triton = pytest.importorskip("triton", reason="triton is not installed: the fused SMoA kernels cannot run")

from smoa_kernels.reference import smoa_linear_reference  # noqa: E402
from smoa_kernels.triton import blocked as triton_blocked  # noqa: E402
from smoa_kernels.triton import configs as triton_configs  # noqa: E402
from smoa_kernels.triton import default_config, is_available, smoa_linear_triton  # noqa: E402
from tests.utils import seeded  # noqa: E402

ON_GPU = torch.cuda.is_available()
DEVICE = torch.device("cuda" if ON_GPU else "cpu")

# Relative error bound (max abs error / max abs value) against the fp64 reference, keyed by (activation, factor)
# dtype. fp32: reassociation only (exact in the interpreter; on a GPU with torch's default allow_tf32=False the dots
# are 3×TF32, fp32-level error). 16-bit: rounding of the output, of the generated ΔW tile and (for fp32 factors) of the
# factor tiles to the activation dtype. TF32 (allow_tf32=True, GPU only): 10-bit mantissa products.
TOLERANCES: dict[tuple[torch.dtype, torch.dtype], float] = {
    (torch.float32, torch.float32): 2e-5,
    (torch.float16, torch.float16): 2e-3,
    (torch.float16, torch.float32): 2e-3,
    (torch.bfloat16, torch.bfloat16): 1.6e-2,
    (torch.bfloat16, torch.float32): 1.6e-2,
}
TF32_TOLERANCE = 5e-3
DTYPES = [(torch.float32, torch.float32), (torch.float16, torch.float16), (torch.float16, torch.float32)]
if ON_GPU:
    DTYPES += [(torch.bfloat16, torch.bfloat16), (torch.bfloat16, torch.float32)]

# The single configs the interpreter uses; the edges below are stated in their tile sizes.
TILE_N = default_config("gemm", torch.float16)["BLOCK_N"]  # token tile of the fused forward / dX kernel
TILE_O = default_config("gemm", torch.float16)["BLOCK_O"]  # output-feature tile of the fused kernel
TILE_BAND = default_config("delta_blocks", torch.float16)["BLOCK_I"]  # 64: band-row tile of the ΔW_k generation
TILE_SCATTER_N = default_config("scatter", torch.float16)["BLOCK_N"]  # 64: token tile of the scatter kernel
EPILOGUE_ROWS = triton_blocked.EPILOGUE_BLOCK_O  # 32: band rows per program of the factor epilogue
PATHS = ["fused", "blocked"]

# (lead dims of x, d_out, d_in, K, r_k, dropout, bias, layout)
CASES = [
    ((1,), 48, 48, 2, 4, False, True, "contiguous"),  # N = 1: one token row and a padded token tile in every kernel
    ((TILE_N - 1,), 64, 64, 2, 4, False, True, "contiguous"),  # N = fused tile − 1; d = one full fused output tile
    ((TILE_N + 1,), 40, 40, 2, 4, True, True, "contiguous"),  # N = tile + 1: a second, one-row token tile; dropout
    ((9,), 96, 40, 2, 16, False, True, "contiguous"),  # d_out > d_in (tall), r_k = 16: no rank padding
    ((9,), 40, 96, 2, 1, False, False, "contiguous"),  # d_out < d_in (wide), r_k = 1 padded to 16, no bias
    ((7,), 67, 53, 3, 4, False, True, "contiguous"),  # neither dim divisible by K = 3: unequal, padded bands
    ((5,), 70, TILE_O + 1, 4, 4, True, False, "contiguous"),  # K = 4, d_in = fused tile + 1, dropout, no bias
    # K = 1 (HiRA), identity orders: one band of 100 rows/columns = 2 ΔW_k tiles, 4 epilogue programs, 2 column steps
    ((6,), 100, 100, 1, 16, False, True, "hira"),
    ((5,), 2 * TILE_BAND + 1, 70, 2, 4, False, True, "contiguous"),  # bands of 65 and 64 rows: masked ΔW_k tiles
    ((3,), 33, 29, 3, 17, False, True, "contiguous"),  # r_k = 17 > 16: rank padded to 32
    ((2,), 24, 20, 2, 40, True, False, "contiguous"),  # r_k = 40 > min(d): padded to 64, dropout
    ((2, 5), 24, 36, 3, 4, True, True, "contiguous"),  # 3-D input (batch, seq, d_in) with dropout
    ((11,), 36, 24, 2, 4, False, True, "transposed"),  # non-contiguous x: a transposed view, strides (1, N)
    ((11,), 36, 24, 2, 4, True, True, "strided"),  # non-contiguous x: a column slice of a wider tensor
    ((0,), 16, 16, 2, 4, False, True, "contiguous"),  # no tokens: empty output, zero factor gradients
    ((4,), 20, 24, 2, 0, True, True, "contiguous"),  # r_k = 0: the adapter contributes nothing (SPEC §6)
    # 3 token tiles of the scatter kernel; 2·EPILOGUE_ROWS + 3 = 67 rows: a band of 34 rows spans 2 epilogue programs
    ((2 * TILE_SCATTER_N + 1,), 2 * EPILOGUE_ROWS + 3, 18, 2, 4, True, False, "contiguous"),
]
if ON_GPU:
    CASES += [
        ((4096,), 512, 384, 4, 16, False, True, "contiguous"),  # large N, many tiles per band
        ((8, 300), 1024, 1024, 2, 16, True, True, "contiguous"),  # 3-D, large square, dropout
        ((1000,), 320, 1000, 3, 8, False, False, "contiguous"),  # wide, odd sizes, K = 3
    ]


@pytest.fixture(autouse=True, scope="module")
def _interpreter_on_cpu():
    """Run the kernels with the Triton interpreter when there is no GPU; restore the environment afterwards."""
    if ON_GPU:
        yield
        return
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("TRITON_INTERPRET", "1")
        yield


def _make_inputs(lead, d_out, d_in, K, r_k, dropout, bias, layout, dtype, factor_dtype, seed=0):
    gen = torch.Generator().manual_seed(seeded(seed))
    n_total = 1
    for size in lead:
        n_total *= size
    x = torch.randn(*lead, d_in, generator=gen)
    weight = torch.randn(d_out, d_in, generator=gen) / d_in**0.5
    problem = {
        "x": x,
        "weight": weight,
        "bias": torch.randn(d_out, generator=gen) if bias else None,
        "lora_A": torch.randn(r_k, d_in, generator=gen) / d_in**0.25,
        "lora_B": torch.randn(d_out, r_k, generator=gen) / r_k**0.5,  # non-zero B: the adapter term is exercised
        # dropout p = 0.5: the kept value 2·x is exact in every dtype, so kernel and reference see the same x_a
        "dropout_mask": (torch.rand(x.shape, generator=gen) > 0.5).double() * 2.0 if dropout else None,
        "layout": layout,
        "grad_out": torch.randn(*lead, d_out, generator=gen),
    }
    if layout == "hira":
        problem["row_order"], problem["col_order"] = torch.arange(d_out), torch.arange(d_in)
    else:
        problem["row_order"], problem["col_order"] = (
            torch.randperm(d_out, generator=gen),
            torch.randperm(d_in, generator=gen),
        )
    cast = {
        "x": dtype,
        "weight": dtype,
        "bias": dtype,
        "lora_A": factor_dtype,
        "lora_B": factor_dtype,
        "grad_out": dtype,
    }
    for name, target in cast.items():
        if problem[name] is not None:
            problem[name] = problem[name].to(target)
    problem["num_blocks"], problem["scale"] = K, 0.5
    return problem


def _run(fn, problem, dtype=None, device=DEVICE, **kwargs):
    """Forward + backward of ``fn`` with inputs cast to ``dtype`` (None: keep); returns y and the leaves' grads."""
    leaves = {}
    for name in ("x", "bias", "lora_A", "lora_B"):
        value = problem[name]
        if value is None:
            continue
        leaves[name] = value.to(device=device, dtype=dtype or value.dtype).detach().requires_grad_(True)
    weight = problem["weight"].to(device=device, dtype=dtype or problem["weight"].dtype)
    x = leaves["x"]
    if problem["layout"] == "transposed":  # same values, strides (1, N)
        x = x.t().contiguous().t()
    elif problem["layout"] == "strided":  # a column slice of a wider tensor: row stride 2·d_in
        x = torch.cat([x, torch.zeros_like(x)], dim=-1)[..., : x.shape[-1]]
    mask = problem["dropout_mask"]
    x_adapter = x if mask is None else x * mask.to(device=device, dtype=x.dtype)
    y = fn(
        x, x_adapter, weight, leaves.get("bias"), leaves["lora_A"], leaves["lora_B"],
        problem["row_order"].to(device), problem["col_order"].to(device), problem["num_blocks"], problem["scale"],
        **kwargs,
    )  # fmt: skip
    grad_out = problem["grad_out"].to(device=device, dtype=dtype or problem["grad_out"].dtype)
    y.backward(grad_out)
    return {"y": y.detach(), **{name: leaf.grad for name, leaf in leaves.items()}}


def _absolute(problem: dict) -> dict:
    """The problem with every operand replaced by its absolute value: y = x W0ᵀ + b + s·x_a ΔWᵀ and its gradients are
    sums of products with non-negative coefficients, so the reference on these inputs gives, entry by entry, the sum
    of the absolute values of every term — the most any summation order can pass through (its partial sums)."""
    return {k: v.abs() if torch.is_tensor(v) and v.is_floating_point() else v for k, v in problem.items()}


def _summation_terms(problem: dict) -> int:
    """The longest chain of sums behind any result (tokens, d_out, d_in, K·r_k): γ_n's n for fp32 accumulation."""
    return (
        problem["x"].shape[:-1].numel()
        + sum(problem["weight"].shape)
        + problem["num_blocks"] * problem["lora_A"].shape[0]
    )


def _assert_matches(actual: dict, expected: dict, tol: float, problem: dict | None = None) -> None:
    """Each result within ``tol·max|expected|`` (the rounding of inputs and outputs to the dtype, relative to the
    result) plus, given ``problem``, ``n·2⁻²⁴·max M`` for fp32 accumulation in any order: M the results of the
    absolute-valued problem (:func:`_absolute`), n the longest chain of sums (tokens + d_out + d_in + K·r_k)."""
    assert set(actual) == set(expected)
    magnitudes = {} if problem is None else _run(smoa_linear_reference, _absolute(problem), torch.float64, "cpu")
    for name, want in expected.items():
        got = actual[name]
        assert got is not None, f"no gradient for {name}"
        assert got.shape == want.shape, f"{name}: shape {tuple(got.shape)} != {tuple(want.shape)}"
        if want.numel() == 0:
            continue
        error = (got.double().cpu() - want.cpu()).abs().max().item()
        magnitude = want.abs().max().item()
        bound = tol * max(magnitude, 1e-6)
        if name in magnitudes:
            bound += _summation_terms(problem) * 2.0**-24 * magnitudes[name].max().item()
        assert error <= bound, f"{name}: max error {error:.3e} > {bound:.3e} ({tol:.1e} × {magnitude:.3e} + sums)"


def test_is_available_under_the_interpreter():
    assert is_available() == (True, "")


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("dtype, factor_dtype", DTYPES, ids=lambda d: str(d).replace("torch.", ""))
@pytest.mark.parametrize("lead, d_out, d_in, K, r_k, dropout, bias, layout", CASES)
def test_forward_and_grads_match_reference(lead, d_out, d_in, K, r_k, dropout, bias, layout, dtype, factor_dtype, path):
    problem = _make_inputs(lead, d_out, d_in, K, r_k, dropout, bias, layout, dtype, factor_dtype)
    expected = _run(smoa_linear_reference, problem, dtype=torch.float64, device="cpu")
    actual = _run(smoa_linear_triton, problem, path=path)
    assert actual["y"].dtype == dtype and actual["x"].dtype == dtype and actual["lora_A"].dtype == factor_dtype
    _assert_matches(actual, expected, TOLERANCES[(dtype, factor_dtype)], problem)


# "auto" on a few shapes (at these sizes the cost model picks "fused"; the dispatch test below forces both choices)
@pytest.mark.parametrize("lead, d_out, d_in, K, r_k, dropout, bias, layout", [CASES[5], CASES[7], CASES[11]])
def test_auto_path_matches_reference(lead, d_out, d_in, K, r_k, dropout, bias, layout):
    problem = _make_inputs(lead, d_out, d_in, K, r_k, dropout, bias, layout, torch.float32, torch.float32)
    expected = _run(smoa_linear_reference, problem, dtype=torch.float64, device="cpu")
    _assert_matches(_run(smoa_linear_triton, problem, path="auto"), expected, TOLERANCES[(torch.float32,) * 2],
                    problem)  # fmt: skip


# Relative error of the adapter term against its own magnitude: ΔW_k and the adapter product are rounded to the
# activation dtype once each (fp16: 2⁻¹¹ each, a few roundings in all); fp32 only reassociates.
ADAPTER_TOLERANCES = {torch.float32: 1e-5, torch.float16: 4e-3, torch.bfloat16: 3e-2}


def _adapter_term_ok(y, base, expected_adapter, dtype, problem) -> tuple[bool, float, float]:
    """``(ok, error, bound)`` for the adapter term ``y − (x W0ᵀ + b)`` against the fp64 reference's. The bound is
    derived from the adapter's own magnitude plus the unavoidable rounding of y to the activation dtype (half an
    ulp of |y|, twice: the adapter + bias rounded, then the sum) and the fp32 accumulation of the base and adapter dots
    in any order (n·2⁻²⁴ of |x||W0|ᵀ + |b| + s·|x_a||ΔW|ᵀ, :func:`_assert_matches`) — not from the base term's size."""
    error = (y - base - expected_adapter).abs().max().item()
    rounding_y = 2 * torch.finfo(dtype).eps * y.abs().max().item()
    magnitude = _run(smoa_linear_reference, _absolute(problem), torch.float64, "cpu")["y"].max().item()
    summed = _summation_terms(problem) * 2.0**-24 * magnitude
    bound = ADAPTER_TOLERANCES[dtype] * expected_adapter.abs().max().item() + rounding_y + summed
    return error <= bound, error, bound


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("dtype, factor_dtype", DTYPES[:3], ids=lambda d: str(d).replace("torch.", ""))
@pytest.mark.parametrize("dropout", [False, True])
def test_adapter_term_alone_matches_reference(dtype, factor_dtype, path, dropout):
    # A small update next to the base term (≈ 10% of it, as a few steps after B = 0): the adapter term
    # y − (x W0ᵀ + b) must be right on its own scale, and the check must fail if the adapter were dropped or halved.
    problem = _make_inputs((TILE_N + 1,), 50, 45, 3, 4, dropout, True, "contiguous", dtype, factor_dtype)
    problem["lora_B"] = problem["lora_B"] * 0.1
    x, weight, bias = problem["x"], problem["weight"], problem["bias"]
    base = torch.nn.functional.linear(x.double(), weight.double(), bias.double())
    expected_adapter = _run(smoa_linear_reference, problem, dtype=torch.float64, device="cpu")["y"] - base
    y = _run(smoa_linear_triton, problem, path=path)["y"].double().cpu()
    ok, error, bound = _adapter_term_ok(y, base, expected_adapter, dtype, problem)
    assert ok, f"adapter term error {error:.3e} > bound {bound:.3e}"
    # the bound is tight enough to see a wrong adapter: half of it, or none (base alone rounded to the dtype)
    assert bound < 0.25 * expected_adapter.abs().max().item()
    halved = y - 0.5 * (y - base)
    dropped = base.to(dtype).double()
    assert not _adapter_term_ok(halved, base, expected_adapter, dtype, problem)[0], "a halved adapter would pass"
    assert not _adapter_term_ok(dropped, base, expected_adapter, dtype, problem)[0], "a dropped adapter would pass"


@pytest.mark.parametrize("dtype, factor_dtype", DTYPES[:2], ids=lambda d: str(d).replace("torch.", ""))
def test_adapter_term_check_catches_a_kernel_that_halves_the_adapter(monkeypatch, dtype, factor_dtype):
    # A mutation of the real code path (not of the numbers): the blocked path's ΔW_k generation at half the scale.
    problem = _make_inputs((TILE_N + 1,), 50, 45, 3, 4, False, True, "contiguous", dtype, factor_dtype)
    problem["lora_B"] = problem["lora_B"] * 0.1
    x, weight, bias = problem["x"], problem["weight"], problem["bias"]
    base = torch.nn.functional.linear(x.double(), weight.double(), bias.double())
    expected_adapter = _run(smoa_linear_reference, problem, dtype=torch.float64, device="cpu")["y"] - base
    real = triton_blocked.delta_blocks
    monkeypatch.setattr(triton_blocked, "delta_blocks", lambda w, a, b, o, k, scale: real(w, a, b, o, k, scale / 2))
    y = _run(smoa_linear_triton, problem, path="blocked")["y"].double().cpu()
    assert not _adapter_term_ok(y, base, expected_adapter, dtype, problem)[0]


def test_merged_weight_fast_path_matches_reference():
    # Opt-in single-dot path of the fused kernel (W0 + s·ΔW formed in registers); exact up to rounding in fp32.
    problem = _make_inputs((TILE_N + 1,), 70, 53, 3, 4, False, True, "contiguous", torch.float32, torch.float32)
    expected = _run(smoa_linear_reference, problem, dtype=torch.float64, device="cpu")
    for path in ("auto", "fused"):
        actual = _run(smoa_linear_triton, problem, merged_weight=True, path=path)
        _assert_matches(actual, expected, TOLERANCES[(torch.float32, torch.float32)], problem)


@pytest.mark.parametrize("path", PATHS)
def test_results_are_bitwise_reproducible(path):
    problem = _make_inputs((TILE_N + 3,), 70, 66, 2, 4, True, True, "contiguous", torch.float32, torch.float32)
    first = _run(smoa_linear_triton, problem, path=path)
    second = _run(smoa_linear_triton, problem, path=path)
    for name in first:
        assert torch.equal(first[name], second[name]), name


@pytest.mark.skipif(
    not ON_GPU or not os.environ.get("CUBLAS_WORKSPACE_CONFIG"),
    reason="GPU only; deterministic cuBLAS needs CUBLAS_WORKSPACE_CONFIG (e.g. :4096:8) set before the process starts",
)
@pytest.mark.parametrize("path", PATHS)
def test_bitwise_reproducible_under_deterministic_algorithms(path):
    problem = _make_inputs((300,), 256, 200, 2, 16, True, True, "contiguous", torch.bfloat16, torch.float32)
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        first = _run(smoa_linear_triton, problem, path=path)
        second = _run(smoa_linear_triton, problem, path=path)
    finally:
        torch.use_deterministic_algorithms(previous)
    for name in first:
        assert torch.equal(first[name], second[name]), name


@pytest.mark.parametrize("path", PATHS)
def test_only_requested_gradients_are_computed(path):
    problem = _make_inputs((5,), 20, 18, 2, 4, False, True, "contiguous", torch.float32, torch.float32)
    x = problem["x"].to(DEVICE)  # no grad for x
    lora_A = problem["lora_A"].to(DEVICE).requires_grad_(True)
    lora_B = problem["lora_B"].to(DEVICE)  # frozen B
    y = smoa_linear_triton(x, x, problem["weight"].to(DEVICE), None, lora_A, lora_B, problem["row_order"].to(DEVICE),
                           problem["col_order"].to(DEVICE), 2, 0.5, path=path)  # fmt: skip
    y.sum().backward()
    assert lora_A.grad is not None and lora_A.grad.shape == lora_A.shape
    assert lora_B.grad is None


@pytest.mark.parametrize("path", PATHS)
def test_frozen_factors_still_give_the_input_gradient(path):
    # No factor needs a gradient: nothing is saved for the factor gradient, dx still carries the adapter term.
    problem = _make_inputs((7,), 30, 26, 2, 4, True, True, "contiguous", torch.float32, torch.float32)
    expected = _run(smoa_linear_reference, problem, dtype=torch.float64, device="cpu")
    for name in ("lora_A", "lora_B", "bias"):
        problem[name] = problem[name].detach()
    x = problem["x"].to(DEVICE).requires_grad_(True)
    x_adapter = x * problem["dropout_mask"].to(device=DEVICE, dtype=x.dtype)
    y = smoa_linear_triton(x, x_adapter, problem["weight"].to(DEVICE), problem["bias"].to(DEVICE),
                           problem["lora_A"].to(DEVICE), problem["lora_B"].to(DEVICE), problem["row_order"].to(DEVICE),
                           problem["col_order"].to(DEVICE), 2, 0.5, path=path)  # fmt: skip
    y.backward(problem["grad_out"].to(DEVICE))
    _assert_matches({"y": y.detach(), "x": x.grad}, {"y": expected["y"], "x": expected["x"]},
                    TOLERANCES[(torch.float32, torch.float32)], problem)  # fmt: skip


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("dropout", [False, True])
def test_what_is_saved_for_backward(path, dropout):
    # No dropout: x itself (no new N×d_in tensor, as LoRA); dropout: x_a in the token-minor padded bands instead of x_a.
    # Nothing D²-sized either way (ΔW_k is regenerated in backward).
    problem = _make_inputs((9,), 30, 67, 3, 4, dropout, True, "contiguous", torch.float32, torch.float32)
    x = problem["x"].to(DEVICE).requires_grad_(True)
    x_adapter = x * problem["dropout_mask"].to(DEVICE, x.dtype) if dropout else x
    lora_A = problem["lora_A"].to(DEVICE).requires_grad_(True)
    saved = []

    def pack(tensor):
        saved.append(tensor)
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        orders = problem["row_order"].to(DEVICE), problem["col_order"].to(DEVICE)
        weight, lora_B = problem["weight"].to(DEVICE), problem["lora_B"].to(DEVICE)
        smoa_linear_triton(x, x_adapter, weight, None, lora_A, lora_B, *orders, 3, 0.5, path=path)
    activations = [t for t in saved if t.dim() == 2 and t.shape[0] == 9]
    if dropout:  # the mask multiply saves the mask; the kernels' saved tensor is the gathered x_a: 3 bands of 23 → 96
        # rows (token-minor), 9 tokens → a row stride of 16
        assert any(t.shape == (96, 16) for t in saved), [t.shape for t in saved]
    else:
        assert [t.data_ptr() for t in activations] == [x.data_ptr()], [t.shape for t in activations]
    # besides W0 itself: the orders, their inverses, the flag and the permuted factors the forward hands to backward
    assert all(t.numel() < 30 * 67 for t in saved if not (t.dim() and t.shape[0] == 9) and tuple(t.shape) != (30, 67))


def test_custom_ops_are_registered_with_fake_impls():
    from torch._subclasses.fake_tensor import FakeTensorMode

    assert hasattr(torch.ops.smoa_kernels, "triton_forward") and hasattr(torch.ops.smoa_kernels, "triton_backward")
    with FakeTensorMode():
        x, weight = torch.empty(7, 12), torch.empty(10, 67)
        x = torch.empty(7, 67)
        lora_A, lora_B = torch.empty(4, 67), torch.empty(10, 4)
        orders = torch.empty(10, dtype=torch.int64), torch.empty(67, dtype=torch.int64)
        for path in ("auto", "fused", "blocked"):
            y, xa_bands, *state = torch.ops.smoa_kernels.triton_forward(
                x, None, weight, None, lora_A, lora_B, *orders, 3, 0.5, path, False, True, True
            )
            # 67 columns in 3 bands of 23, 22, 22, each padded to 32: the saved x_a is 96 token-minor rows of 16
            assert y.shape == (7, 10) and xa_bands.shape == (96, 16)
            # the step's state: both orders clamped and inverted, the flag, col_order's band index, Â and B̂ permuted
            assert [tuple(t.shape) for t in state] == [(10,), (67,), (10,), (67,), (), (96,), (4, 96), (10, 4)]
            _, nothing, *state = torch.ops.smoa_kernels.triton_forward(
                x, None, weight, None, lora_A, lora_B, *orders, 3, 0.5, path, False, False, False
            )
            assert nothing.shape == (0,) and all(t.shape == (0,) for t in state)
            grads = torch.ops.smoa_kernels.triton_backward(
                y,
                xa_bands,
                False,
                weight,
                lora_A,
                lora_B,
                *orders,
                state,
                3,
                0.5,
                path,
                False,
                [True, True, False, True, False],
            )
            assert [tuple(g.shape) for g in grads] == [(7, 67), (7, 67), (0,), (4, 67), (0,)]


# On the CPU, "aot_eager" traces the Function and the custom ops with fake tensors (fake impls only) and then runs the
# real ops eagerly under the interpreter; inductor would generate CPU code around them, which adds nothing here.
COMPILE_BACKEND = "inductor" if ON_GPU else "aot_eager"


@pytest.mark.parametrize("path", ["auto", *PATHS])
def test_torch_compile_traces_through_in_one_graph(path):
    problem = _make_inputs((33,), 64, 48, 2, 4, True, True, "contiguous", torch.float32, torch.float32)
    expected = _run(smoa_linear_reference, problem, dtype=torch.float64, device="cpu")
    compiled = torch.compile(smoa_linear_triton, backend=COMPILE_BACKEND, fullgraph=True)
    actual = _run(compiled, problem, path=path)
    _assert_matches(actual, expected, TOLERANCES[(torch.float32, torch.float32)], problem)


@pytest.mark.parametrize("choice", PATHS)
def test_auto_asks_the_cost_model_per_call_with_the_token_count(monkeypatch, choice):
    # "auto" follows cost_model.choose_path (called inside the custom op with N = tokens), and the chosen path is the
    # one whose kernels run: the fused GEMM, or the blocked path's ΔW_k generation and scatter (never the fused GEMM).
    from smoa_kernels import cost_model

    calls, launched = [], []
    monkeypatch.setattr(cost_model, "choose_path", lambda *args, **kwargs: calls.append(args) or choice)
    real_launch = triton_configs.launch
    monkeypatch.setattr(
        triton_configs, "launch", lambda name, *a, **k: launched.append(name) or real_launch(name, *a, **k)
    )
    problem = _make_inputs((3, 7), 30, 26, 2, 4, True, True, "contiguous", torch.float32, torch.float32)
    expected = _run(smoa_linear_reference, problem, dtype=torch.float64, device="cpu")
    actual = _run(smoa_linear_triton, problem, path="auto")
    _assert_matches(actual, expected, TOLERANCES[(torch.float32, torch.float32)], problem)
    assert calls and all(args[:4] == (21, 30, 26, 2) for args in calls), calls  # forward and backward: N = 3·7
    forward_kernels = {"fused": {"gemm"}, "blocked": {"delta_blocks", "scatter"}}[choice]
    other = {"fused": {"scatter"}, "blocked": {"gemm"}}[choice]  # (both gather the anchors for the factor gradient)
    assert forward_kernels <= set(launched) and not other & set(launched), launched
    assert "factor_epilogue" in launched  # the factor gradient is the blocked one on both paths


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize(
    "make_bad",
    [
        lambda order: torch.zeros_like(order),  # duplicates: not a permutation
        lambda order: order.clone().index_fill_(0, torch.tensor([0]), 10**9),  # far out of range
        lambda order: order.clone().index_fill_(0, torch.tensor([1]), -5),  # negative
    ],
    ids=["duplicates", "out-of-range", "negative"],
)
def test_an_order_that_is_not_a_permutation_gives_nan_never_a_wrong_number(path, make_bad):
    # The call-side guard: no host sync, every index clamped (memory-safe), and a device-side check that poisons the
    # factors, so the output and every gradient are NaN instead of a plausible wrong answer.
    problem = _make_inputs((6,), 20, 18, 2, 4, True, True, "contiguous", torch.float32, torch.float32)
    problem["col_order"] = make_bad(problem["col_order"])
    actual = _run(smoa_linear_triton, problem, path=path)
    for name in ("y", "x", "lora_A", "lora_B"):
        assert torch.isnan(actual[name]).all(), name
    problem = _make_inputs((6,), 20, 18, 2, 4, False, True, "contiguous", torch.float32, torch.float32)
    problem["row_order"] = make_bad(problem["row_order"])
    assert torch.isnan(_run(smoa_linear_triton, problem, path=path)["y"]).all()


@pytest.mark.skipif(ON_GPU, reason="the interpreter's bf16 limitation; bf16 runs natively on a GPU")
def test_bf16_is_refused_under_the_interpreter():
    args = _good_args()
    # bf16 activations with fp32 factors, and everything in bf16
    for names in (("x", "x_adapter", "weight", "bias"), ("x", "x_adapter", "weight", "bias", "lora_A", "lora_B")):
        bad = dict(args)
        for name in names:
            bad[name] = args[name].bfloat16()
        if "x" in names:
            bad["x_adapter"] = bad["x"]
        with pytest.raises(TypeError, match=r"bfloat16 cannot run under the Triton interpreter"):
            _call(bad)


@pytest.mark.skipif(not ON_GPU, reason="TF32 exists on GPUs only; the interpreter computes exact fp32")
@pytest.mark.parametrize("path", PATHS)
def test_tf32_follows_allow_tf32(monkeypatch, path):
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", True)
    problem = _make_inputs((300,), 256, 200, 2, 16, True, True, "contiguous", torch.float32, torch.float32)
    expected = _run(smoa_linear_reference, problem, dtype=torch.float64, device="cpu")
    _assert_matches(_run(smoa_linear_triton, problem, path=path), expected, TF32_TOLERANCE, problem)


@pytest.mark.skipif(not ON_GPU, reason="autocast of CUDA tensors needs a GPU")
@pytest.mark.parametrize("path", PATHS)
def test_autocast_runs_in_the_autocast_dtype(path):
    problem = _make_inputs((17,), 64, 48, 2, 4, False, True, "contiguous", torch.float32, torch.float32)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        actual = _run(smoa_linear_triton, problem, path=path)
    assert actual["y"].dtype == torch.bfloat16 and actual["lora_A"].dtype == torch.float32
    expected = _run(smoa_linear_reference, problem, dtype=torch.float64, device="cpu")
    _assert_matches({k: v for k, v in actual.items() if k != "x"}, {k: v for k, v in expected.items() if k != "x"},
                    TOLERANCES[(torch.bfloat16, torch.float32)], problem)  # fmt: skip


@pytest.mark.skipif(
    not ON_GPU or torch.cuda.get_device_properties(0).total_memory < 40 * 2**30,
    reason="needs a GPU with ≥ 40 GB: tensors above 2³¹ elements exercise the int64 offsets",
)
@pytest.mark.parametrize("path", PATHS)
def test_int64_offsets_beyond_two_gigaelements(path):
    # x and y have (2²⁰ + 64)·2048 > 2³¹ elements; rows are independent in the forward and in dX, so the last rows
    # (whose offsets overflow int32) are compared with the reference on those rows alone. The blocked path's Zᵀ/Uᵀ
    # buffers (d × N) and gathered bands exceed 2³¹ elements too.
    n_rows, d_in, d_out, K, r_k = 2**20 + 64, 2048, 2048, 2, 16
    problem = _make_inputs((64,), d_out, d_in, K, r_k, False, False, "contiguous", torch.bfloat16, torch.float32)
    tail = problem["x"].to(DEVICE)
    x = torch.zeros(n_rows, d_in, dtype=torch.bfloat16, device=DEVICE)
    x[-64:] = tail
    x.requires_grad_(True)
    grad_out = torch.zeros(n_rows, d_out, dtype=torch.bfloat16, device=DEVICE)
    grad_out[-64:] = problem["grad_out"].to(DEVICE)
    args = (problem["weight"].to(DEVICE), None, problem["lora_A"].to(DEVICE), problem["lora_B"].to(DEVICE),
            problem["row_order"].to(DEVICE), problem["col_order"].to(DEVICE), K, 0.5)  # fmt: skip
    y = smoa_linear_triton(x, x, *args, path=path)
    y.backward(grad_out)
    expected = _run(smoa_linear_reference, problem, dtype=torch.float64, device="cpu")
    tol = TOLERANCES[(torch.bfloat16, torch.float32)]
    _assert_matches({"y": y.detach()[-64:], "x": x.grad[-64:]}, {"y": expected["y"], "x": expected["x"]}, tol,
                    problem)  # fmt: skip


# ---------------------------------------------------------------------------------------------------------------------
# Bad input: a clear error before any launch
# ---------------------------------------------------------------------------------------------------------------------


def _good_args():
    problem = _make_inputs((4,), 12, 10, 2, 4, False, True, "contiguous", torch.float32, torch.float32)
    args = {name: problem[name] for name in ("x", "weight", "bias", "lora_A", "lora_B", "row_order", "col_order")}
    args = {name: value.to(DEVICE) for name, value in args.items()}
    args["x_adapter"] = args["x"]
    args["num_blocks"], args["scale"] = 2, 0.5
    return args


ARG_NAMES = ("x", "x_adapter", "weight", "bias", "lora_A", "lora_B", "row_order", "col_order", "num_blocks", "scale")


def _call(args, **kwargs):
    return smoa_linear_triton(*(args[name] for name in ARG_NAMES), **kwargs)


def test_good_args_run():
    assert _call(_good_args()).shape == (4, 12)


@pytest.mark.parametrize(
    "change, error, match",
    [
        (lambda a: a.update(x=a["x"].half(), x_adapter=a["x"].half()), TypeError, "x.dtype=torch.float16"),
        (lambda a: a.update(x_adapter=a["x"].double()), TypeError, "x_adapter.dtype"),
        (
            lambda a: a.update(weight=a["weight"].double(), x=a["x"].double(), x_adapter=a["x"].double()),
            TypeError,
            "weight.dtype=torch.float64",
        ),
        (lambda a: a.update(lora_A=a["lora_A"].half()), TypeError, "lora_A.dtype=torch.float16"),
        (lambda a: a.update(lora_A=a["lora_A"].half(), lora_B=a["lora_B"].half()), TypeError, "factor dtype"),
        (lambda a: a.update(x=a["x"][:, :9], x_adapter=a["x"][:, :9]), ValueError, r"x.shape=\(4, 9\)"),
        (lambda a: a.update(x_adapter=a["x"][:3]), ValueError, "x_adapter.shape"),
        (lambda a: a.update(lora_A=a["lora_A"][:, :9]), ValueError, r"lora_A.shape=\(4, 9\)"),
        (lambda a: a.update(lora_B=a["lora_B"][:, :3]), ValueError, r"lora_B.shape=\(12, 3\)"),
        (lambda a: a.update(bias=a["bias"][:5]), ValueError, "bias must have shape"),
        (lambda a: a.update(row_order=a["row_order"][:5]), ValueError, "row_order must be"),
        (lambda a: a.update(col_order=a["col_order"].int()), ValueError, "col_order must be"),
        (lambda a: a.update(num_blocks=11), ValueError, "num_blocks=11"),
        (lambda a: a.update(num_blocks=0), ValueError, "num_blocks=0"),
        (lambda a: a.update(num_blocks=2.0), TypeError, "num_blocks must be an int"),
        (lambda a: a.update(scale="1"), TypeError, "scale must be"),
        (lambda a: a.update(weight=a["weight"].to("meta")), ValueError, "weight is on meta"),
        (lambda a: a.update(lora_B=a["lora_B"].to("meta")), ValueError, "lora_B is on meta"),
        (lambda a: a.update(weight=a["weight"].clone().requires_grad_(True)), ValueError, "weight.requires_grad"),
        (lambda a: a.update(x=None), TypeError, "x must be a torch.Tensor"),
    ],
)
def test_bad_input_raises_before_launch(change, error, match):
    args = _good_args()
    change(args)
    with pytest.raises(error, match=match):
        _call(args)


def test_merged_weight_with_dropout_is_refused():
    args = _good_args()
    args["x_adapter"] = args["x"] * 2
    with pytest.raises(ValueError, match="merged_weight=True requires"):
        _call(args, merged_weight=True)


@pytest.mark.parametrize("path", ["Blocked", "permuted", "original", 1, None])
def test_unknown_paths_are_refused(path):
    with pytest.raises(ValueError, match="path="):
        _call(_good_args(), path=path)


def test_merged_weight_on_the_blocked_path_is_refused():
    with pytest.raises(ValueError, match="cannot be combined with path='blocked'"):
        _call(_good_args(), merged_weight=True, path="blocked")


@pytest.mark.skipif(ON_GPU, reason="checks the CPU error message; on a GPU machine CPU tensors are simply refused")
def test_cpu_tensors_without_interpreter_are_refused(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert is_available()[0] is False
    with pytest.raises(ValueError, match="x is a CPU tensor"):
        _call(_good_args())


def test_kernel_mode_is_read_at_launch_not_import():
    # The module never fixes TRITON_INTERPRET for other code: importing it leaves the environment untouched.
    assert triton_configs._interpreting() == (not ON_GPU)
