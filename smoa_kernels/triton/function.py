"""The custom ops (opaque to torch.compile), the autograd.Function, input validation, the path dispatch and the public
entry point :func:`smoa_linear_triton` of the ``triton`` backend.

Two paths compute the same function (see the package docstring): ``"fused"`` (the single-pass kernel of
:mod:`~smoa_kernels.triton.fused` for forward and dX) and ``"blocked"`` (:mod:`~smoa_kernels.triton.blocked`: vendor
GEMMs on the K contiguous diagonal blocks). The factor gradient is the blocked one on both paths. ``"auto"`` asks
:func:`smoa_kernels.cost_model.choose_path` per call, inside the custom op: the decision depends on N, and deciding
inside the op keeps it out of torch.compile's graph (no guard on N, no recompilation when N changes). Both paths save
the same tensor for backward — ``x`` itself when there is no dropout (nothing new is kept: the band gather is redone in
backward, one N·D pass), else ``x_a`` gathered into the padded band layout (the size of x_a, which LoRA keeps too) —
so the decision needs no agreement between forward and backward.
"""

from __future__ import annotations

import contextlib
import functools

import torch

from smoa_kernels import cost_model
from smoa_kernels.triton import blocked, configs
from smoa_kernels.triton.configs import triton
from smoa_kernels.triton.fused import _gemm

__all__ = ["PATHS", "SMoATritonFunction", "is_available", "resolve_path", "smoa_linear_triton"]

PATHS = ("auto", "fused", "blocked")


@functools.cache
def _gpu_class(device: torch.device) -> str:
    """The cost model's GPU class for ``device`` ("a100" for Ampere data-centre parts, else "h100")."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device).lower()
        if "a100" in name or "a800" in name or "a30" in name:
            return "a100"
    return "h100"


def resolve_path(
    path: str,
    n_tokens: int,
    d_out: int,
    d_in: int,
    num_blocks: int,
    dtype: torch.dtype,
    device: torch.device,
    rank: int = 0,
    two_activations: bool = False,
) -> str:
    """``"fused"`` or ``"blocked"`` for one call (``rank``: r_k, the factors' rank; ``two_activations``: x_a is not x).

    ``"blocked"`` as asked. ``"fused"`` as asked if one of its configs fits the device's shared memory at this rank
    (the fused GEMM holds the block-extended factors, K·r_k ranks padded to a power of two, in every stage), else a
    ``ValueError``. ``"auto"``: the blocked path for an empty batch (N = 0: nothing is launched) and where no fused
    config fits (high total rank, small-shared-memory GPUs: the blocked path's memory does not grow with the rank),
    else the cost model's choice."""
    if path == "blocked":
        return path
    rank_pad = configs._rank_pad(num_blocks * rank)
    fits = configs.fused_fits(dtype, rank_pad, device, two_activations=two_activations)
    if path == "fused":
        if not fits:
            raise ValueError(
                f"path='fused' cannot run num_blocks={num_blocks} × r_k={rank} (rank pad {rank_pad}) in "
                f"{dtype}: no fused config fits the {configs.device_shared_memory(device)} B of shared memory per "
                "block of this device; use path='auto' or 'blocked'"
            )
        return path
    if n_tokens == 0 or not fits:
        return "blocked"
    element_bytes = torch.empty((), dtype=dtype).element_size()
    return cost_model.choose_path(n_tokens, d_out, d_in, num_blocks, element_bytes=element_bytes,
                                  gpu=_gpu_class(device))  # fmt: skip


def _on_device(tensor: torch.Tensor):
    """The tensor's CUDA device made current for the block (a no-op for CPU tensors under the interpreter).

    Triton launches on ``torch.cuda.current_device()`` and that device's current stream, not on the tensors' device,
    while torch's own ops (cuBLAS, index_select) run on the tensors' device and its current stream. For a layer on
    ``cuda:1`` (``device_map="auto"``, DDP with ``model.to(f"cuda:{rank}")`` and no ``set_device``) the two would
    differ: a crash without peer access, with it a kernel racing the cuBLAS result it reads. Every custom-op body runs
    inside this guard, so both kinds of launch go to the same device and stream."""
    if tensor.is_cuda:
        return torch.cuda.device(tensor.device)
    return contextlib.nullcontext()


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
    row_order: torch.Tensor,
    col_order: torch.Tensor,
    num_blocks: int,
    scale: float,
    path: str,
    merged: bool,
    save: bool,
    keep_state: bool,
) -> list[torch.Tensor]:
    """``[y, x_band, *state]``; ``x_band`` is x_a gathered into the padded band layout when ``save`` (else empty; the
    Function asks for it only when dropout makes x_a a tensor of its own). ``state`` (``keep_state``, else empty
    tensors): what the backward would otherwise redo from the same orders and factors (:func:`_step_state`)."""
    with _on_device(x), torch.autocast(x.device.type, enabled=False):  # dtypes were fixed by smoa_linear_triton
        orders = blocked.prepare_orders(row_order, col_order)
        y, x_band = _forward_body(x, x_adapter, weight, bias, lora_A, lora_B, orders, num_blocks, scale, path, merged,
                                  save)  # fmt: skip
        state = _step_state(orders, lora_A, lora_B, num_blocks) if keep_state else [x.new_empty(0) for _ in _STATE]
        return [y, x_band, *state]


# What the forward hands to the backward (made once per step): the order guard's outputs, col_order's band index and
# the permuted fp32 factors. O(d + r·d) elements; the backward then uses exactly the orders and factors the forward
# used (a write to the orders between forward and backward does not mix two orders in one step).
_STATE = ("row", "col", "inv_row", "inv_col", "flag", "col_band_index", "a_bands", "b_bands")


def _step_state(orders, lora_A, lora_B, num_blocks) -> list[torch.Tensor]:
    if lora_A.shape[0]:
        a_bands, b_bands = blocked.permuted_factors(lora_A, lora_B, orders, num_blocks)
    else:
        width = blocked.band_width(lora_A.shape[1], num_blocks)
        a_bands = lora_A.new_empty((0, width), dtype=torch.float32)
        b_bands = lora_B.new_empty((lora_B.shape[0], 0), dtype=torch.float32)
    index = orders.band_index("col", num_blocks)
    return [orders.row, orders.col, orders.inv_row, orders.inv_col, orders.flag, index, a_bands, b_bands]


def _orders_from_state(state, lora_A, lora_B) -> blocked.Orders | None:
    if len(state) != len(_STATE) or state[4].dim() != 0:  # not kept: the backward prepares its own
        return None
    row, col, inv_row, inv_col, flag, index, a_bands, b_bands = state
    return blocked.Orders(row, col, inv_row, inv_col, flag, factor_bands=(lora_A, lora_B, a_bands, b_bands),
                          col_band_index=index)  # fmt: skip


def _forward_body(x, x_adapter, weight, bias, lora_A, lora_B, orders, num_blocks, scale, path, merged, save):
    """The path's work: ``(y, x_band)`` (see :func:`_forward_op`)."""
    chosen = "fused" if merged else resolve_path(path, x.shape[0], *weight.shape, num_blocks, x.dtype, x.device,
                                                 lora_A.shape[0], x_adapter is not None)  # fmt: skip
    if chosen == "blocked":
        y, xa_bands = blocked.blocked_forward(x, x_adapter, weight, bias, lora_A, lora_B, orders, num_blocks,
                                              scale)  # fmt: skip
        return y, xa_bands if save else x.new_empty(0)
    # the block ids come from the inverse orders inside the operands kernel; the flag poisons U for a bad order
    y = _gemm(x, x_adapter, weight, bias, lora_B, lora_A, orders.inv_row, orders.inv_col, scale, transpose=False,
              has_base=True, merged=merged, num_blocks=num_blocks, flag=orders.flag, positions=True)  # fmt: skip
    if not save:
        return y, x.new_empty(0)
    return y, blocked.gather_bands_t(x if x_adapter is None else x_adapter, orders, "col", num_blocks)


@_forward_op.register_fake
def _(x, x_adapter, weight, bias, lora_A, lora_B, row_order, col_order, num_blocks, scale, path, merged, save,
      keep_state):  # fmt: skip
    d_out, d_in = weight.shape
    width = blocked.band_width(d_in, num_blocks)
    bands = (width, -(-x.shape[0] // blocked.ALIGN) * blocked.ALIGN)  # token-minor padded bands
    out = [x.new_empty((x.shape[0], d_out)), x.new_empty(bands if save else (0,))]
    if not keep_state:
        return [*out, *(x.new_empty(0) for _ in _STATE)]
    rank, f32 = lora_A.shape[0], torch.float32
    return [
        *out, row_order.new_empty(d_out), col_order.new_empty(d_in), row_order.new_empty(d_out),
        col_order.new_empty(d_in), x.new_empty((), dtype=f32), col_order.new_empty(width),
        x.new_empty((rank, width), dtype=f32), x.new_empty((d_out, rank), dtype=f32),
    ]  # fmt: skip


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
    state: list[torch.Tensor],
    num_blocks: int,
    scale: float,
    path: str,
    merged: bool,
    needs: list[bool],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(dx, dx_a, db, dÂ, dB̂)``; entries not asked for by ``needs`` are empty tensors. ``x_saved``: x itself when
    ``adapter_is_x`` (gathered into bands here), else x_a already in the padded band layout. ``state``: what the
    forward kept (its orders and permuted factors), or empty tensors (then prepared here from the orders)."""
    need_x, need_xa, need_bias, need_A, need_B = needs
    with _on_device(grad_out), torch.autocast(grad_out.device.type, enabled=False):
        grad_out = grad_out.contiguous()
        orders = _orders_from_state(state, lora_A, lora_B) or blocked.prepare_orders(row_order, col_order)
        n_rows = grad_out.shape[0]
        chosen = "fused" if merged else resolve_path(path, n_rows, *weight.shape, num_blocks, grad_out.dtype,
                                                     grad_out.device, lora_A.shape[0])  # fmt: skip
        dy_bands = None
        if need_A or need_B or chosen == "blocked":
            dy_bands = blocked.gather_bands_t(grad_out, orders, "row", num_blocks)
        grad_x = grad_xa = None
        if chosen == "blocked":
            grad_x, grad_xa = blocked.blocked_input_grads(
                grad_out, dy_bands, weight, lora_A, lora_B, orders, num_blocks, scale,
                adapter_is_x=adapter_is_x, need_x=need_x, need_xa=need_xa,
            )  # fmt: skip
        elif need_x or need_xa:
            blk_row, blk_col, flag = orders.inv_row, orders.inv_col, orders.flag  # positions: see _forward_body
            if adapter_is_x:
                if need_x:  # dx = dY W0 + s·dY ΔW in one pass over W0
                    grad_x = _gemm(grad_out, None, weight, None, lora_A, lora_B, blk_col, blk_row, scale,
                                   transpose=True, has_base=True, merged=merged, num_blocks=num_blocks,
                                   flag=flag, positions=True)  # fmt: skip
            else:
                if need_x:
                    grad_x = grad_out @ weight
                if need_xa:
                    grad_xa = _gemm(grad_out, None, weight, None, lora_A, lora_B, blk_col, blk_row, scale,
                                    transpose=True, has_base=False, merged=False, num_blocks=num_blocks,
                                    flag=flag, positions=True)  # fmt: skip
        grad_bias = grad_out.sum(0) if need_bias else None
        grad_A = grad_B = None
        if need_A or need_B:
            xa_bands = blocked.gather_bands_t(x_saved, orders, "col", num_blocks) if adapter_is_x else x_saved
            grad_A, grad_B = blocked.factor_grads(dy_bands, xa_bands, n_rows, weight, lora_A, lora_B, orders,
                                                  num_blocks, scale)  # fmt: skip
    # custom ops return tensors only: an unused gradient is a fresh empty tensor (distinct objects, no aliasing).
    grads = (grad_x if need_x else None, grad_xa if need_xa else None, grad_bias, grad_A if need_A else None,
             grad_B if need_B else None)  # fmt: skip
    return tuple(grad_out.new_empty(0) if g is None else g for g in grads)


@_backward_op.register_fake
def _(grad_out, x_saved, adapter_is_x, weight, lora_A, lora_B, row_order, col_order, state, num_blocks, scale, path,
      merged, needs):  # fmt: skip
    need_x, need_xa, need_bias, need_A, need_B = needs
    n_rows, d_in = grad_out.shape[0], weight.shape[1]

    def maybe(flag, shape, like):
        return like.new_empty(shape) if flag else grad_out.new_empty(0)

    return (
        maybe(need_x, (n_rows, d_in), grad_out),
        maybe(need_xa, (n_rows, d_in), grad_out),
        maybe(need_bias, (weight.shape[0],), grad_out),
        maybe(need_A, lora_A.shape, lora_A),
        maybe(need_B, lora_B.shape, lora_B),
    )


class SMoATritonFunction(torch.autograd.Function):
    """2-D autograd.Function over the custom ops. ``x_adapter=None`` means "x itself" (dropout p = 0): its whole
    input gradient then comes back on x; a distinct ``x_adapter`` gets its own. W0 is frozen (no weight gradient).
    ``save``: keep what the factor gradient needs (False when no factor needs a gradient): x itself when x_a is x,
    else x_a gathered into the padded band layout."""

    @staticmethod
    @torch.amp.custom_fwd(device_type="cuda")
    def forward(ctx, x, x_adapter, weight, bias, lora_A, lora_B, row_order, col_order, num_blocks, scale, path, merged,
                save):  # fmt: skip
        ctx.adapter_is_x = x_adapter is None
        ctx.has_bias = bias is not None
        ctx.num_blocks, ctx.scale, ctx.path, ctx.merged = num_blocks, scale, path, merged
        out, xa_bands, *state = torch.ops.smoa_kernels.triton_forward(
            x, x_adapter, weight, bias, lora_A, lora_B, row_order, col_order, num_blocks, scale, path, merged,
            save and x_adapter is not None, save,
        )  # fmt: skip
        # x_a in the padded band layout replaces x_a (the same size up to <= 15 padding columns per block); without
        # dropout x itself is kept (no new tensor) and the bands are gathered again in backward.
        x_saved = x if save and x_adapter is None else xa_bands
        # the step's orders and permuted factors (save: O(d + r·d) elements), so the backward does not redo them
        ctx.save_for_backward(x_saved, weight, lora_A, lora_B, row_order, col_order, *state)
        return out

    @staticmethod
    @torch.amp.custom_bwd(device_type="cuda")
    def backward(ctx, grad_out):
        need_x, need_xa, _, need_bias, need_A, need_B = ctx.needs_input_grad[:6]
        needs = [need_x, need_xa and not ctx.adapter_is_x, need_bias and ctx.has_bias, need_A, need_B]
        x_saved, weight, lora_A, lora_B, row_order, col_order, *state = ctx.saved_tensors
        grads = torch.ops.smoa_kernels.triton_backward(
            grad_out, x_saved, ctx.adapter_is_x, weight, lora_A, lora_B, row_order, col_order, state, ctx.num_blocks,
            ctx.scale, ctx.path, ctx.merged, needs,
        )  # fmt: skip
        grad_x, grad_xa, grad_bias, grad_A, grad_B = (g if flag else None for g, flag in zip(grads, needs))
        return grad_x, grad_xa, None, grad_bias, grad_A, grad_B, None, None, None, None, None, None, None


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
    if configs._interpreting() and not configs.capturing():  # (the compile gate only records launches)
        for name, tensor in (("x", x), ("lora_A", lora_A)):
            if tensor.dtype == torch.bfloat16:
                raise TypeError(
                    f"{name}.dtype=torch.bfloat16 cannot run under the Triton interpreter (TRITON_INTERPRET=1): it "
                    "stores bf16 as raw 16-bit integers, so its dots and casts would return wrong numbers; use "
                    "float16/float32 here, or the torch backend"
                )
    if torch.is_grad_enabled() and weight.requires_grad:
        raise ValueError("weight.requires_grad=True: the triton SMoA path treats W0 as frozen (SPEC §4)")


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
    path: str = "auto",
    merged_weight: bool = False,
) -> torch.Tensor:
    """Same signature and result as :func:`smoa_kernels.reference.smoa_linear_reference`, any leading dims in ``x``.

    Pass the very same tensor object as ``x`` and ``x_adapter`` for dropout p = 0 (dx is then one pass).
    ``path``: ``"auto"`` (default: :func:`smoa_kernels.cost_model.choose_path` per call, by the number of tokens),
    ``"fused"`` (the single-pass kernel, for small N) or ``"blocked"`` (vendor GEMMs on the K diagonal blocks, for
    training-sized N). ``merged_weight=True`` opts into the fused kernel's single-dot fast path (requires
    ``x_adapter is x``; rounds the update at W0's magnitude); it runs on the fused path.

    Orders are not checked here with a host sync: any content is memory-safe (indices are clamped on the device)
    and an order that is not a permutation makes the output and every gradient NaN (see
    :mod:`smoa_kernels.triton.blocked`). ``SMoALinear`` and the PEFT loaders validate orders where they enter.
    """
    _validate(x, x_adapter, weight, bias, lora_A, lora_B, row_order, col_order, num_blocks, scale)
    if not isinstance(path, str) or path not in PATHS:
        raise ValueError(f"path={path!r} must be one of {', '.join(map(repr, PATHS))}")
    if merged_weight and x_adapter is not x:
        raise ValueError("merged_weight=True requires x_adapter to be x itself (dropout p = 0)")
    if merged_weight and path == "blocked":
        raise ValueError("merged_weight=True is a fast path of the fused kernel: it cannot be combined with "
                         "path='blocked'")  # fmt: skip
    x, x_adapter, weight, bias, lora_A, lora_B = _autocast(x, x_adapter, weight, bias, lora_A, lora_B)
    if merged_weight or path == "fused":  # refused here, before any launch, when no fused config fits the device
        resolve_path("fused", 1, *weight.shape, num_blocks, x.dtype, x.device, lora_A.shape[0], x_adapter is not x)
    # The kernels read the bias and the orders as dense vectors (element i at offset i); every other operand reaches a
    # kernel with its strides, or through a torch op that honours them. A strided, offset or expanded vector
    # (``bias = t[::2]``) is made dense here: d elements, and a no-op when it already is (autograd flows through).
    bias = None if bias is None else bias.contiguous()
    row_order, col_order = row_order.contiguous(), col_order.contiguous()
    same = x_adapter is x
    d_in = weight.shape[1]
    lead = x.shape[:-1]
    x2 = x.reshape(-1, d_in)
    xa2 = None if same else x_adapter.reshape(-1, d_in)
    save = torch.is_grad_enabled() and (lora_A.requires_grad or lora_B.requires_grad)
    y = SMoATritonFunction.apply(
        x2, xa2, weight, bias, lora_A, lora_B, row_order, col_order, num_blocks, float(scale), path,
        bool(merged_weight), save,
    )  # fmt: skip
    return y.reshape(*lead, weight.shape[0])
