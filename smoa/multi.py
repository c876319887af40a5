"""Many SMoA adapters of one base in one batch, for the layers of :mod:`smoa` (the kernels and their API:
:mod:`smoa_kernels.multi_adapter`, docs/multi_adapter.md).

- :func:`adapter_bank` builds a :class:`~smoa_kernels.multi_adapter.MultiAdapterBank` from several
  :class:`smoa.layer.SMoALinear` adapters of one base layer (for users not on PEFT): one copy of W0 and of the orders,
  each adapter's factors and scale.
- :func:`peft_layer_bank` does the same for the adapters of one PEFT SMoA layer, cached on the factors' and orders'
  version counters, so the PEFT layer's ``adapter_names=`` forward routes a mixed batch through one pass over W0.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from smoa_kernels.multi_adapter import AdapterFactors, AdapterSegments, MultiAdapterBank, build_segments

__all__ = ["adapter_bank", "batch_segments", "peft_layer_bank"]

# The last batch's per-token index and segment table. A model's layers see the same adapter names and token shape in
# one forward, so they share one table (~13 small launches and one host-to-device copy per batch, not per layer).
_last_batch: list = [(None, None)]  # one (key, value) pair, replaced whole (threads never mix two batches)


def adapter_bank(layers: Mapping[str, object] | Sequence[object]) -> MultiAdapterBank:
    """A :class:`MultiAdapterBank` over ``layers``: :class:`smoa.layer.SMoALinear` adapters of one base layer (the same
    W0 tensor, or equal W0 values, and equal orders). A mapping ``name -> layer`` gives a bank whose
    ``index_for(adapter_names, shape)`` takes PEFT-style names. Refuses, naming the layer: another base weight, a
    merged layer, a W0 that another layer sharing it has merged into; the bank refuses another ``num_blocks`` or
    other orders, naming the adapter's position."""
    named = isinstance(layers, Mapping)
    items = list(layers.items()) if named else [(str(i), layer) for i, layer in enumerate(layers)]
    if not items:
        raise ValueError("layers is empty: give at least one SMoALinear")
    first = items[0][1]
    where = {name: f"layers[{name!r}]" if named else f"layers[{name}]" for name, _ in items}
    for name, layer in items:
        if not all(hasattr(layer, attr) for attr in ("smoa_A", "smoa_B", "row_order", "col_order", "weight")):
            raise TypeError(f"{where[name]} must be an SMoALinear, got {type(layer).__name__}")
        if layer.merged:
            raise ValueError(
                f"{where[name]} is merged: unmerge() it first (its weight holds W0 + ΔW, not the shared W0)"
            )
    for name, layer in items:
        if layer.weight is not first.weight and (
            layer.weight.shape != first.weight.shape or not torch.equal(layer.weight, first.weight)
        ):
            raise ValueError(f"{where[name]} adapts another base weight than the first layer: one bank serves one W0")
        layer._check_weight_owner()  # a from_linear sibling outside ``layers`` merged into the shared W0
        layer._check_orders()
    factors = {
        name: _factors(
            layer.smoa_A.weight,
            layer.smoa_B.weight,
            layer.scale,
            layer.num_blocks,
            layer.row_order,
            layer.col_order,
            layer.block_ranks,
        )
        for name, layer in items
    }
    adapters = factors if named else list(factors.values())
    return MultiAdapterBank.build(first.weight, adapters, first.row_order, first.col_order, first.num_blocks)


def _factors(lora_A, lora_B, scale, num_blocks, row_order, col_order, block_ranks) -> AdapterFactors:
    uneven = len(set(block_ranks)) > 1
    return AdapterFactors(lora_A, lora_B, float(scale), int(num_blocks), row_order, col_order,
                          tuple(block_ranks) if uneven else None)  # fmt: skip


def peft_layer_bank(layer, names: Sequence[str], weight: torch.Tensor) -> MultiAdapterBank | None:
    """The bank of adapters ``names`` of the PEFT SMoA ``layer`` over its W0 ``weight`` (d_out×d_in), or ``None``
    when they cannot share one pass (another ``num_blocks`` or other orders, factors of different dtypes): the caller
    then takes the per-sub-batch route. Cached on the layer, keyed on every factor's and order's identity, version and
    storage and on W0's (the key holds the tensors, so no address is reused), so a training step, a load or an order
    write rebuilds it; a refusal is cached the same way."""
    orders = {name: layer._orders(name) for name in names}
    tensors = [weight]
    for name in names:
        tensors += [layer.smoa_A[name].weight, layer.smoa_B[name].weight, *orders[name]]
    key = (tuple(names), tuple(float(layer.scaling[name]) for name in names),
           tuple((t._version, t.data_ptr()) for t in tensors))  # fmt: skip
    cached = layer.__dict__.get("_smoa_multi_bank")
    if cached is not None and cached[0] == key and all(a is b for a, b in zip(cached[1], tensors)):
        return cached[2]
    factors = {
        name: _factors(
            layer.smoa_A[name].weight,
            layer.smoa_B[name].weight,
            layer.scaling[name],
            layer.num_blocks[name],
            *orders[name],
            layer.block_ranks[name],
        )
        for name in names
    }
    rows, cols = orders[names[0]]
    try:
        bank = MultiAdapterBank.build(weight, factors, rows, cols, layer.num_blocks[names[0]])
    except (ValueError, TypeError):
        bank = None
    layer.__dict__["_smoa_multi_bank"] = (key, tensors, bank)
    return bank


def batch_segments(
    bank: MultiAdapterBank, adapter_names: Sequence[str], shape, device
) -> tuple[torch.Tensor, AdapterSegments]:
    """``(adapter_index, segments)`` of PEFT-style per-sample ``adapter_names`` for ``bank`` (names it does not hold
    count as ``"__base__"``), for tokens of ``shape`` (``x.shape[:-1]``) on ``device``. Reused while the names, the
    shape, the device and the bank's adapter names are the same — the case of every layer of one forward — so a batch
    builds its table once. Everything in the key is compared by value: a reuse gives exactly what a rebuild would."""
    held = set(bank.names)
    names = tuple(name if name in held else "__base__" for name in adapter_names)
    key = (names, tuple(int(n) for n in shape), torch.device(device), bank.names)
    cached_key, value = _last_batch[0]
    if cached_key != key:
        index = bank.index_for(names, key[1], device=device)
        value = (index, build_segments(index, bank.num_adapters))
        _last_batch[0] = (key, value)
    return value
