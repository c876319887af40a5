"""Many adapters of one base in one batch (``smoa_kernels.multi_adapter``), against each adapter run alone.

The oracle is :func:`smoa_kernels.multi_adapter.multi_adapter_reference`: every adapter's tokens through the
single-adapter reference ``smoa_linear_reference`` in float64, base-only tokens through ``F.linear``. Both paths — the
torch path and the fused Triton forward (under ``TRITON_INTERPRET=1`` on a CPU: fp32 and fp16; bf16 is refused there,
the torch path is tested in bf16) — are compared with two bounds scaled by what the operands can produce
(``M = |x||W0|ᵀ + |b| + s_a|x||ΔW_a|ᵀ`` per output, never a computed value that may be ~0): the whole output within
``tol·max M``, and the adapter term alone (``y − x W0ᵀ − b`` on adapter tokens) within ``tol·max M_adapter`` plus
three roundings of the output's dtype (base output, sum), where the test first asserts that bound is below a quarter
of the adapter term's size, so that dropping it must fail.
"""

from __future__ import annotations

import pytest
import torch

from smoa_kernels.multi_adapter import (
    AdapterFactors,
    MultiAdapterBank,
    build_segments,
    multi_adapter_linear,
    multi_adapter_reference,
)
from smoa_kernels.reference import dense_delta_weight
from tests.utils import seeded

triton = pytest.importorskip("triton", reason="triton is not installed")

ON_GPU = torch.cuda.is_available()
DEVICE = torch.device("cuda" if ON_GPU else "cpu")
TOL = {torch.float32: 2e-5, torch.float16: 4e-3, torch.bfloat16: 3e-2}
UNIT_ROUNDOFF = {torch.float32: 2.0**-24, torch.float16: 2.0**-11, torch.bfloat16: 2.0**-8}
TRITON_DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if ON_GPU else [])
if ON_GPU:
    TOL[torch.float32] = 2e-3  # TF32 dots when allowed


@pytest.fixture(autouse=True)
def _interpreter_on_cpu(monkeypatch):
    if not ON_GPU:
        monkeypatch.setenv("TRITON_INTERPRET", "1")


def _layer(n, d_out, d_in, K, ranks, seed=0, factor_dtype=torch.float32, scales=None):
    gen = torch.Generator().manual_seed(seeded(seed))
    layer = {
        "x": torch.randn(n, d_in, generator=gen, dtype=torch.float64),
        "weight": torch.randn(d_out, d_in, generator=gen, dtype=torch.float64) / d_in**0.5,
        "bias": torch.randn(d_out, generator=gen, dtype=torch.float64),
        "row_order": torch.randperm(d_out, generator=gen),
        "col_order": torch.randperm(d_in, generator=gen),
        "num_blocks": K,
    }
    adapters = []
    for i, r in enumerate(ranks):
        A = torch.randn(r, d_in, generator=gen, dtype=torch.float64) / max(r, 1) ** 0.25
        B = torch.randn(d_out, r, generator=gen, dtype=torch.float64) / max(r, 1) ** 0.25
        adapters.append(AdapterFactors(A, B, scales[i] if scales else 0.5 + 0.25 * i))
    layer["adapters"] = adapters
    return layer


def _cast(layer, dtype, factor_dtype):
    adapters = [AdapterFactors(a.lora_A.to(factor_dtype).to(DEVICE), a.lora_B.to(factor_dtype).to(DEVICE), a.scale)
                for a in layer["adapters"]]  # fmt: skip
    return {
        **{k: layer[k].to(dtype).to(DEVICE) for k in ("x", "weight", "bias")},
        "row_order": layer["row_order"].to(DEVICE),
        "col_order": layer["col_order"].to(DEVICE),
        "num_blocks": layer["num_blocks"],
        "adapters": adapters,
    }


def _run(layer, index, dtype, factor_dtype, backend, **options):
    dev = _cast(layer, dtype, factor_dtype)
    with torch.no_grad():
        y = multi_adapter_linear(dev["x"], dev["weight"], dev["bias"], dev["adapters"], index.to(DEVICE),
                                 dev["row_order"], dev["col_order"], dev["num_blocks"], backend=backend,
                                 **options)  # fmt: skip
    return y.cpu().double(), dev


def _check(layer, index, y, dtype, factor_dtype):
    """Both bounds of the module docstring, against the float64 oracle run on the inputs as the path saw them."""
    as_seen = {k: layer[k].to(dtype).double() for k in ("x", "weight", "bias")}
    adapters = [AdapterFactors(a.lora_A.to(factor_dtype).double(), a.lora_B.to(factor_dtype).double(), a.scale)
                for a in layer["adapters"]]  # fmt: skip
    x, W, b = as_seen["x"], as_seen["weight"], as_seen["bias"]
    ref = multi_adapter_reference(x, W, b, adapters, index, layer["row_order"], layer["col_order"],
                                  layer["num_blocks"])  # fmt: skip
    base = x @ W.T + b
    magnitude = x.abs() @ W.abs().T + b.abs()
    adapter_mag = torch.zeros_like(base)
    for a, f in enumerate(adapters):
        mask = index == a
        delta = dense_delta_weight(W, f.lora_A, f.lora_B, layer["row_order"], layer["col_order"], layer["num_blocks"])
        adapter_mag[mask] = f.scale * (x[mask].abs() @ delta.abs().T)
    tol = TOL[dtype] if factor_dtype == torch.float32 or dtype == factor_dtype else TOL[factor_dtype]
    bound = tol * float((magnitude + adapter_mag).max())
    err = float((y - ref).abs().max()) if y.numel() else 0.0
    assert err <= bound, f"output error {err:.3g} > {bound:.3g}"
    on_adapter = index >= 0
    if bool(on_adapter.any()):
        term, term_ref = (y - base)[on_adapter], (ref - base)[on_adapter]
        # the adapter term's own error, plus the roundings of the base output and of the sum (y in x's dtype)
        rounding = 3 * UNIT_ROUNDOFF[dtype] * float((magnitude + adapter_mag).max())
        adapter_bound = tol * float(adapter_mag.max()) + rounding
        assert adapter_bound < 0.25 * float(term_ref.abs().max()), "the adapter-alone bound would not see a drop"
        adapter_err = float((term - term_ref).abs().max())
        assert adapter_err <= adapter_bound, f"adapter term error {adapter_err:.3g} > {adapter_bound:.3g}"
    return ref


# (name, N, d_out, d_in, K, ranks, index) — d_out ≠ d_in, sizes not divisible by K or by the 32/16/64 tiles
T3 = (4, 4, 4)
CASES = [
    ("mixed, unsorted, base-only", 13, 40, 56, 2, T3, [0, 2, -1, 1, 1, 0, 2, 2, -1, 0, 1, 2, 0]),
    ("segments of length 0 and 1", 6, 37, 29, 3, (2, 2, 2, 2), [3, -1, 3, 0, 3, 3]),
    ("all tokens on one adapter", 20, 33, 70, 2, T3, [1] * 20),
    ("N = 1", 1, 48, 40, 4, (2, 2), [1]),
    ("base only", 5, 24, 20, 2, T3, [-1] * 5),
    ("r_k differ (2, 4, 1)", 9, 36, 44, 2, (2, 4, 1), [2, 1, 0, 0, 1, 2, 1, -1, 0]),
    # K·r_k = 32: the Triton kernel's block-extended rank pad above the minimum of 16
    ("K=2 r_k=16 (rank pad 32)", 11, 40, 56, 2, (16, 16, 8), [2, 0, -1, 1, 1, 0, 2, 0, 0, 1, -1]),
    ("K=4 r_k=8 (rank pad 32)", 7, 36, 70, 4, (8, 8), [1, 0, 0, -1, 1, 1, 0]),
]
IDS = [c[0] for c in CASES]


@pytest.mark.parametrize("case", CASES, ids=IDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_torch_path_matches_each_adapter_alone(case, dtype):
    _, n, d_out, d_in, K, ranks, index = case
    layer = _layer(n, d_out, d_in, K, ranks)
    index = torch.tensor(index)
    for factor_dtype in {torch.float32, dtype}:
        y, _ = _run(layer, index, dtype, factor_dtype, "torch")
        _check(layer, index, y, dtype, factor_dtype)


@pytest.mark.parametrize("case", CASES, ids=IDS)
@pytest.mark.parametrize("dtype", TRITON_DTYPES, ids=[str(d).split(".")[-1] for d in TRITON_DTYPES])
def test_triton_path_matches_each_adapter_alone(case, dtype):
    _, n, d_out, d_in, K, ranks, index = case
    layer = _layer(n, d_out, d_in, K, ranks, seed=1)
    index = torch.tensor(index, dtype=torch.int32)
    y, _ = _run(layer, index, dtype, torch.float32, "triton")
    _check(layer, index, y, dtype, torch.float32)


def test_triton_long_segments_and_int64_index():
    """Segments longer than one token tile (BLOCK_N = 16), 3-D x, int64 index, a bank reused across calls."""
    layer = _layer(2 * 23, 40, 72, 2, (4, 4))
    gen = torch.Generator().manual_seed(seeded(5))
    index = torch.randint(-1, 2, (46,), generator=gen)
    dev = _cast(layer, torch.float32, torch.float32)
    bank = MultiAdapterBank.build(dev["weight"], dev["adapters"], dev["row_order"], dev["col_order"], 2)
    segments = build_segments(index.view(2, 23).to(DEVICE), bank.num_adapters)
    with torch.no_grad():
        y = bank(dev["x"].view(2, 23, 72), dev["bias"], index.view(2, 23).to(DEVICE), segments=segments,
                 backend="triton")  # fmt: skip
        again = bank(dev["x"].view(2, 23, 72), dev["bias"], index.view(2, 23).to(DEVICE), backend="triton")
    assert y.shape == (2, 23, 40) and len(bank._triton_operands) == 1
    _check(layer, index, y.reshape(46, 40).cpu().double(), torch.float32, torch.float32)
    torch.testing.assert_close(again, y, rtol=0, atol=0)


def test_segments_table():
    index = torch.tensor([2, -1, 0, 2, 7, 2, -1])
    seg = build_segments(index, 3)
    assert seg.offsets.tolist() == [0, 2, 3, 3, 6, 7]  # base 2, a0 1, a1 0, a2 3, out of range 1
    assert seg.perm.tolist() == [1, 6, 2, 0, 3, 5, 4]  # stable within a segment
    # static shapes only: it traces into one graph (nothing read on the host)
    compiled = torch.compile(lambda i: build_segments(i, 3).offsets, backend="aot_eager", fullgraph=True)
    assert compiled(index).tolist() == seg.offsets.tolist()


@pytest.mark.parametrize("ranks", [(4, 4), (16, 16)], ids=["rank pad 16", "rank pad 32"])
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_out_of_range_index_errors_or_poisons(backend, ranks):
    layer = _layer(6, 40, 32, 2, ranks)
    good = torch.tensor([0, 1, -1, 1, 0, 0], dtype=torch.int32)
    bad = torch.tensor([0, 5, -1, 1, -3, 0], dtype=torch.int32)
    with pytest.raises(ValueError, match=r"adapter_index\[1\] = 5 is out of range"):
        _run(layer, bad, torch.float32, torch.float32, backend, check_index=True)
    if DEVICE.type == "cpu":  # the default on CPU tensors: checked
        with pytest.raises(ValueError, match="out of range"):
            _run(layer, bad, torch.float32, torch.float32, backend)
    y, _ = _run(layer, bad, torch.float32, torch.float32, backend, check_index=False)
    y_good, _ = _run(layer, good, torch.float32, torch.float32, backend)
    poisoned = torch.tensor([False, True, False, False, True, False])
    assert torch.isnan(y[poisoned]).all()
    assert not torch.isnan(y[~poisoned]).any()
    # other segment sizes give other GEMM blockings (another summation order): fp32 rounding of the output's scale
    scale = float(y_good[~poisoned].abs().max())
    torch.testing.assert_close(y[~poisoned], y_good[~poisoned], atol=TOL[torch.float32] * scale, rtol=0)


def test_bad_index_dtype_shape_device():
    dev = _cast(_layer(4, 24, 20, 2, (2,)), torch.float32, torch.float32)
    args = (dev["x"], dev["weight"], dev["bias"], dev["adapters"])
    orders = (dev["row_order"], dev["col_order"], 2)
    with pytest.raises(TypeError, match=r"adapter_index\.dtype=torch\.float32"):
        multi_adapter_linear(*args, torch.zeros(4), *orders)
    with pytest.raises(ValueError, match=r"adapter_index.shape=\(5,\)"):
        multi_adapter_linear(*args, torch.zeros(5, dtype=torch.int64), *orders)
    with pytest.raises(ValueError, match="adapter_index is on meta"):
        multi_adapter_linear(*args, torch.zeros(4, dtype=torch.int64, device="meta"), *orders)


def test_refusals_name_the_argument():
    layer = _layer(4, 24, 20, 2, (2, 2))
    dev = _cast(layer, torch.float32, torch.float32)
    W, ro, co = dev["weight"], dev["row_order"], dev["col_order"]
    A, B = dev["adapters"][0].lora_A, dev["adapters"][0].lora_B
    for scale in (float("nan"), float("inf"), -float("inf")):
        with pytest.raises(ValueError, match=r"adapters\[1\]\.scale=(nan|inf|-inf) must be finite"):
            MultiAdapterBank.build(W, [AdapterFactors(A, B), AdapterFactors(A, B, scale)], ro, co, 2)
    with pytest.raises(ValueError, match=r"row_order must be a 1-D int64 tensor of length 24, found shape \(24,\), "
                                         r"dtype=torch.int32"):  # fmt: skip
        MultiAdapterBank.build(W, [(A, B)], ro.int(), co, 2)
    with pytest.raises(ValueError, match=r"adapters\[1\].num_blocks=4 but the batch uses num_blocks=2"):
        MultiAdapterBank.build(W, [AdapterFactors(A, B), AdapterFactors(A, B, num_blocks=4)], ro, co, 2)
    with pytest.raises(ValueError, match=r"adapters\[1\].col_order differs"):
        MultiAdapterBank.build(W, [(A, B), AdapterFactors(A, B, col_order=co.flip(0))], ro, co, 2)
    with pytest.raises(ValueError, match=r"adapters\[0\].lora_A.shape=\(2, 19\)"):
        MultiAdapterBank.build(W, [(A[:, :19], B)], ro, co, 2)
    with pytest.raises(TypeError, match=r"adapters\[1\] has factors of dtype torch.float16"):
        MultiAdapterBank.build(W, [(A, B), (A.half(), B.half())], ro, co, 2)
    with pytest.raises(ValueError, match="row_order is not a permutation"):
        MultiAdapterBank.build(W, [(A, B)], torch.zeros_like(ro), co, 2)
    with pytest.raises(ValueError, match=r"adapters\[0\].block_ranks=\(1, 3\)"):
        MultiAdapterBank.build(W, [AdapterFactors(A, B, block_ranks=(1, 3))], ro, co, 2)
    index = torch.tensor([0, 1, 1, -1], device=DEVICE)
    big = [(torch.zeros(40, 20, device=DEVICE), torch.zeros(24, 40, device=DEVICE))]  # K·r_k = 80: pad 128
    with pytest.raises(ValueError, match="rank pad of 128 > 64"):
        with torch.no_grad():
            multi_adapter_linear(dev["x"], W, None, big, index.clamp(max=0), ro, co, 2, backend="triton")
    grad_A = A.clone().requires_grad_(True)
    with pytest.raises(ValueError, match="forward-only"):
        multi_adapter_linear(dev["x"], W, None, [(grad_A, B), (A, B)], index, ro, co, 2, backend="triton")
    if not ON_GPU:
        with pytest.raises(TypeError, match="bfloat16 cannot run under the Triton interpreter"):
            with torch.no_grad():
                x16, W16 = dev["x"].bfloat16(), W.bfloat16()
                multi_adapter_linear(x16, W16, None, [(A, B), (A, B)], index, ro, co, 2, backend="triton")


def test_uneven_block_ranks_are_served():
    """Block ranks (1, 3) stored zero-padded to r_k = 3, as the single-adapter reference stores them."""
    layer = _layer(7, 30, 26, 2, (3, 3))
    A = layer["adapters"][0].lora_A.clone()
    C = torch.tensor_split(layer["col_order"], 2)[0]
    A[1:, C] = 0  # block 0 uses rank slot 0 only
    layer["adapters"][0] = AdapterFactors(A, layer["adapters"][0].lora_B, 0.5, block_ranks=(1, 3))
    index = torch.tensor([0, 1, 0, -1, 1, 0, 0])
    for backend in ("torch", "triton"):
        y, _ = _run(layer, index, torch.float32, torch.float32, backend)
        _check(layer, index, y, torch.float32, torch.float32)


def test_torch_path_gradients_match_each_adapter_alone():
    layer = _layer(8, 24, 20, 2, (2, 2))
    index = torch.tensor([0, 1, 1, -1, 0, 1, -1, 0])
    dev = _cast(layer, torch.float64, torch.float64)
    leaves = [(a.lora_A.clone().requires_grad_(True), a.lora_B.clone().requires_grad_(True), a.scale)
              for a in dev["adapters"]]  # fmt: skip
    x = dev["x"].clone().requires_grad_(True)
    args = (dev["weight"], dev["bias"])
    orders = (dev["row_order"], dev["col_order"], 2)
    y = multi_adapter_linear(x, *args, leaves, index, *orders, backend="torch")
    y.square().sum().backward()
    x_ref = dev["x"].clone().requires_grad_(True)
    ref_leaves = [(A.detach().clone().requires_grad_(True), B.detach().clone().requires_grad_(True), s)
                  for A, B, s in leaves]  # fmt: skip
    ref = multi_adapter_reference(x_ref, *args, [AdapterFactors(*f) for f in ref_leaves], index, *orders)
    ref.square().sum().backward()
    torch.testing.assert_close(y, ref)
    torch.testing.assert_close(x.grad, x_ref.grad)
    for (A, B, _), (A_ref, B_ref, _) in zip(leaves, ref_leaves):
        torch.testing.assert_close(A.grad, A_ref.grad)
        torch.testing.assert_close(B.grad, B_ref.grad)


def test_torch_path_under_torch_compile():
    layer = _layer(10, 40, 32, 2, (4, 2))
    index = torch.tensor([1, 0, -1, 1, 1, 0, -1, 0, 1, 1])
    dev = _cast(layer, torch.float32, torch.float32)

    def call(x, idx):
        return multi_adapter_linear(x, dev["weight"], dev["bias"], dev["adapters"], idx, dev["row_order"],
                                    dev["col_order"], 2, backend="torch", check_index=False)  # fmt: skip

    with torch.no_grad():
        eager = call(dev["x"], index)
        compiled = torch.compile(call, backend="aot_eager")(dev["x"], index)
    # a compiled graph may decompose ops into another summation order: fp32 rounding of the output's scale
    torch.testing.assert_close(compiled, eager, atol=TOL[torch.float32] * float(eager.abs().max()), rtol=0)
    _check(layer, index, compiled.double(), torch.float32, torch.float32)


def test_cost_model_multi_is_labelled_and_consistent():
    from smoa_kernels import cost_model, cost_model_multi

    data = cost_model_multi.table()
    assert "ESTIMATE" in data["label"] and "not a measurement" in data["label"]
    assert len(data["rows"]) == len(cost_model_multi.TOKEN_COUNTS) * 2 * len(cost_model_multi.ADAPTER_COUNTS)
    for n in cost_model_multi.TOKEN_COUNTS:
        for k in (2, 4):
            rows = [r for r in data["rows"] if r["N"] == n and r["K"] == k]
            fused = [r["multi-fused_us"] for r in rows]
            assert fused == sorted(fused) and all(r["sequential_us"] > 0 for r in rows)
            if n == 64:  # decode is bound by reading W0: T sequential passes read it T times
                assert rows[0]["sequential_us"] < rows[-1]["sequential_us"] / 16
    # one adapter, no sub-batching: "sequential" is exactly today's single-adapter fused path
    single = cost_model.estimate("smoa-fused", "inference", 64, 4096, 4096, 32, 2)
    assert cost_model_multi.estimate("sequential", 64, 1) == pytest.approx(single)
    assert "| 64 | 2 | 16 |" in cost_model_multi.markdown_table()
    with pytest.raises(ValueError, match="n_adapters=0"):
        cost_model_multi.estimate("multi-fused", 64, 0)
    # the docs' table is the model's, regenerated when the model changes
    from pathlib import Path

    docs = (Path(__file__).resolve().parents[2] / "docs" / "multi_adapter.md").read_text()
    assert cost_model_multi.markdown_table().strip().split("\n", 2)[2] in docs, "regenerate docs/multi_adapter.md"


def test_compile_gate_captures_the_multi_adapter_launch():
    import importlib.util
    import sys
    from pathlib import Path

    tool = Path(__file__).resolve().parents[2] / "tools" / "kernel_report.py"
    kr = sys.modules.get("kernel_report")
    if kr is None:
        spec = importlib.util.spec_from_file_location("kernel_report", tool)
        kr = importlib.util.module_from_spec(spec)
        sys.modules["kernel_report"] = kr
        spec.loader.exec_module(kr)
    assert kr.MULTI_SCENARIOS
    small = kr.MultiScenario("multi small", dtype="fp16", factor_dtype="fp32", n_tokens=20, d_out=64, d_in=48,
                             rank=8, adapters=3)  # fmt: skip
    cap = kr.capture_multi(small)
    assert cap.error == "" and [launch.name for launch in cap.launches] == ["multi_gemm"]
    jobs = kr.build_jobs([cap], quick=True, archs=(80,))
    assert len(jobs) == 1 and jobs[0].programs >= 2 * (2 + 3 + 2)  # 2 output tiles × (cdiv(20, 16) + 5 segments)


def test_bench_provider_matches_its_oracle():
    pytest.importorskip("peft")
    from smoa.bench import TOLERANCES, BenchInputs, build_case
    from smoa.bench.providers_multi import SMOA_MULTI

    inputs = BenchInputs.make(48, 64, 27, torch.float32, "cpu")
    case = build_case(SMOA_MULTI, inputs, 4, 2)
    error, _ = case.check()
    assert error <= TOLERANCES[torch.float32]
    assert case.step("inference")().shape == (27, 64)


@pytest.mark.skipif(not ON_GPU, reason="torch.compile of the Triton custom op needs real device pointers (a GPU)")
def test_triton_path_under_torch_compile():
    layer = _layer(24, 64, 48, 2, (4, 4, 2))
    index = torch.tensor([2, 0, -1, 1] * 6, device=DEVICE)
    dev = _cast(layer, torch.float16, torch.float32)
    bank = MultiAdapterBank.build(dev["weight"], dev["adapters"], dev["row_order"], dev["col_order"], 2)

    def call(x, idx):
        return bank(x, dev["bias"], idx, backend="triton")

    with torch.no_grad():
        eager = call(dev["x"], index)
        compiled = torch.compile(call)(dev["x"], index)  # (not run on a GPU yet: graph breaks allowed)
    torch.testing.assert_close(compiled, eager, atol=TOL[torch.float16] * float(eager.abs().max()), rtol=0)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_empty_batch_and_rank_zero_adapter(backend):
    layer = _layer(0, 24, 20, 2, (0, 2))
    y, _ = _run(layer, torch.zeros(0, dtype=torch.int64), torch.float32, torch.float32, backend)
    assert y.shape == (0, 24)
    layer = _layer(5, 24, 20, 2, (0, 2))  # adapter 0 has r_k = 0: it contributes nothing (SPEC §6)
    index = torch.tensor([0, 1, 0, -1, 1])
    y, _ = _run(layer, index, torch.float32, torch.float32, backend)
    _check(layer, index, y, torch.float32, torch.float32)


def test_bank_from_named_adapters_maps_peft_adapter_names():
    layer = _layer(6, 24, 20, 2, (2, 2))
    dev = _cast(layer, torch.float32, torch.float32)
    named = {"fr": dev["adapters"][0], "de": dev["adapters"][1]}
    bank = MultiAdapterBank.build(dev["weight"], named, dev["row_order"], dev["col_order"], 2)
    index = bank.index_for(["de", "__base__", "fr"], (3, 2))
    assert index.tolist() == [[1, 1], [-1, -1], [0, 0]]
    y = bank(dev["x"].view(3, 2, 20), dev["bias"], index)
    _check(layer, index.reshape(-1), y.reshape(6, 24).double(), torch.float32, torch.float32)
    with pytest.raises(ValueError, match=r"adapter names \['es'\] are not in this bank"):
        bank.index_for(["es", "fr", "fr"], (3, 2))
    with pytest.raises(ValueError, match="'__base__' is reserved"):
        MultiAdapterBank.build(dev["weight"], {"__base__": named["fr"]}, dev["row_order"], dev["col_order"], 2)


def test_every_shipped_multi_config_is_correct(monkeypatch):
    """Each config of the multi-adapter kernel (not only the interpreter's default) computes the same function."""
    from smoa_kernels.triton import configs
    from smoa_kernels.triton.multi_adapter import KERNEL

    layer = _layer(41, 40, 72, 2, (4, 2, 4), seed=9)
    index = torch.randint(-1, 3, (41,), generator=torch.Generator().manual_seed(seeded(9)))
    default = configs.default_config
    for entry in configs.KERNEL_CONFIGS[KERNEL]:
        monkeypatch.setattr(configs, "default_config", lambda name, dtype, e=entry: e if name == KERNEL else
                            default(name, dtype))  # fmt: skip
        dtype = torch.float32 if "fp32" in configs.config_dtypes(entry) else torch.float16
        if dtype in TRITON_DTYPES:
            y, _ = _run(layer, index, dtype, torch.float32, "triton")
            _check(layer, index, y, dtype, torch.float32)
