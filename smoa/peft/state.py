"""The PEFT layer's state dict: the order buffers (validated on every assignment), every check made before a load
writes anything (:func:`smoa.checkpoint.check_adapter_entries`, shared with :class:`smoa.layer.SMoALinear`), what a
load does afterwards (orders recomputed only under :func:`smoa.allow_missing_orders`, the W0 fingerprint compared,
B's known-zero stamp), and the hooks that save orders in their smallest dtype and a merged layer's original W0.

:class:`SMoALayerState` is a mixin of :class:`smoa.peft.layer.SMoALayer`; it relies on the attributes that class sets.
"""

from __future__ import annotations

import warnings
from typing import TYPE_CHECKING

import torch
import torch.nn as nn
from peft.tuners._buffer_dict import BufferDict
from peft.utils.integrations import gather_params_ctx

from smoa.checkpoint import (
    AdapterEntries,
    _check_order_value,
    check_adapter_entries,
    checked_by_the_model,
    fingerprint_differs,
    warn_w0_differs,
)
from smoa.factors import order_storage_dtype
from smoa.partition import compute_orders

if TYPE_CHECKING:
    from smoa.peft.layer import Linear, SMoALayer

__all__ = ["OrderDict", "SMoALayerState", "orders_in_smallest_dtype", "save_unmerged_base_weight", "stamp_loaded_B"]


class OrderDict(BufferDict):
    """The per-adapter orders, validated on every assignment (any integer dtype, stored as int64). An all ``-1``
    tensor is the "to be loaded from the checkpoint" placeholder (see ``SMoALayer.update_layer``)."""

    def __init__(self, size: int, name: str) -> None:
        super().__init__({}, persistent=True)
        self._order_size, self._order_name = size, name

    def _checked(self, key: str, value):
        if isinstance(value, torch.Tensor) and (value.is_meta or (value.numel() and bool((value == -1).all()))):
            return value
        return _check_order_value(f"{self._order_name}.{key}", value, self._order_size, getattr(value, "device", "cpu"))

    def __setitem__(self, key: str, buffer) -> None:
        super().__setitem__(key, self._checked(key, buffer))

    def __setattr__(self, name: str, value) -> None:
        if name in self.__dict__.get("_buffers", {}):
            value = self._checked(name, value)
        super().__setattr__(name, value)


class SMoALayerState:
    """Loading and checking the state dict of an SMoA tuner layer, all adapters at once or one at a time."""

    def _adapter_entries(self, adapter_name: str) -> AdapterEntries:
        """Where adapter ``adapter_name`` lives in this layer's state dict, and what its entries must match."""
        return AdapterEntries(
            keys={
                "rows": f"smoa_row_order.{adapter_name}",
                "cols": f"smoa_col_order.{adapter_name}",
                "info": f"smoa_partition_info.{adapter_name}",
                "A": f"smoa_A.{adapter_name}.weight",
                "B": f"smoa_B.{adapter_name}.weight",
            },
            shape_A=tuple(self.smoa_A[adapter_name].weight.shape),
            shape_B=tuple(self.smoa_B[adapter_name].weight.shape),
            num_blocks=self.num_blocks[adapter_name],
            r=self.r[adapter_name],
            block_ranks=tuple(self.block_ranks[adapter_name]),
            d_out=self.out_features,
            d_in=self.in_features,
            saved_with="get_peft_model_state_dict and save_pretrained",
        )

    def _check_state_dict(self, state_dict, prefix: str) -> None:
        """Raise naming the key for anything in ``state_dict`` (under ``prefix``) that this layer cannot load exactly,
        for every adapter; nothing is written to the layer (integer orders are replaced by int64 copies in the dict).
        Also run by the load pre-hook of the whole model (``smoa.model.guard_loads``) before torch copies anything."""
        base_key = f"{prefix}base_layer.weight"
        if self.merged and base_key in state_dict:
            raise RuntimeError(
                f"{prefix or 'this layer'} is merged (adapters {self.merged_adapters}): loading {base_key} into a "
                "merged weight could not be undone; call unmerge_adapter() first"
            )
        for adapter_name in list(self.smoa_A.keys()):
            self._check_adapter_state(state_dict, prefix, adapter_name)

    def _check_adapter_state(self, state_dict, prefix: str, adapter_name: str) -> None:
        """Raise naming the key for anything in ``state_dict`` (under ``prefix``) that adapter ``adapter_name`` of this
        layer cannot load exactly (:func:`smoa.checkpoint.check_adapter_entries`); nothing is written to the layer."""
        entries = self._adapter_entries(adapter_name)
        if adapter_name in self.merged_adapters and any(prefix + key in state_dict for key in entries.keys.values()):
            raise RuntimeError(
                f"adapter {adapter_name!r} is merged into {prefix or 'this layer'}: unmerge it before loading "
                f"{prefix + entries.keys['A']} (a load into a merged adapter could not be undone)"
            )
        check_adapter_entries(state_dict, prefix, entries)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, errors):
        if not checked_by_the_model(state_dict, prefix):
            self._check_state_dict(state_dict, prefix)
        loaded = {
            adapter_name: (
                f"{prefix}smoa_row_order.{adapter_name}" in state_dict,
                f"{prefix}smoa_A.{adapter_name}.weight" in state_dict,
                f"{prefix}smoa_partition_info.{adapter_name}" in state_dict,
            )
            for adapter_name in self.smoa_A
        }
        self.__dict__["_smoa_zero_B_after_load"] = {}  # per load (see stamp_loaded_B); a stale one is never used
        nn.Module._load_from_state_dict(
            self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, errors
        )
        for adapter_name, (orders, factors, info) in loaded.items():
            value_B = state_dict.get(f"{prefix}smoa_B.{adapter_name}.weight")
            if isinstance(value_B, torch.Tensor):  # a load already reads the values: is the loaded B zero?
                # smoa_B (a child) is loaded after this hook: stamp_loaded_B stamps it after the children
                zero = not value_B.is_meta and not bool(value_B.any())
                self.__dict__.setdefault("_smoa_zero_B_after_load", {})[adapter_name] = zero
            if orders:
                self._smoa_orders_pending.discard(adapter_name)
                self._smoa_orders_lost.discard(adapter_name)
                self._smoa_order_stamp.pop(adapter_name, None)
            elif factors:  # allowed only under allow_missing_orders()
                warnings.warn(
                    f"{prefix}smoa_row_order.{adapter_name}/smoa_col_order.{adapter_name} were not in the state dict: "
                    "recomputing them from W0 as allow_missing_orders() asked",
                    stacklevel=3,
                )
                ordering, seed, svd_dtype = self._smoa_order_options[adapter_name]
                rows, cols = compute_orders(self._original_weight(), ordering, seed=seed, svd_dtype=svd_dtype)
                self.smoa_row_order[adapter_name] = rows
                self.smoa_col_order[adapter_name] = cols
                self._smoa_orders_pending.discard(adapter_name)
                self._smoa_orders_lost.discard(adapter_name)
            key = f"{prefix}smoa_partition_info.{adapter_name}"
            if not info and key in missing_keys:
                missing_keys.remove(key)  # an adapter saved before the record existed
            # (the BufferDicts are child modules, loaded after this hook: compare the incoming record itself)
            if info:
                with gather_params_ctx(self.get_base_layer().weight):
                    if fingerprint_differs(state_dict[key], self._original_weight()):
                        warn_w0_differs(key)


def stamp_loaded_B(module: SMoALayer, incompatible_keys) -> None:
    """Load post-hook (after the children, so after ``smoa_B`` was written): B is known zero iff the loaded B was."""
    for adapter_name, zero in module.__dict__.pop("_smoa_zero_B_after_load", {}).items():
        module._stamp_zero_B(adapter_name, zero)


def orders_in_smallest_dtype(module: SMoALayer, state_dict: dict, prefix: str, local_metadata) -> None:
    """State-dict post hook: the orders go to files in the smallest integer dtype that holds them (int16 up to 32,768
    features: adapter files as small as LoRA's at equal trainable parameters); in memory they stay int64."""
    for attr, size in (("smoa_row_order", module.out_features), ("smoa_col_order", module.in_features)):
        for adapter_name in module.smoa_A:
            key = f"{prefix}{attr}.{adapter_name}"
            if key in state_dict:
                state_dict[key] = state_dict[key].to(order_storage_dtype(size))


def save_unmerged_base_weight(module: Linear, state_dict, prefix: str, local_metadata) -> None:
    """``state_dict()`` of a merged layer saves the original W0 (with the factors), so that loading it into a fresh
    model does not apply the update twice."""
    key = prefix + "base_layer.weight"
    if module.merged and key in state_dict:
        original = module._original_weight()
        state_dict[key] = (original.T if module.fan_in_fan_out else original).clone()
