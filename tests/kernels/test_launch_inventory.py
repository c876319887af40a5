"""Every launch the triton backend makes is a pass of the cost model: a real step's launches, captured, against the
model's pass list, by count and by name, in order.

The capture runs the real entry point under the Triton interpreter on the CPU and records two kinds of launch:
every Triton kernel (through the single launch point ``configs.launch``: ``triton.<kernel>``) and every torch op that
would be a CUDA kernel (a ``TorchDispatchMode`` inside the custom ops: ``aten.<op>``). Not launches, so not recorded:
views and metadata ops, allocations (``empty*``, which launch nothing), ``detach``, and an op that returns its own input
(``x.to(x.dtype)``, ``contiguous()`` of a contiguous tensor). While a Triton kernel runs the recording pauses (the
interpreter's own copies are no CUDA launches). fp32 throughout: the model's pass list does not depend on the dtype,
and fp32 keeps the G_k GEMM one ``mm`` on the CPU as on a GPU (16-bit inputs take ``mm(out_dtype=float32)`` on CUDA
and fp32 copies on the CPU)."""

from __future__ import annotations

import contextlib

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

pytest.importorskip("triton", reason="triton is not installed")

from smoa_kernels import cost_model as cm
from smoa_kernels.triton import blocked, configs, function, smoa_linear_triton
from tests.utils import triton_interpreter

NOT_LAUNCHES = {"view", "_unsafe_view", "t", "transpose", "slice", "select", "as_strided", "expand", "alias", "detach",
                "detach_", "empty", "empty_strided", "empty_like", "new_empty", "new_empty_strided", "_reshape_alias",
                "unsqueeze", "squeeze", "permute", "lift_fresh", "split", "unbind", "resolve_conj", "resolve_neg",
                "sym_size", "sym_stride", "sym_numel"}  # fmt: skip
CUSTOM_OPS = {"triton_forward": function._forward_op, "triton_backward": function._backward_op}


@pytest.fixture(autouse=True, scope="module")
def _interpret():
    with triton_interpreter():
        yield


def _storage(t):
    return t.untyped_storage().data_ptr() if isinstance(t, torch.Tensor) and t.numel() else None


class _Recorder(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.log: list[str] = []
        self.paused = False

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = func.overloadpacket.__name__
        if name in CUSTOM_OPS:  # record what the op's body launches, not the op itself
            with self:
                return CUSTOM_OPS[name]._init_fn(*args, **kwargs)
        out = func(*args, **kwargs)
        if self.paused or name in NOT_LAUNCHES:
            return out
        inputs = {_storage(a) for a in (*args, *kwargs.values())} - {None}
        results = out if isinstance(out, (tuple, list)) else (out,)
        same = [_storage(r) in inputs for r in results if isinstance(r, torch.Tensor)]
        if not name.endswith("_") and "out" not in kwargs and same and all(same):  # returned its input: no kernel
            return out
        self.log.append(f"aten.{name}")
        return out


@contextlib.contextmanager
def _recording(monkeypatch):
    recorder = _Recorder()
    real = configs.launch

    def launch(name, grid, *args, **kwargs):
        recorder.log.append(f"triton.{name}")
        recorder.paused = True
        try:
            real(name, grid, *args, **kwargs)
        finally:
            recorder.paused = False

    monkeypatch.setattr(configs, "launch", launch)
    with recorder:
        yield recorder.log


def _problem(n, d_out, d_in, r_k, k, bias):
    torch.manual_seed(0)
    return {
        "x": torch.randn(n, d_in, requires_grad=True),
        "weight": torch.randn(d_out, d_in) / d_in**0.5,
        "bias": torch.randn(d_out, requires_grad=True) if bias else None,
        "lora_A": torch.randn(r_k, d_in, requires_grad=True),
        "lora_B": torch.randn(d_out, r_k, requires_grad=True),
        "row_order": torch.randperm(d_out),
        "col_order": torch.randperm(d_in),
    }


def _captured(monkeypatch, p, k, path, mode):
    grad_y = torch.full((p["x"].shape[0], p["weight"].shape[0]), 0.01)
    args = (p["x"], p["x"], p["weight"], p["bias"], p["lora_A"], p["lora_B"], p["row_order"], p["col_order"], k, 0.5)
    smoa_linear_triton(*args, path=path).backward(grad_y)  # warm: what is made once per shape is not a step's launch
    for t in (p["x"], p["bias"], p["lora_A"], p["lora_B"]):
        if t is not None:
            t.grad = None
    with _recording(monkeypatch) as log:
        grad = torch.is_grad_enabled() and mode == "full"
        with torch.set_grad_enabled(grad):
            y = smoa_linear_triton(*args, path=path)
        forward = len(log)
        if mode == "full":
            y.backward(grad_y)
    assert all(torch.isfinite(t).all() for t in (y, *([p["lora_A"].grad] if mode == "full" else [])))
    return log[:forward], log[forward:]


def _modelled(method, mode, n, d_out, d_in, r_k, k, bias, element_bytes=4):
    passes = cm.passes(method, mode, n, d_out, d_in, r_k * k, k, element_bytes=element_bytes, bias=bias)
    return [op for p in passes for op in p.ops]


@pytest.mark.parametrize(
    ("n", "d_out", "d_in", "k", "r_k", "bias"),
    [(8, 40, 36, 2, 4, False), (5, 67, 53, 4, 3, True), (3, 24, 20, 1, 16, True)],
)
def test_blocked_training_step_launches_are_the_models_passes(monkeypatch, n, d_out, d_in, k, r_k, bias):
    p = _problem(n, d_out, d_in, r_k, k, bias)
    forward, backward = _captured(monkeypatch, p, k, "blocked", "full")
    assert forward == _modelled("smoa-blocked", "forward", n, d_out, d_in, r_k, k, bias)
    assert forward + backward == _modelled("smoa-blocked", "full", n, d_out, d_in, r_k, k, bias)


def test_epilogue_chunks_are_passes_too(monkeypatch):
    # a block of more row tiles than one epilogue launch takes is done in chunks: the model reads the same constant
    monkeypatch.setattr(blocked, "EPILOGUE_CHUNK_TILES", 1)
    p = _problem(4, 70, 36, 2, 4, False)  # bands of 35 rows: two chunks of 32-row tiles per block
    forward, backward = _captured(monkeypatch, p, 2, "blocked", "full")
    modelled = _modelled("smoa-blocked", "full", 4, 70, 36, 4, 2, False)
    assert forward + backward == modelled
    assert modelled.count("triton.factor_epilogue") == 4 and "aten.add_" in modelled


@pytest.mark.parametrize(
    ("mode", "d_out", "d_in", "r_k", "dtype"),
    [
        ("inference", 48, 40, 4, torch.float32),  # rank and reduction padded: U and V zero-filled first
        ("full", 48, 40, 4, torch.float32),
        ("full", 32, 48, 8, torch.float32),  # K·r_k = 16 = the rank pad, d multiples of 16: no zero fill
        ("inference", 32, 48, 8, torch.float16),  # fp32 factors cast to the activation dtype
    ],
)
def test_fused_launches_are_the_models_passes(monkeypatch, mode, d_out, d_in, r_k, dtype):
    n, k = 16, 2
    p = _problem(n, d_out, d_in, r_k, k, False)
    for name in ("x", "weight"):
        p[name] = p[name].detach().to(dtype).requires_grad_(p[name].requires_grad)
    forward, backward = _captured(monkeypatch, p, k, "fused", mode)
    e = dtype.itemsize
    forward_mode = "forward" if mode == "full" else "inference"  # a training forward keeps what backward needs
    assert forward == _modelled("smoa-fused", forward_mode, n, d_out, d_in, r_k, k, False, e)
    if mode == "full":
        assert forward + backward == _modelled("smoa-fused", "full", n, d_out, d_in, r_k, k, False, e)


def test_the_canonical_pass_lists_count_every_launch():
    # at the canonical shape the pass lists are what the step launches: the counts the docs quote come from here
    for k in (2, 4):
        ops = [op for p in cm.passes("smoa-blocked", "full", 8192, 4096, 4096, 32, k) for op in p.ops]
        assert len(ops) == sum(p.launches for p in cm.passes("smoa-blocked", "full", 8192, 4096, 4096, 32, k))
        assert ops.count("aten.mm") == 3 * k and ops.count("triton.factor_epilogue") == k
        assert len(ops) == {2: 32, 4: 44}[k]  # the counts docs/kernels.md quotes
    decode = [op for p in cm.passes("smoa-fused", "inference", 16, 4096, 4096, 32, 2) for op in p.ops]
    assert decode == ["triton.orders", "triton.orders_check", "triton.fused_operands", "triton.gemm"]
