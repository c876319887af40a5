"""The spectral partition of SPEC §1: SVD of W0 → row/column scores → orders → ``tensor_split`` blocks.

Computed once, when an adapter is attached; afterwards the orders are state (buffers saved with the adapter) and are
never re-derived on load — a re-derived SVD can reorder near-ties and silently scramble a trained adapter.
"""

from __future__ import annotations

import torch

__all__ = ["ORDERINGS", "compute_orders", "spectral_orders", "spectral_scores", "validate_order"]

ORDERINGS = ("spectral", "identity", "random")


def _check_weight(weight: torch.Tensor) -> None:
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
        raise ValueError(
            f"weight must be a 2-D tensor, got {type(weight).__name__} of shape {getattr(weight, 'shape', None)}"
        )
    if not weight.is_floating_point():
        raise TypeError(f"weight must be floating point to compute a spectral partition, got dtype={weight.dtype}")
    if not bool(torch.isfinite(weight).all()):
        raise ValueError("weight contains NaN or Inf: the spectral partition needs a finite W0")


def _svd(weight: torch.Tensor, dtype: torch.dtype):
    w = weight.detach().to(dtype)
    try:
        return torch.linalg.svd(w, full_matrices=False)
    except (RuntimeError, NotImplementedError):  # e.g. MPS, or a device without a (converging) SVD: do it on the CPU
        U, S, Vh = torch.linalg.svd(w.cpu(), full_matrices=False)
        return U.to(weight.device), S.to(weight.device), Vh.to(weight.device)


def spectral_scores(weight: torch.Tensor, svd_dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    """Energy-weighted mean spectral index of every row and column of W0 (SPEC §1.2), in ``svd_dtype``.

    ``score_row[i] = Σ_j j·U[i,j]²σ_j² / max(Σ_j U[i,j]²σ_j², eps)``, and the same with V for columns; squares make the
    scores independent of SVD sign flips, and ``eps`` (the dtype's machine epsilon) makes an all-zero row score 0.
    """
    _check_weight(weight)
    if svd_dtype not in (torch.float32, torch.float64):
        raise ValueError(f"svd_dtype must be torch.float32 or torch.float64, got {svd_dtype}")
    U, S, Vh = _svd(weight, svd_dtype)
    index = torch.arange(S.numel(), dtype=svd_dtype, device=S.device)
    eps = torch.finfo(svd_dtype).eps
    energy_sq = S.square()

    def score(vectors: torch.Tensor) -> torch.Tensor:
        energy = vectors.square() * energy_sq
        return (energy @ index) / energy.sum(dim=1).clamp_min(eps)

    return score(U), score(Vh.T)


def spectral_orders(weight: torch.Tensor, svd_dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    """``(row_order, col_order)``: ascending stable argsort of the spectral scores (SPEC §1.3).

    Rows/columns that live in the top of the spectrum come first; ties keep index order (stable sort).
    """
    score_row, score_col = spectral_scores(weight, svd_dtype)
    return (
        torch.argsort(score_row, stable=True).to(device=weight.device, dtype=torch.long),
        torch.argsort(score_col, stable=True).to(device=weight.device, dtype=torch.long),
    )


def compute_orders(
    weight: torch.Tensor, ordering: str = "spectral", seed: int = 0, svd_dtype: torch.dtype = torch.float32
) -> tuple[torch.Tensor, torch.Tensor]:
    """Row and column orders for ``ordering`` ∈ ``ORDERINGS`` (SPEC §7): ``spectral`` (default), ``identity``
    (contiguous index blocks) or ``random`` (a permutation drawn from a generator seeded with ``seed``)."""
    if ordering == "spectral":
        return spectral_orders(weight, svd_dtype)
    d_out, d_in = weight.shape
    if ordering == "identity":
        return (torch.arange(d_out, device=weight.device), torch.arange(d_in, device=weight.device))
    if ordering == "random":
        generator = torch.Generator().manual_seed(int(seed))
        row = torch.randperm(d_out, generator=generator)
        col = torch.randperm(d_in, generator=generator)
        return row.to(weight.device), col.to(weight.device)
    raise ValueError(f"ordering={ordering!r} is not one of {ORDERINGS}")


def validate_order(name: str, order: torch.Tensor, size: int) -> None:
    """Raise ``ValueError`` unless ``order`` is an integer permutation of ``range(size)``."""
    if not isinstance(order, torch.Tensor) or order.dim() != 1 or order.numel() != size:
        shape = tuple(order.shape) if isinstance(order, torch.Tensor) else type(order).__name__
        raise ValueError(f"{name} must be a permutation of range({size}), got shape {shape}")
    if order.is_floating_point() or order.is_complex() or order.dtype == torch.bool:
        raise ValueError(f"{name} must be an integer tensor, got dtype={order.dtype}")
    if not torch.equal(torch.sort(order.detach().long().cpu()).values, torch.arange(size)):
        raise ValueError(f"{name} is not a permutation of range({size}) (repeated or out-of-range indices)")
