"""torch.compile of a model carrying SMoA PEFT layers (the ``torch`` backend): same outputs and gradients as eager,
no graph break inside the SMoA layer, and ``fullgraph=True`` after ``merge_and_unload``."""

from __future__ import annotations

import copy

import pytest
import torch

pytest.importorskip("peft", reason="needs the [peft] extra")
pytest.importorskip("transformers", reason="needs the [peft] extra")

from peft import get_peft_model

from smoa.backends import use_backend
from smoa.peft import SMoAConfig
from tests.utils import Toy


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # compile + tiny GEMMs: threads only add contention on a shared 2-core machine
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def model():
    torch.manual_seed(0)
    return get_peft_model(Toy(), SMoAConfig(r=4, num_blocks=2, target_modules=["lin0", "lin1"], init_weights=False))


def factor_grads(model) -> dict[str, torch.Tensor]:
    return {n.removeprefix("_orig_mod."): p.grad for n, p in model.named_parameters() if p.requires_grad}


def test_compiled_model_matches_eager_outputs_and_gradients(model):
    x = torch.randn(5, 16)
    compiled_model = copy.deepcopy(model)
    with use_backend("torch"):
        eager = model(x)
        eager.square().sum().backward()
        # aot_eager: Dynamo capture + AOTAutograd (forward and backward graphs) without Inductor's C++ build, which
        # takes over a minute per graph on 2 CPU cores; Inductor is exercised by the merged fullgraph test below
        compiled = torch.compile(compiled_model, backend="aot_eager")(x)
        compiled.square().sum().backward()
    torch.testing.assert_close(compiled, eager, atol=1e-6, rtol=1e-5)
    eager_grads, compiled_grads = factor_grads(model), factor_grads(compiled_model)
    assert eager_grads.keys() == compiled_grads.keys() and len(eager_grads) == 4
    for name in eager_grads:
        torch.testing.assert_close(compiled_grads[name], eager_grads[name], atol=1e-6, rtol=1e-5)


def test_no_graph_break_inside_the_smoa_layer(model):
    x = torch.randn(5, 16)
    torch._dynamo.reset()
    with use_backend("torch"):
        explanation = torch._dynamo.explain(model)(x)
    reasons = [reason.reason for reason in explanation.break_reasons]
    assert explanation.graph_break_count == 0, reasons


def test_blockwise_function_traces_without_graph_breaks():
    """The computation under the dispatcher (smoa_kernels.blockwise) traces as one graph."""
    from smoa_kernels.blockwise import smoa_linear_blockwise

    torch.manual_seed(0)
    W0, b = torch.randn(12, 16), torch.randn(12)
    A, B = torch.randn(2, 16, requires_grad=True), torch.randn(12, 2, requires_grad=True)
    rows, cols = torch.randperm(12), torch.randperm(16)
    x = torch.randn(5, 16)

    def f(x, A, B):
        return smoa_linear_blockwise(x, x, W0, b, A, B, rows, cols, 2, 0.5)

    explanation = torch._dynamo.explain(f)(x, A, B)
    assert explanation.graph_break_count == 0, [r.reason for r in explanation.break_reasons]


def test_fullgraph_after_merge_and_unload(model):
    x = torch.randn(5, 16)
    with torch.no_grad():
        expected = model(x)
        merged = model.merge_and_unload()
        torch._dynamo.reset()
        out = torch.compile(merged, fullgraph=True)(x)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
