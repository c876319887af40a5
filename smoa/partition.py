"""The spectral partition of SPEC §1: W0 → row/column scores → orders → ``tensor_split`` blocks.

Computed once, when an adapter is attached; afterwards the orders are state (buffers saved with the adapter) and are
never re-derived on load — a re-derived SVD can reorder near-ties and silently scramble a trained adapter.

The scores need only the row energies ``U²σ²`` and the column energies ``V²σ²``, not a full SVD. The default route
(``method="gram"``) takes them from a symmetric eigendecomposition of the smaller Gram matrix (``W0 W0ᵀ = U σ² Uᵀ`` when
d_out ≤ d_in, else ``W0ᵀ W0 = V σ² Vᵀ``) and the other side from one GEMM (``W0ᵀ U = V σ``, or ``W0 V = U σ``), in
float64: a Gram matrix squares the condition number, and in fp32 its small eigenpairs lose the precision that the
scores' large spectral indices weigh. In float64 its orders equal the float64 SVD route's (``method="svd"``) on generic
weights (tested) and on all 210 linear layers of SmolLM2-135M (0 of 305,280 positions differ, where the float32 SVD
differs at 308 and an fp32 Gram at 264). During an attach (``SMoAModel.inject_adapter``) the orders of all targeted
layers come from :func:`precomputed_orders`: worker threads (one per torch thread) form the Gram matrices and
decompose them ahead, in float64 on one thread each (as the serial route's ``eigh`` already ran), while PEFT creates
the layers, and the scores' matrix-vector products run on the calling thread as before, so the orders, and every
saved tensor of the attached adapter, are bit-identical to the serial route's (tested; and on all 210 layers of
SmolLM2-135M). All-linear SmolLM2-135M attaches on 2 CPU cores shared at load 3–4 in 15.0 s against 29.4 s for the
serial route (medians of 3 interleaved runs; 7.2 s at load 1.3, the serial route 7.2 s idle; benchmarks/attach_time.py,
docs/guide.md, "Attach time"). On exact or near
ties of the scores (equal within rounding, e.g. repeated singular values, whose singular vectors are not unique) the two
routes may order the tied indices differently: neither side is more right; a stable sort keeps index order among scores
that come out exactly equal, and the saved orders make the result of attach time final.
"""

from __future__ import annotations

import collections
import contextlib
import os
import sys
import time

import torch

__all__ = [
    "ORDERINGS",
    "SCORE_METHODS",
    "compute_orders",
    "partition_progress",
    "precomputed_orders",
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


_ONE_THREAD_LIMIT = 1024


@contextlib.contextmanager
def _one_thread_for_small_cpu_problems(matrix: torch.Tensor, limit: int = _ONE_THREAD_LIMIT):
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


def _check_arguments(weight: torch.Tensor, svd_dtype: torch.dtype, method: str) -> None:
    _check_weight(weight)
    if svd_dtype not in (torch.float32, torch.float64):
        raise ValueError(f"svd_dtype must be torch.float32 or torch.float64, got {svd_dtype}")
    if method not in SCORE_METHODS:
        raise ValueError(f"method={method!r} is not one of {SCORE_METHODS}")


def _scores_from_energies(energy_row: torch.Tensor, energy_col: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    index = torch.arange(energy_row.shape[1], dtype=energy_row.dtype, device=energy_row.device)
    eps = torch.finfo(energy_row.dtype).eps

    def score(energy: torch.Tensor) -> torch.Tensor:
        return (energy @ index) / energy.sum(dim=1).clamp_min(eps)

    return score(energy_row), score(energy_col)


def _orders_from_scores(weight: torch.Tensor, score_row: torch.Tensor, score_col: torch.Tensor):
    return (
        torch.argsort(score_row, stable=True).to(device=weight.device, dtype=torch.long),
        torch.argsort(score_col, stable=True).to(device=weight.device, dtype=torch.long),
    )


def spectral_scores(
    weight: torch.Tensor, svd_dtype: torch.dtype = torch.float32, *, method: str = "gram"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Energy-weighted mean spectral index of every row and column of W0 (SPEC §1.2).

    ``score_row[i] = Σ_j j·U[i,j]²σ_j² / max(Σ_j U[i,j]²σ_j², eps)``, and the same with V for columns; squares make the
    scores independent of sign flips, and ``eps`` (the dtype's machine epsilon) makes an all-zero row score 0.
    ``method="gram"`` (default): from the smaller Gram matrix, in float64 (see the module docstring);
    ``method="svd"``: from an economy SVD in ``svd_dtype`` (float32 or float64), the literal SPEC §1.1 route.
    """
    _check_arguments(weight, svd_dtype, method)
    _progress.tick()
    energy_row, energy_col = _energies_gram(weight) if method == "gram" else _energies_svd(weight, svd_dtype)
    return _scores_from_energies(energy_row, energy_col)


def spectral_orders(
    weight: torch.Tensor, svd_dtype: torch.dtype = torch.float32, *, method: str = "gram"
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(row_order, col_order)``: ascending stable argsort of the spectral scores (SPEC §1.3), on W0's device.

    Rows/columns that live in the top of the spectrum come first; ties keep index order (stable sort). Inside
    :func:`precomputed_orders`, a weight computed there up front (and not modified since) returns those orders.
    """
    entry = _precomputed.pop(_cache_key(weight, svd_dtype, method), None) if _precomputed else None
    if entry is not None and entry[0] is _base_of(weight):
        orders = entry[2].take(entry, weight)
        if orders is not None:
            return orders
    score_row, score_col = spectral_scores(weight, svd_dtype, method=method)
    return _orders_from_scores(weight, score_row, score_col)


# ---- the orders of many layers at once, concurrently on the CPU (one attach) -------------------------------------
_precomputed: dict[tuple, list] = {}  # key → [W0's base tensor, its future (None: not submitted yet), its _Batch]


def _base_of(weight: torch.Tensor) -> torch.Tensor:
    return weight if weight._base is None else weight._base


def _cache_key(weight: torch.Tensor, svd_dtype: torch.dtype, method: str) -> tuple | None:
    """The identity of ``weight`` as a view (storage, shape, strides, dtype) and of its contents (the version counter,
    bumped by every in-place write), with the score options; ``None`` for anything :func:`precomputed_orders` skips."""
    if not isinstance(weight, torch.Tensor) or weight.is_meta or type(weight) not in (torch.Tensor, torch.nn.Parameter):
        return None
    try:
        return (weight.data_ptr(), weight.storage_offset(), tuple(weight.shape), tuple(weight.stride()), weight.dtype,
                weight.device, weight._version, svd_dtype, method)  # fmt: skip
    except (RuntimeError, NotImplementedError):
        return None


def _concurrent_energies(weight: torch.Tensor):
    torch.set_num_threads(1)  # this worker thread only (torch's and MKL's thread counts are per thread)
    try:
        _check_weight(weight)
        return _energies_gram(weight)
    except Exception:
        return None


class _Batch:
    """The worker threads of one :func:`precomputed_orders` block and the layers still to submit, in the order in
    which they will be asked for; at most ``window`` layers' energies are in flight or waiting (bounded memory)."""

    def __init__(self, todo: list, workers: int) -> None:
        from concurrent.futures import ThreadPoolExecutor

        self.pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="smoa-partition")
        self.pending = collections.deque(todo)
        self.window, self.in_flight = 2 * workers, 0

    def refill(self) -> None:
        while self.pending and self.in_flight < self.window:
            key, weight = self.pending.popleft()
            entry = _precomputed.get(key)
            if entry is None or entry[1] is not None:  # already asked for (computed serially) or submitted
                continue
            entry[1] = self.pool.submit(_concurrent_energies, weight.detach())
            self.in_flight += 1

    def take(self, entry: list, weight: torch.Tensor):
        """The orders of ``entry``'s layer (``None``: compute them serially), the scores on the calling thread."""
        future = entry[1]
        if future is None:  # asked for before its turn: the serial route computes it now
            return None
        self.in_flight -= 1
        energies = future.result()
        self.refill()  # keep the workers busy while this thread goes on
        if energies is None:
            return None
        _progress.tick()
        return _orders_from_scores(weight, *_scores_from_energies(*energies))


@contextlib.contextmanager
def precomputed_orders(
    weights, svd_dtype: torch.dtype = torch.float32, *, method: str = "gram", workers: int | None = None
):
    """Within the block, :func:`spectral_orders` (and so :func:`compute_orders`) of each of ``weights`` returns
    orders whose Gram eigendecompositions ``workers`` CPU threads (default: ``torch.get_num_threads()``, at most the
    cores) compute ahead, in the order of ``weights``, while the calling thread goes on (e.g. PEFT creates the layers);
    bit-identical to the serial route's (test_partition.py).

    Only what the serial route computes on one CPU thread anyway goes to the workers: ``method="gram"``, a plain CPU
    tensor whose smaller side is ≤ 1024 (larger ones, other devices and methods stay serial, where they were). Each
    worker forms the Gram matrix and its eigendecomposition on one thread (torch's thread count is per thread; these
    results do not depend on it); the scores' matrix-vector products, whose rounding does depend on it, and the sorts
    run on the calling thread with its thread count, as before, when the layer's orders are asked for (which is
    when the progress bar of :func:`partition_progress` counts it). A weight modified (or viewed differently) in
    between misses and is computed serially; an entry is used once; what was not asked for is dropped on exit."""
    threads = torch.get_num_threads()
    workers = min(workers or threads, os.cpu_count() or 1)
    todo = []
    for weight in weights if method == "gram" and svd_dtype in (torch.float32, torch.float64) else ():
        key = _cache_key(weight, svd_dtype, method)
        if key is None or key in _precomputed or hasattr(weight, "ds_id") or weight.device.type != "cpu":
            continue
        if weight.dim() != 2 or min(weight.shape) > _ONE_THREAD_LIMIT or not weight.is_floating_point():
            continue
        todo.append((key, weight))
    if workers < 2 or len(todo) < 2:
        yield
        return
    batch = _Batch(todo, workers)
    for key, weight in todo:
        _precomputed[key] = [_base_of(weight), None, batch]
    try:
        batch.refill()
        yield
    finally:
        for key, _ in todo:
            _precomputed.pop(key, None)
        batch.pool.shutdown(wait=True, cancel_futures=True)


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
