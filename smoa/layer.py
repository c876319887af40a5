"""``SMoALinear``: the ``nn.Linear`` drop-in carrying an SMoA adapter (SPEC §2), its merge and its state.

The layer keeps ``weight``/``bias`` (the frozen W0 and b, shared with the wrapped ``nn.Linear``), the trainable
factors in the LoRA-shaped layout of SPEC §3 as leaf modules ``smoa_A`` (``weight``: r_k×d_in = Â) and ``smoa_B``
(``weight``: d_out×r_k = B̂) so FSDP/PEFT wrap them like LoRA's, and the spectral orders as persistent buffers.
The computation itself lives in :mod:`smoa_kernels` and is chosen by :mod:`smoa.backends`.
"""

from __future__ import annotations

import math
import numbers

import torch
import torch.nn as nn
import torch.nn.functional as F

from smoa.backends import check_backend_name, smoa_linear
from smoa.partition import ORDERINGS, compute_orders, validate_order
from smoa_kernels.reference import blocks_to_lora, dense_delta_weight, lora_to_blocks

__all__ = [
    "INIT_WEIGHTS",
    "SMoALinear",
    "check_smoa_arguments",
    "check_zero_padding",
    "init_block_factors",
    "modulated_merge",
    "modulated_unmerge",
    "order_storage_dtype",
    "padding_masks",
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


def check_zero_padding(state_dict, prefix, block_ranks, key_A, key_B, row_order, col_order) -> None:
    """Refuse factors whose zero padding (uneven block ranks) is not zero: they would compute another function."""
    mask_A, mask_B = padding_masks(block_ranks, row_order, col_order)
    for key, mask in ((key_A, mask_A), (key_B, mask_B)):
        value = state_dict.get(prefix + key)
        if mask is not None and value is not None and tuple(value.shape) == tuple(mask.shape):
            if bool((value.detach()[mask.to(value.device)] != 0).any()):
                raise ValueError(
                    f"{prefix + key} has non-zero entries in the zero padding of block_ranks={list(block_ranks)} "
                    "(rank slots j >= r_k of block k must be 0)"
                )


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
        out_features, in_features = weight.shape
        check_smoa_arguments(in_features, out_features, r, num_blocks, alpha, dropout, ordering, block_ranks)
        if init_weights not in INIT_WEIGHTS or not isinstance(init_weights, (bool, str)):
            raise ValueError(f"init_weights={init_weights!r} is not one of {INIT_WEIGHTS}")
        self.block_ranks = resolve_block_ranks(int(r), int(num_blocks), block_ranks)
        self.backend = None if backend is None else check_backend_name(backend)
        self.in_features, self.out_features = in_features, out_features
        self.r, self.num_blocks, self.ordering = int(r), int(num_blocks), ordering
        self.alpha = float(r if alpha is None else alpha)
        self.scale = self.alpha / self.r
        self.weight = weight
        self.weight.requires_grad_(False)
        if bias is None:
            self.register_parameter("bias", None)
        else:
            self.bias = bias
            self.bias.requires_grad_(False)
        row_order, col_order = compute_orders(weight, ordering, seed=seed, svd_dtype=svd_dtype)
        self.register_buffer("row_order", row_order)
        self.register_buffer("col_order", col_order)
        if factor_dtype is None:
            factor_dtype = torch.float32 if weight.dtype in (torch.float16, torch.bfloat16) else weight.dtype
        rank = max(self.block_ranks)
        self.smoa_A = nn.Linear(in_features, rank, bias=False, device=weight.device, dtype=factor_dtype)
        self.smoa_B = nn.Linear(rank, out_features, bias=False, device=weight.device, dtype=factor_dtype)
        self.smoa_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.merged = False
        # Entries of W0 that a merge could not keep recoverable (SPEC §5): flat indices and original values.
        self.register_buffer("_merge_lost_index", None, persistent=False)
        self.register_buffer("_merge_lost_value", None, persistent=False)
        self.reset_smoa_parameters(init_weights)

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

    # ---- the official per-block layout -------------------------------------------------------------------------
    def block_factors(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """``[(A_k, B_k)]`` in the authors' layout (``A_k``: r_k×|C_k|, ``B_k``: |R_k|×r_k), detached copies."""
        with torch.no_grad():
            blocks = lora_to_blocks(
                self.smoa_A.weight, self.smoa_B.weight, self.row_order, self.col_order, self.num_blocks,
                self.block_ranks,
            )  # fmt: skip
            return [(A_k.detach().clone(), B_k.detach().clone()) for A_k, B_k in blocks]

    @torch.no_grad()
    def load_block_factors(self, blocks) -> None:
        """Inverse of :meth:`block_factors`: load per-block factors (e.g. converted from an official checkpoint)."""
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
        if self.merged:
            return F.linear(x, self.weight, self.bias)
        return smoa_linear(
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

    # ---- ΔW and merge -------------------------------------------------------------------------------------------
    def _modulation(self) -> torch.Tensor:
        return smoa_modulation(self.weight, [(self.scale, self.smoa_A.weight, self.smoa_B.weight, self.row_order,
                                              self.col_order, self.num_blocks)])  # fmt: skip

    @torch.no_grad()
    def delta_weight(self) -> torch.Tensor:
        """``s·ΔW`` (d_out×d_in, original coordinates) in the factors' dtype."""
        if self.merged:
            raise RuntimeError("delta_weight() needs the original W0 as anchor: call unmerge() first")
        delta = dense_delta_weight(
            self.weight, self.smoa_A.weight, self.smoa_B.weight, self.row_order, self.col_order, self.num_blocks
        )
        return delta * self.scale

    @torch.no_grad()
    def merge(self) -> None:
        """``W0 ← W0 ⊙ (1 + s·P) = W0 + s·ΔW``: inference then costs exactly a plain linear layer.

        Unmerge divides back (see :func:`modulated_merge`): W0 to rounding, exactly where a division cannot.
        """
        if self.merged:
            return
        merged, lost_index, lost_value = modulated_merge(self.weight.detach(), self._modulation())
        self.weight.copy_(merged)
        self._merge_lost_index, self._merge_lost_value = lost_index, lost_value
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """Restore W0 after :meth:`merge`, to rounding (exactly where the merge had to keep the original)."""
        if not self.merged:
            return
        original = modulated_unmerge(
            self.weight.detach(), self._modulation(), self._merge_lost_index, self._merge_lost_value
        )
        self.weight.copy_(original)
        self._merge_lost_index = self._merge_lost_value = None
        self.merged = False

    # ---- state --------------------------------------------------------------------------------------------------
    def _save_to_state_dict(self, destination, prefix, keep_vars) -> None:
        """Orders are saved in the smallest integer dtype that holds them (int16 up to 32,768 features: files 4×
        smaller than int64); in memory they stay int64, which the kernels index with."""
        super()._save_to_state_dict(destination, prefix, keep_vars)
        for name, size in (("row_order", self.out_features), ("col_order", self.in_features)):
            if prefix + name in destination:
                destination[prefix + name] = destination[prefix + name].to(order_storage_dtype(size))

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        for name, size in (("row_order", self.out_features), ("col_order", self.in_features)):
            if prefix + name in state_dict:
                validate_order(prefix + name, state_dict[prefix + name], size)
                state_dict[prefix + name] = state_dict[prefix + name].long()  # int16/int32 files, int64 in memory
        check_zero_padding(state_dict, prefix, self.block_ranks, "smoa_A.weight", "smoa_B.weight",
                       state_dict.get(prefix + "row_order", self.row_order),
                       state_dict.get(prefix + "col_order", self.col_order))  # fmt: skip
        for name, param in (("smoa_A.weight", self.smoa_A.weight), ("smoa_B.weight", self.smoa_B.weight)):
            value = state_dict.get(prefix + name)
            if value is not None and tuple(value.shape) != tuple(param.shape):
                raise ValueError(
                    f"{prefix + name} has shape {tuple(value.shape)}, expected {tuple(param.shape)} "
                    f"(r={self.r}, num_blocks={self.num_blocks}, in_features={self.in_features}, "
                    f"out_features={self.out_features})"
                )
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def extra_repr(self) -> str:
        dropout = self.smoa_dropout.p if isinstance(self.smoa_dropout, nn.Dropout) else 0.0
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, r={self.r}, "
            f"num_blocks={self.num_blocks}, "
            + (f"block_ranks={list(self.block_ranks)}, " if len(set(self.block_ranks)) > 1 else "")
            + f"alpha={self.alpha:g}, dropout={dropout:g}, ordering={self.ordering}, "
            f"backend={self.backend or 'follow'}, bias={self.bias is not None}, merged={self.merged}"
        )
