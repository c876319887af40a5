"""The spectral partition of SPEC §1: W0 → row/column scores → orders → ``tensor_split`` blocks.

Computed once, when an adapter is attached; afterwards the orders are state (buffers saved with the adapter) and are
never re-derived on load — a re-derived SVD can reorder near-ties and silently scramble a trained adapter.

The scores need only the row energies ``U²σ²`` and the column energies ``V²σ²``, not a full SVD. The default route
(``method="gram"``) takes them from a symmetric eigendecomposition of the smaller Gram matrix (``W0 W0ᵀ = U σ² Uᵀ`` when
d_out ≤ d_in, else ``W0ᵀ W0 = V σ² Vᵀ``) and the other side from one GEMM (``W0ᵀ U = V σ``, or ``W0 V = U σ``), in
float64: a Gram matrix squares the condition number, and in fp32 its small eigenpairs lose the precision that the
scores' large spectral indices weigh. In float64 its orders equal the float64 SVD route's (``method="svd"``) on generic
weights (tested) and on all 210 linear layers of SmolLM2-135M (0 of 305,280 positions differ, where the float32 SVD
differs at 308 and an fp32 Gram at 264). All-linear SmolLM2-135M attaches in 7.2 s on 2 CPU cores against 11.7 s for the
fp32 SVD route and 37 s for the previous release (benchmarks/attach_time.py, README "Attach time"). On exact or near
ties of the scores (equal within rounding, e.g. repeated singular values, whose singular vectors are not unique) the two
routes may order the tied indices differently: neither side is more right; a stable sort keeps index order among scores
that come out exactly equal, and the saved orders make the result of attach time final.
"""

from __future__ import annotations

import contextlib
import sys
import time

import torch

__all__ = [
    "ORDERINGS",
    "SCORE_METHODS",
    "compute_orders",
    "partition_progress",
    "spectral_orders",
    "spectral_scores",
    "validate_order",
]

ORDERINGS = ("spectral", "identity", "random")
SCORE_METHODS = ("gram", "svd")


def _check_weight(weight: torch.Tensor) -> None:
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
        raise ValueError(
            f"weight must be a 2-D tensor, got {type(weight).__name__} of shape {getattr(weight, 'shape', None)}"
        )
    if not weight.is_floating_point():
        raise TypeError(f"weight must be floating point to compute a spectral partition, got dtype={weight.dtype}")
    if not bool(torch.isfinite(weight).all()):
        raise ValueError("weight contains NaN or Inf: the spectral partition needs a finite W0")


def _on_cpu_if_unsupported(fn, *tensors: torch.Tensor):
    """``fn(*tensors)`` on their device; on the CPU where the device has no (converging) kernel, e.g. MPS."""
    try:
        return fn(*tensors)
    except (RuntimeError, NotImplementedError, TypeError):
        device = tensors[0].device
        if device.type == "cpu":
            raise
        return tuple(t.to(device) for t in fn(*(t.cpu() for t in tensors)))


def _energies_svd(weight: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    w = weight.detach().to(dtype)
    with _one_thread_for_small_cpu_problems(w):
        U, S, Vh = _on_cpu_if_unsupported(lambda a: torch.linalg.svd(a, full_matrices=False), w)
    energy_sq = S.square()
    return U.square() * energy_sq, Vh.T.square() * energy_sq


@contextlib.contextmanager
def _one_thread_for_small_cpu_problems(matrix: torch.Tensor, limit: int = 1024):
    """Run a CPU eigendecomposition/SVD of order ≤ ``limit`` on one thread (GEMMs keep torch's threads).
    Multi-threaded LAPACK gains little at these sizes and collapses when the cores are shared: on the 2-core machine
    of benchmarks/attach_time.py at load 9, a float64 ``eigh`` of order 576 took 0.93 s with 2 threads and 0.053 s
    with 1, and all-linear SmolLM2-135M with the former fp32 SVD route took 484 s with 2 threads, 41 s with 1."""
    threads = torch.get_num_threads()
    if matrix.device.type != "cpu" or min(matrix.shape) > limit or threads == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _energies_gram(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(U²σ², V²σ²)`` (d_out×q, d_in×q, σ descending) from the eigendecomposition of the smaller Gram matrix."""
    try:
        w = weight.detach().to(torch.float64)
    except (RuntimeError, TypeError):  # a device without float64 (MPS): the CPU computes it
        w = weight.detach().cpu().to(torch.float64)
    wide = w.shape[0] <= w.shape[1]
    small = w if wide else w.T  # q×n with q = min(d_out, d_in)
    gram = small @ small.T
    with _one_thread_for_small_cpu_problems(gram):
        eigenvalues, vectors = _on_cpu_if_unsupported(torch.linalg.eigh, gram)
    eigenvalues, vectors = eigenvalues.flip(-1).clamp_min(0), vectors.flip(-1)  # descending: j = 0 is the largest σ
    energy_small = vectors.square() * eigenvalues  # U²σ² of the small side
    energy_other = (small.T @ vectors).square()  # (W0ᵀU)² = V²σ² (or (W0 V)² = U²σ²)
    return (energy_small, energy_other) if wide else (energy_other, energy_small)


def spectral_scores(
    weight: torch.Tensor, svd_dtype: torch.dtype = torch.float32, *, method: str = "gram"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Energy-weighted mean spectral index of every row and column of W0 (SPEC §1.2).

    ``score_row[i] = Σ_j j·U[i,j]²σ_j² / max(Σ_j U[i,j]²σ_j², eps)``, and the same with V for columns; squares make the
    scores independent of sign flips, and ``eps`` (the dtype's machine epsilon) makes an all-zero row score 0.
    ``method="gram"`` (default): from the smaller Gram matrix, in float64 (see the module docstring);
    ``method="svd"``: from an economy SVD in ``svd_dtype`` (float32 or float64), the literal SPEC §1.1 route.
    """
    _check_weight(weight)
    if svd_dtype not in (torch.float32, torch.float64):
        raise ValueError(f"svd_dtype must be torch.float32 or torch.float64, got {svd_dtype}")
    if method not in SCORE_METHODS:
        raise ValueError(f"method={method!r} is not one of {SCORE_METHODS}")
    _progress.tick()
    energy_row, energy_col = _energies_gram(weight) if method == "gram" else _energies_svd(weight, svd_dtype)
    index = torch.arange(energy_row.shape[1], dtype=energy_row.dtype, device=energy_row.device)
    eps = torch.finfo(energy_row.dtype).eps

    def score(energy: torch.Tensor) -> torch.Tensor:
        return (energy @ index) / energy.sum(dim=1).clamp_min(eps)

    return score(energy_row), score(energy_col)


def spectral_orders(
    weight: torch.Tensor, svd_dtype: torch.dtype = torch.float32, *, method: str = "gram"
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(row_order, col_order)``: ascending stable argsort of the spectral scores (SPEC §1.3), on W0's device.

    Rows/columns that live in the top of the spectrum come first; ties keep index order (stable sort).
    """
    score_row, score_col = spectral_scores(weight, svd_dtype, method=method)
    return (
        torch.argsort(score_row, stable=True).to(device=weight.device, dtype=torch.long),
        torch.argsort(score_col, stable=True).to(device=weight.device, dtype=torch.long),
    )


# ---- a progress line over layers while a model is attached ------------------------------------------------------
class _Progress:
    """Counts spectral decompositions inside :func:`partition_progress`; shows a bar once a second has passed."""

    def __init__(self) -> None:
        self.total: int | None = None
        self.done = 0
        self.started = 0.0
        self.bar = None
        self.active = False

    def tick(self) -> None:
        if not self.active:
            return
        if self.bar is None and time.perf_counter() - self.started > 1.0:
            self.bar = _make_bar(self.total, self.done)
        self.done += 1
        if self.bar is not None:
            self.bar.update(1)


class _LineBar:
    """A one-line progress report on stderr when tqdm is not installed."""

    def __init__(self, total: int | None, done: int) -> None:
        self.total, self.done = total, done

    def update(self, n: int) -> None:
        self.done += n
        of = f"/{self.total}" if self.total else ""
        print(f"\rsmoa: spectral partition {self.done}{of} layers", end="", file=sys.stderr, flush=True)

    def close(self) -> None:
        print(file=sys.stderr)


def _make_bar(total: int | None, done: int):
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return _LineBar(total, done)
    return tqdm(total=total, initial=done, desc="smoa: spectral partition", unit="layer", file=sys.stderr)


_progress = _Progress()


@contextlib.contextmanager
def partition_progress(total: int | None = None):
    """Within the block, show a progress bar over the layers whose spectral partition is computed, once it has taken
    more than a second (tqdm when installed, else a line on stderr). ``total``: the expected number of layers."""
    if _progress.active:  # nested (e.g. get_peft_model inside apply_smoa's caller): the outer bar counts
        yield
        return
    _progress.__init__()
    _progress.total, _progress.started, _progress.active = total, time.perf_counter(), True
    try:
        yield
    finally:
        if _progress.bar is not None:
            _progress.bar.close()
        _progress.__init__()


def compute_orders(
    weight: torch.Tensor,
    ordering: str = "spectral",
    seed: int = 0,
    svd_dtype: torch.dtype = torch.float32,
    *,
    method: str = "gram",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Row and column orders for ``ordering`` ∈ ``ORDERINGS`` (SPEC §7): ``spectral`` (default; ``method`` and
    ``svd_dtype`` as for :func:`spectral_scores`), ``identity`` (contiguous index blocks) or ``random`` (a permutation
    drawn from a generator seeded with ``seed``)."""
    if ordering == "spectral":
        return spectral_orders(weight, svd_dtype, method=method)
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
