"""What an adapter file carries and every check made when one is loaded: the partition record (K, r, shape,
ordering, a fingerprint of W0), the orders (validated wherever they enter), the factors (shape, dtype, finite, zero
padding), the opt-in to recompute orders a load did not bring, and the state-dict hooks of the layers.

Every check runs before anything is written: a refused load leaves the layer as it was (docs/reliability.md).
"""

from __future__ import annotations

import contextlib
import threading
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from smoa.factors import padding_masks, version_stamp
from smoa.partition import ORDERINGS, validate_order

if TYPE_CHECKING:
    from smoa.layer import SMoALinear

__all__ = [
    "AdapterEntries",
    "allow_missing_orders",
    "check_adapter_entries",
    "check_layer_state_dict",
    "check_loaded_tensor",
    "check_order",
    "check_partition_info",
    "check_zero_padding",
    "checked_by_the_model",
    "fingerprint_differs",
    "missing_orders_allowed",
    "partition_info",
]

# ---- the saved partition and W0 fingerprint (one int64 tensor; ints are never cast by .half()/.to(dtype)) --------
_INFO_FORMAT = 1
_FINGERPRINT_ROWS = 4
_FINGERPRINT_RTOL = 1e-3  # far above bf16/fp16 rounding of a row sum, far below what another checkpoint changes


def _fingerprint(weight: torch.Tensor) -> torch.Tensor:
    """A cheap float64 fingerprint of W0 (d_out×d_in): its Frobenius norm, then the sum and the absolute sum of a
    few evenly spaced rows."""
    w = weight.detach()
    if hasattr(w, "full_tensor"):  # an FSDP2 DTensor shard: every rank attaches/loads, so all-gather
        w = w.full_tensor()
    if w.dim() != 2 or w.numel() == 0 or not w.is_floating_point():  # a ZeRO-3 partition, a packed 4-bit weight
        return torch.full((1 + 2 * _FINGERPRINT_ROWS,), float("nan"), dtype=torch.float64)
    rows = torch.linspace(0, w.shape[0] - 1, min(_FINGERPRINT_ROWS, w.shape[0])).round().long().to(w.device)
    sample = w.index_select(0, rows).double()
    values = [torch.linalg.vector_norm(w.double()).reshape(1), torch.stack([sample.sum(1), sample.abs().sum(1)], 1)]
    return torch.cat([values[0], values[1].flatten()]).cpu()


def partition_info(
    weight: torch.Tensor, num_blocks: int, r: int, ordering: str, fingerprint: bool = True
) -> torch.Tensor:
    """The int64 vector saved with an adapter: ``[format, K, r, d_out, d_in, ordering index, fingerprint bits...]``
    (the fingerprint of :func:`_fingerprint` as float64 bit patterns; NaN bits — unknown — when W0 is on the meta
    device or ``fingerprint=False``, e.g. when the record will be loaded from a checkpoint)."""
    d_out, d_in = weight.shape
    if weight.is_meta or not fingerprint:
        fingerprint = torch.full((1 + 2 * min(_FINGERPRINT_ROWS, d_out),), float("nan"), dtype=torch.float64)
    else:
        fingerprint = _fingerprint(weight)
    head = torch.tensor([_INFO_FORMAT, num_blocks, r, d_out, d_in, ORDERINGS.index(ordering)], dtype=torch.int64)
    return torch.cat([head, fingerprint.view(torch.int64)])


def check_partition_info(key: str, info, num_blocks: int, r: int, d_out: int, d_in: int) -> None:
    """Raise ``ValueError`` naming ``key`` unless the saved partition record matches this layer's K, r and shape (a
    config edited so that the factor shapes still match would otherwise load with another partition). The ordering
    is not compared: the saved orders are what counts, whatever ablation label built the receiving layer."""
    if not isinstance(info, torch.Tensor) or info.dim() != 1 or info.numel() < 6 or info.is_floating_point():
        found = (
            f"shape {tuple(info.shape)}, dtype={info.dtype}" if isinstance(info, torch.Tensor) else type(info).__name__
        )
        raise ValueError(
            f"{key} is not an SMoA partition record: expected a 1-D integer tensor of at least 6 entries [format, K, "
            f"r, d_out, d_in, ordering, ...], found {found}; re-save the adapter with this smoa"
        )
    fmt, saved_k, saved_r, saved_out, saved_in = (int(v) for v in info[:5].tolist())
    if fmt != _INFO_FORMAT:
        raise ValueError(
            f"{key} has format {fmt}, this smoa reads format {_INFO_FORMAT} (expected {_INFO_FORMAT}, found {fmt}); "
            "install the smoa version that wrote the adapter, or re-save it with this one"
        )
    saved = {"num_blocks": saved_k, "r": saved_r, "out_features": saved_out, "in_features": saved_in}
    ours = {"num_blocks": num_blocks, "r": r, "out_features": d_out, "in_features": d_in}
    diff = [
        f"{name}={saved[name]} in the checkpoint but {ours[name]} here" for name in saved if saved[name] != ours[name]
    ]
    if diff:
        fix = ", ".join(f"{name}={saved[name]}" for name in ("num_blocks", "r") if saved[name] != ours[name])
        advice = (
            f"set {fix} in the config (or load the folder with its own adapter_config.json)"
            if fix
            else "the checkpoint is for a layer of another shape: load it onto the base model it was trained on"
        )
        raise ValueError(
            f"{key}: the adapter was saved with another partition: {'; '.join(diff)} (the checkpoint's value is the "
            f"one found, this layer's the one expected); {advice}"
        )


def saved_ordering(info: torch.Tensor) -> str | None:
    index = int(info[5])
    return ORDERINGS[index] if 0 <= index < len(ORDERINGS) else None


def fingerprint_differs(info: torch.Tensor, weight: torch.Tensor) -> bool:
    """True when the W0 fingerprint in ``info`` is known and differs from ``weight``'s by more than rounding."""
    saved = info[6:].contiguous().view(torch.float64)
    if weight.is_meta or saved.numel() == 0 or bool(torch.isnan(saved).any()):
        return False
    ours = _fingerprint(weight)
    if bool(torch.isnan(ours).any()):  # W0 not available here (e.g. partitioned): nothing to compare
        return False
    if ours.numel() != saved.numel():
        return True
    norm, pairs_saved, pairs_ours = saved[0], saved[1:].view(-1, 2), ours[1:].view(-1, 2)
    scale = pairs_saved[:, 1].abs().clamp_min(1e-30)
    return bool(
        (ours[0] - norm).abs() > _FINGERPRINT_RTOL * norm.abs()
        or ((pairs_ours - pairs_saved).abs() > _FINGERPRINT_RTOL * scale[:, None]).any()
    )


def warn_w0_differs(key: str) -> None:
    warnings.warn(
        f"{key}: the base weight W0 differs from the one this SMoA adapter was trained on (another base checkpoint, a "
        "fine-tuned or quantized copy?); the adapter's update ΔW = (BA) ⊙ W0 is anchored on W0, so its outputs will "
        "differ from the trained model's",
        stacklevel=4,
    )


def check_loaded_tensor(key: str, value, expected_shape=None, context: str = "") -> None:
    """Raise ``ValueError`` naming ``key`` for a non-tensor, a shape mismatch, a non-float or a NaN/Inf value
    (``context``: the receiving layer's sizes, for the shape message)."""
    if not isinstance(value, torch.Tensor):
        raise ValueError(f"{key} must be a tensor, got {type(value).__name__}; save tensors (state_dict() values)")
    if expected_shape is not None and tuple(value.shape) != tuple(expected_shape):
        raise ValueError(
            f"{key} has shape {tuple(value.shape)}, expected {tuple(expected_shape)}"
            + (f" ({context})" if context else "")
            + ": the checkpoint was made for "
            "another r, num_blocks or base shape; load it with the config and base model it was trained with"
        )
    if not value.is_floating_point():
        raise ValueError(
            f"{key} must be a floating-point tensor (expected float16/bfloat16/float32/float64), found "
            f"dtype={value.dtype}; is the key mapped to the right tensor?"
        )
    if not value.is_meta and not bool(torch.isfinite(value).all()):
        nan, total = int(torch.isnan(value).sum()), int((~torch.isfinite(value)).sum())
        raise ValueError(
            f"{key} holds {total} NaN/Inf values ({nan} NaN, {total - nan} Inf) of {value.numel()}; expected finite "
            "values: refusing to load a corrupt adapter — load an earlier checkpoint or re-save a finite one"
        )


ORDER_ADVICE = (
    "the orders are saved with the adapter (save_pretrained / adapter_state_dict write them): re-save the adapter "
    "from the trained model, or load a checkpoint of this layer's shape"
)


def describe_order(value, size: int) -> str:
    """What an order tensor holds, for an error message: shape, dtype, range, repeated and missing indices."""
    if not isinstance(value, torch.Tensor):
        return f"a {type(value).__name__}"
    found = f"shape {tuple(value.shape)}, dtype={value.dtype}"
    if value.is_meta or value.numel() == 0 or value.is_floating_point() or value.is_complex():
        return found
    flat = value.detach().flatten().long().cpu()
    present = flat[(flat >= 0) & (flat < size)].unique().numel()
    return (
        f"{found}, values in [{int(flat.min())}, {int(flat.max())}], {flat.numel() - flat.unique().numel()} repeated, "
        f"{size - present} of range({size}) missing"
    )


def check_order(name: str, value, size: int) -> None:
    """:func:`smoa.partition.validate_order` with the expected and found values and what to do in the message."""
    try:
        validate_order(name, value, size)
    except ValueError as error:
        raise ValueError(
            f"{error}: expected a permutation of range({size}) (shape ({size},), an integer dtype), found "
            f"{describe_order(value, size)}; {ORDER_ADVICE}"
        ) from None


def _check_order_value(name: str, value, size: int, device) -> torch.Tensor:
    """A validated int64 copy of ``value`` on ``device`` (any integer dtype is accepted, e.g. int16 from a file)."""
    check_order(name, value, size)
    return value.detach().to(device=device, dtype=torch.int64)


# ---- opting in to recompute orders that a load did not bring -------------------------------------------------------
_load_options = threading.local()


@contextlib.contextmanager
def allow_missing_orders() -> Iterator[None]:
    """Inside this block a ``load_state_dict`` that brings SMoA factors without their ``row_order``/``col_order``
    (e.g. a "trainable parameters only" checkpoint) is accepted: the orders are recomputed from the layer's W0 with
    its ``ordering``/``seed``/``svd_dtype`` (a warning says so). Outside it such a load raises, because a re-derived
    SVD can order near-ties differently and silently scramble a trained adapter (SPEC §1.5)."""
    previous = getattr(_load_options, "allow_missing_orders", False)
    _load_options.allow_missing_orders = True
    try:
        yield
    finally:
        _load_options.allow_missing_orders = previous


def missing_orders_allowed() -> bool:
    return getattr(_load_options, "allow_missing_orders", False)


_ADAPTER_KEYS = ("row_order", "col_order", "partition_info", "smoa_A.weight", "smoa_B.weight")


def _save_unmerged_weight(module: SMoALinear, state_dict, prefix: str, local_metadata) -> None:
    """``state_dict()`` of a merged layer saves the original W0 (with the factors), so that loading it into a fresh
    layer does not apply the update twice."""
    if module.merged and prefix + "weight" in state_dict:
        state_dict[prefix + "weight"] = module._original_weight().clone()


def checked_by_the_model(state_dict, prefix: str) -> bool:
    """Whether the load pre-hook of an enclosing module (``smoa.model.guard_loads``) already checked the entries under
    ``prefix`` of this ``state_dict`` (one ``load_state_dict`` call: torch passes the same dict to every module)."""
    return any(prefix.startswith(done) for done in getattr(state_dict, "_smoa_checked_prefixes", ()))


def _stamp_loaded_B(module: SMoALinear, incompatible_keys) -> None:
    """Load post-hook (after the children, so after ``smoa_B`` was written): B is known zero iff the loaded B was."""
    zero = module.__dict__.pop("_zero_B_after_load", None)
    if zero is not None:
        module._zero_B_stamp = version_stamp(module.smoa_B.weight) if zero else None


def check_zero_padding(state_dict, prefix, block_ranks, key_A, key_B, row_order, col_order) -> None:
    """Refuse factors whose zero padding (uneven block ranks) is not zero: they would compute another function."""
    mask_A, mask_B = padding_masks(block_ranks, row_order, col_order)
    for key, mask in ((key_A, mask_A), (key_B, mask_B)):
        value = state_dict.get(prefix + key)
        if mask is not None and value is not None and tuple(value.shape) == tuple(mask.shape):
            nonzero = int((value.detach()[mask.to(value.device)] != 0).sum())
            if nonzero:
                raise ValueError(
                    f"{prefix + key} has {nonzero} non-zero entries in the zero padding of block_ranks="
                    f"{list(block_ranks)} (expected 0: rank slots j >= r_k of block k must be 0); the checkpoint was "
                    "saved with other block_ranks, or edited: load it with the block_ranks it was trained with"
                )


@dataclass(frozen=True)
class AdapterEntries:
    """Where one adapter of one layer lives in a state dict, and what its entries must match: the keys relative to
    the layer's ``prefix`` (``rows``/``cols``: the orders, ``info``: the partition record, ``A``/``B``: the factors),
    the factors' shapes, the layer's K, r, per-block ranks and shape, and how to save an adapter with its orders."""

    keys: dict[str, str]
    shape_A: tuple[int, ...]
    shape_B: tuple[int, ...]
    num_blocks: int
    r: int
    block_ranks: tuple[int, ...]
    d_out: int
    d_in: int
    saved_with: str


def check_adapter_entries(state_dict, prefix: str, adapter: AdapterEntries) -> set[str]:
    """Raise naming the key for anything of ``adapter`` in ``state_dict`` that cannot load exactly: one order without
    the other, orders that are not permutations, orders without factors (they would re-partition the current factors),
    factors without orders (unless :func:`allow_missing_orders`), factors of another shape, dtype or non-finite, a
    non-zero padding of uneven block ranks, another partition record. Integer orders of any dtype are replaced by
    int64 copies in the dict; nothing else is written. Returns the names of the entries present. Shared by
    :class:`smoa.layer.SMoALinear` and the PEFT layer, so both refuse the same things with the same words."""
    keys = {name: prefix + key for name, key in adapter.keys.items()}
    present = {name for name, key in keys.items() if key in state_dict}
    orders, factors = {"rows", "cols"} & present, {"A", "B"} & present
    if len(orders) == 1:
        (given,) = orders
        missing = ({"rows", "cols"} - orders).pop()
        raise ValueError(f"{keys[given]} is loaded without {keys[missing]}: the orders are loaded together")
    for name, size in (("rows", adapter.d_out), ("cols", adapter.d_in)):
        if name in present:
            state_dict[keys[name]] = _check_order_value(keys[name], state_dict[keys[name]], size, "cpu")
    if orders and not factors:
        raise ValueError(
            f"{keys['rows']}/{keys['cols']} are loaded without {keys['A']}/{keys['B']}: new orders would "
            "re-partition the current factors; load them together"
        )
    if factors and not orders and not missing_orders_allowed():
        raise ValueError(
            f"{sorted(keys[name] for name in factors)} loaded without {keys['rows']}/{keys['cols']}: the factors only "
            f"make sense with the orders they were trained with ({adapter.saved_with} include them); or opt in with "
            "`with smoa.allow_missing_orders():` to recompute them from W0"
        )
    context = (
        f"r={adapter.r}, num_blocks={adapter.num_blocks}, in_features={adapter.d_in}, out_features={adapter.d_out}"
    )
    for name, shape in (("A", adapter.shape_A), ("B", adapter.shape_B)):
        if name in present:
            check_loaded_tensor(keys[name], state_dict[keys[name]], shape, context)
    if orders:  # uneven block ranks: the zero padding of the loaded factors must be zero
        check_zero_padding(state_dict, prefix, adapter.block_ranks, adapter.keys["A"], adapter.keys["B"],
                           state_dict[keys["rows"]], state_dict[keys["cols"]])  # fmt: skip
    if "info" in present:
        check_partition_info(keys["info"], state_dict[keys["info"]], adapter.num_blocks, adapter.r, adapter.d_out,
                             adapter.d_in)  # fmt: skip
    return present


def check_layer_state_dict(layer: SMoALinear, state_dict, prefix: str) -> None:
    """Raise naming the key for anything in ``state_dict`` (under ``prefix``) that the SMoALinear ``layer`` cannot
    load exactly (its adapter: :func:`check_adapter_entries`; W0 and b: shape, dtype, finite); integer orders of any
    dtype are replaced by int64 copies. Nothing is written to the layer."""
    base = {name: prefix + name for name in ("weight", "bias")}
    if not any(prefix + key in state_dict for key in (*_ADAPTER_KEYS, "weight", "bias")):
        return
    if layer.merged:
        present = sorted(prefix + key for key in (*_ADAPTER_KEYS, "weight", "bias") if prefix + key in state_dict)
        raise RuntimeError(
            f"{prefix or 'this '}SMoALinear is merged: call unmerge() before load_state_dict (loading "
            f"{present[:3]} into a merged weight could not be undone)"
        )
    check_adapter_entries(state_dict, prefix, layer_entries(layer))
    context = f"in_features={layer.in_features}, out_features={layer.out_features}"
    for name, param in (("weight", layer.weight), ("bias", layer.bias)):
        if base[name] in state_dict and param is not None:
            check_loaded_tensor(base[name], state_dict[base[name]], param.shape, context)


def layer_entries(layer: SMoALinear) -> AdapterEntries:
    """The :class:`AdapterEntries` of an :class:`smoa.layer.SMoALinear` (keys as in its ``state_dict()``)."""
    return AdapterEntries(
        keys={
            "rows": "row_order",
            "cols": "col_order",
            "info": "partition_info",
            "A": "smoa_A.weight",
            "B": "smoa_B.weight",
        },
        shape_A=tuple(layer.smoa_A.weight.shape),
        shape_B=tuple(layer.smoa_B.weight.shape),
        num_blocks=layer.num_blocks,
        r=layer.r,
        block_ranks=tuple(layer.block_ranks),
        d_out=layer.out_features,
        d_in=layer.in_features,
        saved_with="SMoALinear.adapter_state_dict() and state_dict()",
    )
