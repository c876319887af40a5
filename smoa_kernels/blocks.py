"""Block layout of an SMoA adapter (SPEC §1.4 and §3): which rows/columns form block k.

``row_order``/``col_order`` are permutations of ``range(d_out)``/``range(d_in)``; block k owns the k-th chunk of
``torch.tensor_split(order, K)`` (the first ``n mod K`` chunks hold one element more). Everything here is O(d) and
derived from the two orders, so nothing but the orders needs to be stored.
"""

from __future__ import annotations

import torch

__all__ = ["block_bounds", "block_ids", "block_sizes", "padded_band_sources", "padded_band_starts"]


def block_sizes(n: int, num_blocks: int) -> list[int]:
    """Sizes of ``torch.tensor_split(range(n), num_blocks)``: the first ``n % K`` chunks hold one more."""
    base, extra = divmod(n, num_blocks)
    return [base + (1 if k < extra else 0) for k in range(num_blocks)]


def block_bounds(n: int, num_blocks: int) -> list[tuple[int, int]]:
    """``[(start, stop)]`` of each block's chunk in the sorted order (permuted coordinates)."""
    bounds, start = [], 0
    for size in block_sizes(n, num_blocks):
        bounds.append((start, start + size))
        start += size
    return bounds


def block_ids(order: torch.Tensor, num_blocks: int, dtype: torch.dtype = torch.int32) -> torch.Tensor:
    """``blk[i] = k`` for every original coordinate ``i`` in block k (SPEC §3's ``blk_row``/``blk_col``).

    Static shapes only (no ``repeat_interleave`` by a data-dependent count), so ``torch.compile`` traces it.
    """
    n = order.numel()
    base, extra = divmod(n, num_blocks)
    position = torch.arange(n, device=order.device)
    long_span = extra * (base + 1)  # the first `extra` blocks hold base + 1 elements
    per_position = torch.where(
        position < long_span, position // (base + 1), extra + (position - long_span) // max(base, 1)
    ).to(dtype)
    return torch.empty_like(per_position).scatter_(0, order, per_position)


def padded_band_starts(n: int, num_blocks: int, align: int) -> list[int]:
    """Start of each block's band in a layout where every band is padded to a multiple of ``align`` elements (the
    blocked Triton path's gathered activations: every band then starts 16-element aligned). Length K + 1: the last
    entry is the padded width."""
    starts = [0]
    for size in block_sizes(n, num_blocks):
        starts.append(starts[-1] + -(-size // align) * align)
    return starts


def padded_band_sources(n: int, num_blocks: int, align: int) -> list[int]:
    """For each position of the padded band layout, the position in the sorted order it copies: band k's elements in
    order, then its padding repeating the band's last element (any valid index: padding is never read as data)."""
    sources = []
    padded = padded_band_starts(n, num_blocks, align)
    for k, (start, stop) in enumerate(block_bounds(n, num_blocks)):
        sources.extend(range(start, stop))
        sources.extend([stop - 1] * (padded[k + 1] - padded[k] - (stop - start)))
    return sources
