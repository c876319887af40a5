"""The registry of ``smoa bench`` providers: what a provider is, and the one table every provider module registers into.

:mod:`~smoa.bench.providers` (the core providers), :mod:`~smoa.bench.providers_bnb` (4-bit bases) and
:mod:`~smoa.bench.providers_hira` (PEFT HiRA after :func:`smoa.accelerate`) each import this module and call
:func:`register_provider`; :mod:`~smoa.bench.run` imports all three, so the table is complete wherever a benchmark
runs. Nothing here imports a provider module.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn as nn

from smoa.backends import available_backends

if TYPE_CHECKING:
    from smoa.bench.providers import BenchInputs

__all__ = ["PROVIDERS", "Built", "Provider", "register_provider"]


@dataclass
class Built:
    """What a provider's ``build`` returns: the module to call, its trainable tensors and its oracle."""

    module: nn.Module
    trainable: list[torch.Tensor]
    oracle: Callable[[torch.Tensor], torch.Tensor]
    oracle_key: tuple
    merged: nn.Module | None = None  # the merged layer, for the inference ``merged`` variant


@dataclass(frozen=True)
class Provider:
    """One benchmarked implementation.

    ``family`` keys the FLOP-floor table (:mod:`smoa.bench.flops`); ``rank(r, K)`` is its adapter rank ρ;
    ``depends_on`` names which of r and K change its measurement (measurements are reused across the rest);
    ``backend`` is the SMoA backend it runs (``None`` for non-SMoA providers); ``cuda_only`` skips it off CUDA.
    """

    name: str
    family: str
    help: str
    build: Callable[[BenchInputs, int, int], Built]
    rank: Callable[[int, int], int]
    depends_on: str  # "" | "r" | "r/K" | "r,K"
    backend: str | None = None
    cuda_only: bool = False
    merged_variant: bool = False

    def measurement_key(self, r: int, num_blocks: int) -> tuple:
        return {"": (), "r": (r,), "r/K": (r // num_blocks,), "r,K": (r, num_blocks)}[self.depends_on]

    def unavailable(self, device: torch.device) -> str | None:
        """Why this provider cannot run on ``device`` (``None`` when it can)."""
        if self.cuda_only and torch.device(device).type != "cuda":
            return (
                f"{self.name} needs a CUDA device (on CPU the Triton interpreter is a correctness tool, not a speed "
                "one; run with --device cuda)"
            )
        if self.backend is not None:
            ok, reason = available_backends()[self.backend]
            if not ok:
                return f"the {self.backend!r} backend is unavailable: {reason}"
        if self.family in ("lora", "hira"):
            try:
                import peft  # noqa: F401
            except ImportError:
                return "peft is not installed (pip install 'smoa[bench]')"
        return None


PROVIDERS: dict[str, Provider] = {}


def register_provider(provider: Provider) -> Provider:
    """Add (or replace) a provider; ``smoa bench --providers`` accepts its name from then on."""
    PROVIDERS[provider.name] = provider
    return provider
