"""The merged-weight PyTorch path for K = 1 in identity order (HiRA, SPEC §6), full precision, no dropout.

With one block, the identity order and the adapter input equal to ``x`` (no dropout), the base and the adapter terms
share their input, so ``y = x W0ᵀ + b + s · x (W0 ⊙ BA)ᵀ = x W_effᵀ + b`` with ``W_eff = W0 ⊙ (1 + s·BA)``: one
GEMM instead of two, and one for ``dX`` instead of two::

    forward   W_eff = W0 ⊙ (1 + s·B A)                  y  = x W_effᵀ + b
    backward  W_eff regenerated (never saved)           dx = dY W_eff
              H  = s · (dYᵀ x) ⊙ W0                      dB = H Aᵀ      dA = Bᵀ H      db = Σ dY

FLOPs per step: 6·N·D² (+ 3·D²·r) against 10·N·D² for the two-GEMM form (PEFT's HiRA and the blockwise path at
K = 1). Saved for backward: ``x``, W0 and the factors only (nothing D²-sized). It equals the two-GEMM form to
rounding — ``W0 + s·(W0 ⊙ BA)`` is rounded once more — which is why it is used only where that rounding is at the
level of the input's own (fp32/fp64 with every operand in that dtype; see :func:`merged_weight_applies`): in
bf16/fp16 the small adapter term would be rounded away inside ``W_eff``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["HiraMergedWeightFunction", "merged_weight_applies", "smoa_linear_merged_weight_k1"]

FULL_PRECISION = (torch.float32, torch.float64)


def merged_weight_applies(x: torch.Tensor, weight: torch.Tensor, lora_A: torch.Tensor, lora_B: torch.Tensor) -> bool:
    """True when every operand has one full-precision dtype and no autocast is active on ``x``'s device."""
    return (
        x.dtype in FULL_PRECISION
        and x.dtype == weight.dtype == lora_A.dtype == lora_B.dtype
        and not torch.is_autocast_enabled(x.device.type)
    )


def _effective_weight(weight: torch.Tensor, lora_A: torch.Tensor, lora_B: torch.Tensor, scale: float) -> torch.Tensor:
    product = lora_B @ lora_A
    if scale != 1.0:
        product = product * scale
    return weight * product.add_(1.0)


class HiraMergedWeightFunction(torch.autograd.Function):
    """2-D autograd.Function of ``y = x (W0 ⊙ (1 + s·BA))ᵀ + b`` (see the module docstring); W0 gets no gradient."""

    @staticmethod
    def forward(ctx, x, weight, bias, lora_A, lora_B, scale):
        out = F.linear(x, _effective_weight(weight, lora_A, lora_B, scale), bias)
        ctx.save_for_backward(x, weight, lora_A, lora_B)
        ctx.scale = scale
        return out

    @staticmethod
    def backward(ctx, grad_out):
        x, weight, lora_A, lora_B = ctx.saved_tensors
        need_x, _, need_b, need_A, need_B = ctx.needs_input_grad[:5]
        grad_x = grad_bias = grad_A = grad_B = None
        if need_x:
            grad_x = grad_out @ _effective_weight(weight, lora_A, lora_B, ctx.scale)
        if need_b:
            grad_bias = grad_out.sum(0)
        if need_A or need_B:
            h = (grad_out.T @ x).mul_(weight)
            if ctx.scale != 1.0:
                h.mul_(ctx.scale)
            grad_A = lora_B.T @ h if need_A else None
            grad_B = h @ lora_A.T if need_B else None
        return grad_x, None, grad_bias, grad_A, grad_B, None


def smoa_linear_merged_weight_k1(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    """``smoa_linear_reference(x, x, weight, bias, lora_A, lora_B, arange, arange, 1, scale)`` to rounding, any
    leading dims; only for operands accepted by :func:`merged_weight_applies` (raises ``ValueError`` otherwise)."""
    if not merged_weight_applies(x, weight, lora_A, lora_B):
        raise ValueError(
            f"the merged-weight path needs x, weight, lora_A and lora_B in one dtype of {FULL_PRECISION} and no "
            f"autocast; got x={x.dtype}, weight={weight.dtype}, lora_A={lora_A.dtype}, lora_B={lora_B.dtype}"
        )
    lead = x.shape[:-1]
    y = HiraMergedWeightFunction.apply(x.reshape(-1, x.shape[-1]), weight, bias, lora_A, lora_B, float(scale))
    return y.reshape(*lead, weight.shape[0])
