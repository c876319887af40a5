"""No silent wrong answers: every bad input or fault raises a clear error that names the argument and the
value, and leaves outputs, parameters, ``requires_grad`` flags and files exactly as they were; the faults that used to
give a wrong result silently (unfrozen W0, unmerge after a factor change, NaN factors through a merge, a merged
state dict, a shared W0, an edited partition, dropped orders, mixed-adapter batches, interleaved ``use_backend``
threads, ``to_empty``) now compute the right thing or refuse. Tiny layers; a tiny BERT built from a config where a
real transformers model is needed.
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import threading
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn as nn

import smoa
import smoa.backends as backends
from smoa import SMoALinear, apply_smoa
from smoa.checkpoint import allow_missing_orders
from smoa.model import adapter_state_dict

os.environ.setdefault("HF_HUB_OFFLINE", "1")
peft = pytest.importorskip("peft")
pytest.importorskip("transformers")

from peft import PeftModel, get_peft_model, get_peft_model_state_dict, set_peft_model_state_dict  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402

from smoa.peft import SMoAConfig  # noqa: E402
from smoa.peft.layer import Linear as SMoAPeftLinear  # noqa: E402

X = torch.randn(5, 12, generator=torch.Generator().manual_seed(7))


# ---- snapshots: what "nothing changed" means ------------------------------------------------------------------
def snapshot(module: nn.Module, x: torch.Tensor | None = None) -> dict:
    state = {k: v.detach().clone() for k, v in module.state_dict(keep_vars=True).items()}
    flags = {n: p.requires_grad for n, p in module.named_parameters()}
    types = {n: type(m) for n, m in module.named_modules()}
    out = None
    if x is not None:
        with torch.no_grad():
            out = module(x).detach().clone()
    return {"state": state, "flags": flags, "types": types, "out": out, "x": x}


def assert_unchanged(module: nn.Module, snap: dict) -> None:
    assert {n: type(m) for n, m in module.named_modules()} == snap["types"]
    assert {n: p.requires_grad for n, p in module.named_parameters()} == snap["flags"]
    state = module.state_dict(keep_vars=True)
    assert set(state) == set(snap["state"])
    for key, value in snap["state"].items():
        assert same(state[key].detach(), value), key
    if snap["out"] is not None:
        with torch.no_grad():
            assert torch.equal(module(snap["x"]), snap["out"])


def same(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal values, NaNs in the same places."""
    if a.shape != b.shape or a.dtype != b.dtype:
        return False
    if a.is_floating_point():
        return torch.equal(torch.isnan(a), torch.isnan(b)) and torch.equal(a.nan_to_num(0.0), b.nan_to_num(0.0))
    return torch.equal(a, b)


def folder_digest(path: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(path.iterdir()) if p.is_file()}


def linear(d_in: int = 12, d_out: int = 10, seed: int = 0, **kwargs) -> nn.Linear:
    torch.manual_seed(seed)
    return nn.Linear(d_in, d_out, **kwargs)


def layer(seed: int = 0, **kwargs) -> SMoALinear:
    options = {"r": 4, "num_blocks": 2, "init_weights": False} | kwargs
    return SMoALinear.from_linear(linear(seed=seed), **options)


def linear_snapshot(lin: nn.Linear) -> tuple:
    return (lin.weight.detach().clone(), lin.bias.detach().clone(), lin.weight.requires_grad, lin.bias.requires_grad,
            set(vars(lin.weight)))  # fmt: skip


# ---- 1. construction: a failure leaves the wrapped nn.Linear as it was ------------------------------------------
def _nan_linear():
    lin = linear()
    with torch.no_grad():
        lin.weight[2, 3] = float("nan")
    return lin


def _inf_linear():
    lin = linear()
    with torch.no_grad():
        lin.weight[0, 0] = float("-inf")
    return lin


BAD_CONSTRUCTION = [
    # (id, linear factory, options, error, pattern naming argument and value)
    ("svd_dtype=fp16", linear, {"svd_dtype": torch.float16}, ValueError, r"svd_dtype=torch\.float16"),
    ("svd_dtype=str", linear, {"svd_dtype": "float64"}, ValueError, r"svd_dtype='float64'"),
    ("factor_dtype=int32", linear, {"factor_dtype": torch.int32}, TypeError, r"factor_dtype=torch\.int32"),
    ("factor_dtype=bool", linear, {"factor_dtype": torch.bool}, TypeError, r"factor_dtype=torch\.bool"),
    ("factor_dtype=str", linear, {"factor_dtype": "float32"}, TypeError, r"factor_dtype='float32'"),
    ("nan-weight", _nan_linear, {}, ValueError, r"weight contains NaN or Inf"),
    ("inf-weight", _inf_linear, {}, ValueError, r"weight contains NaN or Inf"),
    ("nan-weight-identity", _nan_linear, {"ordering": "identity"}, ValueError, r"weight contains NaN or Inf"),
    ("r=0", linear, {"r": 0}, ValueError, r"r=0 must be >= 1"),
    ("r=2.5", linear, {"r": 2.5}, TypeError, r"r must be an int, got 2\.5"),
    ("r=True", linear, {"r": True}, TypeError, r"r must be an int, got True"),
    ("num_blocks=0", linear, {"num_blocks": 0}, ValueError, r"num_blocks=0 must be >= 1"),
    ("num_blocks>min", linear, {"num_blocks": 11, "r": 11}, ValueError, r"num_blocks=11 exceeds"),
    ("block_ranks sum", linear, {"r": 5, "block_ranks": [2, 2]}, ValueError, r"block_ranks=\[2, 2\] sums to 4 but r=5"),
    ("alpha=0", linear, {"alpha": 0}, ValueError, r"alpha=0 must be"),
    ("alpha=inf", linear, {"alpha": float("inf")}, ValueError, r"alpha=inf must be"),
    ("dropout=1", linear, {"dropout": 1.0}, ValueError, r"dropout=1\.0 must be in"),
    ("ordering", linear, {"ordering": "svd"}, ValueError, r"ordering='svd' is not one of"),
    ("backend", linear, {"backend": "gpu"}, ValueError, r"backend='gpu' is not a known SMoA backend"),
]


@pytest.mark.parametrize("make, options, error, pattern", [c[1:] for c in BAD_CONSTRUCTION],
                         ids=[c[0] for c in BAD_CONSTRUCTION])  # fmt: skip
def test_failed_construction_leaves_the_linear(make, options, error, pattern):
    lin = make()
    before = linear_snapshot(lin)
    with pytest.raises(error, match=pattern):
        SMoALinear.from_linear(lin, **({"r": 4, "num_blocks": 2} | options))
    after = linear_snapshot(lin)
    assert torch.equal(after[0], before[0]) or (torch.isnan(after[0]) == torch.isnan(before[0])).all()
    assert after[2:] == before[2:]  # still trainable, no marker left on the weight


def test_integer_weight_is_refused_and_left_alone():
    lin = linear()
    lin.weight = nn.Parameter(torch.ones(10, 12, dtype=torch.int32), requires_grad=False)
    with pytest.raises(TypeError, match=r"weight has dtype=torch\.int32"):
        SMoALinear.from_linear(lin, r=4)
    assert lin.bias.requires_grad and lin.weight.dtype == torch.int32


def test_meta_device_layer_refuses_until_its_orders_are_loaded():
    real = layer()
    meta = SMoALinear(12, 10, r=4, num_blocks=2, device="meta")
    meta.to_empty(device="cpu")  # garbage everywhere: the orders must not index W0 out of range
    assert bool((meta.row_order == -1).all())
    with pytest.raises(RuntimeError, match=r"no orders yet .*recompute_orders"):
        meta(X)
    meta.load_state_dict(real.state_dict())
    assert torch.equal(meta(X), real(X))


def test_to_empty_keeps_known_orders():
    lay = layer()
    rows, cols = lay.row_order.clone(), lay.col_order.clone()
    lay.to_empty(device="cpu")
    assert torch.equal(lay.row_order, rows) and torch.equal(lay.col_order, cols)


# ---- 2. orders: validated where they enter, guarded at the call ----------------------------------------------------
BAD_ORDERS = [
    ("repeated", "row_order", lambda: torch.tensor([0, 0, 2, 3, 4, 5, 6, 7, 8, 9]), r"row_order is not a permutation"),
    ("out-of-range", "row_order", lambda: torch.tensor([0, 1, 2, 3, 4, 5, 6, 7, 8, 99]), r"row_order is not a perm"),
    ("negative", "col_order", lambda: torch.arange(12) - 1, r"col_order is not a permutation of range\(12\)"),
    ("short", "col_order", lambda: torch.arange(11), r"col_order must be a permutation of range\(12\), got shape \(11"),
    ("2-D", "row_order", lambda: torch.arange(10).view(2, 5), r"row_order must be a permutation .*shape \(2, 5\)"),
    ("float", "row_order", lambda: torch.arange(10.0), r"row_order must be an integer tensor, got dtype=torch.float32"),
    ("bool", "col_order", lambda: torch.ones(12, dtype=torch.bool), r"col_order must be an integer tensor.*bool"),
    ("list", "row_order", lambda: list(range(10)), r"row_order must be a permutation of range\(10\), got shape list"),
    ("meta", "row_order", lambda: torch.empty(10, dtype=torch.long, device="meta"), r"row_order .*meta tensor"),
]


@pytest.mark.parametrize("name, make, pattern", [c[1:] for c in BAD_ORDERS], ids=[c[0] for c in BAD_ORDERS])
def test_assigning_a_bad_order_is_refused(name, make, pattern):
    lay = layer()
    snap = snapshot(lay, X)
    with pytest.raises(ValueError, match=pattern):
        setattr(lay, name, make())
    assert_unchanged(lay, snap)


def test_assigning_a_valid_order_of_any_int_dtype_is_stored_as_int64():
    lay = layer()
    lay.row_order = torch.arange(10, dtype=torch.int16).flip(0)
    assert lay.row_order.dtype == torch.int64 and torch.equal(lay.row_order, torch.arange(9, -1, -1))
    lay(X)


@pytest.mark.parametrize("write", ["in-place", "data-swap"])
def test_an_order_corrupted_after_validation_is_caught_at_the_call(write):
    lay = layer()
    with torch.no_grad():
        if write == "in-place":
            lay.row_order[0] = lay.row_order[1]
        else:
            lay.row_order.data = torch.full((10,), 50)
    with pytest.raises(ValueError, match=r"row_order is not a permutation of range\(10\)"):
        lay(X)


# ---- 3. load_state_dict: checked before anything is written ------------------------------------------------------
def _edit(key, value):
    return lambda sd: sd | {key: value(sd[key])}


def _nan_at(t):
    t = t.clone()
    t.view(-1)[0] = float("nan")
    return t


def _inf_at(t):
    t = t.clone()
    t.view(-1)[-1] = float("inf")
    return t


def _drop(*keys):
    return lambda sd: {k: v for k, v in sd.items() if k not in keys}


def _info(index, value):
    def edit(t):
        t = t.clone()
        t[index] = value
        return t

    return edit


BAD_STATE = [
    ("nan-A", _edit("smoa_A.weight", _nan_at), ValueError, r"smoa_A\.weight holds 1 NaN/Inf"),
    ("inf-B", _edit("smoa_B.weight", _inf_at), ValueError, r"smoa_B\.weight holds 1 NaN/Inf"),
    ("nan-W0", _edit("weight", _nan_at), ValueError, r"weight holds 1 NaN/Inf"),
    (
        "int-A",
        _edit("smoa_A.weight", lambda t: t.long()),
        ValueError,
        r"smoa_A\.weight must be a floating-point.*int64",
    ),
    ("float-order", _edit("row_order", lambda t: t.double()), ValueError, r"row_order must be an integer tensor"),
    ("bad-order", _edit("col_order", lambda t: t * 0), ValueError, r"col_order is not a permutation of range\(12\)"),
    ("one-order", _drop("col_order"), ValueError, r"row_order is loaded without col_order"),
    ("factors-only", _drop("row_order", "col_order"), ValueError, r"loaded without row_order/col_order.*allow_missing"),
    ("orders-only", _drop("smoa_A.weight", "smoa_B.weight"), ValueError, r"row_order/col_order are loaded without"),
    ("rank", _edit("smoa_A.weight", lambda t: torch.zeros(4, 12)), ValueError, r"smoa_A\.weight has shape \(4, 12\)"),
    ("info-K", _edit("partition_info", _info(1, 4)), ValueError, r"num_blocks=4 in the checkpoint but 2 here"),
    ("info-r", _edit("partition_info", _info(2, 8)), ValueError, r"r=8 in the checkpoint but 4 here"),
    ("info-shape", _edit("partition_info", _info(4, 13)), ValueError, r"in_features=13 in the checkpoint but 12"),
    ("info-float", _edit("partition_info", lambda t: t.double()), ValueError, r"partition_info is not an SMoA"),
    ("info-format", _edit("partition_info", _info(0, 9)), ValueError, r"partition_info has format 9"),
]


@pytest.mark.parametrize("edit, error, pattern", [c[1:] for c in BAD_STATE], ids=[c[0] for c in BAD_STATE])
def test_bad_state_dict_is_refused_and_nothing_loaded(edit, error, pattern):
    source, target = layer(seed=1), layer(seed=2)
    snap = snapshot(target, X)
    with pytest.raises(error, match=pattern):
        target.load_state_dict(edit(source.state_dict()), strict=False)
    assert_unchanged(target, snap)


def test_orders_in_any_integer_dtype_load_as_int64():
    source, target = layer(seed=1), layer(seed=2)
    state = source.state_dict()
    state = state | {"row_order": state["row_order"].to(torch.int16), "col_order": state["col_order"].to(torch.int32)}
    target.load_state_dict(state)
    assert target.row_order.dtype == torch.int64 and torch.equal(target(X), source(X))


def test_loading_into_a_merged_layer_is_refused():
    source, target = layer(seed=1), layer(seed=2)
    target.merge()
    snap = snapshot(target, X)
    with pytest.raises(RuntimeError, match=r"merged: call unmerge\(\) before load_state_dict"):
        target.load_state_dict(source.state_dict())
    assert_unchanged(target, snap)


def test_adapter_state_dict_keeps_the_orders_and_a_trainable_only_dict_is_refused():
    trained = layer(seed=1)
    fresh = SMoALinear.from_linear(_same_base(trained), r=4)
    trainable_only = {k: v for k, v in trained.state_dict(keep_vars=True).items() if v.requires_grad}
    snap = snapshot(fresh, X)
    with pytest.raises(ValueError, match=r"\['smoa_A\.weight', 'smoa_B\.weight'\] loaded without row_order"):
        fresh.load_state_dict(trainable_only, strict=False)
    assert_unchanged(fresh, snap)
    fresh.load_state_dict(trained.adapter_state_dict(), strict=False)
    assert torch.equal(fresh(X), trained(X))
    with allow_missing_orders(), pytest.warns(UserWarning, match="recomputing them from W0"):
        fresh.load_state_dict(trainable_only, strict=False)  # the explicit opt-in


def _same_base(trained: SMoALinear) -> nn.Linear:
    lin = nn.Linear(12, 10)
    with torch.no_grad():
        lin.weight.copy_(trained.weight)
        lin.bias.copy_(trained.bias)
    return lin


def test_adapter_loaded_onto_another_w0_warns():
    trained = layer(seed=1)
    other = layer(seed=5)
    with pytest.warns(UserWarning, match="differs from the one this SMoA adapter was trained on"):
        other.load_state_dict(trained.adapter_state_dict(), strict=False)
    same = SMoALinear.from_linear(_same_base(trained), r=4)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        same.load_state_dict(trained.adapter_state_dict(), strict=False)


class Two(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin0 = nn.Linear(12, 10)
        self.lin1 = nn.Linear(10, 3)

    def forward(self, x):
        return self.lin1(torch.tanh(self.lin0(x)))


def two(seed: int = 0) -> Two:
    torch.manual_seed(seed)
    return Two()


def test_whole_model_load_is_all_or_nothing():
    source, target = two(1), two(2)
    apply_smoa(source, ["lin0", "lin1"], r=2, num_blocks=1, init_weights=False)
    apply_smoa(target, ["lin0", "lin1"], r=2, num_blocks=1, init_weights=False)
    state = source.state_dict()
    state["lin1.smoa_B.weight"] = _nan_at(state["lin1.smoa_B.weight"])  # the last layer is bad
    snap = snapshot(target, X)
    with pytest.raises(ValueError, match=r"lin1\.smoa_B\.weight holds 1 NaN/Inf"):
        target.load_state_dict(state)
    assert_unchanged(target, snap)  # lin0 was not loaded either
    good = adapter_state_dict(source)
    assert {k for k in good if "order" in k} == {"lin0.row_order", "lin0.col_order", "lin1.row_order", "lin1.col_order"}


# ---- 4. apply_smoa: every target validated before any is touched ----------------------------------------------
BAD_APPLY = [
    ("regex", {"target_modules": "lin("}, ValueError, r"target_modules='lin\(' is not a valid regular expression"),
    ("exclude-regex", {"target_modules": ["lin0"], "exclude_modules": "[x"}, ValueError, r"exclude_modules='\[x'"),
    (
        "second-too-small",
        {"target_modules": ["lin0", "lin1"], "num_blocks": 4, "r": 4},
        ValueError,
        r"num_blocks=4 exceeds min\(in_features, out_features\)=3",
    ),
    (
        "second-factor-dtype",
        {"target_modules": ["lin0", "lin1"], "factor_dtype": torch.int8},
        TypeError,
        r"factor_dtype=torch\.int8",
    ),
    ("unknown-name", {"target_modules": ["lin0", "lin9"]}, ValueError, r"target_modules entry 'lin9' matches no"),
]


@pytest.mark.parametrize("options, error, pattern", [c[1:] for c in BAD_APPLY], ids=[c[0] for c in BAD_APPLY])
def test_failed_apply_smoa_leaves_the_model(options, error, pattern):
    model = two()
    model.lin1.bias.requires_grad_(False)  # a user's own flag must survive too
    snap = snapshot(model, X)
    with pytest.raises(error, match=pattern):
        apply_smoa(model, **({"r": 2, "num_blocks": 1} | options))
    assert_unchanged(model, snap)


# ---- 5. merge: bit-exact unmerge, safe_merge, merged state dicts, shared W0 ------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_unmerge_after_the_factors_changed_is_bit_exact(dtype):
    lin = linear(dtype=dtype)
    lay = SMoALinear.from_linear(lin, r=4, num_blocks=2, init_weights=False)
    W0 = lin.weight.detach().clone()
    lay.merge()
    optimizer = torch.optim.SGD(lay.parameters(), lr=0.5)
    lay.smoa_A.weight.grad = torch.randn_like(lay.smoa_A.weight)
    optimizer.step()  # the factors move while merged
    lay.unmerge()
    assert torch.equal(lin.weight, W0)


def test_nan_factors_through_merge_and_unmerge_restore_w0_exactly():
    lin = linear()
    with torch.no_grad():
        lin.weight[1, :] = 0.0  # zeros of W0 were the entries that became NaN
    lay = SMoALinear.from_linear(lin, r=4, num_blocks=2, init_weights=False)
    with torch.no_grad():
        lay.smoa_B.weight[:, 0] = float("nan")
        lay.smoa_A.weight[0, 0] = float("inf")
    W0 = lin.weight.detach().clone()
    snap = snapshot(lay)
    with pytest.raises(ValueError, match=r"NaNs detected in the merged weights \(safe_merge=True\)"):
        lay.merge(safe_merge=True)
    assert_unchanged(lay, snap)
    assert not lay.merged
    lay.merge()
    lay.unmerge()
    assert torch.equal(lin.weight, W0)


def test_state_dict_of_a_merged_layer_does_not_apply_the_update_twice():
    lay = layer(seed=1)
    expected = lay(X)
    lay.merge()
    fresh = layer(seed=3)
    fresh.load_state_dict(lay.state_dict())
    torch.testing.assert_close(fresh(X), expected, atol=1e-6, rtol=0)
    assert not fresh.merged


def test_two_wrappers_sharing_one_w0():
    lin = linear()
    first = SMoALinear.from_linear(lin, r=4, num_blocks=2, init_weights=False)
    second = SMoALinear.from_linear(lin, r=2, num_blocks=1, init_weights=False)
    expected = second(X)
    first.merge()
    for call in (lambda: second(X), second.merge, second.delta_weight):
        with pytest.raises(RuntimeError, match="holds another SMoA layer's merged update"):
            call()
    first.unmerge()
    assert torch.equal(second(X), expected)


def test_merge_smoa_output_can_be_wrapped_again():
    model = two()
    apply_smoa(model, ["lin0"], r=2, num_blocks=1, init_weights=False)
    expected = model(X)
    smoa.merge_smoa(model)
    again = SMoALinear.from_linear(model.lin0, r=2, num_blocks=1)
    torch.testing.assert_close(again(torch.randn(2, 12)).shape, torch.Size([2, 10]))
    torch.testing.assert_close(model(X), expected, atol=1e-6, rtol=0)


# ---- 6. an unfrozen W0 gets its full gradient ---------------------------------------------------------------------
def independent_output(x, W0, b, A, B, rows, cols, K, s):
    """SPEC §3 written independently: ΔW = (B̂Â) ⊙ W0 ⊙ [blk_row[i] == blk_col[c]]."""
    blk_row = torch.empty(W0.shape[0], dtype=torch.long)
    blk_col = torch.empty(W0.shape[1], dtype=torch.long)
    for k, (R_k, C_k) in enumerate(zip(torch.tensor_split(rows, K), torch.tensor_split(cols, K))):
        blk_row[R_k], blk_col[C_k] = k, k
    mask = (blk_row[:, None] == blk_col[None, :]).to(W0.dtype)
    return x @ W0.T + b + s * x @ ((B @ A) * W0 * mask).T


@pytest.mark.parametrize("backend", ["torch", "reference"])
def test_unfrozen_w0_gets_the_exact_gradient(backend):
    lin = linear(dtype=torch.float64)
    lay = SMoALinear.from_linear(lin, r=4, num_blocks=2, init_weights=False, backend=backend)
    lay.weight.requires_grad_(True)
    x = X.double()
    backends._warned_weight_grad = False
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        lay(x).square().sum().backward()
    assert (backend == "torch") == any("do not differentiate" in str(w.message) for w in caught)
    W0 = lin.weight.detach().clone().requires_grad_(True)
    out = independent_output(x, W0, lin.bias.detach(), lay.smoa_A.weight.detach(), lay.smoa_B.weight.detach(),
                             lay.row_order, lay.col_order, 2, lay.scale)  # fmt: skip
    out.square().sum().backward()
    torch.testing.assert_close(lay.weight.grad, W0.grad, atol=1e-12, rtol=1e-10)


# ---- 7. use_backend is per thread -----------------------------------------------------------------------------
def test_use_backend_in_two_interleaved_threads(monkeypatch):
    monkeypatch.delenv("SMOA_BACKEND", raising=False)
    step = [threading.Event() for _ in range(4)]
    seen: dict[str, list[str]] = {"a": [], "b": []}

    def thread_a():
        with smoa.use_backend("reference"):
            step[0].set()
            step[1].wait(5)
            seen["a"].append(smoa.get_backend())  # b entered "torch" meanwhile
        step[2].set()  # a leaves first, while b is still inside
        step[3].wait(5)
        seen["a"].append(smoa.get_backend())

    def thread_b():
        step[0].wait(5)
        with smoa.use_backend("torch"):
            step[1].set()
            step[2].wait(5)
            seen["b"].append(smoa.get_backend())
            seen["b"].append(backends.resolve_backend(None, torch.device("cpu")))
        step[3].set()
        seen["b"].append(smoa.get_backend())

    threads = [threading.Thread(target=thread_a), threading.Thread(target=thread_b)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    assert seen == {"a": ["reference", "auto"], "b": ["torch", "torch", "auto"]}
    assert smoa.get_backend() == "auto"


# ---- 8. determinism ---------------------------------------------------------------------------------------------
def _forward_backward(backend: str, device: str, dtype=torch.float32):
    lay = SMoALinear.from_linear(linear(48, 40, seed=3, dtype=dtype).to(device), r=8, num_blocks=2,
                                 init_weights=False, backend=backend)  # fmt: skip
    x = torch.randn(33, 48, generator=torch.Generator().manual_seed(5), dtype=dtype).to(device).requires_grad_(True)
    y = lay(x)
    y.square().sum().backward()
    return y.detach(), x.grad, lay.smoa_A.weight.grad, lay.smoa_B.weight.grad


def _assert_deterministic(backend: str, device: str) -> None:
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        first, second = _forward_backward(backend, device), _forward_backward(backend, device)
    finally:
        torch.use_deterministic_algorithms(previous)
    for a, b in zip(first, second):
        assert torch.equal(a, b)


@pytest.mark.parametrize("backend", ["reference", "torch"])
def test_deterministic_on_cpu(backend):
    _assert_deterministic(backend, "cpu")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("backend", ["reference", "torch", "triton"])
def test_deterministic_on_gpu(backend):
    _assert_deterministic(backend, "cuda")


# ---- 9. PEFT: adapter folders, loads, merges, mixed batches -----------------------------------------------------
def toy(seed: int = 0) -> Two:
    return two(seed)


def smoa_peft(base=None, **config) -> PeftModel:
    config = {"r": 4, "num_blocks": 2, "target_modules": ["lin0", "lin1"], "init_weights": False} | config
    return get_peft_model(toy() if base is None else base, SMoAConfig(**config))


@pytest.fixture(scope="module")
def saved_adapter(tmp_path_factory):
    path = tmp_path_factory.mktemp("adapter")
    model = smoa_peft(num_blocks=1, r=2)
    model.save_pretrained(path)
    return path


@pytest.fixture
def adapter(saved_adapter, tmp_path):
    for file in saved_adapter.iterdir():
        (tmp_path / file.name).write_bytes(file.read_bytes())
    return tmp_path


def _tensors(path):
    return load_file(path / "adapter_model.safetensors")


def _write_tensors(path, tensors):
    save_file(tensors, path / "adapter_model.safetensors")


def _write_config(path, **changes):
    config = json.loads((path / "adapter_config.json").read_text())
    (path / "adapter_config.json").write_text(json.dumps(config | changes))


def _nan_file(path):
    t = _tensors(path)
    t["base_model.model.lin0.smoa_A.weight"][0, 0] = float("nan")
    _write_tensors(path, t)


def _inf_file(path):
    t = _tensors(path)
    t["base_model.model.lin1.smoa_B.weight"][-1, -1] = float("inf")
    _write_tensors(path, t)


def _no_orders_file(path):
    t = _tensors(path)
    del t["base_model.model.lin0.smoa_row_order"], t["base_model.model.lin0.smoa_col_order"]
    _write_tensors(path, t)


def _edited_partition(path):  # r=2, K=1 → r=4, K=2: r/K and so every factor shape stay the same
    _write_config(path, r=4, num_blocks=2)


def _pickle_bin(path):
    marker = path / "UNPICKLED"

    class Payload:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    (path / "adapter_model.safetensors").unlink()
    (path / "adapter_model.bin").write_bytes(pickle.dumps(Payload()))


BAD_FOLDERS = [
    ("nan-factor", _nan_file, ValueError, r"lin0\.smoa_A\.weight in .*adapter_model\.safetensors holds 1 NaN/Inf"),
    ("inf-factor", _inf_file, ValueError, r"lin1\.smoa_B\.weight in .*adapter_model\.safetensors holds 1 NaN/Inf"),
    ("no-orders", _no_orders_file, ValueError, r"lin0\.smoa_row_order\.\w+: missing"),
    ("edited-partition", _edited_partition, ValueError, r"num_blocks=1 in the checkpoint but 2 here"),
    (
        "bad-json",
        lambda p: (p / "adapter_config.json").write_text("{not json"),
        ValueError,
        r"adapter_config\.json is not valid JSON",
    ),
    (
        "json-list",
        lambda p: (p / "adapter_config.json").write_text("[1, 2]"),
        ValueError,
        r"adapter_config\.json must hold a JSON object, got list",
    ),
    ("bad-r", lambda p: _write_config(p, r="four"), TypeError, r"adapter_config\.json: r must be an int, got 'four'"),
    ("bad-ordering", lambda p: _write_config(p, ordering="svd"), ValueError, r"json: ordering='svd' is not one of"),
    (
        "bad-regex",
        lambda p: _write_config(p, target_modules="lin("),
        ValueError,
        r"json: target_modules='lin\(' is not a valid regular expression",
    ),
    (
        "says-lora",
        lambda p: _write_config(p, peft_type="LORA"),
        ValueError,
        r"says peft_type='LORA', but the folder holds an SMoA adapter",
    ),
    ("says-unknown", lambda p: _write_config(p, peft_type="FANCY"), ValueError, r"says peft_type='FANCY'"),
    (
        "truncated",
        lambda p: (p / "adapter_model.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}"),
        ValueError,
        r"is not a readable safetensors file",
    ),
    ("pickle-bin", _pickle_bin, ValueError, r"adapter_model\.bin: SMoA adapters are read from .* only; refusing"),
]


@pytest.mark.parametrize("corrupt, error, pattern", [c[1:] for c in BAD_FOLDERS], ids=[c[0] for c in BAD_FOLDERS])
@pytest.mark.parametrize("route", ["from_pretrained", "load_adapter"])
def test_bad_adapter_folder_is_refused_and_nothing_changes(adapter, corrupt, error, pattern, route):
    corrupt(adapter)
    files = folder_digest(adapter)
    if route == "from_pretrained":
        model = toy()
        model.lin1.weight.requires_grad_(False)  # a flag PEFT would change on the way
    else:
        model = smoa_peft(num_blocks=1, r=2)
    snap = snapshot(model, X)
    with pytest.raises(error, match=pattern):
        if route == "from_pretrained":
            PeftModel.from_pretrained(model, adapter)
        else:
            model.load_adapter(adapter, adapter_name="other")
    assert_unchanged(model, snap)
    assert folder_digest(adapter) == files
    assert not (adapter / "UNPICKLED").exists()


def test_orders_saved_in_a_small_integer_dtype_load(adapter):
    reference = PeftModel.from_pretrained(toy(), adapter)
    t = _tensors(adapter)
    for key in [k for k in t if k.endswith("_order")]:
        t[key] = t[key].to(torch.int16)
    _write_tensors(adapter, t)
    loaded = PeftModel.from_pretrained(toy(), adapter)
    assert torch.equal(loaded(X), reference(X))


def test_adapter_on_another_base_warns(adapter):
    with pytest.warns(UserWarning, match="differs from the one this SMoA adapter was trained on"):
        PeftModel.from_pretrained(toy(seed=9), adapter)


def test_get_peft_model_state_dict_keeps_the_orders_and_a_load_without_them_is_refused():
    trained, fresh = smoa_peft(), smoa_peft()
    state = get_peft_model_state_dict(trained)
    assert {"base_model.model.lin0.smoa_row_order", "base_model.model.lin0.smoa_partition_info"} <= set(state)
    factors_only = {k: v for k, v in state.items() if k.endswith(".weight")}
    snap = snapshot(fresh, X)
    with pytest.raises(ValueError, match=r"smoa_row_order\.default: missing"):
        set_peft_model_state_dict(fresh, factors_only)
    assert_unchanged(fresh, snap)
    with pytest.raises(ValueError, match=r"smoa_A\.default\.weight'.*loaded without .*allow_missing_orders"):
        fresh.load_state_dict(_peft_keys(factors_only), strict=False)  # the "trainable parameters only" pattern
    assert_unchanged(fresh, snap)
    with allow_missing_orders(), pytest.warns(UserWarning, match="recomputing them from W0"):
        smoa_peft().load_state_dict(_peft_keys(factors_only), strict=False)  # the explicit opt-in
    set_peft_model_state_dict(fresh, state)
    assert torch.equal(fresh(X), trained(X))


def _peft_keys(state: dict) -> dict:
    """get_peft_model_state_dict keys → the model's own keys (adapter name inserted)."""
    out = {}
    for key, value in state.items():
        module, attr = key.rsplit(".smoa_", 1)
        attr, *rest = attr.split(".")
        out[f"{module}.smoa_{attr}.default" + ("." + ".".join(rest) if rest else "")] = value
    return out


def test_peft_unmerge_after_a_training_step_and_with_nan_factors_is_bit_exact():
    model = smoa_peft()
    layers = [m for m in model.modules() if isinstance(m, SMoAPeftLinear)]
    W0 = [m.get_base_layer().weight.detach().clone() for m in layers]
    model.merge_adapter()
    with torch.no_grad():
        for m in layers:
            m.smoa_B["default"].weight.add_(1.0)
            m.smoa_A["default"].weight[0, 0] = float("nan")
    model.unmerge_adapter()
    for m, w in zip(layers, W0):
        assert torch.equal(m.get_base_layer().weight, w)
    with pytest.raises(ValueError, match="NaNs detected in the merged weights"):
        model.merge_and_unload(safe_merge=True)
    for m, w in zip(layers, W0):
        assert torch.equal(m.get_base_layer().weight, w) and not m.merged


def test_peft_state_dict_of_a_merged_model_does_not_double_apply():
    model = smoa_peft()
    expected = model(X)
    model.merge_adapter()
    fresh = smoa_peft(toy(seed=4))
    fresh.load_state_dict(model.state_dict())
    torch.testing.assert_close(fresh(X), expected, atol=1e-6, rtol=0)


def test_peft_load_into_a_merged_adapter_is_refused():
    source, target = smoa_peft(toy(1)), smoa_peft()
    target.merge_adapter()
    snap = snapshot(target, X)
    with pytest.raises(ValueError, match=r"adapter 'default' is merged into .*lin0"):
        set_peft_model_state_dict(target, get_peft_model_state_dict(source))
    assert_unchanged(target, snap)


def test_peft_to_empty_keeps_the_orders():
    model = smoa_peft()
    layer0 = model.base_model.model.lin0
    rows = layer0.smoa_row_order["default"].clone()
    model.to_empty(device="cpu")
    assert torch.equal(layer0.smoa_row_order["default"], rows)


BAD_PEFT_ORDERS = [
    ("repeated", lambda: torch.zeros(10, dtype=torch.long), r"smoa_row_order\.default is not a permutation"),
    ("float", lambda: torch.arange(10.0), r"smoa_row_order\.default must be an integer tensor"),
    ("short", lambda: torch.arange(9), r"smoa_row_order\.default must be a permutation of range\(10\)"),
]


@pytest.mark.parametrize("make, pattern", [c[1:] for c in BAD_PEFT_ORDERS], ids=[c[0] for c in BAD_PEFT_ORDERS])
def test_peft_order_assignment_is_validated(make, pattern):
    model = smoa_peft()
    snap = snapshot(model, X)
    with pytest.raises(ValueError, match=pattern):
        model.base_model.model.lin0.smoa_row_order["default"] = make()
    assert_unchanged(model, snap)


# ---- mixed-adapter batches ----------------------------------------------------------------------------------------
@pytest.fixture
def two_adapters():
    model = smoa_peft()
    model.add_adapter("other", SMoAConfig(r=2, num_blocks=1, target_modules=["lin0"], init_weights=False))
    return model.eval()


def test_mixed_batch_routes_each_sample_through_its_adapter(two_adapters):
    model = two_adapters
    names = ["default", "other", "__base__", "other", "default"]
    with torch.no_grad():
        mixed = model(X, adapter_names=names)
        per_adapter = {}
        for name in ("default", "other"):
            model.set_adapter(name)
            per_adapter[name] = model(X)
        with model.disable_adapter():
            per_adapter["__base__"] = model(X)
    for i, name in enumerate(names):
        torch.testing.assert_close(mixed[i], per_adapter[name][i], atol=1e-6, rtol=0)


BAD_MIXED = [
    ("short-list", ["default", "other"], ValueError, r"Length of `adapter_names` should be the same .* got 2 and 5"),
    ("unknown-name", ["default", "nope", "other", "other", "other"], ValueError, r"non-existing adapter\(s\): nope"),
    ("a-str", "default", TypeError, r"adapter_names='default' must be a list of str"),
]


@pytest.mark.parametrize("names, error, pattern", [c[1:] for c in BAD_MIXED], ids=[c[0] for c in BAD_MIXED])
def test_bad_mixed_batches_are_refused(two_adapters, names, error, pattern):
    snap = snapshot(two_adapters, X)
    with pytest.raises(error, match=pattern):
        two_adapters(X, adapter_names=names)
    assert_unchanged(two_adapters, snap)


def test_mixed_batch_in_train_mode_is_refused(two_adapters):
    two_adapters.train()
    with pytest.raises(ValueError, match="Cannot pass `adapter_names` when the model is in training mode"):
        two_adapters(X, adapter_names=["default"] * 5)


# ---- 10. transformers' load_adapter: all-or-nothing ------------------------------------------------------------
def tiny_bert(hidden: int = 16, seed: int = 0):
    from transformers import BertConfig, BertModel

    torch.manual_seed(seed)
    config = BertConfig(hidden_size=hidden, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
                        vocab_size=50, max_position_embeddings=16)  # fmt: skip
    return BertModel(config).eval()


@pytest.fixture(scope="module")
def bert_adapter(tmp_path_factory):
    path = tmp_path_factory.mktemp("bert")
    config = SMoAConfig(r=4, num_blocks=2, target_modules=["query", "value"], init_weights=False)
    get_peft_model(tiny_bert(), config).save_pretrained(path / "h16")
    get_peft_model(tiny_bert(hidden=24), config).save_pretrained(path / "h24")
    return path


def _bert_snapshot(model):
    ids = torch.arange(8).view(1, 8)
    with torch.no_grad():
        out = model(input_ids=ids).last_hidden_state
    return snapshot(model) | {"bert_out": out, "ids": ids}


def _assert_bert_unchanged(model, snap):
    assert_unchanged(model, snap)
    with torch.no_grad():
        assert torch.equal(model(input_ids=snap["ids"]).last_hidden_state, snap["bert_out"])
    assert not any(isinstance(m, SMoAPeftLinear) for m in model.modules())
    assert not getattr(model, "peft_config", None)


@pytest.mark.parametrize("fault", ["other-shapes", "nan", "bad-orders"])
def test_transformers_load_adapter_is_all_or_nothing(bert_adapter, tmp_path, fault):
    source = bert_adapter / ("h24" if fault == "other-shapes" else "h16")
    for file in source.iterdir():
        (tmp_path / file.name).write_bytes(file.read_bytes())
    if fault != "other-shapes":
        t = _tensors(tmp_path)
        key = next(k for k in t if k.endswith("query.smoa_A.weight" if fault == "nan" else "query.smoa_row_order"))
        t[key] = _nan_at(t[key]) if fault == "nan" else torch.zeros_like(t[key])
        _write_tensors(tmp_path, t)
    model = tiny_bert()
    snap = _bert_snapshot(model)
    pattern = {
        "other-shapes": r"loading the SMoA adapter .* failed, nothing was loaded .*ignore_mismatched_sizes",
        "nan": r"holds 1 NaN/Inf",
        "bad-orders": r"is not a permutation",
    }[fault]
    with pytest.raises(Exception, match=pattern):
        model.load_adapter(str(tmp_path))
    _assert_bert_unchanged(model, snap)


def test_transformers_load_adapter_still_loads_a_good_adapter(bert_adapter):
    model = tiny_bert()
    model.load_adapter(str(bert_adapter / "h16"))
    reference = PeftModel.from_pretrained(tiny_bert(), str(bert_adapter / "h16")).eval()
    ids = torch.arange(8).view(1, 8)
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).last_hidden_state,
                                   reference(input_ids=ids).last_hidden_state, atol=0, rtol=0)  # fmt: skip


def test_config_regex_errors_name_the_argument():
    for argument in ("target_modules", "exclude_modules"):
        with pytest.raises(ValueError, match=rf"{argument}='q\[' is not a valid regular expression"):
            SMoAConfig(**{argument: "q["})


def test_peft_meta_model_after_to_empty_refuses_until_its_checkpoint_is_loaded(adapter):
    from peft import PeftConfig

    config = PeftConfig.from_pretrained(adapter)  # read from a file: the orders will come from the checkpoint
    with torch.device("meta"):
        base = toy()
    model = PeftModel(base, config)
    model.to_empty(device="cpu")
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.zeros_like(p))  # any finite base; the orders are what matters here
    with pytest.raises(RuntimeError, match=r"adapter 'default' has no orders \(built on the meta device"):
        model(X)
    tensors = _tensors(adapter)
    set_peft_model_state_dict(model, tensors)
    layer0 = model.base_model.model.lin0
    assert torch.equal(layer0.smoa_row_order["default"], tensors["base_model.model.lin0.smoa_row_order"])
    model(X)
