"""Shared test helpers: the one tolerance table and input factories (used by tests/ and benchmarks/)."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

import torch
import torch.nn as nn

# Added to every seed the tests draw inputs with: SMOA_TEST_SEED=n reruns the suite on other random inputs (.ci/matrix),
# so that no bound holds only for the one draw it was written on.
TEST_SEED = int(os.environ.get("SMOA_TEST_SEED", "0"))


@contextlib.contextmanager
def triton_interpreter() -> Iterator[None]:
    """``TRITON_INTERPRET=1`` for the block (Triton reads it at each launch), the previous value restored after; for
    module-scoped fixtures, where pytest's ``monkeypatch`` (function-scoped) cannot be used."""
    previous = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "1"
    try:
        yield
    finally:
        if previous is None:
            del os.environ["TRITON_INTERPRET"]
        else:
            os.environ["TRITON_INTERPRET"] = previous


def seeded(seed: int) -> int:
    """``seed`` shifted by ``SMOA_TEST_SEED`` (0 by default: the seeds as written)."""
    return seed + TEST_SEED


# (atol, rtol) per compute dtype for comparing a fast path with the reference. fp64 is exact up to reassociation;
# fp32 differs by summation order over ≤ a few hundred terms; half precisions by their rounding of inputs/outputs.
TOLERANCES: dict[torch.dtype, tuple[float, float]] = {
    torch.float64: (1e-10, 1e-10),
    torch.float32: (1e-5, 1e-4),
    torch.float16: (2e-3, 2e-3),
    torch.bfloat16: (1.6e-2, 1.6e-2),
}


def assert_close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype | None = None, scale: float = 1.0):
    """``torch.testing.assert_close`` with the table's tolerance for ``dtype`` (default: ``expected.dtype``),
    with ``atol`` multiplied by ``scale`` (the magnitude of the compared quantity)."""
    atol, rtol = TOLERANCES[dtype or expected.dtype]
    torch.testing.assert_close(actual, expected.to(actual.dtype), atol=atol * scale, rtol=rtol)


def make_problem(
    n_tokens: int,
    d_in: int,
    d_out: int,
    num_blocks: int,
    rank_per_block: int,
    dtype: torch.dtype = torch.float32,
    factor_dtype: torch.dtype | None = None,
    bias: bool = True,
    seed: int = 0,
    requires_grad: bool = True,
):
    """Random inputs for the functional signature, with *non-zero* B so the adapter term is exercised.

    Returns a dict with keys x, weight, bias, lora_A, lora_B, row_order, col_order, num_blocks, scale.
    """
    gen = torch.Generator().manual_seed(seeded(seed))
    factor_dtype = factor_dtype or dtype

    def randn(*shape, dt):
        return torch.randn(*shape, generator=gen, dtype=torch.float64).to(dt)

    problem = {
        "x": randn(n_tokens, d_in, dt=dtype),
        "weight": randn(d_out, d_in, dt=dtype),
        "bias": randn(d_out, dt=dtype) if bias else None,
        "lora_A": randn(rank_per_block, d_in, dt=factor_dtype),
        "lora_B": randn(d_out, rank_per_block, dt=factor_dtype),
        "row_order": torch.randperm(d_out, generator=gen),
        "col_order": torch.randperm(d_in, generator=gen),
        "num_blocks": num_blocks,
        "scale": 0.75,
    }
    if requires_grad:
        for key in ("x", "bias", "lora_A", "lora_B"):
            if problem[key] is not None:
                problem[key].requires_grad_(True)
    return problem


def call(fn, problem, x_adapter=None):
    """Call a functional path (reference/blockwise/triton) on a problem dict; ``x_adapter`` defaults to ``x``."""
    p = problem
    x_adapter = p["x"] if x_adapter is None else x_adapter
    return fn(p["x"], x_adapter, p["weight"], p["bias"], p["lora_A"], p["lora_B"], p["row_order"], p["col_order"],
              p["num_blocks"], p["scale"])  # fmt: skip


def grads(output: torch.Tensor, problem, grad_output: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """Gradients of ``(output * grad_output).sum()`` w.r.t. every input of ``problem`` that requires grad."""
    names = [k for k in ("x", "bias", "lora_A", "lora_B") if problem[k] is not None and problem[k].requires_grad]
    if grad_output is None:
        grad_output = torch.randn(output.shape, generator=torch.Generator().manual_seed(seeded(1)), dtype=torch.float64)
    values = torch.autograd.grad(output, [problem[k] for k in names], grad_output.to(output.dtype))
    return dict(zip(names, values))


class Toy(nn.Module):
    """A two-layer MLP (16 → 12 → 8) for the PEFT compile and distributed tests."""

    def __init__(self) -> None:
        super().__init__()
        self.lin0 = nn.Linear(16, 12)
        self.act = nn.Tanh()
        self.lin1 = nn.Linear(12, 8)

    def forward(self, x):
        return self.lin1(self.act(self.lin0(x)))
