"""FLOP floors of every ``smoa bench`` provider (KERNELS.md §1), per mode — the one table of these formulas.

Notation: N tokens, P = d_in·d_out, S = d_in + d_out, ρ the provider's adapter rank, K blocks, and
P_K = Σ_k |R_k|·|C_k| the area of SMoA's K diagonal blocks (= P/K when K divides d_in and d_out).
A floor counts the multiply-adds (2 FLOPs each) of the GEMMs that scale with N, for the work the mode must do;
:data:`FLOOR_TABLE` lists them (``smoa bench --help`` prints it) and :func:`forward_backward_flops` computes them.
``full`` = forward + backward (square D, r = ρ: frozen 4ND², LoRA 4ND² + 12NDr, reference/HiRA 10ND²,
SMoA (4 + 6/K)ND², SMoA with the opt-in merged-weight kernels (4 + 2/K)ND²); ``inference`` = forward, and a
merged adapter is a plain linear layer (2NP).
Not counted: D²-sized per-step weight work (building ΔW or B_k A_k: O(P·ρ), independent of N), O(N·S) gathers and
elementwise ops — so the floor is a lower bound that every implementation of the method must pay.
"""

from __future__ import annotations

from smoa_kernels.blocks import block_sizes

__all__ = ["FAMILIES", "FLOOR_TABLE", "MODES", "diagonal_block_area", "flop_floor", "forward_backward_flops"]

MODES = ("forward", "backward", "full", "inference")
FAMILIES = ("frozen", "lora", "hira", "reference", "smoa", "smoa-merged-weight")

# (family, forward, backward = dX + the trainable factors' grads, why)
FLOOR_TABLE = (
    ("frozen", "2NP", "2NP", "y = x W0ᵀ;  dX = dY W0 (no weight gradient)"),
    ("lora", "2NP + 2NρS", "2NP + 4NρS", "x Aᵀ, (xAᵀ) Bᵀ;  dB, d(xAᵀ), dA, dX_adapter (rank ρ)"),
    ("hira", "4NP", "6NP", "dense W0⊙(BA): a second full GEMM, full dΔW = dYᵀX"),
    ("reference", "4NP", "6NP", "dense ΔW like the authors' code (SPEC §2)"),
    ("smoa", "2NP + 2NP_K", "2NP + 4NP_K", "diagonal blocks only: x ΔW_kᵀ;  dX_adapter, G_k = dY_kᵀ X_k"),
    ("smoa-merged-weight", "2NP", "2NP + 2NP_K", "opt-in: one dot with W0 + sΔW per pass; G_k for the factors"),
)


def diagonal_block_area(d_in: int, d_out: int, num_blocks: int) -> int:
    """P_K = Σ_k |R_k|·|C_k| with the chunk sizes of ``torch.tensor_split`` (SPEC §1 step 4)."""
    return sum(rows * cols for rows, cols in zip(block_sizes(d_out, num_blocks), block_sizes(d_in, num_blocks)))


def forward_backward_flops(family: str, tokens: int, d_in: int, d_out: int, rank: int, num_blocks: int):
    """``(forward, backward)`` floor FLOPs of one layer call for ``family`` (see the module table)."""
    n, p, s = tokens, d_in * d_out, d_in + d_out
    if family == "frozen":
        return 2 * n * p, 2 * n * p
    if family == "lora":
        return 2 * n * p + 2 * n * rank * s, 2 * n * p + 4 * n * rank * s
    if family in ("hira", "reference"):
        return 4 * n * p, 6 * n * p
    if family == "smoa":
        p_k = diagonal_block_area(d_in, d_out, num_blocks)
        return 2 * n * p + 2 * n * p_k, 2 * n * p + 4 * n * p_k
    if family == "smoa-merged-weight":
        return 2 * n * p, 2 * n * p + 2 * n * diagonal_block_area(d_in, d_out, num_blocks)
    raise ValueError(f"family={family!r} is not one of {FAMILIES}")


def flop_floor(
    family: str, mode: str, tokens: int, d_in: int, d_out: int, rank: int, num_blocks: int, merged: bool = False
) -> int:
    """Floor FLOPs of ``mode`` (one of :data:`MODES`); ``merged=True`` (inference only) is a plain linear layer."""
    if mode not in MODES:
        raise ValueError(f"mode={mode!r} is not one of {MODES}")
    if merged:
        if mode != "inference":
            raise ValueError(f"merged=True only applies to mode='inference', got mode={mode!r}")
        family = "frozen"
    forward, backward = forward_backward_flops(family, tokens, d_in, d_out, rank, num_blocks)
    return {"forward": forward, "backward": backward, "full": forward + backward, "inference": forward}[mode]
