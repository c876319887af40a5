"""``SMoALinear``: the ``nn.Linear`` drop-in carrying an SMoA adapter (SPEC §2), its merge and its state.

The layer keeps ``weight``/``bias`` (the frozen W0 and b, shared with the wrapped ``nn.Linear``), the trainable
factors in the LoRA-shaped layout of SPEC §3 as leaf modules ``smoa_A`` (``weight``: r_k×d_in = Â) and ``smoa_B``
(``weight``: d_out×r_k = B̂) so FSDP/PEFT wrap them like LoRA's, and the spectral orders as persistent buffers.
The computation itself lives in :mod:`smoa_kernels` and is chosen by :mod:`smoa.backends`.
"""

from __future__ import annotations

import contextlib
import math
import numbers
import threading
import uuid
import warnings
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from smoa.backends import check_backend_name, smoa_linear
from smoa.partition import ORDERINGS, compute_orders, validate_order
from smoa_kernels.reference import blocks_to_lora, dense_delta_weight, lora_to_blocks

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

INIT_WEIGHTS = (True, False, "gaussian")


def resolve_block_ranks(r: int, num_blocks: int, block_ranks=None) -> tuple[int, ...]:
    """The rank r_k of every block: ``block_ranks`` if given (``num_blocks`` integers ≥ 0 summing to ``r``), else the
    authors' split of the total ``r``: ``r // num_blocks`` each, the first ``r % num_blocks`` blocks one more."""
    if block_ranks is None:
        return tuple(r // num_blocks + (k < r % num_blocks) for k in range(num_blocks))
    if isinstance(block_ranks, (str, bytes)) or not hasattr(block_ranks, "__len__"):
        raise TypeError(f"block_ranks must be a list of {num_blocks} ints, got {block_ranks!r}")
    ranks = tuple(block_ranks)
    if len(ranks) != num_blocks:
        raise ValueError(f"block_ranks={list(ranks)} has {len(ranks)} entries, expected num_blocks={num_blocks}")
    for rank in ranks:
        if isinstance(rank, bool) or not isinstance(rank, numbers.Integral) or rank < 0:
            raise ValueError(f"block_ranks={list(ranks)}: every entry must be an int >= 0")
    if sum(ranks) != r:
        raise ValueError(f"block_ranks={list(ranks)} sums to {sum(ranks)} but r={r}; set r={sum(ranks)}")
    return tuple(int(rank) for rank in ranks)


def padding_masks(block_ranks, row_order: torch.Tensor, col_order: torch.Tensor):
    """``(mask_A, mask_B)``: True at the zero padding of the LoRA-shaped factors (``Â``: r_max×d_in, ``B̂``:
    d_out×r_max) — rank slots ``j ≥ r_k`` of block k — or ``(None, None)`` when every block has the same rank."""
    if len(set(block_ranks)) <= 1:
        return None, None
    r_max, num_blocks = max(block_ranks), len(block_ranks)
    slots = torch.arange(r_max, device=row_order.device)
    mask_A = torch.zeros(r_max, col_order.numel(), dtype=torch.bool, device=row_order.device)
    mask_B = torch.zeros(row_order.numel(), r_max, dtype=torch.bool, device=row_order.device)
    for R_k, C_k, r_k in zip(torch.tensor_split(row_order, num_blocks), torch.tensor_split(col_order, num_blocks),
                             block_ranks):  # fmt: skip
        mask_A[:, C_k.long()] = (slots >= r_k)[:, None]
        mask_B[R_k.long(), :] = (slots >= r_k)[None, :]
    return mask_A, mask_B


def order_storage_dtype(size: int) -> torch.dtype:
    """The smallest signed integer dtype that holds the indices of an order over ``range(size)`` (saved files)."""
    for dtype in (torch.int8, torch.int16, torch.int32):
        if size - 1 <= torch.iinfo(dtype).max:
            return dtype
    return torch.int64


def init_block_factors(sizes, block_ranks, init_weights=True, device=None):
    """Per-block factors ``[(A_k, B_k)]`` (fp32) for block sizes ``[(|R_k|, |C_k|)]`` and ranks r_k (SPEC §2 init).

    ``True``: ``A_k`` kaiming-uniform(a=√5) over its fan-in |C_k|, ``B_k = 0`` (an exact no-op). ``"gaussian"``:
    ``A_k ~ N(0, 1/r_k)``, ``B_k = 0`` (LoRA's "gaussian"). ``False``: ``A_k`` as for ``True`` and ``B_k ~ N(0,
    3|C_k|/r_k)``, so that every entry of ``P_k = B_k A_k`` has unit variance and ``ΔW = P ⊙ W0`` is of W0's own
    magnitude on every layer — a LoRA-style random B gives a change of only ~1/(3√|C_k|) of W0, which is invisible
    on small-weight layers (for tests and debugging: two such adapters give visibly different outputs).
    """
    if init_weights not in INIT_WEIGHTS or not isinstance(init_weights, (bool, str)):
        raise ValueError(f"init_weights={init_weights!r} is not one of {INIT_WEIGHTS}")
    blocks = []
    for (rows, cols), rank in zip(sizes, block_ranks):
        A_k = torch.empty(rank, cols, device=device)
        B_k = torch.zeros(rows, rank, device=device)
        if A_k.numel() == 0:  # r_k = 0 (or an empty band): nothing to draw
            pass
        elif init_weights == "gaussian":
            nn.init.normal_(A_k, std=1 / math.sqrt(rank))
        else:
            nn.init.kaiming_uniform_(A_k, a=math.sqrt(5))
        if init_weights is False and rank > 0:
            nn.init.normal_(B_k, std=math.sqrt(3 * cols / rank))
        blocks.append((A_k, B_k))
    return blocks


def smoa_modulation(weight: torch.Tensor, adapters) -> torch.Tensor:
    """``1 + Σ_a s_a·P_a`` (SPEC §5, d_out×d_in, in at least fp32) with ``P_a = (B̂_a Â_a) ⊙ blockmask_a``, so that
    merging every adapter gives ``W0 ⊙ (1 + Σ s·P) = W0 + Σ s·ΔW``.

    ``adapters``: iterable of ``(scale, lora_A, lora_B, row_order, col_order, num_blocks)``.
    """
    adapters = list(adapters)
    dtype = torch.promote_types(adapters[0][1].dtype, torch.float32)
    ones = torch.ones(weight.shape, dtype=dtype, device=weight.device)
    modulation = ones.clone()
    for scale, lora_A, lora_B, row_order, col_order, num_blocks in adapters:
        P = dense_delta_weight(ones, lora_A.to(dtype), lora_B.to(dtype), row_order, col_order, num_blocks)
        modulation += scale * P
    return modulation


def modulated_merge(original: torch.Tensor, modulation: torch.Tensor):
    """``(W0 ⊙ modulation in W0's dtype, lost_index, lost_value)``.

    The multiplicative form makes the unmerge a division that keeps W0's relative precision; the entries a division
    cannot recover (zero, subnormal or non-finite after the merge, e.g. where the modulation is 0) are returned as
    flat indices and original values so that :func:`modulated_unmerge` restores them exactly.
    """
    merged = (original.to(modulation.dtype) * modulation).to(original.dtype)
    lost = (~torch.isfinite(merged) | (merged.abs() < torch.finfo(original.dtype).tiny)) & (original != 0)
    index = lost.flatten().nonzero().squeeze(1)
    return merged, index, original.flatten()[index].clone()


def modulated_unmerge(merged: torch.Tensor, modulation: torch.Tensor, lost_index, lost_value) -> torch.Tensor:
    """Inverse of :func:`modulated_merge`: W0 to rounding, exactly at the kept entries (a zero W0 stays zero)."""
    restored = torch.where(modulation == 0, torch.zeros_like(modulation), merged.to(modulation.dtype) / modulation)
    restored = restored.to(merged.dtype).flatten()
    if lost_index is not None:
        restored[lost_index] = lost_value
    return restored.view_as(merged)


def _same_bits(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Elementwise bit equality (so -0.0 ≠ 0.0 and a NaN equals only the same NaN)."""
    if a.element_size() == 1:
        return a.view(torch.uint8) == b.view(torch.uint8)
    bits = {2: torch.int16, 4: torch.int32, 8: torch.int64}[a.element_size()]
    return a.contiguous().view(bits) == b.contiguous().view(bits)


@dataclass
class MergeRecord:
    """What a merge wrote, so that the unmerge is bit-exact whatever happens to the factors while merged.

    ``adapters``: ``(scale, lora_A, lora_B, row_order, col_order, num_blocks)`` per merged adapter, *copies* taken at
    the merge (an optimizer step or a ``load_state_dict`` while merged cannot change what the unmerge divides by);
    ``lost_index``/``lost_value``: the flat indices and original values of every W0 entry that the division would not
    give back bit for bit (zeros, NaN/Inf factors, roundings), checked at the merge.
    """

    adapters: list[tuple]
    lost_index: torch.Tensor
    lost_value: torch.Tensor


def exact_merge(original: torch.Tensor, adapters, safe_merge: bool = False, what: str = "adapter"):
    """``(W0 ⊙ (1 + Σ s·P), MergeRecord)`` for ``adapters`` (see :func:`smoa_modulation`), such that
    :func:`exact_unmerge` returns ``original`` bit for bit. ``safe_merge=True`` raises ``ValueError`` (and nothing is
    written by the caller) when the merged weight would hold NaN/Inf."""
    adapters = [
        (float(scale), A.detach().clone(), B.detach().clone(), rows.detach().clone(), cols.detach().clone(), int(k))
        for scale, A, B, rows, cols, k in adapters
    ]
    modulation = smoa_modulation(original, adapters)
    merged = (original.to(modulation.dtype) * modulation).to(original.dtype)
    if safe_merge and not bool(torch.isfinite(merged).all()):
        bad = int((~torch.isfinite(merged)).sum())
        factors = [f"{int((~torch.isfinite(t)).sum())} in {name}" for _, A, B, *_ in adapters
                   for name, t in (("A", A), ("B", B)) if not bool(torch.isfinite(t).all())]  # fmt: skip
        cause = (
            f"non-finite factor entries: {', '.join(factors)}" if factors else "finite factors whose product overflows"
        )
        raise ValueError(
            f"NaNs detected in the merged weights (safe_merge=True): merging {what} would put NaN/Inf into {bad} of "
            f"{merged.numel()} entries of the base weight (expected 0; cause: {cause}); nothing was merged — fix or "
            "reload the factors, or keep the adapter unmerged"
        )
    restored = modulated_unmerge(merged, modulation, None, None)
    index = (~_same_bits(restored, original)).flatten().nonzero().squeeze(1)
    return merged, MergeRecord(adapters, index, original.flatten()[index].clone())


def exact_unmerge(merged: torch.Tensor, record: MergeRecord) -> torch.Tensor:
    """Inverse of :func:`exact_merge`: the original W0, bit for bit (on the device the merge ran on; moved with the
    weight otherwise)."""
    device = merged.device
    adapters = [(s, A.to(device), B.to(device), rows.to(device), cols.to(device), k) for s, A, B, rows, cols, k in
                record.adapters]  # fmt: skip
    lost_index, lost_value = record.lost_index.to(device), record.lost_value.to(device)
    return modulated_unmerge(merged, smoa_modulation(merged, adapters), lost_index, lost_value)


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


def check_loaded_tensor(key: str, value, expected_shape=None) -> None:
    """Raise ``ValueError`` naming ``key`` for a non-tensor, a shape mismatch, a non-float or a NaN/Inf value."""
    if not isinstance(value, torch.Tensor):
        raise ValueError(f"{key} must be a tensor, got {type(value).__name__}; save tensors (state_dict() values)")
    if expected_shape is not None and tuple(value.shape) != tuple(expected_shape):
        raise ValueError(
            f"{key} has shape {tuple(value.shape)}, expected {tuple(expected_shape)}: the checkpoint was made for "
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


def check_smoa_arguments(
    in_features: int,
    out_features: int,
    r: int,
    num_blocks: int,
    alpha: float | None,
    dropout: float,
    ordering: str,
    block_ranks=None,
) -> None:
    """Raise ``ValueError``/``TypeError`` naming the argument for every SMoA hyper-parameter that cannot work."""
    for name, value in (("r", r), ("num_blocks", num_blocks)):
        if isinstance(value, bool) or not isinstance(value, numbers.Integral):
            raise TypeError(f"{name} must be an int, got {value!r}")
        if value < 1:
            raise ValueError(f"{name}={value} must be >= 1")
    if num_blocks > min(in_features, out_features):
        raise ValueError(
            f"num_blocks={num_blocks} exceeds min(in_features, out_features)={min(in_features, out_features)}"
        )
    resolve_block_ranks(r, num_blocks, block_ranks)
    if alpha is not None and (
        isinstance(alpha, bool) or not isinstance(alpha, numbers.Real) or not math.isfinite(alpha) or alpha == 0
    ):
        raise ValueError(f"alpha={alpha!r} must be a finite non-zero number (or None for alpha = r)")
    if isinstance(dropout, bool) or not isinstance(dropout, numbers.Real) or not 0.0 <= dropout < 1.0:
        raise ValueError(f"dropout={dropout!r} must be in [0, 1)")
    if ordering not in ORDERINGS:
        raise ValueError(f"ordering={ordering!r} is not one of {ORDERINGS}")


_ADAPTER_KEYS = ("row_order", "col_order", "partition_info", "smoa_A.weight", "smoa_B.weight")


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


# ---- the adapter term that is zero by construction: the output is then the base layer's, bit for bit -------------
# With a non-finite input (an fp16 overflow, an inf in a batch) the adapter term s·x ΔWᵀ is 0·inf = NaN wherever the
# arithmetic runs, even when ΔW is zero by construction; nn.Linear gives inf there. So where the term is known to be
# exactly zero — B = 0 (the init, tracked by the factor's version counter: no host sync) or an r_k = 0 block (its
# output rows R_k) — the layer returns the base layer's output there, and a non-finite input elsewhere propagates as
# it does through nn.Linear (and LoRA). The gradient is the adapter's (the factors train from B = 0 as before).
class _ValueWithGradientOf(torch.autograd.Function):
    """``value`` in the forward, the gradient of ``gradient_of`` in the backward (equal in exact arithmetic)."""

    @staticmethod
    def forward(ctx, value: torch.Tensor, gradient_of: torch.Tensor) -> torch.Tensor:
        return value.clone()

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return None, grad


def value_with_gradient_of(value: torch.Tensor, gradient_of: torch.Tensor) -> torch.Tensor:
    """``value`` (e.g. the base output, when the adapter term is zero by construction) carrying the gradient of
    ``gradient_of`` (the full adapter forward, which the factors need to train); ``gradient_of`` when they differ
    in shape or dtype."""
    if value.shape != gradient_of.shape or value.dtype != gradient_of.dtype:
        return gradient_of
    return _ValueWithGradientOf.apply(value.detach(), gradient_of)


def zero_rank_rows(block_ranks, row_order: torch.Tensor) -> torch.Tensor | None:
    """Bool (d_out,): True at the output rows R_k of the blocks with r_k = 0 (their adapter term is zero by
    construction), or ``None`` when every block has a rank."""
    if 0 not in block_ranks:
        return None
    mask = torch.zeros(row_order.numel(), dtype=torch.bool, device=row_order.device)
    for R_k, r_k in zip(torch.tensor_split(row_order, len(block_ranks)), block_ranks):
        if r_k == 0:
            mask[R_k.long()] = True
    return mask


def version_stamp(tensor: torch.Tensor) -> tuple:
    """What identifies ``tensor``'s current values without reading them: the object, its version, its storage."""
    return (tensor, tensor._version, tensor.data_ptr())


def known_zero(stamp, tensor: torch.Tensor) -> bool:
    """Whether ``tensor`` (a factor B) is still the zero tensor recorded in ``stamp`` (:func:`version_stamp`).

    The stamp (no device work) rules out every write through autograd-visible ops, a load and a ``.data`` swap; a
    write through ``tensor.data`` bypasses the version counter, so a holding stamp is confirmed by reading B (one
    small host sync, only while B is believed zero: once B has been written, the stamp no longer holds and nothing is
    read). Never under ``torch.compile`` or CUDA-graph capture."""
    if stamp is None or tensor.is_meta or torch.compiler.is_compiling():
        return False  # a meta tensor (low_cpu_mem_usage loads) has no values: unknown, never "zero"
    if not (stamp[0] is tensor and stamp[1] == tensor._version and stamp[2] == tensor.data_ptr()):
        return False
    if tensor.is_cuda and torch.cuda.is_current_stream_capturing():
        return False
    return not bool(tensor.detach().any())


def base_output_applies(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether ``F.linear(x, W0, b)`` is the base layer's own output for ``x`` (same dtype, or autocast)."""
    return x.dtype == weight.dtype or torch.is_autocast_enabled(x.device.type)


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
        """Raise naming the key for anything in ``state_dict`` (under ``prefix``) that this layer cannot load
        exactly; integer orders of any dtype are replaced by int64 copies. Nothing is written to the layer."""
        keys = {name: prefix + name for name in (*_ADAPTER_KEYS, "weight", "bias")}
        present = {name for name, key in keys.items() if key in state_dict}
        if not present:
            return
        if self.merged:
            raise RuntimeError(
                f"{prefix or 'this '}SMoALinear is merged: call unmerge() before load_state_dict (loading "
                f"{sorted(keys[name] for name in present)[:3]} into a merged weight could not be undone)"
            )
        orders = {"row_order", "col_order"} & present
        factors = {"smoa_A.weight", "smoa_B.weight"} & present
        if len(orders) == 1:
            (given,) = orders
            missing = ({"row_order", "col_order"} - orders).pop()
            raise ValueError(f"{keys[given]} is loaded without {keys[missing]}: the orders are loaded together")
        for name, size in (("row_order", self.out_features), ("col_order", self.in_features)):
            if name in present:
                state_dict[keys[name]] = _check_order_value(keys[name], state_dict[keys[name]], size, "cpu")
        if orders and not factors:
            raise ValueError(
                f"{keys['row_order']}/{keys['col_order']} are loaded without {keys['smoa_A.weight']}/"
                f"{keys['smoa_B.weight']}: new orders would re-partition the current factors; load them together"
            )
        if factors and not orders and not missing_orders_allowed():
            raise ValueError(
                f"{sorted(keys[name] for name in factors)} loaded without {keys['row_order']}/{keys['col_order']}: the "
                "factors only make sense with the orders they were trained with. Load SMoALinear.adapter_state_dict() "
                "(which carries them), or opt in with `with smoa.layer.allow_missing_orders():` to recompute them "
                "from W0"
            )
        for name, param in (("smoa_A.weight", self.smoa_A.weight), ("smoa_B.weight", self.smoa_B.weight),
                            ("weight", self.weight), ("bias", self.bias)):  # fmt: skip
            if name in present and param is not None:
                value = state_dict[keys[name]]
                if isinstance(value, torch.Tensor) and tuple(value.shape) != tuple(param.shape):
                    raise ValueError(
                        f"{keys[name]} has shape {tuple(value.shape)}, expected {tuple(param.shape)} "
                        f"(r={self.r}, num_blocks={self.num_blocks}, in_features={self.in_features}, "
                        f"out_features={self.out_features})"
                    )
                check_loaded_tensor(keys[name], value)
        if orders:  # uneven block ranks: the zero padding of the loaded factors must be zero
            check_zero_padding(state_dict, prefix, self.block_ranks, "smoa_A.weight", "smoa_B.weight",
                               state_dict[keys["row_order"]], state_dict[keys["col_order"]])  # fmt: skip
        if "partition_info" in present:
            check_partition_info(keys["partition_info"], state_dict[keys["partition_info"]], self.num_blocks, self.r,
                                 self.out_features, self.in_features)  # fmt: skip

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
