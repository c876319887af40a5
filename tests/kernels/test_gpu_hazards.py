"""What a real GPU would do differently from the interpreter, closed on the CPU where a test can say it, and on the GPU
(skipped here) where only a GPU can: the device and stream a kernel launches on, operands with strides the kernels
never see in the other tests, torch's two TF32 APIs, shared memory and the rank, GPUs the kernels are not built for,
the factor epilogue's partial buffers, autotuning, empty batches and orders changed behind the layer's back.

On a CPU the kernels run under the Triton interpreter (``TRITON_INTERPRET=1`` for this module only) and every result is
compared with the float64 reference on the same inputs, with the tolerances of ``test_triton_smoa``.
"""

from __future__ import annotations

import contextlib
import warnings

import pytest
import torch

pytest.importorskip("triton", reason="triton is not installed: the SMoA kernels cannot run")

from smoa import backends
from smoa_kernels.reference import smoa_linear_reference
from smoa_kernels.triton import blocked, configs, function, smoa_linear_triton
from tests.kernels.test_triton_smoa import TOLERANCES, _assert_matches, _make_inputs, _run

ON_GPU = torch.cuda.is_available()
DEVICE = torch.device("cuda" if ON_GPU else "cpu")
PATHS = ["fused", "blocked"]
FP32_TOL = TOLERANCES[(torch.float32, torch.float32)]


@pytest.fixture(autouse=True, scope="module")
def _interpreter_on_cpu():
    if ON_GPU:
        yield
        return
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("TRITON_INTERPRET", "1")
        yield


def _problem(n=9, d_out=40, d_in=36, K=2, r_k=4, dropout=False, bias=True):
    return _make_inputs((n,), d_out, d_in, K, r_k, dropout, bias, "contiguous", torch.float32, torch.float32)


def _expected(problem):
    return _run(smoa_linear_reference, problem, dtype=torch.float64, device="cpu")


# ----------------------------------------------------------------------------------------------------------------------
# The launch device: every custom-op body runs with the tensors' device current
# ----------------------------------------------------------------------------------------------------------------------


def test_on_device_makes_the_tensors_cuda_device_current(monkeypatch):
    entered = []

    class Recorder(contextlib.AbstractContextManager):
        def __init__(self, device):
            entered.append(device)

        def __exit__(self, *exc):
            return None

    monkeypatch.setattr(torch.cuda, "device", Recorder)

    class CudaStandIn:  # what the guard reads of a tensor on the second GPU
        is_cuda = True
        device = torch.device("cuda", 1)

    with function._on_device(CudaStandIn()):
        pass
    assert entered == [torch.device("cuda", 1)]
    with function._on_device(torch.zeros(1)):  # CPU (the interpreter): nothing to switch
        pass
    assert entered == [torch.device("cuda", 1)]


@pytest.mark.parametrize("path", PATHS)
def test_forward_and_backward_bodies_run_under_the_device_guard(monkeypatch, path):
    # Triton launches on torch.cuda.current_device(): both custom ops must make the tensors' device current
    guarded = []
    real = function._on_device

    def recording(tensor):
        guarded.append(tensor.device)
        return real(tensor)

    monkeypatch.setattr(function, "_on_device", recording)
    problem = _problem()
    _run(smoa_linear_triton, problem, path=path)
    assert guarded == [DEVICE, DEVICE]  # forward, then backward


@pytest.mark.skipif(not ON_GPU or torch.cuda.device_count() < 2, reason="needs two CUDA GPUs")
@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("dropout", [False, True])
def test_a_layer_on_the_second_gpu_while_the_first_is_current(path, dropout):
    # device_map="auto" / DDP without set_device: the tensors live on cuda:1, cuda:0 is current
    problem = _problem(n=300, d_out=256, d_in=192, dropout=dropout)
    torch.cuda.set_device(0)
    actual = _run(smoa_linear_triton, problem, device=torch.device("cuda", 1), path=path)
    torch.cuda.synchronize(1)
    assert torch.cuda.current_device() == 0  # the guard restores the caller's device
    assert all(t.device == torch.device("cuda", 1) for t in actual.values())
    _assert_matches(actual, _expected(problem), 5e-3)  # TF32 or 3×TF32 dots, cuBLAS fp32


# ----------------------------------------------------------------------------------------------------------------------
# Operands with strides, offsets and zero strides: every tensor argument of the entry point
# ----------------------------------------------------------------------------------------------------------------------


LAYOUTS = {
    # every other element of a twice-as-wide buffer (bias = t[::2] in the report: read densely, a wrong y, no error)
    "step": lambda t: torch.stack([t, torch.zeros_like(t)], dim=-1)[..., 0],
    "offset": lambda t: torch.cat([torch.zeros_like(t[:3]), t])[3:],  # a view that starts inside its storage
    "transposed": lambda t: t.t().contiguous().t(),  # 2-D, column-major (a tied, transposed embedding)
    "expanded": lambda t: t[:1].expand_as(t),  # the first row / element broadcast: stride 0
}
STRIDED_CASES = [
    ("bias", "step"),
    ("bias", "offset"),
    ("bias", "expanded"),
    ("row_order", "step"),  # the orders kernel reads the orders densely
    ("col_order", "offset"),
    ("weight", "transposed"),
    ("weight", "offset"),
    ("lora_A", "transposed"),
    ("lora_B", "step"),  # a column slice of a wider factor
    ("x", "expanded"),  # every token the same row: stride 0 along tokens
    ("x", "offset"),
    ("x", "transposed"),
]


def _call_with_layout(fn, problem: dict, name: str, layout, dtype: torch.dtype, **kwargs) -> dict:
    """Forward + backward of ``fn`` with operand ``name`` passed as ``layout(leaf)`` (the same function of the same
    leaf for the kernel and the reference, so values and gradients are comparable whatever the layout)."""
    leaves = {}
    for key in ("x", "bias", "lora_A", "lora_B"):
        if problem[key] is not None:
            leaves[key] = problem[key].to(dtype).detach().requires_grad_(True)
    operands = {key: problem[key] for key in ("weight", "row_order", "col_order")}
    operands["weight"] = operands["weight"].to(dtype)
    operands.update(leaves)
    operands[name] = layout(operands[name])
    assert not operands[name].is_contiguous() or operands[name].storage_offset() != 0
    y = fn(
        operands["x"], operands["x"], operands["weight"], operands.get("bias"), operands["lora_A"],
        operands["lora_B"], operands["row_order"], operands["col_order"], problem["num_blocks"], problem["scale"],
        **kwargs,
    )  # fmt: skip
    y.backward(problem["grad_out"].to(dtype))
    return {"y": y.detach(), **{key: leaf.grad for key, leaf in leaves.items()}}


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("name, how", STRIDED_CASES)
def test_strided_operands_give_the_reference_result(path, name, how):
    problem = _problem(n=7, d_out=40, d_in=36)
    expected = _call_with_layout(smoa_linear_reference, problem, name, LAYOUTS[how], torch.float64)
    actual = _call_with_layout(smoa_linear_triton, problem, name, LAYOUTS[how], torch.float32, path=path)
    _assert_matches(actual, expected, FP32_TOL)


# ----------------------------------------------------------------------------------------------------------------------
# The factor epilogue: partial buffers bounded, the grid filled, chunks and column ranges exact
# ----------------------------------------------------------------------------------------------------------------------


def test_epilogue_partials_are_bounded_whatever_the_layer_size():
    # one launch per EPILOGUE_CHUNK_TILES row tiles: the dA partial (row tiles × r_k × |C_k|) no longer grows with |R_k|
    rank, rank_chunks = 32, 1
    for rows, cols in ((128256, 8192), (8192, 128256), (2048, 2048), (37, 5)):
        chunk_rows = min(rows, blocked.EPILOGUE_CHUNK_TILES * blocked.EPILOGUE_BLOCK_O)
        tiles, col_programs = blocked.epilogue_grid(chunk_rows, cols, rank_chunks, 132)
        assert tiles <= blocked.EPILOGUE_CHUNK_TILES
        partial_bytes = 4 * (tiles * rank * cols + col_programs * chunk_rows * rank)
        assert partial_bytes <= 4 * rank * cols * blocked.EPILOGUE_CHUNK_TILES + 4 * 64 * chunk_rows * rank
    # the lm_head of the report: was r/32 × G_k = 4.2 GB, now under 0.1 GB
    tiles, col_programs = blocked.epilogue_grid(64 * 32, 8192, 1, 132)
    assert 4 * (tiles * 32 * 8192 + col_programs * 2048 * 32) < 0.1e9


def test_epilogue_grid_gives_two_waves_where_the_block_allows():
    # 4096², K = 2: 64 row tiles; one program per row tile would fill half of an H100 once
    tiles, col_programs = blocked.epilogue_grid(2048, 2048, 1, 132)
    assert tiles == 64 and tiles * col_programs >= blocked.EPILOGUE_WAVES * 132
    assert blocked.epilogue_grid(32, 64, 1, 132) == (1, 1)  # never more column ranges than 64-column tiles


@pytest.mark.parametrize("chunk_tiles, multiprocessors", [(1, 1), (2, 50), (64, 1000)])
def test_epilogue_chunks_and_column_ranges_match_the_reference(monkeypatch, chunk_tiles, multiprocessors):
    # bands of 75 and 74 rows (3 row tiles each), 130/129 columns (3 column tiles): several chunks per block, several
    # column ranges per chunk, a last column range that is partly past the block
    monkeypatch.setattr(blocked, "EPILOGUE_CHUNK_TILES", chunk_tiles)
    monkeypatch.setattr(blocked, "_multiprocessors", lambda device: multiprocessors)
    problem = _problem(n=5, d_out=149, d_in=259, K=2, r_k=4, dropout=True)
    _assert_matches(_run(smoa_linear_triton, problem, path="blocked"), _expected(problem), FP32_TOL)


# ----------------------------------------------------------------------------------------------------------------------
# TF32: read through the API that never raises, whichever API the user set it with
# ----------------------------------------------------------------------------------------------------------------------


@pytest.fixture
def restore_fp32_precision():
    matmul = torch.backends.cuda.matmul
    saved = (matmul.fp32_precision, torch.backends.fp32_precision)
    yield
    torch.backends.fp32_precision = saved[1]
    matmul.fp32_precision = saved[0]


TF32_SETTINGS = [
    ("matmul.fp32_precision = 'tf32'", lambda: setattr(torch.backends.cuda.matmul, "fp32_precision", "tf32"), True),
    ("matmul.fp32_precision = 'ieee'", lambda: setattr(torch.backends.cuda.matmul, "fp32_precision", "ieee"), False),
    ("fp32_precision = 'tf32' (global)", lambda: setattr(torch.backends, "fp32_precision", "tf32"), True),
    ("fp32_precision = 'ieee' (global)", lambda: setattr(torch.backends, "fp32_precision", "ieee"), False),
    ("legacy allow_tf32 = True", lambda: setattr(torch.backends.cuda.matmul, "allow_tf32", True), True),
    ("legacy allow_tf32 = False", lambda: setattr(torch.backends.cuda.matmul, "allow_tf32", False), False),
    ("set_float32_matmul_precision('high')", lambda: torch.set_float32_matmul_precision("high"), True),
    ("set_float32_matmul_precision('highest')", lambda: torch.set_float32_matmul_precision("highest"), False),
]


@pytest.mark.parametrize("label, apply, tf32", TF32_SETTINGS, ids=[s[0] for s in TF32_SETTINGS])
def test_tf32_is_read_without_raising_in_either_api(restore_fp32_precision, label, apply, tf32):
    apply()
    assert configs.tf32_enabled() is tf32
    # the precision a GPU launch would get (captured launches make a GPU run's launch-time choices)
    problem = _problem(n=5, d_out=24, d_in=20)
    with configs.capture_launches() as launches:
        x, w = problem["x"], problem["weight"]
        smoa_linear_triton(x, x, w, problem["bias"], problem["lora_A"], problem["lora_B"], problem["row_order"],
                           problem["col_order"], 2, 0.5, path="fused")  # fmt: skip
    (gemm,) = [launch for launch in launches if launch.name == "gemm"]
    assert gemm.constexprs["DOT_PRECISION"] == configs.FP32_DOT_PRECISION[tf32]


def test_the_legacy_flag_really_raises_after_the_new_api(restore_fp32_precision):
    # the hazard itself, so that this module notices if torch changes: reading allow_tf32 after the new API asked for
    # TF32 raises, which the fused fp32 launcher used to do on every call
    torch.backends.cuda.matmul.fp32_precision = "tf32"
    with pytest.raises(RuntimeError, match="legacy and new APIs"):
        bool(torch.backends.cuda.matmul.allow_tf32)


@pytest.mark.skipif(not ON_GPU, reason="TF32 exists on GPUs only; the interpreter computes exact fp32")
@pytest.mark.parametrize("precision", ["tf32", "ieee"])
@pytest.mark.parametrize("path", PATHS)
def test_fp32_runs_under_the_new_tf32_api(restore_fp32_precision, precision, path):
    torch.backends.cuda.matmul.fp32_precision = precision
    problem = _problem(n=300, d_out=256, d_in=200, r_k=16, dropout=True)
    _assert_matches(_run(smoa_linear_triton, problem, path=path), _expected(problem), 5e-3)


# ----------------------------------------------------------------------------------------------------------------------
# Shared memory and the rank: the fused GEMM only where a config fits, the blocked path otherwise
# ----------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "K, r_k, fused", [(2, 64, True), (2, 65, False), (1, 129, False), (4, 32, True), (2, 256, False)]
)
def test_auto_sends_total_ranks_above_the_fused_limit_to_the_blocked_path(monkeypatch, K, r_k, fused):
    # the rank pad is next_pow2(K·r_k); above FUSED_MAX_RANK_PAD = 128 every shipped tile spills or needs 143–365 KB.
    # The cost model is told to prefer the fused path here, so the limit alone decides.
    monkeypatch.setattr(function.cost_model, "choose_path", lambda *args, **kwargs: "fused")
    chosen = function.resolve_path("auto", 16, 512, 512, K, torch.float16, DEVICE, r_k)
    assert chosen == ("fused" if fused else "blocked")
    if not fused:
        with pytest.raises(ValueError, match=r"path='fused' cannot run"):
            function.resolve_path("fused", 16, 512, 512, K, torch.float16, DEVICE, r_k)


def test_high_total_rank_runs_exactly_on_the_blocked_path():
    # r = 2 × 80 (rank pad 256): auto launches no fused GEMM, and the blocked glue walks the rank 32 at a time
    problem = _problem(n=6, d_out=40, d_in=44, K=2, r_k=80, dropout=True)
    with configs.capture_launches() as launches:
        x = problem["x"]
        smoa_linear_triton(x, x, problem["weight"], problem["bias"], problem["lora_A"], problem["lora_B"],
                           problem["row_order"], problem["col_order"], 2, 0.5)  # fmt: skip
    assert "gemm" not in {launch.name for launch in launches}
    _assert_matches(_run(smoa_linear_triton, problem), _expected(problem), FP32_TOL)
    x = problem["x"].detach()
    with pytest.raises(ValueError, match=r"rank pad 256"):
        smoa_linear_triton(x, x, problem["weight"], None, problem["lora_A"], problem["lora_B"], problem["row_order"],
                           problem["col_order"], 2, 0.5, merged_weight=True)  # fmt: skip


def test_small_shared_memory_gpus_get_a_config_that_fits(monkeypatch):
    # an sm_86 / sm_89 GPU (99 KB per block): the default 32×32 config at rank pad 128 needs 86 KB, 32×64 102 KB
    monkeypatch.setattr(configs, "device_shared_memory", lambda device: configs.MIN_SUPPORTED_SHARED_MEMORY)
    fits = configs.fitting_configs("gemm", torch.float16, {"RANK_PAD": 128}, configs.MIN_SUPPORTED_SHARED_MEMORY)
    assert fits and all(
        configs.shared_memory_estimate("gemm", e, 2, {"RANK_PAD": 128}) <= configs.MIN_SUPPORTED_SHARED_MEMORY
        for e in fits
    )
    assert len(fits) < len([e for e in configs.KERNEL_CONFIGS["gemm"] if "fp16" in configs.config_dtypes(e)])
    # a device too small for the default config: the untuned launch takes the first config that fits
    tiny = 30000
    monkeypatch.setattr(configs, "device_shared_memory", lambda device: tiny)
    default = configs.default_config("gemm", torch.float16)
    assert configs.shared_memory_estimate("gemm", default, 2, {"RANK_PAD": 32}) > tiny
    chosen = configs.single_config("gemm", torch.zeros(1, dtype=torch.float16), {"RANK_PAD": 32})
    assert configs.shared_memory_estimate("gemm", chosen, 2, {"RANK_PAD": 32}) <= tiny
    # and auto routes shapes no fused config fits to the blocked path
    assert function.resolve_path("auto", 16, 512, 512, 2, torch.float16, DEVICE, 32) == "blocked"
    problem = _make_inputs((5,), 40, 36, 2, 8, False, True, "contiguous", torch.float16, torch.float32)
    tol = TOLERANCES[(torch.float16, torch.float32)]
    _assert_matches(_run(smoa_linear_triton, problem, path="fused"), _expected(problem), tol)  # fits at rank pad 16


# ----------------------------------------------------------------------------------------------------------------------
# GPUs the kernels are not built for: auto falls back to the torch backend with one notice, triton refuses
# ----------------------------------------------------------------------------------------------------------------------


@pytest.fixture
def fake_gpu(monkeypatch):
    """Pretend cuda:0 is a GPU of the given capability and shared memory (nothing runs on it)."""

    def make(capability, shared=232448, name="Fake GPU"):
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
        monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: name)
        monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
        monkeypatch.setattr(configs, "_cuda_shared_memory", lambda index: shared)
        monkeypatch.setattr(backends, "_triton_status", lambda: (True, ""))
        monkeypatch.setattr(backends, "_noticed_fallback", False)
        backends._device_support.cache_clear()
        return torch.device("cuda", 0)

    yield make
    backends._device_support.cache_clear()


@pytest.mark.parametrize(
    "capability, shared, supported",
    [
        ((7, 5), 65536, False),  # T4: below the default config's shared memory, no bf16 MMA
        ((7, 0), 98304, False),  # V100
        ((8, 0), 166912, True),  # A100
        ((8, 6), 101376, True),  # A10 / RTX 30xx: the sm_80 code, 99 KB
        ((8, 9), 101376, True),  # L4 / RTX 40xx
        ((8, 6), 65536, False),  # a supported capability with too little shared memory
        ((9, 0), 232448, True),  # H100 / H200
        ((10, 0), 232448, False),  # B200: not compiled by the gate
        ((12, 0), 101376, False),  # RTX 50xx
    ],
)
def test_auto_uses_triton_only_on_gpus_the_kernels_are_built_for(fake_gpu, capability, shared, supported):
    device = fake_gpu(capability, shared)
    ok, reason = configs.device_support(device)
    assert ok is supported
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        chosen = [backends.resolve_backend("auto", device) for _ in range(3)]
    assert chosen == ["triton"] * 3 if supported else chosen == ["torch"] * 3
    notices = [w for w in caught if "uses the 'torch' backend" in str(w.message)]
    assert len(notices) == (0 if supported else 1)  # one notice, not one per call
    if not supported:
        assert reason and reason in str(notices[0].message)
        with pytest.raises(RuntimeError, match="'triton' was requested but is not available"):
            backends.resolve_backend("triton", device)
    else:
        assert backends.resolve_backend("triton", device) == "triton"


# ----------------------------------------------------------------------------------------------------------------------
# Autotuning: bounded tunings, a disk cache, one launch at a time per kernel
# ----------------------------------------------------------------------------------------------------------------------


def test_token_counts_fall_into_a_few_autotune_buckets():
    buckets = {configs._n_bucket(n) for n in range(1, 70000)}
    assert len(buckets) == len(configs.N_BUCKETS) <= 4
    assert all(configs._n_bucket(n) >= n for n in (1, 16, 17, 64, 65, 256)) and configs._n_bucket(0) == 16


def test_autotuned_kernels_cache_to_disk_and_launch_under_a_lock(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)  # as on a GPU (the interpreter never caches tunings)
    configs._autotuned_kernel.cache_clear()
    try:
        assert configs._autotuned_kernel("gemm").cache_results  # chosen configs persist in Triton's cache directory
    finally:
        configs._autotuned_kernel.cache_clear()
    seen = []

    class FakeTuner:
        def __getitem__(self, grid):
            return lambda *args, **kwargs: seen.append(configs._AUTOTUNE_LOCKS["scatter"].locked())

    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.setattr(configs, "_autotuned_kernel", lambda name: FakeTuner())
    configs.launch("scatter", (1,), torch.zeros(1))
    assert seen == [True] and not configs._AUTOTUNE_LOCKS["scatter"].locked()


def test_the_autotuner_prunes_configs_that_do_not_fit(monkeypatch):
    tuner = configs._autotuned_kernel("gemm")
    monkeypatch.setattr(configs, "device_shared_memory", lambda device: configs.MIN_SUPPORTED_SHARED_MEMORY)
    x = torch.zeros(4, 4, dtype=torch.float16)
    kept = tuner.early_config_prune(tuner.configs, {"X": x, "rank": 64}, RANK_PAD=128, XA_IS_X=True, MERGED=False)
    need = [configs.shared_memory_estimate("gemm", c.smoa_entry, 2, {"RANK_PAD": 128}) for c in kept]
    assert kept and max(need) <= configs.MIN_SUPPORTED_SHARED_MEMORY and len(kept) < len(tuner.configs)


# ----------------------------------------------------------------------------------------------------------------------
# Empty batches: what nn.Linear accepts, every path accepts (an empty output, zero gradients)
# ----------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("path", ["auto", *PATHS])
@pytest.mark.parametrize("lead", [(0,), (2, 0), (0, 3)])
@pytest.mark.parametrize("dropout", [False, True])
def test_empty_batches_give_empty_outputs_and_zero_gradients(path, lead, dropout):
    problem = _make_inputs(lead, 24, 20, 2, 4, dropout, True, "contiguous", torch.float32, torch.float32)
    actual = _run(smoa_linear_triton, problem, path=path)
    assert actual["y"].shape == (*lead, 24) and actual["x"].shape == (*lead, 20)
    for name in ("bias", "lora_A", "lora_B"):
        assert actual[name].shape == problem[name].shape and not actual[name].abs().max() > 0


def test_the_fake_implementations_accept_empty_batches():
    from torch._subclasses.fake_tensor import FakeTensorMode

    problem = _problem(n=3, d_out=24, d_in=20)
    with FakeTensorMode() as mode:
        fake = {k: mode.from_tensor(v) if torch.is_tensor(v) else v for k, v in problem.items()}
        x = torch.empty(0, 20)
        y, saved, *_ = torch.ops.smoa_kernels.triton_forward(
            x, None, fake["weight"], fake["bias"], fake["lora_A"], fake["lora_B"], fake["row_order"],
            fake["col_order"], 2, 0.5, "auto", False, True, True,
        )  # fmt: skip
    assert y.shape == (0, 24) and saved.numel() == 0


# ----------------------------------------------------------------------------------------------------------------------
# Orders written behind the layer's back (``.data``): a repeated index poisons like an out-of-range one
# ----------------------------------------------------------------------------------------------------------------------


def _repeat(order):
    order[1] = order[0]


def _swap(order):  # still a permutation: a legitimate (if odd) change, computed exactly
    order[[0, 1]] = order[[1, 0]]


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("which", ["row_order", "col_order"])
@pytest.mark.parametrize("change, poisons", [(_repeat, True), (_swap, False)])
def test_orders_changed_through_data_after_a_call(path, which, change, poisons):
    from smoa import SMoALinear

    torch.manual_seed(0)
    layer = SMoALinear.from_linear(torch.nn.Linear(36, 40), r=8, num_blocks=2, init_weights=False, backend="triton")
    x = torch.randn(5, 36, requires_grad=True)
    with function_path(path):
        layer(x).sum().backward()  # a verified call first
        change(getattr(layer, which).data)  # no version bump: the layer's own check cannot see it
        layer.zero_grad()
        x.grad = None
        y = layer(x)
        y.sum().backward()
    grads = [x.grad, layer.smoa_A.weight.grad, layer.smoa_B.weight.grad]
    if poisons:
        assert torch.isnan(y).all() and all(torch.isnan(g).all() for g in grads)
    else:
        with torch.no_grad():
            expected = smoa_linear_reference(x.double(), x.double(), layer.weight.double(), layer.bias.double(),
                                             layer.smoa_A.weight.double(), layer.smoa_B.weight.double(),
                                             layer.row_order, layer.col_order, 2, layer.scale)  # fmt: skip
        _assert_matches({"y": y.detach()}, {"y": expected}, FP32_TOL)


@contextlib.contextmanager
def function_path(path):
    """Force the triton backend's path for calls made through a layer (the layer passes no path)."""
    real = function.smoa_linear_triton
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(function, "smoa_linear_triton", lambda *a, **k: real(*a, **{**k, "path": path}))
        import smoa_kernels.triton as package

        patch.setattr(package, "smoa_linear_triton", lambda *a, **k: real(*a, **{**k, "path": path}))
        yield


# ----------------------------------------------------------------------------------------------------------------------
# The compile gate's shared-memory rules (what keeps the run-time fit check honest)
# ----------------------------------------------------------------------------------------------------------------------


def test_the_gate_holds_shared_memory_to_the_fit_check_and_the_smallest_gpu():
    from tests.kernels.test_kernel_report import _job, _result, kr

    yard = _result(non_mma_per_mma=14.0)
    glue = _job(80)  # a kernel launched whatever the call: must fit the smallest supported GPU
    assert kr.verdict(glue, {**_result(), "shared": configs.MIN_SUPPORTED_SHARED_MEMORY}, yard) == []
    over = kr.verdict(glue, {**_result(), "shared": configs.MIN_SUPPORTED_SHARED_MEMORY + 1024}, yard)
    assert any("least of the supported GPUs" in f for f in over)
    fused = _job(90)
    fused.shared_estimate = 50_000  # what configs.fitting_configs assumed when it let this config launch
    assert kr.verdict(fused, {**_result(), "shared": 120_000}, yard) == [
        "shared memory 120000 B > the fit check's estimate 50000 B"
    ]
    assert kr.verdict(fused, {**_result(), "shared": 50_000}, yard) == []
