"""The PEFT tuner layer of SMoA: ``SMoALayer`` (adapter state per adapter name) and ``Linear`` (nn.Linear/Conv1D).

State per adapter name, in LoRA's layout so that PEFT, FSDP's auto-wrap policy and users find it where they expect:

- ``smoa_A[name]``: ``nn.Linear(d_in, r_k)``, weight = Â (r_k×d_in); ``smoa_B[name]``: ``nn.Linear(r_k, d_out)``,
  weight = B̂ (d_out×r_k) — SPEC §3's LoRA-shaped factors in original coordinates (trainable leaf modules);
- ``smoa_row_order[name]`` / ``smoa_col_order[name]``: the spectral orders (SPEC §1), persistent buffers (int64 in
  memory, saved in the smallest integer dtype that holds them, e.g. int16) in ``adapter_model.safetensors`` next to
  the factors and never re-derived on load;
- ``r``, ``lora_alpha``, ``scaling`` (s = lora_alpha / r), ``num_blocks``, ``block_ranks`` (r_k; uneven ranks are
  zero-padded to the largest in the factors), ``smoa_dropout``.

The math is not here: the forward calls :func:`smoa.backends.smoa_linear`, ΔW comes from
:func:`smoa_kernels.reference.dense_delta_weight`. Merging is multiplicative, as in :class:`smoa.layer.SMoALinear`:
with several adapters merged, ``W = W0 ⊙ (1 + Σ_a s_a P_a)`` (every ΔW_a is anchored on the original W0), so unmerge
divides W0 back out and restores exactly the few entries that a division cannot recover.
"""

from __future__ import annotations

import warnings
from typing import Any

import torch
import torch.nn as nn
from peft.tuners._buffer_dict import BufferDict
from peft.tuners.tuners_utils import BaseTunerLayer, check_adapters_to_merge
from peft.utils.integrations import gather_params_ctx
from transformers.pytorch_utils import Conv1D

from smoa.backends import resolve_backend, smoa_linear
from smoa.checkpoint import check_order, partition_info
from smoa.factors import (
    check_smoa_arguments,
    init_block_factors,
    known_zero,
    resolve_block_ranks,
    value_with_gradient_of,
    version_stamp,
    zero_rank_rows,
)
from smoa.merge import MergeRecord, exact_merge, exact_unmerge, smoa_modulation
from smoa.multi import batch_segments, peft_layer_bank
from smoa.partition import compute_orders
from smoa.peft.state import (
    OrderDict,
    SMoALayerState,
    orders_in_smallest_dtype,
    save_unmerged_base_weight,
    stamp_loaded_B,
)
from smoa_kernels.reference import blocks_to_lora, dense_delta_weight

from .config import SMoAConfig

__all__ = ["Linear", "SMoALayer", "dispatch_default"]

try:  # FSDP wrappers a factor leaf must not be: the layer reads the factors' weights directly
    from torch.distributed.fsdp import FSDPModule, FullyShardedDataParallel

    _FSDP_WRAPPERS: tuple[type, ...] = (FSDPModule, FullyShardedDataParallel)
except ImportError:  # torch built without distributed
    _FSDP_WRAPPERS = ()


class SMoALayer(SMoALayerState, BaseTunerLayer):
    """Adapter state and merge bookkeeping shared by SMoA tuner layers (see the module docstring)."""

    adapter_layer_names: tuple[str, ...] = ("smoa_A", "smoa_B")
    other_param_names: tuple[str, ...] = (
        "r",
        "lora_alpha",
        "scaling",
        "num_blocks",
        "block_ranks",
        "smoa_dropout",
        "smoa_row_order",
        "smoa_col_order",
        "smoa_partition_info",
    )

    def __init__(self, base_layer: nn.Module, **kwargs) -> None:
        self.base_layer = base_layer
        self.r: dict[str, int] = {}
        self.lora_alpha: dict[str, float] = {}
        self.scaling: dict[str, float] = {}
        self.num_blocks: dict[str, int] = {}
        self.block_ranks: dict[str, tuple[int, ...]] = {}
        self.smoa_dropout = nn.ModuleDict({})
        self.smoa_A = nn.ModuleDict({})
        self.smoa_B = nn.ModuleDict({})
        self.smoa_partition_info = BufferDict({}, persistent=True)  # [format, K, r, d_out, d_in, ordering, W0 print]
        # adapters whose orders are still to come from a checkpoint (or, failing that, from the SVD at first use)
        self._smoa_orders_pending: set[str] = set()
        # adapters whose orders were lost to to_empty() from the meta device: only a checkpoint can bring them back
        self._smoa_orders_lost: set[str] = set()
        self._smoa_order_options: dict[str, tuple[str, int, torch.dtype]] = {}  # (ordering, seed, svd_dtype)
        self._disable_adapters = False
        self.merged_adapters: list[str] = []
        self._smoa_merge_record: MergeRecord | None = None  # what the current merge wrote (bit-exact unmerge)
        self._smoa_order_stamp: dict[str, tuple] = {}  # the order tensors last validated, per adapter
        self._smoa_zero_B: dict[str, tuple] = {}  # adapters whose B is known to be zero (smoa.factors.known_zero)
        self.kwargs = kwargs

        base = self.get_base_layer()
        if isinstance(base, nn.Linear):
            in_features, out_features = base.in_features, base.out_features
        elif isinstance(base, Conv1D):
            shape = base.weight.ds_shape if hasattr(base.weight, "ds_shape") else base.weight.shape
            in_features, out_features = shape
        else:
            raise TypeError(f"SMoA supports torch.nn.Linear and transformers Conv1D layers, got {type(base).__name__}")
        self.in_features, self.out_features = in_features, out_features
        self.smoa_row_order = OrderDict(out_features, "smoa_row_order")
        self.smoa_col_order = OrderDict(in_features, "smoa_col_order")
        if isinstance(self, nn.Module):
            self.register_state_dict_post_hook(orders_in_smallest_dtype)
            self.register_load_state_dict_post_hook(stamp_loaded_B)

    # ---- W0 in SPEC orientation (d_out×d_in) -------------------------------------------------------------------
    def _base_weight(self) -> torch.Tensor:
        weight = self.get_base_layer().weight
        return weight.T if self.fan_in_fan_out else weight

    def update_layer(
        self, adapter_name: str, r: int, lora_alpha: float | None, config: SMoAConfig, block_ranks=None, **kwargs
    ) -> None:
        base_weight = self._base_weight()
        if not base_weight.is_floating_point():
            raise NotImplementedError(
                f"SMoA on a quantized base layer (weight dtype {base_weight.dtype}) is not supported yet: the anchor "
                "W0 must be a dense floating-point weight"
            )
        if block_ranks is None and isinstance(r, (list, tuple)):  # a rank_pattern value of per-block ranks
            r, block_ranks = sum(r), r
        elif block_ranks is None and getattr(config, "block_ranks", None) is not None and r == config.r:
            block_ranks = config.block_ranks
        check_smoa_arguments(
            self.in_features, self.out_features, r, config.num_blocks, lora_alpha, config.lora_dropout, config.ordering,
            block_ranks,
        )  # fmt: skip
        num_blocks = config.num_blocks
        self.block_ranks[adapter_name] = resolve_block_ranks(r, num_blocks, block_ranks)
        alpha = float(r if lora_alpha is None else lora_alpha)
        self.r[adapter_name] = r
        self.lora_alpha[adapter_name] = alpha
        self.scaling[adapter_name] = alpha / r
        self.num_blocks[adapter_name] = num_blocks
        self.smoa_dropout[adapter_name] = nn.Dropout(config.lora_dropout) if config.lora_dropout > 0 else nn.Identity()

        device = base_weight.device
        svd_dtype = torch.float64 if config.svd_dtype == "float64" else torch.float32
        self._smoa_order_options[adapter_name] = (config.ordering, config.seed, svd_dtype)
        if getattr(config, "_orders_from_checkpoint", False):
            # the orders will be loaded with the factors: no SVD now (identity placeholders for the init, then -1)
            row_order = torch.arange(self.out_features, device=device)
            col_order = torch.arange(self.in_features, device=device)
            info = partition_info(base_weight, num_blocks, r, config.ordering, fingerprint=False)
        else:
            # under DeepSpeed ZeRO-3 (partitioned) or FSDP2 (DTensor shards) the SVD must see the full W0
            with gather_params_ctx(self.get_base_layer().weight):
                full_weight = self._base_weight()
                if hasattr(full_weight, "full_tensor"):  # a DTensor: all-gather (every rank attaches the adapter)
                    full_weight = full_weight.full_tensor()
                row_order, col_order = compute_orders(
                    full_weight, config.ordering, seed=config.seed, svd_dtype=svd_dtype
                )
                info = partition_info(full_weight, num_blocks, r, config.ordering)
            self._smoa_orders_pending.discard(adapter_name)
        self.smoa_row_order[adapter_name] = row_order
        self.smoa_col_order[adapter_name] = col_order
        info[3:5] = torch.tensor([self.out_features, self.in_features])  # the layer's shape, whatever W0's storage
        self.smoa_partition_info[adapter_name] = info.to(device if not base_weight.is_meta else "cpu")

        rank = max(self.block_ranks[adapter_name])  # uneven ranks: zero-padded to the largest
        factor_dtype = base_weight.dtype  # PEFT then upcasts half-precision adapters (autocast_adapter_dtype=True)
        self.smoa_A[adapter_name] = nn.Linear(self.in_features, rank, bias=False, device=device, dtype=factor_dtype)
        self.smoa_B[adapter_name] = nn.Linear(rank, self.out_features, bias=False, device=device, dtype=factor_dtype)
        self.reset_smoa_parameters(adapter_name, config.init_weights)
        if getattr(config, "_orders_from_checkpoint", False):  # -1 = "not loaded yet", whichever loader fills them
            self.smoa_row_order[adapter_name].fill_(-1)
            self.smoa_col_order[adapter_name].fill_(-1)
            self._smoa_orders_pending.add(adapter_name)
        self._move_adapter_to_device_of_base_layer(adapter_name)
        self._stamp_zero_B(adapter_name, config.init_weights is not False)
        self.set_adapter(self.active_adapters)

    @torch.no_grad()
    def reset_smoa_parameters(self, adapter_name: str, init_weights: bool | str = True) -> None:
        """SPEC §2 init, drawn in fp32 per block, then scattered (SPEC §3); see :func:`smoa.factors.init_block_factors`:
        ``True`` — every ``A_k`` kaiming-uniform(a=√5) over its own fan-in |C_k|, ``B_k = 0``; ``"gaussian"`` —
        ``A_k ~ N(0, 1/r_k)``, ``B_k = 0``; ``False`` — a random ``B_k`` too, so that ΔW is of W0's magnitude."""
        A, B = self.smoa_A[adapter_name].weight, self.smoa_B[adapter_name].weight
        rows, cols = self._orders(adapter_name)
        num_blocks = self.num_blocks[adapter_name]
        sizes = [(R_k.numel(), C_k.numel()) for R_k, C_k in zip(torch.tensor_split(rows, num_blocks),
                                                                 torch.tensor_split(cols, num_blocks))]  # fmt: skip
        blocks = init_block_factors(sizes, self.block_ranks[adapter_name], init_weights, A.device)
        lora_A, lora_B = blocks_to_lora(blocks, rows, cols)
        A.copy_(lora_A)
        B.copy_(lora_B)
        self._stamp_zero_B(adapter_name, init_weights is not False)

    def _stamp_zero_B(self, adapter_name: str, zero: bool) -> None:
        """Record that ``smoa_B[adapter_name]`` is zero (``zero=True``: written as zeros, or checked), or forget it."""
        stamps = self.__dict__.setdefault("_smoa_zero_B", {})
        if zero and adapter_name in self.smoa_B:
            stamps[adapter_name] = version_stamp(self.smoa_B[adapter_name].weight)
        else:
            stamps.pop(adapter_name, None)

    def _B_known_zero(self, adapter_name: str) -> bool:
        """``B`` of ``adapter_name`` is zero and nothing wrote to it since (see :func:`smoa.factors.known_zero`)."""
        stamps = self.__dict__.get("_smoa_zero_B", {})
        if known_zero(stamps.get(adapter_name), self.smoa_B[adapter_name].weight):
            return True
        if adapter_name in stamps and not torch.compiler.is_compiling():
            del stamps[adapter_name]
        return False

    def _restamp_zero_B(self, known: set[str]) -> None:
        """After a cast or move of the factors: the adapters in ``known`` whose B is still zero keep their stamp."""
        for name in known:
            B = self.smoa_B[name].weight if name in self.smoa_B else None
            self._stamp_zero_B(name, B is not None and not B.is_meta and not bool(B.detach().any()))

    def delete_adapter(self, adapter_name: str) -> None:
        if adapter_name in self.merged_adapters:
            warnings.warn(
                f"Adapter {adapter_name!r} is merged: unmerging every adapter of this layer before deleting",
                stacklevel=2,
            )
            self.unmerge()
        super().delete_adapter(adapter_name)
        self._smoa_orders_pending.discard(adapter_name)
        self._smoa_order_stamp.pop(adapter_name, None)
        self._smoa_order_options.pop(adapter_name, None)
        self._smoa_orders_lost.discard(adapter_name)
        self.__dict__.get("_smoa_zero_B", {}).pop(adapter_name, None)

    # ---- orders -------------------------------------------------------------------------------------------------
    def _orders(self, adapter_name: str) -> tuple[torch.Tensor, torch.Tensor]:
        if adapter_name in self._smoa_orders_pending:
            rows, cols = self.smoa_row_order[adapter_name], self.smoa_col_order[adapter_name]
            if bool(rows[0] >= 0) and bool(cols[0] >= 0):
                # a loader that bypasses load_state_dict (transformers' load_adapter) wrote the saved orders
                check_order(f"smoa_row_order.{adapter_name}", rows, self.out_features)
                check_order(f"smoa_col_order.{adapter_name}", cols, self.in_features)
                if rows.dtype != torch.long or cols.dtype != torch.long:  # assigned from an int16/int32 file
                    self.smoa_row_order[adapter_name], self.smoa_col_order[adapter_name] = rows.long(), cols.long()
                    rows, cols = self.smoa_row_order[adapter_name], self.smoa_col_order[adapter_name]
                self._smoa_orders_pending.discard(adapter_name)
                self._smoa_orders_lost.discard(adapter_name)
                return rows, cols
            if adapter_name in self._smoa_orders_lost:
                raise RuntimeError(
                    f"SMoA adapter {adapter_name!r} has no orders (built on the meta device, then to_empty()): load "
                    "its checkpoint (set_peft_model_state_dict / load_state_dict with smoa_row_order, smoa_col_order)"
                )
            # A config read from a checkpoint but no orders loaded (e.g. SMoAConfig(**saved_config) used for a new
            # adapter): fall back to the SVD of the (unmerged) W0, which the adapter was then initialised on.
            if self.merged:
                raise RuntimeError(f"SMoA adapter {adapter_name!r} has no orders yet; unmerge before using it")
            ordering, seed, svd_dtype = self._smoa_order_options[adapter_name]
            warnings.warn(
                f"SMoA adapter {adapter_name!r}: its config came from a saved adapter but no orders were loaded; "
                f"computing them from W0 now (ordering={ordering!r})",
                stacklevel=2,
            )
            row_order, col_order = compute_orders(self._base_weight(), ordering, seed=seed, svd_dtype=svd_dtype)
            self.smoa_row_order[adapter_name].copy_(row_order)
            self.smoa_col_order[adapter_name].copy_(col_order)
            self._smoa_orders_pending.discard(adapter_name)
        rows, cols = self.smoa_row_order[adapter_name], self.smoa_col_order[adapter_name]
        if not torch.compiler.is_compiling() and not rows.is_meta:  # re-validate a replaced or rewritten tensor
            stamp = (rows, rows._version, rows.data_ptr(), cols, cols._version, cols.data_ptr())
            old = self._smoa_order_stamp.get(adapter_name)
            if old is None or not all(a is b if isinstance(a, torch.Tensor) else a == b for a, b in zip(old, stamp)):
                check_order(f"smoa_row_order.{adapter_name}", rows, self.out_features)
                check_order(f"smoa_col_order.{adapter_name}", cols, self.in_features)
                self._smoa_order_stamp[adapter_name] = stamp
        return rows, cols

    def _apply(self, fn, recurse: bool = True):
        # .to()/.cuda() keep the orders' values; to_empty() does not: give back the known orders (or, from the meta
        # device, mark them "to be loaded") instead of leaving garbage that indexes W0 out of range.
        before = {}
        for attr in ("smoa_row_order", "smoa_col_order", "smoa_partition_info"):
            for name, value in getattr(self, attr).items():
                before[attr, name] = None if value.is_meta else value.detach().cpu().clone()
        zero_B = {name for name in self.smoa_B if self._B_known_zero(name)}
        result = nn.Module._apply(self, fn, recurse)
        self._restamp_zero_B(zero_B)  # a cast or move keeps B = 0; to_empty() does not
        for (attr, name), values in before.items():
            buffer = getattr(self, attr)[name]
            if buffer.is_meta:
                continue
            if values is None:
                if attr != "smoa_partition_info":
                    buffer.fill_(-1)
                    self._smoa_orders_pending.add(name)
                    self._smoa_orders_lost.add(name)
            elif not torch.equal(buffer.cpu(), values):
                buffer.copy_(values.to(buffer.device))
        return result

    # ---- ΔW and merge -------------------------------------------------------------------------------------------
    def _adapter_tuple(self, name: str) -> tuple:
        return (self.scaling[name], self.smoa_A[name].weight, self.smoa_B[name].weight, *self._orders(name),
                self.num_blocks[name])  # fmt: skip

    def _modulation(self, adapter_names: list[str]) -> torch.Tensor:
        """``1 + Σ_a s_a·P_a`` over ``adapter_names`` (see :func:`smoa.merge.smoa_modulation`)."""
        return smoa_modulation(self._base_weight(), [self._adapter_tuple(name) for name in adapter_names])

    @torch.no_grad()
    def _original_weight(self) -> torch.Tensor:
        """W0 as it was before any merge (d_out×d_in, W0's dtype), bit for bit."""
        if not self.merged or self._smoa_merge_record is None:
            return self._base_weight().detach()
        return exact_unmerge(self._base_weight().detach(), self._smoa_merge_record)

    @torch.no_grad()
    def _write_base_weight(self, weight: torch.Tensor) -> None:
        self.get_base_layer().weight.data.copy_(weight.T if self.fan_in_fan_out else weight)

    def get_delta_weight(self, adapter: str) -> torch.Tensor:
        """``s·ΔW`` of ``adapter`` in the base layer's weight layout (transposed for ``fan_in_fan_out``), anchored on
        the original W0 (also while merged), in the factors' dtype (computed in fp32 for half-precision factors)."""
        A, B = self.smoa_A[adapter].weight, self.smoa_B[adapter].weight
        dtype = torch.promote_types(A.dtype, torch.float32)
        rows, cols = self._orders(adapter)
        delta = dense_delta_weight(
            self._original_weight().to(dtype), A.to(dtype), B.to(dtype), rows, cols, self.num_blocks[adapter]
        )
        delta = (delta * self.scaling[adapter]).to(A.dtype)
        return delta.T if self.fan_in_fan_out else delta

    def merge(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> None:
        """Merge ``adapter_names`` (default: the active adapters) into the base weight: ``W = W0 ⊙ (1 + Σ s·P)``.

        ``safe_merge=True`` checks the merged weight for NaN/Inf before writing it (the layer is left unchanged then).
        The merge records copies of the merged factors and every W0 entry a division would not give back, so
        :meth:`unmerge` restores W0 bit for bit whatever happens to the factors meanwhile.
        """
        adapter_names = [name for name in check_adapters_to_merge(self, adapter_names) if name in self.smoa_A]
        if not adapter_names:
            return
        with torch.no_grad():
            original = self._original_weight()
            all_names = self.merged_adapters + adapter_names
            merged, record = exact_merge(
                original, [self._adapter_tuple(name) for name in all_names], safe_merge,
                f"adapter {', '.join(adapter_names)}",
            )  # fmt: skip
            self._write_base_weight(merged)
        self._smoa_merge_record = record
        self.merged_adapters.extend(adapter_names)

    def unmerge(self) -> None:
        """Restore W0 (to rounding; exactly where a division could not) and mark every adapter unmerged."""
        if not self.merged:
            warnings.warn("Already unmerged. Nothing to do.", stacklevel=2)
            return
        self._write_base_weight(self._original_weight())
        self._smoa_merge_record = None
        self.merged_adapters.clear()

    def supports_lora_conversion(self, adapter_name: str = "default") -> bool:
        # SMoA is additive, W = W0 + s·ΔW, and get_delta_weight returns s·ΔW anchored on the original W0; ΔW is
        # (nearly) full rank, so the LoRA export is exact only at rank min(d_in, d_out): see lora_export_error.
        return True


class Linear(nn.Module, SMoALayer):
    """SMoA on a ``torch.nn.Linear`` (or a ``transformers`` ``Conv1D`` with ``fan_in_fan_out=True``)."""

    def __init__(
        self,
        base_layer: nn.Module,
        adapter_name: str,
        config: SMoAConfig,
        r: int = 8,
        lora_alpha: float | None = None,
        fan_in_fan_out: bool = False,
        is_target_conv_1d_layer: bool = False,
        **kwargs,
    ) -> None:
        super().__init__()
        SMoALayer.__init__(self, base_layer, **kwargs)
        self.fan_in_fan_out = fan_in_fan_out
        self.is_target_conv_1d_layer = is_target_conv_1d_layer
        self._active_adapter = adapter_name
        self.update_layer(adapter_name, r, lora_alpha, config=config)
        self.register_state_dict_post_hook(save_unmerged_base_weight)

    def _check_forward_args(self, x: torch.Tensor, adapter_names) -> None:
        """LoRA's checks for a mixed-adapter batch (``adapter_names``: one name or ``"__base__"`` per sample)."""
        if adapter_names is None:
            return
        if isinstance(adapter_names, str) or len(adapter_names) != len(x):
            count = "a str" if isinstance(adapter_names, str) else len(adapter_names)
            raise ValueError(
                "Length of `adapter_names` should be the same as the number of inputs, but got "
                f"{count} and {len(x)} respectively."
            )
        if self.merged:
            raise ValueError(
                "Cannot pass `adapter_names` when there are merged adapters, please call `unmerge_adapter` first."
            )

    def _mixed_batch_forward(self, x: torch.Tensor, *args: Any, adapter_names: list[str], **kwargs: Any):
        """Each sample through its adapter (``"__base__"`` or a name this layer does not hold: the base layer): in one
        pass over W0 for all of them where :meth:`_one_pass_forward` can, else sub-batch by sub-batch."""
        one_pass = self._one_pass_forward(x, adapter_names, args, kwargs)
        if one_pass is not None:
            return one_pass
        result = self.base_layer(x, *args, **kwargs)
        weight = self._base_weight()
        for name in dict.fromkeys(adapter_names):
            if name == "__base__" or name not in self.smoa_A:
                continue
            index = torch.tensor([i for i, item in enumerate(adapter_names) if item == name], device=x.device)
            sub_batch = x.index_select(0, index)
            rows, cols = self._orders(name)
            out = smoa_linear(
                sub_batch, self.smoa_dropout[name](sub_batch), weight, self.get_base_layer().bias,
                self.smoa_A[name].weight, self.smoa_B[name].weight, rows, cols, self.num_blocks[name],
                self.scaling[name],
            )  # fmt: skip
            result = result.index_copy(0, index, out.to(result.dtype))
        return result

    def _one_pass_forward(self, x: torch.Tensor, adapter_names, args, kwargs) -> torch.Tensor | None:
        """A mixed batch through :mod:`smoa_kernels.multi_adapter`'s Triton kernel — W0 read once for every adapter
        in the batch — when the ``triton`` backend computes this layer, the batch needs no gradient and no dropout,
        and the named adapters share one K and one pair of orders (:func:`smoa.multi.peft_layer_bank`); ``None``
        otherwise (the per-sub-batch route, which gives the same outputs to rounding)."""
        base = self.get_base_layer()
        if args or kwargs or self.fan_in_fan_out or type(base) is not nn.Linear or x.dim() < 2:
            return None
        if torch.compiler.is_compiling():  # the bank's cache reads version counters on the host: eager only
            return None
        names = [name for name in dict.fromkeys(adapter_names) if name in self.smoa_A]
        if not names or resolve_backend(None, x.device) != "triton" or x.dtype != base.weight.dtype:
            return None
        if torch.is_grad_enabled() and (x.requires_grad or any(
            self.smoa_A[name].weight.requires_grad or self.smoa_B[name].weight.requires_grad for name in names
        )):  # fmt: skip
            return None  # the kernel is forward only: training takes the sub-batch route (autograd)
        if any(self.training and isinstance(self.smoa_dropout[name], nn.Dropout) for name in names):
            return None  # dropout on each adapter's input: the sub-batch route applies it
        if any(0 in self.block_ranks[name] for name in names):
            return None  # rows of an r_k = 0 block are the base output bit for bit there (non-finite inputs)
        bank = peft_layer_bank(self, names, base.weight)
        if bank is None:
            return None
        index, segments = batch_segments(bank, adapter_names, x.shape[:-1], x.device)
        return bank(x, base.bias, index, segments=segments, backend="triton")

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        adapter_names = kwargs.pop("adapter_names", None)
        self._check_forward_args(x, adapter_names)
        if self.disable_adapters:
            if self.merged:
                self.unmerge()
            return self.base_layer(x, *args, **kwargs)
        if adapter_names is not None:
            return self._mixed_batch_forward(x, *args, adapter_names=adapter_names, **kwargs)
        if self.merged:
            return self.base_layer(x, *args, **kwargs)
        active = [name for name in self.active_adapters if name in self.smoa_A]
        if not active:
            return self.base_layer(x, *args, **kwargs)
        for name in active:
            if _FSDP_WRAPPERS and isinstance(self.smoa_A[name], _FSDP_WRAPPERS):
                raise RuntimeError(
                    "the SMoA factor modules smoa_A/smoa_B are FSDP-wrapped on their own; the SMoA layer reads their "
                    "weights directly (ΔW = (BA) ⊙ W0), so shard the enclosing SMoA layer or decoder layer instead "
                    "(e.g. accelerate's TRANSFORMER_BASED_WRAP, not peft's fsdp_auto_wrap_policy)"
                )
            self._orders(name)  # an adapter without orders refuses, whichever path computes the output
        # adapters whose term is zero by construction (B = 0): the output is the one without them, bit for bit; their
        # factors still get the gradient of the full forward (see smoa.factors.value_with_gradient_of)
        zero = [name for name in active if self._B_known_zero(name)]
        if not zero:
            return self._adapters_forward(x, active, args, kwargs)
        live = [name for name in active if name not in zero]
        value = self._adapters_forward(x, live, args, kwargs)
        needs_grad = torch.is_grad_enabled() and any(
            self.smoa_A[name].weight.requires_grad or self.smoa_B[name].weight.requires_grad for name in zero
        )
        if not needs_grad:
            return value
        return value_with_gradient_of(value, self._adapters_forward(x, active, args, kwargs))

    def _adapters_forward(self, x: torch.Tensor, names: list[str], args, kwargs) -> torch.Tensor:
        """``base(x) + Σ_a s_a·x_a ΔW_aᵀ`` over ``names``; the output rows of r_k = 0 blocks (zero by construction)
        are the base layer's (or the previous adapters') own, bit for bit."""
        if not names:
            return self.base_layer(x, *args, **kwargs)
        weight = self._base_weight()
        result = None
        for name in names:
            rows, cols = self._orders(name)
            x_adapter = self.smoa_dropout[name](x)
            zero_rows = zero_rank_rows(self.block_ranks[name], rows)
            if result is None:  # y = x W0ᵀ + b + s·x_a ΔWᵀ in one call
                result = smoa_linear(
                    x, x_adapter, weight, self.get_base_layer().bias, self.smoa_A[name].weight,
                    self.smoa_B[name].weight, rows, cols, self.num_blocks[name], self.scaling[name],
                )  # fmt: skip
                if zero_rows is not None:
                    result = torch.where(zero_rows, self.base_layer(x, *args, **kwargs).to(result.dtype), result)
            else:  # a further active adapter adds its s·x_a ΔWᵀ only (the base term is zero with x = 0)
                term = smoa_linear(
                    torch.zeros_like(x), x_adapter, weight, None, self.smoa_A[name].weight,
                    self.smoa_B[name].weight, rows, cols, self.num_blocks[name], self.scaling[name],
                ).to(result.dtype)  # fmt: skip
                result = result + term if zero_rows is None else torch.where(zero_rows, result, result + term)
        return result

    # nn.Module comes first in the MRO: point its state-dict hooks at SMoALayer's (which validate and clear pending
    # orders, and keep the orders through to_empty())
    _load_from_state_dict = SMoALayer._load_from_state_dict
    _apply = SMoALayer._apply

    def __repr__(self) -> str:
        return "smoa." + super().__repr__()


def dispatch_default(target: nn.Module, adapter_name: str, config: SMoAConfig, **kwargs) -> nn.Module | None:
    """``Linear`` for an ``nn.Linear`` or ``Conv1D`` target (fixing ``fan_in_fan_out`` with a warning), else None."""
    base = target.get_base_layer() if isinstance(target, BaseTunerLayer) else target
    if isinstance(base, nn.Linear):
        if kwargs.get("fan_in_fan_out"):
            warnings.warn(
                "fan_in_fan_out=True but the target module is torch.nn.Linear; using fan_in_fan_out=False", stacklevel=2
            )
        kwargs["fan_in_fan_out"] = False
        return Linear(target, adapter_name, config=config, **kwargs)
    if isinstance(base, Conv1D):
        if not kwargs.get("fan_in_fan_out"):
            warnings.warn(
                "fan_in_fan_out=False but the target module is Conv1D; using fan_in_fan_out=True", stacklevel=2
            )
        kwargs["fan_in_fan_out"] = True
        return Linear(target, adapter_name, config=config, is_target_conv_1d_layer=True, **kwargs)
    return None
