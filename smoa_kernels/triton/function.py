"""The custom ops (opaque to torch.compile), the autograd.Function, input validation and the public entry point
:func:`smoa_linear_triton` of the ``triton`` backend."""

from __future__ import annotations

import torch

from smoa_kernels.blocks import block_ids
from smoa_kernels.triton import configs
from smoa_kernels.triton.configs import triton
from smoa_kernels.triton.factor_grad import _factor_grads
from smoa_kernels.triton.fused import _gemm
from smoa_kernels.triton.permuted import _perm_adapter

__all__ = ["COORDINATES", "SMoATritonFunction", "choose_coordinates", "is_available", "smoa_linear_triton"]


# ----------------------------------------------------------------------------------------------------------------------
# Custom ops (opaque to torch.compile; simple fake implementations) and the autograd.Function
# ----------------------------------------------------------------------------------------------------------------------


@torch.library.custom_op("smoa_kernels::triton_forward", mutates_args=())
def _forward_op(
    x: torch.Tensor,
    x_adapter: torch.Tensor | None,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    blk_row: torch.Tensor,
    blk_col: torch.Tensor,
    scale: float,
    merged: bool,
) -> torch.Tensor:
    return _gemm(
        x,
        x_adapter,
        weight,
        bias,
        lora_B,
        lora_A,
        blk_row,
        blk_col,
        scale,
        transpose=False,
        has_base=True,
        merged=merged,
    )


@_forward_op.register_fake
def _(x, x_adapter, weight, bias, lora_A, lora_B, blk_row, blk_col, scale, merged):
    return x.new_empty((x.shape[0], weight.shape[0]))


@torch.library.custom_op("smoa_kernels::triton_backward", mutates_args=())
def _backward_op(
    grad_out: torch.Tensor,
    x_saved: torch.Tensor,
    adapter_is_x: bool,
    weight: torch.Tensor,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    row_order: torch.Tensor,
    col_order: torch.Tensor,
    blk_row: torch.Tensor,
    blk_col: torch.Tensor,
    num_blocks: int,
    scale: float,
    merged: bool,
    needs: list[bool],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(dx, dx_a, db, dÂ, dB̂)``; entries not asked for by ``needs`` are empty tensors."""
    need_x, need_xa, need_bias, need_A, need_B = needs
    grad_out = grad_out.contiguous()
    grad_x = grad_xa = None
    if adapter_is_x:
        if need_x:  # dx = dY W0 + s·dY ΔW in one pass over W0
            grad_x = _gemm(
                grad_out, None, weight, None, lora_A, lora_B, blk_col, blk_row, scale,
                transpose=True, has_base=True, merged=merged,
            )  # fmt: skip
    else:
        if need_x:
            grad_x = grad_out @ weight
        if need_xa:
            grad_xa = _gemm(
                grad_out, None, weight, None, lora_A, lora_B, blk_col, blk_row, scale,
                transpose=True, has_base=False, merged=False,
            )  # fmt: skip
    grad_bias = grad_out.sum(0) if need_bias else None
    grad_A = grad_B = None
    if need_A or need_B:
        grad_A, grad_B = _factor_grads(
            grad_out, x_saved, weight, lora_A, lora_B, row_order, col_order, num_blocks, scale
        )
    # custom ops return tensors only: an unused gradient is a fresh empty tensor (distinct objects, no aliasing).
    grads = (grad_x, grad_xa, grad_bias, grad_A if need_A else None, grad_B if need_B else None)
    return tuple(grad_out.new_empty(0) if g is None else g for g in grads)


@_backward_op.register_fake
def _(grad_out, x_saved, adapter_is_x, weight, lora_A, lora_B, row_order, col_order, blk_row, blk_col, num_blocks,
      scale, merged, needs):  # fmt: skip
    need_x, need_xa, need_bias, need_A, need_B = needs
    n_rows, d_in = grad_out.shape[0], weight.shape[1]

    def maybe(flag, shape, like):
        return like.new_empty(shape) if flag else grad_out.new_empty(0)

    return (
        maybe(need_x, (n_rows, d_in), grad_out),
        maybe(need_xa and not adapter_is_x, (n_rows, d_in), grad_out),
        maybe(need_bias, (weight.shape[0],), grad_out),
        maybe(need_A, lora_A.shape, lora_A),
        maybe(need_B, lora_B.shape, lora_B),
    )


@torch.library.custom_op("smoa_kernels::triton_forward_permuted", mutates_args=())
def _forward_permuted_op(
    x: torch.Tensor,
    x_adapter: torch.Tensor | None,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    row_order: torch.Tensor,
    col_order: torch.Tensor,
    num_blocks: int,
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(y, x_a[:, col_order])``: base term by cuBLAS, adapter term on the diagonal blocks in permuted coordinates;
    the gathered x_a is returned to be saved for backward (the factor gradient needs exactly it)."""
    xa_perm = (x if x_adapter is None else x_adapter).index_select(1, col_order)
    out = torch.nn.functional.linear(x, weight, bias).contiguous()
    _perm_adapter(
        xa_perm, out, weight, lora_B, lora_A, row_order, col_order, num_blocks, scale, transpose=False, accumulate=True
    )
    return out, xa_perm


@_forward_permuted_op.register_fake
def _(x, x_adapter, weight, bias, lora_A, lora_B, row_order, col_order, num_blocks, scale):
    return x.new_empty((x.shape[0], weight.shape[0])), x.new_empty((x.shape[0], weight.shape[1]))


@torch.library.custom_op("smoa_kernels::triton_backward_permuted", mutates_args=())
def _backward_permuted_op(
    grad_out: torch.Tensor,
    xa_perm: torch.Tensor,
    adapter_is_x: bool,
    weight: torch.Tensor,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    row_order: torch.Tensor,
    col_order: torch.Tensor,
    num_blocks: int,
    scale: float,
    needs: list[bool],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(dx, dx_a, db, dÂ, dB̂)`` as :func:`_backward_op`; ``dY[:, row_order]`` is gathered once and feeds both the
    dX adapter term and the factor gradient."""
    need_x, need_xa, need_bias, need_A, need_B = needs
    grad_out = grad_out.contiguous()
    dy_perm = grad_out.index_select(1, row_order)
    grad_x = grad_xa = None
    if need_x:
        grad_x = (grad_out @ weight).contiguous()
        if adapter_is_x:  # dx = dY W0 (cuBLAS) + s·dY ΔW on the diagonal blocks, added in place
            _perm_adapter(dy_perm, grad_x, weight, lora_A, lora_B, col_order, row_order, num_blocks, scale,
                          transpose=True, accumulate=True)  # fmt: skip
    if need_xa and not adapter_is_x:
        grad_xa = grad_out.new_empty((grad_out.shape[0], weight.shape[1]))
        _perm_adapter(dy_perm, grad_xa, weight, lora_A, lora_B, col_order, row_order, num_blocks, scale,
                      transpose=True, accumulate=False)  # fmt: skip
    grad_bias = grad_out.sum(0) if need_bias else None
    grad_A = grad_B = None
    if need_A or need_B:
        grad_A, grad_B = _factor_grads(grad_out, None, weight, lora_A, lora_B, row_order, col_order, num_blocks, scale,
                                       dy_perm=dy_perm, xa_perm=xa_perm)  # fmt: skip
    grads = (grad_x, grad_xa, grad_bias, grad_A if need_A else None, grad_B if need_B else None)
    return tuple(grad_out.new_empty(0) if g is None else g for g in grads)


@_backward_permuted_op.register_fake
def _(grad_out, xa_perm, adapter_is_x, weight, lora_A, lora_B, row_order, col_order, num_blocks, scale, needs):
    need_x, need_xa, need_bias, need_A, need_B = needs
    n_rows, d_in = grad_out.shape[0], weight.shape[1]

    def maybe(flag, shape, like):
        return like.new_empty(shape) if flag else grad_out.new_empty(0)

    return (
        maybe(need_x, (n_rows, d_in), grad_out),
        maybe(need_xa and not adapter_is_x, (n_rows, d_in), grad_out),
        maybe(need_bias, (weight.shape[0],), grad_out),
        maybe(need_A, lora_A.shape, lora_A),
        maybe(need_B, lora_B.shape, lora_B),
    )


class SMoATritonFunction(torch.autograd.Function):
    """2-D autograd.Function over the custom ops. ``x_adapter=None`` means "x itself" (dropout p = 0): then dx is one
    fused pass; a distinct ``x_adapter`` gets its own gradient. W0 is frozen (no weight gradient)."""

    @staticmethod
    @torch.amp.custom_fwd(device_type="cuda")
    def forward(
        ctx, x, x_adapter, weight, bias, lora_A, lora_B, row_order, col_order, num_blocks, scale, merged,
        permuted=False,
    ):  # fmt: skip
        ctx.adapter_is_x = x_adapter is None
        ctx.has_bias = bias is not None
        ctx.num_blocks, ctx.scale, ctx.merged, ctx.permuted = num_blocks, scale, merged, permuted
        if permuted:
            out, xa_perm = torch.ops.smoa_kernels.triton_forward_permuted(
                x, x_adapter, weight, bias, lora_A, lora_B, row_order, col_order, num_blocks, scale
            )
            # x_a[:, col_order] replaces x_a (same size): the factor gradient reads exactly it.
            ctx.save_for_backward(xa_perm, weight, lora_A, lora_B, row_order, col_order)
            return out
        blk_row = block_ids(row_order, num_blocks)
        blk_col = block_ids(col_order, num_blocks)
        out = torch.ops.smoa_kernels.triton_forward(
            x, x_adapter, weight, bias, lora_A, lora_B, blk_row, blk_col, scale, merged
        )
        ctx.save_for_backward(x if x_adapter is None else x_adapter, weight, lora_A, lora_B, row_order, col_order,
                              blk_row, blk_col)  # fmt: skip
        return out

    @staticmethod
    @torch.amp.custom_bwd(device_type="cuda")
    def backward(ctx, grad_out):
        need_x, need_xa, _, need_bias, need_A, need_B = ctx.needs_input_grad[:6]
        needs = [need_x, need_xa and not ctx.adapter_is_x, need_bias and ctx.has_bias, need_A, need_B]
        if ctx.permuted:
            xa_perm, weight, lora_A, lora_B, row_order, col_order = ctx.saved_tensors
            grads = torch.ops.smoa_kernels.triton_backward_permuted(
                grad_out, xa_perm, ctx.adapter_is_x, weight, lora_A, lora_B, row_order, col_order, ctx.num_blocks,
                ctx.scale, needs,
            )  # fmt: skip
            grad_x, grad_xa, grad_bias, grad_A, grad_B = (g if flag else None for g, flag in zip(grads, needs))
            return grad_x, grad_xa, None, grad_bias, grad_A, grad_B, None, None, None, None, None, None
        x_saved, weight, lora_A, lora_B, row_order, col_order, blk_row, blk_col = ctx.saved_tensors
        grads = torch.ops.smoa_kernels.triton_backward(
            grad_out, x_saved, ctx.adapter_is_x, weight, lora_A, lora_B, row_order, col_order, blk_row, blk_col,
            ctx.num_blocks, ctx.scale, ctx.merged, needs,
        )  # fmt: skip
        grad_x, grad_xa, grad_bias, grad_A, grad_B = (g if flag else None for g, flag in zip(grads, needs))
        return grad_x, grad_xa, None, grad_bias, grad_A, grad_B, None, None, None, None, None, None


# ----------------------------------------------------------------------------------------------------------------------
# Validation and the public entry points
# ----------------------------------------------------------------------------------------------------------------------


def is_available() -> tuple[bool, str]:
    """``(True, "")`` if triton imports and CUDA is available or ``TRITON_INTERPRET=1``; else ``(False, reason)``."""
    if triton is None:
        return False, configs.TRITON_IMPORT_ERROR
    if torch.cuda.is_available() or configs._interpreting():
        return True, ""
    return False, "no CUDA device and TRITON_INTERPRET is not set to 1 (the Triton interpreter runs kernels on the CPU)"


def _check_permutation(name: str, order: torch.Tensor, n: int) -> None:
    """Orders index W0 inside the kernels: check that they are permutations of range(n) (no cache: a cache keyed by
    address or version can be fooled by a new tensor at a freed address or a ``.data`` write).

    Skipped while torch.compile traces (a data-dependent check cannot be traced; eager calls have checked them)."""
    if torch.compiler.is_compiling():
        return
    expected = torch.arange(n, device=order.device, dtype=order.dtype)
    if not torch.equal(torch.sort(order).values, expected):
        raise ValueError(f"{name} is not a permutation of range({n})")


def _validate(x, x_adapter, weight, bias, lora_A, lora_B, row_order, col_order, num_blocks, scale) -> None:
    """Every check that can fail, before any launch: types, devices, dtypes, shapes."""
    named = {
        "x": x,
        "x_adapter": x_adapter,
        "weight": weight,
        "lora_A": lora_A,
        "lora_B": lora_B,
        "row_order": row_order,
        "col_order": col_order,
    }
    if bias is not None:
        named["bias"] = bias
    for name, tensor in named.items():
        if not isinstance(tensor, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(tensor).__name__}")
    if isinstance(num_blocks, bool) or not isinstance(num_blocks, int):
        raise TypeError(f"num_blocks must be an int, got {num_blocks!r}")
    if isinstance(scale, bool) or not isinstance(scale, (int, float)):
        raise TypeError(f"scale must be a python float, got {scale!r}")
    if triton is None:
        raise RuntimeError(f"the triton SMoA kernels are not available: {configs.TRITON_IMPORT_ERROR}")
    for name, tensor in named.items():
        if tensor.device != x.device:
            raise ValueError(f"{name} is on {tensor.device} but x is on {x.device}: all tensors must share one device")
    if x.device.type == "cpu" and not configs._interpreting():
        raise ValueError("x is a CPU tensor: the triton kernels need CUDA tensors (or TRITON_INTERPRET=1 for testing)")
    if x.device.type not in ("cuda", "cpu"):
        raise ValueError(f"x is on {x.device}: the triton kernels run on CUDA devices only")
    if weight.dim() != 2:
        raise ValueError(f"weight must be 2-D (d_out, d_in), got shape {tuple(weight.shape)}")
    d_out, d_in = weight.shape
    if weight.dtype not in configs.FLOAT_DTYPES:
        raise TypeError(f"weight.dtype={weight.dtype} is not one of float32/float16/bfloat16")
    if x.dtype != weight.dtype:
        raise TypeError(f"x.dtype={x.dtype} does not match weight.dtype={weight.dtype}")
    if x.dim() < 1 or x.shape[-1] != d_in:
        raise ValueError(f"x.shape={tuple(x.shape)}: the last dimension must be d_in={d_in}")
    if x_adapter.shape != x.shape:
        raise ValueError(f"x_adapter.shape={tuple(x_adapter.shape)} does not match x.shape={tuple(x.shape)}")
    if x_adapter.dtype != x.dtype:
        raise TypeError(f"x_adapter.dtype={x_adapter.dtype} does not match x.dtype={x.dtype}")
    if bias is not None and (bias.shape != (d_out,) or bias.dtype != weight.dtype):
        raise ValueError(
            f"bias must have shape ({d_out},) and dtype {weight.dtype}, got {tuple(bias.shape)} {bias.dtype}"
        )
    if lora_A.dtype != lora_B.dtype:
        raise TypeError(f"lora_A.dtype={lora_A.dtype} and lora_B.dtype={lora_B.dtype} differ")
    if lora_A.dtype not in (torch.float32, weight.dtype):
        raise TypeError(f"factor dtype {lora_A.dtype} must be float32 or weight.dtype={weight.dtype}")
    if lora_A.dim() != 2 or lora_A.shape[1] != d_in:
        raise ValueError(f"lora_A.shape={tuple(lora_A.shape)} must be (r_k, d_in={d_in})")
    rank = lora_A.shape[0]
    if lora_B.dim() != 2 or tuple(lora_B.shape) != (d_out, rank):
        raise ValueError(f"lora_B.shape={tuple(lora_B.shape)} must be (d_out={d_out}, r_k={rank})")
    if not 1 <= num_blocks <= min(d_in, d_out):
        raise ValueError(f"num_blocks={num_blocks} must be in [1, min(d_in, d_out)={min(d_in, d_out)}]")
    for name, order, n in (("row_order", row_order, d_out), ("col_order", col_order, d_in)):
        if order.dtype != torch.int64 or order.dim() != 1 or order.numel() != n:
            raise ValueError(f"{name} must be a 1-D int64 tensor of length {n}, got {order.dtype} {tuple(order.shape)}")
        _check_permutation(name, order, n)
    if torch.is_grad_enabled() and weight.requires_grad:
        raise ValueError("weight.requires_grad=True: the triton SMoA path treats W0 as frozen (SPEC §4)")


COORDINATES = ("original", "permuted", "auto")
# "auto" picks "permuted" when the FLOPs it saves per token and feature, 2·D·(1 − 1/K), exceed this many. Modelled, not
# yet measured (see the module docstring): the permuted path moves about 4 extra elements per token and feature (the
# gather of x_a / dY and the read-modify-write of the scattered output columns) at about 300 FLOP/byte (H100 bf16
# ridge), i.e. ≈ 2400 FLOPs, plus element-wise W0 sub-tile loads; the margin is for the latter.
AUTO_PERMUTED_MIN_SAVED_FLOPS = 4096


def choose_coordinates(coordinates: str, d_out: int, d_in: int, num_blocks: int) -> str:
    """Resolve ``coordinates`` ("auto" by the size heuristic: shapes and K only, so it never depends on N)."""
    if coordinates != "auto":
        return coordinates
    saved = 2 * min(d_out, d_in) * (1 - 1 / num_blocks)
    return "permuted" if num_blocks >= 2 and saved >= AUTO_PERMUTED_MIN_SAVED_FLOPS else "original"


def _autocast(x, x_adapter, weight, bias, lora_A, lora_B):
    """Apply an enclosing autocast the way F.linear would: activations, W0 and b to the autocast dtype; fp32 factors
    stay fp32 (the precision contract), other factors follow the activations."""
    device_type = x.device.type
    if device_type != "cuda" or not torch.is_autocast_enabled(device_type):
        return x, x_adapter, weight, bias, lora_A, lora_B
    dtype = torch.get_autocast_dtype(device_type)
    same = x_adapter is x
    x = x.to(dtype)
    x_adapter = x if same else x_adapter.to(dtype)
    weight = weight.to(dtype)
    bias = None if bias is None else bias.to(dtype)
    if lora_A.dtype != torch.float32:
        lora_A, lora_B = lora_A.to(dtype), lora_B.to(dtype)
    return x, x_adapter, weight, bias, lora_A, lora_B


def smoa_linear_triton(
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
    *,
    merged_weight: bool = False,
    coordinates: str = "original",
) -> torch.Tensor:
    """Same signature and result as :func:`smoa_kernels.reference.smoa_linear_reference`, any leading dims in ``x``.

    Pass the very same tensor object as ``x`` and ``x_adapter`` for dropout p = 0 (dx is then one fused pass).
    ``merged_weight=True`` opts into the single-dot fast path (requires ``x_adapter is x``; see the module docstring
    for its rounding cost). ``coordinates``: ``"original"`` (default: fused base + adapter GEMM over every W0 tile),
    ``"permuted"`` (cuBLAS base GEMMs + the adapter on the diagonal blocks only) or ``"auto"`` (the size heuristic
    :func:`choose_coordinates`); see the module docstring for the cost model.
    """
    _validate(x, x_adapter, weight, bias, lora_A, lora_B, row_order, col_order, num_blocks, scale)
    if merged_weight and x_adapter is not x:
        raise ValueError("merged_weight=True requires x_adapter to be x itself (dropout p = 0)")
    if not isinstance(coordinates, str) or coordinates not in COORDINATES:
        raise ValueError(f"coordinates={coordinates!r} must be one of {', '.join(map(repr, COORDINATES))}")
    if coordinates == "permuted" and merged_weight:
        raise ValueError("merged_weight=True runs in original coordinates: it cannot be combined with 'permuted'")
    permuted = not merged_weight and choose_coordinates(coordinates, *weight.shape, num_blocks) == "permuted"
    x, x_adapter, weight, bias, lora_A, lora_B = _autocast(x, x_adapter, weight, bias, lora_A, lora_B)
    same = x_adapter is x
    d_in = weight.shape[1]
    lead = x.shape[:-1]
    x2 = x.reshape(-1, d_in)
    xa2 = None if same else x_adapter.reshape(-1, d_in)
    y = SMoATritonFunction.apply(
        x2, xa2, weight, bias, lora_A, lora_B, row_order, col_order, num_blocks, float(scale), bool(merged_weight),
        permuted,
    )  # fmt: skip
    return y.reshape(*lead, weight.shape[0])
