"""The fused single-pass GEMM launcher ``smoa_kernels.triton.fused._gemm`` against the float64 reference.

Forward (``y = x W0ᵀ + b + s·x_a ΔWᵀ``), dX (``dY (W0 + s·ΔW)``, transposed pass), dX_a (``s·dY ΔW``, no base dot) and
the merged fast path, on edge shapes: N = 1, K ∈ {1, 2, 3}, sizes not divisible by K or by the tiles, d_out ≠ d_in,
r_k ∈ {0, 1, 16, 40}. On a CPU the kernel runs under the Triton interpreter (fp32 and fp16; bf16 only on a GPU: the
interpreter stores bf16 as uint16, KERNELS.md §5).

Two checks per result: the whole output within ``tol·max|expected|``, and the adapter term alone (``y − x W0ᵀ − b``)
within a bound derived from rounding analysis: ``8·u·(max|y| + max(|x_a| |s·ΔW|ᵀ))`` (u = the unit roundoff of the
activation dtype: factors, ΔW tile and output are each rounded once, plus fp32 accumulation). The test first asserts
that this bound is below a quarter of the adapter term itself, so dropping or halving the adapter must fail it;
:func:`test_adapter_check_fails_when_the_adapter_is_dropped_or_halved` proves that on the kernel's own output.
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton", reason="triton is not installed: the fused kernel cannot run")

from smoa_kernels.blocks import block_ids
from smoa_kernels.reference import dense_delta_weight, smoa_linear_reference
from smoa_kernels.triton import configs
from smoa_kernels.triton.fused import _gemm

ON_GPU = torch.cuda.is_available()
DEVICE = torch.device("cuda" if ON_GPU else "cpu")
DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if ON_GPU else [])
UNIT_ROUNDOFF = {torch.float32: 2.0**-24, torch.float16: 2.0**-11, torch.bfloat16: 2.0**-8}
# Whole-output bound relative to max|expected| (the adapter-alone check is the strict one).
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
    gen = torch.Generator().manual_seed(seed)
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
    """(expected output, its base term, its adapter term, the adapter's absolute-sum scale) in float64."""
    d = {k: v.double() if torch.is_tensor(v) and v.is_floating_point() else v for k, v in p.items()}
    delta = p["scale"] * dense_delta_weight(d["weight"], d["lora_A"], d["lora_B"], d["row_order"], d["col_order"],
                                            p["num_blocks"])  # fmt: skip
    if transpose:
        base = d["dy"] @ d["weight"] if has_base else torch.zeros(d["dy"].shape[0], d["weight"].shape[1])
        adapter = d["dy"] @ delta
        scale = (d["dy"].abs() @ delta.abs()).max()
        return base.double() + adapter, base.double(), adapter, scale
    xa = d["x_adapter"] if dropout else d["x"]
    b = d["bias"] if bias else None
    y = smoa_linear_reference(d["x"], xa, d["weight"], b, d["lora_A"], d["lora_B"], d["row_order"], d["col_order"],
                              p["num_blocks"], p["scale"])  # fmt: skip
    base = d["x"] @ d["weight"].T + (b if bias else 0)
    if not has_base:
        y, base = y - base, torch.zeros_like(base)
    return y, base, y - base, (xa.abs() @ delta.abs().T).max()


def _adapter_bound(dtype, expected, scale):
    return 8 * UNIT_ROUNDOFF[dtype] * (float(expected.abs().max()) + float(scale))


def _adapter_ok(actual, base, adapter, bound):
    return float(((actual - base) - adapter).abs().max()) <= bound


def _check(actual, dtype, expected, base, adapter, scale):
    assert actual.shape == expected.shape
    assert torch.isfinite(actual).all()
    err = float((actual - expected).abs().max())
    assert err <= TOLERANCE[dtype] * max(float(expected.abs().max()), 1e-30), (err, float(expected.abs().max()))
    if float(adapter.abs().max()) == 0:  # r_k = 0: nothing to isolate; the output must be the base term
        assert float((actual - base).abs().max()) <= TOLERANCE[dtype] * max(float(base.abs().max()), 1e-30)
        return
    bound = _adapter_bound(dtype, expected, scale)
    # the bound must be able to see a halved adapter: otherwise the check below proves nothing
    assert bound < 0.25 * float(adapter.abs().max()), (bound, float(adapter.abs().max()))
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
    _check(_launch(p, merged=True), torch.float32, *_expected(p))


def test_adapter_check_fails_when_the_adapter_is_dropped_or_halved():
    # the mutation check: the adapter-alone bound rejects the kernel's output with its adapter term removed or halved
    for dtype in DTYPES:
        p = _problem(5, 40, 48, 2, 4, dtype, seed=6)
        actual = _launch(p)
        expected, base, adapter, scale = _expected(p)
        bound = _adapter_bound(dtype, expected, scale)
        assert _adapter_ok(actual, base, adapter, bound)
        assert not _adapter_ok(base + 0.5 * (actual - base), base, adapter, bound)  # halved
        assert not _adapter_ok(base, base, adapter, bound)  # dropped
        assert not _adapter_ok(actual - 0.1 * adapter, base, adapter, bound)  # 10% too small


def test_every_shipped_config_is_correct_under_the_interpreter(monkeypatch):
    # each KERNEL_CONFIGS["gemm"] entry (not only the default) computes the same function: force it as the default
    p = _problem(17, 70, 72, 2, 16, torch.float16, seed=7)
    expected = _expected(p)
    for entry in configs.KERNEL_CONFIGS["gemm"]:
        monkeypatch.setattr(configs, "default_config", lambda name, dtype, entry=entry: entry)
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
    (launch,) = launches
    u, v = launch.args[5], launch.args[6]
    assert launch.constexprs["RANK_PAD"] == 16 and u.shape == (21, 16) and v.shape == (16, 32)
    assert u.is_contiguous() and v.is_contiguous() and u.dtype == v.dtype == torch.float32
    delta = p["scale"] * dense_delta_weight(torch.ones(21, 19), p["lora_A"], p["lora_B"], p["row_order"],
                                            p["col_order"], 3)  # fmt: skip
    torch.testing.assert_close(u @ v[:, :19], delta, rtol=1e-6, atol=1e-6)
    assert (v[:, 19:] == 0).all()
