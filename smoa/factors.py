"""The adapter's hyper-parameters and factors: block ranks, argument checks, the SPEC §2 init, the zero padding of
uneven ranks, and the adapter term that is zero by construction (B = 0 or r_k = 0), whose output is the base layer's.

Shared by :class:`smoa.layer.SMoALinear` and the PEFT layer (:mod:`smoa.peft.layer`); nothing here holds state.
"""

from __future__ import annotations

import math
import numbers

import torch
import torch.nn as nn

from smoa.partition import ORDERINGS

__all__ = [
    "INIT_WEIGHTS",
    "base_output_applies",
    "check_smoa_arguments",
    "init_block_factors",
    "known_zero",
    "order_storage_dtype",
    "padding_masks",
    "resolve_block_ranks",
    "value_with_gradient_of",
    "version_stamp",
    "zero_rank_rows",
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
