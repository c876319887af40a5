"""``smoa bench`` provider ``smoa-multi``: T = 8 SMoA adapters of the bench's W0 served in one batch.

The batch's tokens are spread round-robin over the 8 adapters and the base layer (index ``-1``), and the layer is
:func:`smoa_kernels.multi_adapter.multi_adapter_linear` with ``backend="auto"`` (the torch path on a CPU and whenever a
gradient is needed; on CUDA inference the cheaper of the torch path and the fused multi-adapter kernel by the cost
model). Adapter 0 is the shared SMoA layer's own factors, the others random factors of the same size; every adapter's
factors are trainable. Its oracle runs each adapter alone through the single-adapter reference. Compare its row with
``smoa-torch`` (one adapter for all tokens) and ``frozen``.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from smoa.bench.providers import BenchInputs, _randomize_factors
from smoa.bench.registry import Built, Provider, register_provider

__all__ = ["MULTI_ADAPTERS", "SMOA_MULTI"]

MULTI_ADAPTERS = 8


class _MultiAdapter(nn.Module):
    def __init__(self, layer, factors, index) -> None:
        super().__init__()
        self.layer, self.factors, self.index = layer, factors, index

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        from smoa_kernels.multi_adapter import multi_adapter_linear

        layer = self.layer
        return multi_adapter_linear(x, layer.weight, layer.bias, self.factors, self.index, layer.row_order,
                                    layer.col_order, layer.num_blocks)  # fmt: skip


def _build_multi(inputs: BenchInputs, r: int, num_blocks: int) -> Built:
    from smoa_kernels.multi_adapter import AdapterFactors, multi_adapter_reference

    layer = inputs.smoa_layer(r, num_blocks)
    A0, B0 = layer.smoa_A.weight, layer.smoa_B.weight
    factors = [AdapterFactors(A0, B0, layer.scale)]
    for seed in range(1, MULTI_ADAPTERS):
        A = torch.empty_like(A0, requires_grad=False)
        B = torch.empty_like(B0, requires_grad=False)
        _randomize_factors(A, B, target_std=1.0, seed=inputs.seed + 100 * seed)
        factors.append(AdapterFactors(A.requires_grad_(True), B.requires_grad_(True), layer.scale))
    index = torch.arange(inputs.tokens, device=inputs.device) % (MULTI_ADAPTERS + 1) - 1

    def oracle(x: torch.Tensor) -> torch.Tensor:
        return multi_adapter_reference(x, layer.weight, layer.bias, factors, index, layer.row_order, layer.col_order,
                                       layer.num_blocks)  # fmt: skip

    trainable = [t for f in factors for t in (f.lora_A, f.lora_B)]
    return Built(_MultiAdapter(layer, factors, index), trainable, oracle, ("smoa-multi", r, num_blocks))


SMOA_MULTI = register_provider(
    Provider(
        "smoa-multi", "smoa",
        f"SMoA, {MULTI_ADAPTERS} adapters of one base in one batch (round-robin tokens + base-only tokens)",
        _build_multi, lambda r, K: r // K, "r,K",
    )
)  # fmt: skip
