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

__all__ = ["SMoALinear", "check_smoa_arguments", "modulated_merge", "modulated_unmerge", "smoa_modulation"]


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
    in_features: int, out_features: int, r: int, num_blocks: int, alpha: float | None, dropout: float, ordering: str
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
    if r % num_blocks:
        raise ValueError(
            f"r={r} is not divisible by num_blocks={num_blocks}: every block gets rank r/num_blocks "
            f"(use r={num_blocks * max(1, round(r / num_blocks))})"
        )
    if alpha is not None and (
        isinstance(alpha, bool) or not isinstance(alpha, numbers.Real) or not math.isfinite(alpha) or alpha == 0
    ):
        raise ValueError(f"alpha={alpha!r} must be a finite non-zero number (or None for alpha = r)")
    if isinstance(dropout, bool) or not isinstance(dropout, numbers.Real) or not 0.0 <= dropout < 1.0:
        raise ValueError(f"dropout={dropout!r} must be in [0, 1)")
    if ordering not in ORDERINGS:
        raise ValueError(f"ordering={ordering!r} is not one of {ORDERINGS}")


class SMoALinear(nn.Module):
    """A frozen linear layer ``y = x W0ᵀ + b`` plus the SMoA update ``s · dropout(x) ΔWᵀ`` (SPEC §2).

    Args:
        in_features, out_features, bias, device, dtype: as for ``nn.Linear`` (W0 is initialised like it, then frozen).
        r: the total rank budget (SPEC's r); every block gets rank ``r // num_blocks``.
        num_blocks: K, the number of spectral blocks (K = 1 is HiRA with a scale s).
        alpha: the scale numerator, ``s = alpha / r``; ``None`` means ``alpha = r`` (s = 1), the paper's default.
        dropout: dropout probability on the adapter path only (identity in eval mode).
        ordering: ``"spectral"`` (SPEC §1), ``"identity"`` or ``"random"`` (seeded by ``seed``) — the ablations.
        svd_dtype: precision of the SVD behind the spectral ordering (float32 or float64).
        factor_dtype: dtype of the trainable factors; default fp32 over a half-precision base, else W0's dtype.
        init_weights: ``True`` — A kaiming-uniform per block, B = 0 (an exact no-op); ``False`` — B random too (tests).
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
        init_weights: bool = True,
        backend: str | None = None,
        device=None,
        dtype=None,
    ) -> None:
        super().__init__()
        base = nn.Linear(in_features, out_features, bias=bias, device=device, dtype=dtype)
        self._attach(base.weight, base.bias, r, num_blocks, alpha, dropout, ordering, seed, svd_dtype,
                     factor_dtype, init_weights, backend)  # fmt: skip

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
        init_weights: bool = True,
        backend: str | None = None,
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
                      factor_dtype, init_weights, backend)  # fmt: skip
        return layer

    def _attach(self, weight, bias, r, num_blocks, alpha, dropout, ordering, seed, svd_dtype, factor_dtype,
                init_weights, backend) -> None:  # fmt: skip
        out_features, in_features = weight.shape
        check_smoa_arguments(in_features, out_features, r, num_blocks, alpha, dropout, ordering)
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
        rank = self.r // self.num_blocks
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
        return self.r // self.num_blocks

    @torch.no_grad()
    def reset_smoa_parameters(self, init_weights: bool = True) -> None:
        """SPEC §2 init: every ``A_k`` kaiming-uniform(a=√5) over its own fan-in |C_k|; ``B = 0`` (exact no-op).

        ``init_weights=False`` draws every ``B_k`` the same way (a non-trivial adapter, for tests and debugging).
        """
        blocks = []
        for A_k, B_k in self.block_factors():
            nn.init.kaiming_uniform_(A_k, a=math.sqrt(5))
            if init_weights:
                B_k.zero_()
            else:
                nn.init.kaiming_uniform_(B_k, a=math.sqrt(5))
            blocks.append((A_k, B_k))
        self.load_block_factors(blocks)

    # ---- the official per-block layout -------------------------------------------------------------------------
    def block_factors(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """``[(A_k, B_k)]`` in the authors' layout (``A_k``: r_k×|C_k|, ``B_k``: |R_k|×r_k), detached copies."""
        with torch.no_grad():
            blocks = lora_to_blocks(
                self.smoa_A.weight, self.smoa_B.weight, self.row_order, self.col_order, self.num_blocks
            )
            return [(A_k.detach().clone(), B_k.detach().clone()) for A_k, B_k in blocks]

    @torch.no_grad()
    def load_block_factors(self, blocks) -> None:
        """Inverse of :meth:`block_factors`: load per-block factors (e.g. converted from an official checkpoint)."""
        blocks = list(blocks)
        if len(blocks) != self.num_blocks:
            raise ValueError(f"blocks has {len(blocks)} entries, expected num_blocks={self.num_blocks}")
        expected = [(tuple(A.shape), tuple(B.shape)) for A, B in lora_to_blocks(
            self.smoa_A.weight, self.smoa_B.weight, self.row_order, self.col_order, self.num_blocks)]  # fmt: skip
        for k, ((A_k, B_k), (shape_A, shape_B)) in enumerate(zip(blocks, expected)):
            if tuple(A_k.shape) != shape_A or tuple(B_k.shape) != shape_B:
                raise ValueError(
                    f"blocks[{k}] has shapes A={tuple(A_k.shape)}, B={tuple(B_k.shape)}; expected A={shape_A}, "
                    f"B={shape_B} (r_k={self.rank_per_block}, |C_k|, |R_k| from the stored orders)"
                )
        lora_A, lora_B = blocks_to_lora(blocks, self.row_order, self.col_order)
        self.smoa_A.weight.copy_(lora_A)
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
    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        for name, size in (("row_order", self.out_features), ("col_order", self.in_features)):
            if prefix + name in state_dict:
                validate_order(prefix + name, state_dict[prefix + name], size)
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
            f"num_blocks={self.num_blocks}, alpha={self.alpha:g}, dropout={dropout:g}, ordering={self.ordering}, "
            f"backend={self.backend or 'follow'}, bias={self.bias is not None}, merged={self.merged}"
        )
