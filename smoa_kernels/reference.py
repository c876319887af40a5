"""The SMoA oracle: SPEC §2 written out literally, with a dense d_out×d_in ΔW.

Every other path (the blockwise PyTorch path, the Triton kernels) is tested against this file, and the benchmarks use
it as the "official formulation" baseline (it has the authors' code's cost: a dense ΔW per forward and a full
``dΔW = dYᵀX`` through autograd). Keep it obviously correct, not fast.

Factors are passed in the LoRA-shaped layout of SPEC §3 (``lora_A``: r_k×d_in, ``lora_B``: d_out×r_k, original
coordinates); :func:`lora_to_blocks` slices them into the official per-block factors ``A_k = Â[:, C_k]``,
``B_k = B̂[R_k, :]`` and the update is then assembled exactly as SPEC §2 states it, block by block.

Precision contract (shared by every backend): the base term ``x W0ᵀ + b`` is computed in the input's dtype; the
adapter term is computed in the factors' dtype (``x`` and the W0 anchor are cast to it, as PEFT does for LoRA) and
cast to the input's dtype before it is added.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["blocks_to_lora", "dense_delta_weight", "lora_to_blocks", "smoa_linear_reference"]


def lora_to_blocks(
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    row_order: torch.Tensor,
    col_order: torch.Tensor,
    num_blocks: int,
    block_ranks: list[int] | tuple[int, ...] | None = None,
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """``[(A_k, B_k)]`` with ``A_k = Â[:r_k, C_k]`` (r_k×|C_k|) and ``B_k = B̂[R_k, :r_k]`` (|R_k|×r_k).

    ``block_ranks=None``: every block uses all of Â's rows (equal ranks). Uneven ranks are stored zero-padded to the
    largest one: block k uses its first r_k rank slots and the rest are exactly zero.
    """
    row_blocks = torch.tensor_split(row_order, num_blocks)
    col_blocks = torch.tensor_split(col_order, num_blocks)
    ranks = [lora_A.shape[0]] * num_blocks if block_ranks is None else list(block_ranks)
    return [(lora_A[:r_k, C_k], lora_B[R_k, :r_k]) for R_k, C_k, r_k in zip(row_blocks, col_blocks, ranks)]


def blocks_to_lora(
    blocks: list[tuple[torch.Tensor, torch.Tensor]], row_order: torch.Tensor, col_order: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Inverse of :func:`lora_to_blocks`: scatter per-block factors into ``(Â, B̂)`` (SPEC §3); blocks of uneven rank
    are zero-padded to the largest rank r_max (``Â``: r_max×d_in, ``B̂``: d_out×r_max)."""
    num_blocks = len(blocks)
    row_blocks = torch.tensor_split(row_order, num_blocks)
    col_blocks = torch.tensor_split(col_order, num_blocks)
    rank = max(A_k.shape[0] for A_k, _ in blocks)
    ref = blocks[0][0]
    lora_A = torch.zeros(rank, col_order.numel(), dtype=ref.dtype, device=ref.device)
    lora_B = torch.zeros(row_order.numel(), rank, dtype=ref.dtype, device=ref.device)
    for (A_k, B_k), R_k, C_k in zip(blocks, row_blocks, col_blocks):
        lora_A[: A_k.shape[0], C_k] = A_k
        lora_B[R_k, : B_k.shape[1]] = B_k
    return lora_A, lora_B


def dense_delta_weight(
    anchor: torch.Tensor,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    row_order: torch.Tensor,
    col_order: torch.Tensor,
    num_blocks: int,
) -> torch.Tensor:
    """ΔW (d_out×d_in, original coordinates, unscaled): ``ΔW[R_k, C_k] = (B_k A_k) ⊙ anchor[R_k, C_k]``, 0 elsewhere.

    ``anchor`` is W0 for SMoA; passing ones gives the unmodulated block-diagonal product ``P`` of SPEC §5.
    Computed in the factors' dtype.
    """
    anchor = anchor.to(lora_A.dtype)
    delta = torch.zeros(anchor.shape, dtype=lora_A.dtype, device=lora_A.device)
    row_blocks = torch.tensor_split(row_order, num_blocks)
    col_blocks = torch.tensor_split(col_order, num_blocks)
    for (A_k, B_k), R_k, C_k in zip(
        lora_to_blocks(lora_A, lora_B, row_order, col_order, num_blocks), row_blocks, col_blocks
    ):
        rows, cols = R_k[:, None], C_k[None, :]
        delta[rows, cols] = (B_k @ A_k) * anchor[rows, cols]
    return delta


def smoa_linear_reference(
    x: torch.Tensor,
    x_adapter: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    row_order: torch.Tensor,
    col_order: torch.Tensor,
    num_blocks: int,
    scale: float,
) -> torch.Tensor:
    """``y = x W0ᵀ + b + s · x_adapter ΔWᵀ`` (SPEC §2); ``x_adapter`` is ``dropout(x)`` (or ``x`` itself)."""
    delta = dense_delta_weight(weight, lora_A, lora_B, row_order, col_order, num_blocks)
    base = F.linear(x, weight, bias)
    adapter = F.linear(x_adapter.to(delta.dtype), delta) * scale
    return base + adapter.to(base.dtype)
