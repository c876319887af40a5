"""Exact merges: ``W0 ← W0 ⊙ (1 + Σ s·P)`` and back, bit for bit (SPEC §5).

The merge is multiplicative, so the unmerge is a division that keeps W0's relative precision; a :class:`MergeRecord`
keeps copies of the merged factors and every W0 entry the division would not give back, so the unmerge restores W0
bit for bit whatever happens to the factors meanwhile. ``safe_merge`` checks the merged weight before anything is
written. Used by :class:`smoa.layer.SMoALinear`, the PEFT layer and its 4-bit variant.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from smoa_kernels.reference import dense_delta_weight

__all__ = ["MergeRecord", "exact_merge", "exact_unmerge", "modulated_merge", "modulated_unmerge", "smoa_modulation"]


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
