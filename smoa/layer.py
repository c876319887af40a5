"""``SMoALinear``: the ``nn.Linear`` drop-in carrying an SMoA adapter (SPEC §2).

The layer keeps ``weight``/``bias`` (the frozen W0 and b, shared with the wrapped ``nn.Linear``), the trainable
factors in the LoRA-shaped layout of SPEC §3 as leaf modules ``smoa_A`` (``weight``: r_k×d_in = Â) and ``smoa_B``
(``weight``: d_out×r_k = B̂) so FSDP/PEFT wrap them like LoRA's, and the spectral orders as persistent buffers.
It reads top to bottom as construction → forward → merge → orders → state. What it builds on, one idea a module:
:mod:`smoa.factors` (block ranks, argument checks, init, the zero-by-construction shortcut), :mod:`smoa.merge`
(the bit-exact merge and unmerge), :mod:`smoa.checkpoint` (the partition record and every load-time check); the
computation itself lives in :mod:`smoa_kernels` and is chosen by :mod:`smoa.backends`.
"""

from __future__ import annotations

import uuid
import warnings

import torch
import torch.nn as nn
import torch.nn.functional as F

from smoa.backends import check_backend_name, smoa_linear
from smoa.checkpoint import (
    _ADAPTER_KEYS,
    _check_order_value,
    _save_unmerged_weight,
    _stamp_loaded_B,
    allow_missing_orders,
    check_layer_state_dict,
    check_order,
    check_zero_padding,
    checked_by_the_model,
    fingerprint_differs,
    partition_info,
    saved_ordering,
    warn_w0_differs,
)
from smoa.factors import (
    INIT_WEIGHTS,
    base_output_applies,
    check_smoa_arguments,
    init_block_factors,
    known_zero,
    order_storage_dtype,
    padding_masks,
    resolve_block_ranks,
    value_with_gradient_of,
    version_stamp,
    zero_rank_rows,
)
from smoa.merge import (
    MergeRecord,
    exact_merge,
    exact_unmerge,
    modulated_merge,
    modulated_unmerge,
    smoa_modulation,
)
from smoa.partition import compute_orders
from smoa_kernels.reference import blocks_to_lora, dense_delta_weight, lora_to_blocks

# SMoALinear, and the names that lived here before the split (re-exported so that existing imports keep working)
__all__ = [
    "INIT_WEIGHTS",
    "MergeRecord",
    "SMoALinear",
    "allow_missing_orders",
    "check_smoa_arguments",
    "check_zero_padding",
    "exact_merge",
    "exact_unmerge",
    "init_block_factors",
    "modulated_merge",
    "modulated_unmerge",
    "order_storage_dtype",
    "padding_masks",
    "partition_info",
    "resolve_block_ranks",
    "smoa_modulation",
]


def _check_layer_inputs(weight, svd_dtype, factor_dtype) -> None:
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
        raise ValueError(f"weight must be a 2-D tensor, got shape {tuple(getattr(weight, 'shape', ()))}")
    if not weight.is_floating_point():
        raise TypeError(f"weight has dtype={weight.dtype}: SMoA needs a floating-point W0 (a quantized base?)")
    if svd_dtype not in (torch.float32, torch.float64):
        raise ValueError(f"svd_dtype={svd_dtype!r} must be torch.float32 or torch.float64")
    if factor_dtype is not None and (not isinstance(factor_dtype, torch.dtype) or not factor_dtype.is_floating_point):
        raise TypeError(f"factor_dtype={factor_dtype!r} must be a floating-point torch.dtype")
    if not weight.is_meta and not bool(torch.isfinite(weight).all()):
        raise ValueError("weight contains NaN or Inf: the spectral partition and the anchor W0 need a finite weight")


class SMoALinear(nn.Module):
    """A frozen linear layer ``y = x W0ᵀ + b`` plus the SMoA update ``s · dropout(x) ΔWᵀ`` (SPEC §2).

    Args:
        in_features, out_features, bias, device, dtype: as for ``nn.Linear`` (W0 is initialised like it, then frozen).
        r: the total rank budget (SPEC's r); block k gets rank r_k = ``r // num_blocks``, the first ``r % num_blocks``
            blocks one more (the authors' split), or ``block_ranks[k]``. The scale stays ``s = alpha / r``.
        num_blocks: K, the number of spectral blocks (K = 1 is HiRA with a scale s).
        alpha: the scale numerator, ``s = alpha / r``; ``None`` means ``alpha = r`` (s = 1), the paper's default.
        dropout: dropout probability on the adapter path only (identity in eval mode).
        ordering: ``"spectral"`` (SPEC §1), ``"identity"`` or ``"random"`` (seeded by ``seed``) — the ablations.
        svd_dtype: float32 or float64; kept for compatibility (it sets the precision of the literal SVD route,
            ``smoa.partition.spectral_orders(..., method="svd")``): the ordering itself is computed from the smaller
            Gram matrix in float64, whose orders equal a float64 SVD's (see :mod:`smoa.partition`).
        factor_dtype: dtype of the trainable factors; default fp32 over a half-precision base, else W0's dtype.
        init_weights: ``True`` — A kaiming-uniform per block, B = 0 (an exact no-op); ``"gaussian"`` — A ~ N(0, 1/r_k),
            B = 0; ``False`` — B random too, strong enough that ΔW is of W0's magnitude (tests, debugging).
        block_ranks: explicit per-block ranks (``num_blocks`` ints ≥ 0 summing to ``r``). Uneven ranks are stored
            zero-padded to the largest (``smoa_A``: r_max×d_in); the padding gets exactly zero gradient and stays 0.
        backend: ``None`` (follow :func:`smoa.use_backend` / ``$SMOA_BACKEND``) or a name from ``smoa.BACKENDS``.

    The orders are validated wherever they enter (construction, ``layer.row_order = t``, ``load_state_dict`` in any
    integer dtype, ``to_empty()``) and re-validated at the call when the tensor object, its version or its storage
    changed; only a write through ``.data`` (which also hides from autograd) escapes that guard.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        r: int = 8,
        num_blocks: int = 2,
        alpha: float | None = None,
        dropout: float = 0.0,
        bias: bool = True,
        ordering: str = "spectral",
        *,
        seed: int = 0,
        svd_dtype: torch.dtype = torch.float32,
        factor_dtype: torch.dtype | None = None,
        init_weights: bool | str = True,
        backend: str | None = None,
        block_ranks: list[int] | None = None,
        device=None,
        dtype=None,
    ) -> None:
        super().__init__()
        base = nn.Linear(in_features, out_features, bias=bias, device=device, dtype=dtype)
        self._attach(base.weight, base.bias, r, num_blocks, alpha, dropout, ordering, seed, svd_dtype,
                     factor_dtype, init_weights, backend, block_ranks)  # fmt: skip

    @classmethod
    def from_linear(
        cls,
        linear: nn.Linear,
        r: int,
        num_blocks: int = 2,
        alpha: float | None = None,
        dropout: float = 0.0,
        ordering: str = "spectral",
        *,
        seed: int = 0,
        svd_dtype: torch.dtype = torch.float32,
        factor_dtype: torch.dtype | None = None,
        init_weights: bool | str = True,
        backend: str | None = None,
        block_ranks: list[int] | None = None,
    ) -> SMoALinear:
        """Wrap an existing ``nn.Linear``: its ``weight``/``bias`` Parameters are shared (not copied) and frozen."""
        if not isinstance(linear, nn.Linear):
            hint = (
                " (GPT-2 Conv1D goes through the PEFT tuner's fan_in_fan_out)"
                if type(linear).__name__ == "Conv1D"
                else ""
            )
            raise TypeError(f"linear must be a torch.nn.Linear, got {type(linear).__name__}{hint}")
        layer = cls.__new__(cls)
        nn.Module.__init__(layer)
        layer._attach(linear.weight, linear.bias, r, num_blocks, alpha, dropout, ordering, seed, svd_dtype,
                      factor_dtype, init_weights, backend, block_ranks)  # fmt: skip
        return layer

    def _attach(self, weight, bias, r, num_blocks, alpha, dropout, ordering, seed, svd_dtype, factor_dtype,
                init_weights, backend, block_ranks=None) -> None:  # fmt: skip
        # Everything is checked and computed before the wrapped nn.Linear is touched: a failure leaves it as it was.
        out_features, in_features = weight.shape
        check_smoa_arguments(in_features, out_features, r, num_blocks, alpha, dropout, ordering, block_ranks)
        if init_weights not in INIT_WEIGHTS or not isinstance(init_weights, (bool, str)):
            raise ValueError(f"init_weights={init_weights!r} is not one of {INIT_WEIGHTS}")
        block_ranks = resolve_block_ranks(int(r), int(num_blocks), block_ranks)
        backend = None if backend is None else check_backend_name(backend)
        _check_layer_inputs(weight, svd_dtype, factor_dtype)
        if weight.is_meta:  # the orders must then come from a checkpoint (see _orders_pending)
            row_order = torch.empty(out_features, dtype=torch.long, device="meta")
            col_order = torch.empty(in_features, dtype=torch.long, device="meta")
        else:
            row_order, col_order = compute_orders(weight, ordering, seed=seed, svd_dtype=svd_dtype)
        if factor_dtype is None:
            factor_dtype = torch.float32 if weight.dtype in (torch.float16, torch.bfloat16) else weight.dtype
        rank = max(block_ranks)  # uneven ranks: zero-padded to the largest
        smoa_A = nn.Linear(in_features, rank, bias=False, device=weight.device, dtype=factor_dtype)
        smoa_B = nn.Linear(rank, out_features, bias=False, device=weight.device, dtype=factor_dtype)
        info = partition_info(weight, int(num_blocks), int(r), ordering)

        self.block_ranks = block_ranks
        self.backend = backend
        self.in_features, self.out_features = in_features, out_features
        self.r, self.num_blocks, self.ordering = int(r), int(num_blocks), ordering
        self._seed, self._svd_dtype = int(seed), svd_dtype
        self.alpha = float(r if alpha is None else alpha)
        self.scale = self.alpha / self.r
        self.weight = weight
        if bias is None:
            self.register_parameter("bias", None)
        else:
            self.bias = bias
        self._order_stamp = None
        self._orders_pending = weight.is_meta
        self.register_buffer("row_order", row_order)
        self.register_buffer("col_order", col_order)
        self.register_buffer("partition_info", info.to(weight.device) if not weight.is_meta else info)
        self.smoa_A, self.smoa_B = smoa_A, smoa_B
        self.smoa_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.merged = False
        self._merge_record: MergeRecord | None = None  # what the current merge wrote (bit-exact unmerge)
        self._merge_token = uuid.uuid4().hex  # marks the shared W0 Parameter while this layer has merged into it
        self._zero_B_stamp = None  # set while B is known to be zero (see _B_known_zero)
        if not weight.is_meta:
            self._stamp_orders()
            self.reset_smoa_parameters(init_weights)
        self.register_state_dict_post_hook(_save_unmerged_weight)
        self.register_load_state_dict_post_hook(_stamp_loaded_B)
        self.weight.requires_grad_(False)  # last: only a layer that was fully built freezes the wrapped weight
        if self.bias is not None:
            self.bias.requires_grad_(False)

    # ---- forward ------------------------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.in_features:
            raise ValueError(f"input has {x.shape[-1]} features (shape {tuple(x.shape)}), expected {self.in_features}")
        self._check_weight_owner()
        if self.merged:
            return F.linear(x, self.weight, self.bias)
        self._check_orders()
        zero_B = self._B_known_zero() and base_output_applies(x, self.weight)
        factors_need_grad = torch.is_grad_enabled() and (self.smoa_A.weight.requires_grad or
                                                         self.smoa_B.weight.requires_grad)  # fmt: skip
        if zero_B and not factors_need_grad:  # the adapter term is zero by construction: the base layer's output
            return F.linear(x, self.weight, self.bias)
        output = smoa_linear(
            x,
            self.smoa_dropout(x),
            self.weight,
            self.bias,
            self.smoa_A.weight,
            self.smoa_B.weight,
            self.row_order,
            self.col_order,
            self.num_blocks,
            self.scale,
            backend=self.backend,
        )
        if zero_B:
            return value_with_gradient_of(F.linear(x, self.weight, self.bias), output)
        rows = zero_rank_rows(self.block_ranks, self.row_order)
        if rows is not None and base_output_applies(x, self.weight):
            output = torch.where(rows, F.linear(x, self.weight, self.bias).to(output.dtype), output)
        return output

    # ---- ΔW and merge -------------------------------------------------------------------------------------------
    def _adapter_tuple(self) -> tuple:
        return (self.scale, self.smoa_A.weight, self.smoa_B.weight, self.row_order, self.col_order, self.num_blocks)

    def _check_weight_owner(self) -> None:
        owner = getattr(self.weight, "_smoa_merged_by", None)
        if owner is not None and owner != self._merge_token:
            raise RuntimeError(
                "the base weight W0 of this SMoALinear holds another SMoA layer's merged update (two from_linear "
                "wrappers share one nn.Linear): unmerge() that layer before using this one"
            )

    @torch.no_grad()
    def delta_weight(self) -> torch.Tensor:
        """``s·ΔW`` (d_out×d_in, original coordinates) in the factors' dtype."""
        if self.merged:
            raise RuntimeError("delta_weight() needs the original W0 as anchor: call unmerge() first")
        self._check_weight_owner()
        self._check_orders()
        delta = dense_delta_weight(
            self.weight, self.smoa_A.weight, self.smoa_B.weight, self.row_order, self.col_order, self.num_blocks
        )
        return delta * self.scale

    @torch.no_grad()
    def _original_weight(self) -> torch.Tensor:
        """W0 as it was before the merge, bit for bit (the weight itself when unmerged)."""
        if not self.merged:
            return self.weight.detach()
        return exact_unmerge(self.weight.detach(), self._merge_record)

    @torch.no_grad()
    def merge(self, safe_merge: bool = False) -> None:
        """``W0 ← W0 ⊙ (1 + s·P) = W0 + s·ΔW``: inference then costs exactly a plain linear layer.

        ``safe_merge=True`` (PEFT's option) refuses, leaving W0 unchanged, when the merged weight would hold NaN/Inf.
        The merge records copies of the factors and every W0 entry a division would not give back, so
        :meth:`unmerge` restores W0 bit for bit whatever happens to the factors meanwhile (an optimizer step, a load).
        """
        if self.merged:
            return
        self._check_weight_owner()
        self._check_orders()
        merged, record = exact_merge(self.weight.detach(), [self._adapter_tuple()], safe_merge, "this SMoALinear")
        self.weight.copy_(merged)
        self._merge_record = record
        self.merged = True
        self.weight._smoa_merged_by = self._merge_token

    @torch.no_grad()
    def unmerge(self) -> None:
        """Restore W0 after :meth:`merge`, bit for bit (with the factors recorded at the merge)."""
        if not self.merged:
            return
        self.weight.copy_(self._original_weight())
        self._merge_record = None
        self.merged = False
        self.weight.__dict__.pop("_smoa_merged_by", None)

    # ---- the orders: validated wherever they enter, guarded at the call -------------------------------------------
    def __setattr__(self, name: str, value) -> None:
        if name in ("row_order", "col_order") and name in self.__dict__.get("_buffers", {}):
            size = self.out_features if name == "row_order" else self.in_features
            if isinstance(value, torch.Tensor) and value.is_meta:
                raise ValueError(f"{name} must be a permutation of range({size}), got a meta tensor")
            value = _check_order_value(name, value, size, self.weight.device)
            super().__setattr__(name, value)
            self._stamp_orders()
            return
        super().__setattr__(name, value)

    def _stamp_orders(self) -> None:
        """Remember which order tensors (objects, versions, storage) were validated; :meth:`_check_orders` re-validates
        anything else. The objects themselves are held, so no address can be reused by another tensor."""
        row, col = self._buffers["row_order"], self._buffers["col_order"]
        self._order_stamp = (row, row._version, row.data_ptr(), col, col._version, col.data_ptr())
        self._orders_pending = False

    def _check_orders(self) -> None:
        if self._orders_pending:
            raise RuntimeError(
                "this SMoALinear has no orders yet (built on the meta device, or to_empty()): load a state dict that "
                "carries row_order and col_order, or call recompute_orders() to derive them from W0"
            )
        if torch.compiler.is_compiling():
            return
        row, col, stamp = self.row_order, self.col_order, self._order_stamp
        if stamp is None or not (
            stamp[0] is row and stamp[1] == row._version and stamp[2] == row.data_ptr()
            and stamp[3] is col and stamp[4] == col._version and stamp[5] == col.data_ptr()
        ):  # fmt: skip
            check_order("row_order", row, self.out_features)
            check_order("col_order", col, self.in_features)
            self._stamp_orders()

    def _apply(self, fn, recurse: bool = True):
        # .to()/.cuda() keep the orders' values; to_empty() does not: give back the known orders (or, from the meta
        # device, mark them missing) instead of leaving garbage that indexes W0 out of range.
        row, col, info = self.row_order, self.col_order, self.partition_info
        known = None if row.is_meta else (row.detach().cpu().clone(), col.detach().cpu().clone())
        info_values = None if info.is_meta else info.detach().cpu().clone()
        zero_B = self._B_known_zero()
        result = super()._apply(fn, recurse)
        B = self.smoa_B.weight
        # a cast or move keeps B = 0; to_empty() does not: re-stamp only a B that is still zero
        self._zero_B_stamp = version_stamp(B) if zero_B and not B.is_meta and not bool(B.any()) else None
        if self.row_order is not row or self.col_order is not col:
            if known is None:
                self.row_order.fill_(-1)
                self.col_order.fill_(-1)
                self._orders_pending = True
            else:
                for name, values in zip(("row_order", "col_order"), known):
                    buffer = self._buffers[name]
                    if buffer.is_meta:
                        continue
                    if not torch.equal(buffer.cpu(), values):
                        buffer.copy_(values.to(buffer.device))
                if not self.row_order.is_meta:
                    self._stamp_orders()
        if info_values is not None and not self.partition_info.is_meta:
            if not torch.equal(self.partition_info.cpu(), info_values):
                self.partition_info.copy_(info_values.to(self.partition_info.device))
        return result

    @torch.no_grad()
    def recompute_orders(self) -> None:
        """Derive ``row_order``/``col_order`` again from the current W0 (this layer's ``ordering``, seed and
        ``svd_dtype``): the explicit opt-in when a checkpoint did not bring them. The factors are kept as they are."""
        if self.merged:
            raise RuntimeError("recompute_orders() needs the original W0: call unmerge() first")
        if self.weight.is_meta:
            raise RuntimeError("recompute_orders() needs W0's values: the weight is on the meta device")
        row_order, col_order = compute_orders(self.weight, self.ordering, seed=self._seed, svd_dtype=self._svd_dtype)
        self.row_order, self.col_order = row_order, col_order
        saved = self.partition_info[6:].view(torch.float64)
        if bool(torch.isnan(saved).any()):  # built on the meta device: record the W0 the adapter now lives on
            self.partition_info.copy_(partition_info(self.weight, self.num_blocks, self.r, self.ordering))

    @property
    def rank_per_block(self) -> int:
        """r_k when every block has the same rank, else the largest r_k (the padded width of the factors)."""
        return max(self.block_ranks)

    @torch.no_grad()
    def reset_smoa_parameters(self, init_weights: bool | str = True) -> None:
        """SPEC §2 init (see :func:`init_block_factors`): ``True`` — every ``A_k`` kaiming-uniform(a=√5) over its own
        fan-in |C_k|, ``B = 0`` (exact no-op); ``"gaussian"`` — ``A_k ~ N(0, 1/r_k)``, ``B = 0``; ``False`` — a random
        ``B`` too, strong enough that ΔW is of W0's own magnitude."""
        sizes = [(B_k.shape[0], A_k.shape[1]) for A_k, B_k in self.block_factors()]
        self.load_block_factors(init_block_factors(sizes, self.block_ranks, init_weights, self.smoa_A.weight.device))
        self._zero_B_stamp = version_stamp(self.smoa_B.weight) if init_weights is not False else None

    def _B_known_zero(self) -> bool:
        """B = 0 and nothing wrote to it since (see :func:`known_zero`); a stamp found wrong is dropped."""
        stamp = self.__dict__.get("_zero_B_stamp")
        if known_zero(stamp, self.smoa_B.weight):
            return True
        if stamp is not None and not torch.compiler.is_compiling():
            self._zero_B_stamp = None
        return False

    # ---- the official per-block layout -------------------------------------------------------------------------
    def block_factors(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """``[(A_k, B_k)]`` in the authors' layout (``A_k``: r_k×|C_k|, ``B_k``: |R_k|×r_k), detached copies."""
        self._check_orders()
        with torch.no_grad():
            blocks = lora_to_blocks(
                self.smoa_A.weight, self.smoa_B.weight, self.row_order, self.col_order, self.num_blocks,
                self.block_ranks,
            )  # fmt: skip
            return [(A_k.detach().clone(), B_k.detach().clone()) for A_k, B_k in blocks]

    @torch.no_grad()
    def load_block_factors(self, blocks) -> None:
        """Inverse of :meth:`block_factors`: load per-block factors (e.g. converted from an official checkpoint)."""
        self._check_orders()
        blocks = list(blocks)
        if len(blocks) != self.num_blocks:
            raise ValueError(f"blocks has {len(blocks)} entries, expected num_blocks={self.num_blocks}")
        expected = [(tuple(A.shape), tuple(B.shape)) for A, B in lora_to_blocks(
            self.smoa_A.weight, self.smoa_B.weight, self.row_order, self.col_order, self.num_blocks,
            self.block_ranks)]  # fmt: skip
        for k, ((A_k, B_k), (shape_A, shape_B)) in enumerate(zip(blocks, expected)):
            if tuple(A_k.shape) != shape_A or tuple(B_k.shape) != shape_B:
                raise ValueError(
                    f"blocks[{k}] has shapes A={tuple(A_k.shape)}, B={tuple(B_k.shape)}; expected A={shape_A}, "
                    f"B={shape_B} (r_k={self.block_ranks[k]}, |C_k|, |R_k| from the stored orders)"
                )
        lora_A, lora_B = blocks_to_lora(blocks, self.row_order, self.col_order)
        self.smoa_A.weight.copy_(lora_A)  # r_max rows: uneven ranks come zero-padded from blocks_to_lora
        self.smoa_B.weight.copy_(lora_B)

    # ---- state --------------------------------------------------------------------------------------------------
    def _save_to_state_dict(self, destination, prefix, keep_vars) -> None:
        """Orders are saved in the smallest integer dtype that holds them (int16 up to 32,768 features: files 4×
        smaller than int64); in memory they stay int64, which the kernels index with."""
        super()._save_to_state_dict(destination, prefix, keep_vars)
        for name, size in (("row_order", self.out_features), ("col_order", self.in_features)):
            if prefix + name in destination:
                destination[prefix + name] = destination[prefix + name].to(order_storage_dtype(size))

    def adapter_state_dict(self) -> dict[str, torch.Tensor]:
        """The adapter without W0 (keys as in ``state_dict()``): factors, orders and the partition record (K, r,
        shape, ordering, a fingerprint of W0). ``load_state_dict(..., strict=False)`` takes it back; a load of factors
        without their orders is refused (see :func:`allow_missing_orders`)."""
        state = self.state_dict()
        return {key: state[key] for key in _ADAPTER_KEYS}

    def _check_state_dict(self, state_dict, prefix: str) -> None:
        """Raise naming the key for anything under ``prefix`` that cannot load exactly (see
        :func:`smoa.checkpoint.check_layer_state_dict`); nothing is written to the layer."""
        check_layer_state_dict(self, state_dict, prefix)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):  # fmt: skip
        if not checked_by_the_model(state_dict, prefix):
            self._check_state_dict(state_dict, prefix)
        has = {name: prefix + name in state_dict for name in _ADAPTER_KEYS}
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)  # fmt: skip
        if not has["partition_info"] and prefix + "partition_info" in missing_keys:
            missing_keys.remove(prefix + "partition_info")  # a state dict written before the record existed
        # smoa_B (a child) is loaded after this hook: the stamp is taken by _stamp_loaded_B, after the children. Set on
        # every load (None: B not loaded), so a flag left by a load that failed part-way is never used later.
        value_B = state_dict.get(prefix + "smoa_B.weight")
        self._zero_B_after_load = (
            (not value_B.is_meta and not bool(value_B.any())) if isinstance(value_B, torch.Tensor) else None
        )  # a load already reads the values
        if has["row_order"]:
            self._stamp_orders()  # validated above; clears a pending (meta / to_empty) state
        elif has["smoa_A.weight"] or has["smoa_B.weight"]:  # allowed only under allow_missing_orders()
            warnings.warn(
                f"{prefix}row_order/{prefix}col_order were not in the state dict: recomputing them from W0 "
                f"(ordering={self.ordering!r}) as allow_missing_orders() asked",
                stacklevel=3,
            )
            self.recompute_orders()
        if has["partition_info"]:
            self.ordering = saved_ordering(self.partition_info) or self.ordering  # the label of the loaded orders
            if fingerprint_differs(self.partition_info, self.weight):
                warn_w0_differs(prefix + "partition_info")

    def extra_repr(self) -> str:
        dropout = self.smoa_dropout.p if isinstance(self.smoa_dropout, nn.Dropout) else 0.0
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, r={self.r}, "
            f"num_blocks={self.num_blocks}, "
            + (f"block_ranks={list(self.block_ranks)}, " if len(set(self.block_ranks)) > 1 else "")
            + f"alpha={self.alpha:g}, dropout={dropout:g}, ordering={self.ordering}, "
            f"backend={self.backend or 'follow'}, bias={self.bias is not None}, merged={self.merged}"
        )
