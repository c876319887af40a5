"""Backend selection: names, the context manager, the environment variable, and no silent fallback."""

import pytest
import torch
import torch.nn as nn

import smoa
import smoa.backends as backends
from smoa import SMoALinear


def test_default_is_auto_and_resolves_to_torch_on_cpu(monkeypatch):
    monkeypatch.delenv("SMOA_BACKEND", raising=False)
    assert smoa.get_backend() == "auto"
    assert backends.resolve_backend(None, torch.device("cpu")) == "torch"


def test_use_backend_nests_and_restores(monkeypatch):
    monkeypatch.delenv("SMOA_BACKEND", raising=False)
    with smoa.use_backend("reference"):
        assert smoa.get_backend() == "reference"
        with smoa.use_backend("torch"):
            assert smoa.get_backend() == "torch"
        assert smoa.get_backend() == "reference"
    assert smoa.get_backend() == "auto"


def test_environment_variable(monkeypatch):
    monkeypatch.setenv("SMOA_BACKEND", "reference")
    assert smoa.get_backend() == "reference"
    with smoa.use_backend("torch"):  # the context manager wins over the environment
        assert smoa.get_backend() == "torch"
    monkeypatch.setenv("SMOA_BACKEND", "fastest")
    with pytest.raises(ValueError, match="SMOA_BACKEND='fastest' is not a known SMoA backend"):
        smoa.get_backend()


def test_unknown_name_is_an_error():
    with pytest.raises(ValueError, match="backend='cuda'"):
        with smoa.use_backend("cuda"):
            pass


def test_backend_chosen_is_the_one_that_runs(monkeypatch):
    calls = []
    real = backends._implementation

    def spy(name):
        calls.append(name)
        return real(name)

    monkeypatch.setattr(backends, "_implementation", spy)
    layer = SMoALinear.from_linear(nn.Linear(8, 6), r=2, num_blocks=2)
    x = torch.randn(2, 8)
    with smoa.use_backend("reference"):
        layer(x)
    layer.backend = "torch"  # a layer's own choice wins over the context
    with smoa.use_backend("reference"):
        layer(x)
    assert calls == ["reference", "torch"]


def test_unavailable_triton_raises_instead_of_falling_back(monkeypatch):
    monkeypatch.setattr(backends, "_triton_status", lambda: (False, "no GPU in this test"))
    layer = SMoALinear.from_linear(nn.Linear(8, 6), r=2, num_blocks=2, backend="triton")
    with pytest.raises(RuntimeError, match="'triton' was requested but is not available: no GPU in this test"):
        layer(torch.randn(2, 8))
    # auto never picks an unavailable backend
    assert backends.resolve_backend("auto", torch.device("cuda")) == "torch"
    assert smoa.available_backends()["triton"] == (False, "no GPU in this test")


def test_compiled_layer_follows_use_backend_without_graph_breaks(monkeypatch):
    # the active backend is a plain global: Dynamo guards on it (recompiles on change) instead of breaking the graph
    monkeypatch.delenv("SMOA_BACKEND", raising=False)
    calls = []
    real = backends._implementation
    monkeypatch.setattr(backends, "_implementation", lambda name: calls.append(name) or real(name))
    layer = SMoALinear.from_linear(nn.Linear(8, 6), r=2, num_blocks=2, init_weights=False)
    x = torch.randn(3, 8)
    torch._dynamo.reset()
    with smoa.use_backend("torch"):
        explanation = torch._dynamo.explain(layer)(x)
    assert explanation.graph_break_count == 0, [b.reason for b in explanation.break_reasons]
    compiled = torch.compile(layer, backend="eager")
    with smoa.use_backend("reference"):
        y_ref = compiled(x)
    with smoa.use_backend("torch"):
        y_torch = compiled(x)
    assert calls[-2:] == ["reference", "torch"]  # traced anew for each backend, not frozen at the first
    torch.testing.assert_close(y_torch, y_ref)
