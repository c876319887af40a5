"""The fused single-pass GEMM launcher ``smoa_kernels.triton.fused._gemm`` against the float64 reference.

Forward (``y = x W0ᵀ + b + s·x_a ΔWᵀ``), dX (``dY (W0 + s·ΔW)``, transposed pass), dX_a (``s·dY ΔW``, no base dot) and
the merged fast path, on edge shapes: N = 1, K ∈ {1, 2, 3}, sizes not divisible by K or by the tiles, d_out ≠ d_in,
r_k ∈ {0, 1, 16, 40}. On a CPU the kernel runs under the Triton interpreter (fp32 and fp16; bf16 only on a GPU: the
interpreter stores bf16 as uint16, KERNELS.md §5).

Two checks per result, both scaled by what the operands can produce (``M = |x||W0|ᵀ + |b| + |x_a||s·ΔW|ᵀ``, the
largest value any summation order of the output can pass through), never by a computed value that can be ~0: the whole
output within ``tol·max M``, and the adapter term alone (``y − x W0ᵀ − b``) within a first-order rounding bound: the
activation dtype's unit roundoff u for each of the factors, the rank product, the ΔW tile and the output, plus
``(d + rank + 3)·2⁻²⁴·M`` for fp32 products and accumulation in any order (twice that, for margin). The test first
asserts that this bound is below a quarter of the adapter term itself, so dropping or halving the adapter must fail
it; :func:`test_adapter_check_fails_when_the_adapter_is_dropped_or_halved` proves that on the kernel's own output.
Whether the adapter is zero (r_k = 0, B̂ = 0) is decided from the inputs, never from ``y − base`` (two differently
ordered float64 sums that differ by ~1e-16 on one machine and by 0 on another).
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton", reason="triton is not installed: the fused kernel cannot run")

from smoa_kernels.blocks import block_ids
from smoa_kernels.reference import dense_delta_weight, smoa_linear_reference
from smoa_kernels.triton import configs
from smoa_kernels.triton.fused import _block_factors, _gemm
from tests.utils import seeded

ON_GPU = torch.cuda.is_available()
DEVICE = torch.device("cuda" if ON_GPU else "cpu")
DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if ON_GPU else [])
UNIT_ROUNDOFF = {torch.float32: 2.0**-24, torch.float16: 2.0**-11, torch.bfloat16: 2.0**-8}
ACCUMULATE = 2.0**-24  # every dot accumulates in fp32; float64 (the reference's own sums) is 2⁻⁵³
# Whole-output bound relative to max M, the operands' magnitude (the adapter-alone check is the strict one).
TOLERANCE = {torch.float32: 1e-5, torch.float16: 4e-3, torch.bfloat16: 3e-2}
if ON_GPU and torch.backends.cuda.matmul.allow_tf32:
    UNIT_ROUNDOFF[torch.float32] = TOLERANCE[torch.float32] = 2.0**-11  # one TF32 product per dot

TILE = configs.default_config("gemm", torch.float16)  # the interpreter's single config: edges are stated in it
TILE_O, TILE_R = TILE["BLOCK_O"], TILE["BLOCK_R"]

# (N, d_out, d_in, K, r_k)
CASES = [
    (1, 48, 40, 2, 4),  # N = 1: one token, a 1-row tile
    (5, TILE_O + 3, 2 * TILE_R + 5, 3, 1),  # d_out ≠ d_in, neither divisible by K = 3 nor by the tiles; r_k = 1
    (9, 37, 29, 1, 16),  # K = 1 (HiRA), odd sizes, r_k = 16: no rank padding per block
    (3, 33, 36, 2, 40),  # r_k = 40 > min(d): block-extended rank 80, padded to 128
    (4, 20, 24, 2, 0),  # r_k = 0: the adapter contributes nothing (SPEC §6)
]


@pytest.fixture(autouse=True, scope="module")
def _interpreter_on_cpu():
    if ON_GPU:
        yield
        return
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("TRITON_INTERPRET", "1")
        yield


def _problem(n, d_out, d_in, K, r_k, dtype, seed=0, identity=False):
    gen = torch.Generator().manual_seed(seeded(seed))
    p = {
        "x": torch.randn(n, d_in, generator=gen),
        "x_adapter": torch.randn(n, d_in, generator=gen),  # the dropout case: an unrelated x_a
        "dy": torch.randn(n, d_out, generator=gen),
        "weight": torch.randn(d_out, d_in, generator=gen) / d_in**0.5,
        "bias": torch.randn(d_out, generator=gen),
        # |B̂Â| of order 1 so that the adapter term is of the base term's order (a meaningful adapter-alone bound)
        "lora_A": torch.randn(r_k, d_in, generator=gen) / max(r_k, 1) ** 0.25,
        "lora_B": torch.randn(d_out, r_k, generator=gen) / max(r_k, 1) ** 0.25,
    }
    p = {k: v.to(dtype) for k, v in p.items()}  # factors in the activation dtype: the reference then sees the same
    if identity:
        p["row_order"], p["col_order"] = torch.arange(d_out), torch.arange(d_in)
    else:
        p["row_order"], p["col_order"] = torch.randperm(d_out, generator=gen), torch.randperm(d_in, generator=gen)
    p["num_blocks"], p["scale"] = K, 0.5
    return p


def _launch(p, *, transpose=False, has_base=True, merged=False, dropout=False, bias=True, factor_dtype=None):
    dev = {k: v.to(DEVICE) if torch.is_tensor(v) else v for k, v in p.items()}
    A, B = dev["lora_A"], dev["lora_B"]
    if factor_dtype is not None:
        A, B = A.to(factor_dtype), B.to(factor_dtype)
    blk_row, blk_col = block_ids(dev["row_order"], p["num_blocks"]), block_ids(dev["col_order"], p["num_blocks"])
    if transpose:
        out = _gemm(dev["dy"], None, dev["weight"], None, A, B, blk_col, blk_row, p["scale"],
                    transpose=True, has_base=has_base, merged=False, num_blocks=p["num_blocks"])  # fmt: skip
    else:
        xa = dev["x_adapter"] if dropout else None
        out = _gemm(dev["x"], xa, dev["weight"], dev["bias"] if bias else None, B, A, blk_row, blk_col, p["scale"],
                    transpose=False, has_base=has_base, merged=merged, num_blocks=p["num_blocks"])  # fmt: skip
    return out.cpu().double()


def _expected(p, *, transpose=False, has_base=True, dropout=False, bias=True):
    """(expected output, its base term, its adapter term, the operands' magnitudes) in float64.

    The adapter term is exactly zero when the inputs make it so (r_k = 0 or B̂ = 0 or Â = 0), otherwise
    ``y_ref − base``. Magnitudes: ``base`` and ``adapter`` (the largest entry of ``|x||W0|ᵀ + |b|`` and of
    ``|x_a||s·ΔW|ᵀ``), ``reduction`` (the dots' length) and ``rank`` (the block-extended rank K·r_k)."""
    d = {k: v.double() if torch.is_tensor(v) and v.is_floating_point() else v for k, v in p.items()}
    delta = p["scale"] * dense_delta_weight(d["weight"], d["lora_A"], d["lora_B"], d["row_order"], d["col_order"],
                                            p["num_blocks"])  # fmt: skip
    adapter_is_zero = p["lora_A"].shape[0] == 0 or not p["lora_A"].any() or not p["lora_B"].any()
    rank = p["num_blocks"] * p["lora_A"].shape[0]
    if transpose:
        base = d["dy"] @ d["weight"] if has_base else torch.zeros(d["dy"].shape[0], d["weight"].shape[1])
        adapter = torch.zeros_like(base) if adapter_is_zero else d["dy"] @ delta
        base_size = d["dy"].abs() @ d["weight"].abs() if has_base else base.abs()
        magnitudes = {"base": base_size, "adapter": d["dy"].abs() @ delta.abs(), "reduction": d["weight"].shape[0]}
        return base.double() + adapter, base.double(), adapter, dict(magnitudes, rank=rank)
    xa = d["x_adapter"] if dropout else d["x"]
    b = d["bias"] if bias else None
    y = smoa_linear_reference(d["x"], xa, d["weight"], b, d["lora_A"], d["lora_B"], d["row_order"], d["col_order"],
                              p["num_blocks"], p["scale"])  # fmt: skip
    base = d["x"] @ d["weight"].T + (b if bias else 0)
    base_size = d["x"].abs() @ d["weight"].abs().T + (b.abs() if bias else 0)
    adapter = torch.zeros_like(y) if adapter_is_zero else y - base
    if not has_base:
        y, base, base_size = adapter, torch.zeros_like(base), torch.zeros_like(base)
    magnitudes = {"base": base_size, "adapter": xa.abs() @ delta.abs().T, "reduction": d["weight"].shape[1]}
    return y, base, adapter, dict(magnitudes, rank=rank)


def _adapter_bound(dtype, magnitudes, merged=False):
    """Twice the first-order rounding bound on ``(y − base) − adapter`` for any summation order (module docstring)."""
    u = UNIT_ROUNDOFF[dtype]
    total = float((magnitudes["base"] + magnitudes["adapter"]).max())
    adapter = float(magnitudes["adapter"].max())
    terms = magnitudes["reduction"] + magnitudes["rank"] + 3
    rounded = u * total * (2 if merged else 1) + 4 * u * adapter  # output (and W0 + s·ΔW); U, P, Δ and margin
    summed = terms * (ACCUMULATE * total + 2.0**-53 * total)  # fp32 dots in the kernel, fp64 sums in the reference
    return 2 * (rounded + summed)


def _adapter_ok(actual, base, adapter, bound):
    return float(((actual - base) - adapter).abs().max()) <= bound


def _check(actual, dtype, expected, base, adapter, magnitudes, merged=False):
    assert actual.shape == expected.shape
    assert torch.isfinite(actual).all()
    err = float((actual - expected).abs().max())
    total = float((magnitudes["base"] + magnitudes["adapter"]).max())
    assert err <= TOLERANCE[dtype] * total, (err, total)
    bound = _adapter_bound(dtype, magnitudes, merged)
    if adapter.any():  # the bound must be able to see a halved adapter: otherwise the check below proves nothing
        assert bound < 0.25 * float(adapter.abs().max()), (bound, float(adapter.abs().max()))
    # r_k = 0 (adapter exactly zero by the inputs): the output must be the base term within the same bound
    assert _adapter_ok(actual, base, adapter, bound), (float(((actual - base) - adapter).abs().max()), bound)


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).replace("torch.", ""))
@pytest.mark.parametrize("n, d_out, d_in, K, r_k", CASES)
def test_forward_matches_reference(n, d_out, d_in, K, r_k, dtype):
    p = _problem(n, d_out, d_in, K, r_k, dtype, identity=K == 1)
    _check(_launch(p), dtype, *_expected(p))


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).replace("torch.", ""))
@pytest.mark.parametrize("n, d_out, d_in, K, r_k", CASES[:4])
def test_dx_matches_dense_delta_weight(n, d_out, d_in, K, r_k, dtype):
    # dX = dY (W0 + s·ΔW): the same tensors read through swapped strides
    p = _problem(n, d_out, d_in, K, r_k, dtype, seed=1)
    _check(_launch(p, transpose=True), dtype, *_expected(p, transpose=True))


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).replace("torch.", ""))
def test_dx_adapter_without_base(dtype):
    # the dropout case's separate pass: s·dY ΔW only (has_base=False)
    p = _problem(6, 45, 70, 2, 16, dtype, seed=2)
    _check(_launch(p, transpose=True, has_base=False), dtype, *_expected(p, transpose=True, has_base=False))


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).replace("torch.", ""))
def test_forward_with_dropout_and_without_bias(dtype):
    p = _problem(7, 40, 66, 3, 4, dtype, seed=3)
    _check(_launch(p, dropout=True, bias=False), dtype, *_expected(p, dropout=True, bias=False))


def test_forward_fp16_activations_with_fp32_factors():
    # the recommended recipe's dtype mix: the launcher casts the factors once to the activation dtype
    p = _problem(3, 50, 34, 2, 8, torch.float16, seed=4)
    _check(_launch(p, factor_dtype=torch.float32), torch.float16, *_expected(p))


def test_merged_fast_path_matches_reference():
    # merged=True forms W0 + s·ΔW in registers before one dot (fp32: no rounding at W0's magnitude)
    p = _problem(5, 36, 44, 2, 4, torch.float32, seed=5)
    _check(_launch(p, merged=True), torch.float32, *_expected(p), merged=True)


def test_adapter_check_fails_when_the_adapter_is_dropped_or_halved():
    # the mutation check: the adapter-alone bound rejects the kernel's output with its adapter term removed or halved
    for dtype in DTYPES:
        p = _problem(5, 40, 48, 2, 4, dtype, seed=6)
        actual = _launch(p)
        _, base, adapter, magnitudes = _expected(p)
        bound = _adapter_bound(dtype, magnitudes)
        assert _adapter_ok(actual, base, adapter, bound)
        assert not _adapter_ok(base + 0.5 * (actual - base), base, adapter, bound)  # halved
        assert not _adapter_ok(base, base, adapter, bound)  # dropped
        assert not _adapter_ok(actual - 0.1 * adapter, base, adapter, bound)  # 10% too small


_default = configs.default_config  # the other kernels (the operands kernel) keep their own config


def test_every_shipped_config_is_correct_under_the_interpreter(monkeypatch):
    # each KERNEL_CONFIGS["gemm"] entry (not only the default) computes the same function: force it as the default
    p = _problem(17, 70, 72, 2, 16, torch.float16, seed=7)
    expected = _expected(p)
    for entry in configs.KERNEL_CONFIGS["gemm"]:
        monkeypatch.setattr(
            configs,
            "default_config",
            lambda name, dtype, entry=entry: entry if name == "gemm" else _default(name, dtype),
        )
        dtype = torch.float32 if "fp32" in configs.config_dtypes(entry) else torch.float16
        if dtype == torch.float16:
            _check(_launch(p), dtype, *expected)
        else:
            p32 = _problem(17, 70, 72, 2, 16, torch.float32, seed=7)
            _check(_launch(p32), dtype, *_expected(p32))


def test_launcher_passes_aligned_block_extended_factors():
    # what the kernel is promised: U (d_out × RANK_PAD) and V (RANK_PAD × d_red, row stride a multiple of 16), both
    # contiguous, in the activation dtype, with U V = s·(B̂ Â) ⊙ [same block] (zero padding elsewhere)
    p = _problem(3, 21, 19, 3, 5, torch.float32, seed=8)
    blk_row, blk_col = block_ids(p["row_order"], 3), block_ids(p["col_order"], 3)
    with configs.capture_launches() as launches:
        _gemm(p["x"], None, p["weight"], None, p["lora_B"], p["lora_A"], blk_row, blk_col, p["scale"],
              transpose=False, has_base=True, merged=False, num_blocks=3)  # fmt: skip
    operands, launch = launches  # the operands kernel writes U and V, the GEMM reads them
    assert operands.name == "fused_operands" and launch.name == "gemm"
    u, v = launch.args[5], launch.args[6]
    assert operands.args[0] is u and operands.args[1] is v
    assert launch.constexprs["RANK_PAD"] == 16 and u.shape == (21, 16) and v.shape == (16, 32)
    assert u.is_contiguous() and v.is_contiguous() and u.dtype == v.dtype == torch.float32
    # (captured launches do not run: the values come from the operands kernel itself, under the interpreter)
    u, v = _block_factors(p["lora_B"], p["lora_A"], blk_row, blk_col, p["scale"], 3, 16, torch.float32, 32)
    d = {k: p[k].double() for k in ("lora_A", "lora_B")}
    delta = p["scale"] * dense_delta_weight(torch.ones(21, 19, dtype=torch.float64), d["lora_A"], d["lora_B"],
                                            p["row_order"], p["col_order"], 3)  # fmt: skip
    # U and V hold the fp32 factors (U = s·B̂ rounded once); their product taken in float64, so no summation order
    # enters: within one rounding of each |s·B̂||Â| term of the exact block-masked product
    magnitude = float((p["scale"] * d["lora_B"].abs() @ d["lora_A"].abs()).max())
    assert float((u.double() @ v[:, :19].double() - delta).abs().max()) <= 2 * UNIT_ROUNDOFF[torch.float32] * magnitude
    assert (v[:, 19:] == 0).all()
