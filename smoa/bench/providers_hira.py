"""``smoa bench`` provider ``hira-smoa``: PEFT's own HiRA layer after :func:`smoa.accelerate`.

The ``hira`` provider is PEFT 0.21's ``hira.Linear`` as shipped (a dense ``W0 ⊙ (BA)`` and a second full GEMM per
call); ``hira-smoa`` is the very same PEFT layer, same factors, routed through :func:`smoa.backends.smoa_linear` at
K = 1 in identity order (SPEC §6) by :func:`smoa.accelerate` — the "before" and "after" of the one-line change. Its
oracle is the ``hira`` provider's (the reference at K = 1, identity order, s = 1), so both rows are checked alike.
"""

from __future__ import annotations

import dataclasses

from smoa.bench.providers import BenchInputs, _build_hira
from smoa.bench.registry import Built, Provider, register_provider

__all__ = ["HIRA_SMOA"]


def _build_hira_smoa(inputs: BenchInputs, r: int, num_blocks: int) -> Built:
    from smoa.hira import accelerate

    built = _build_hira(inputs, r, num_blocks)
    return dataclasses.replace(built, module=accelerate(built.module))


HIRA_SMOA = register_provider(
    Provider(
        "hira-smoa", "hira", "PEFT HiRA at rank r/K after smoa.accelerate(model) (smoa backends at K = 1)",
        _build_hira_smoa, lambda r, K: r // K, "r/K",
    )
)  # fmt: skip
