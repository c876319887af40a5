"""The fast pure-PyTorch SMoA path (the ``torch`` backend; the CPU/MPS production path).

Works block by block in permuted coordinates (SPEC §3, KERNELS.md §2): block k reads the columns ``C_k`` of its input
and writes the rows ``R_k`` of its output, so only the K diagonal blocks are ever touched — no dense d_out×d_in ΔW,
no mask, and the weight-side gradient costs ``2ND²/K`` instead of ``2ND²``. Per block k, with ``M_k = W0[R_k, C_k]``::

    forward   ΔW_k = (B_k A_k) ⊙ M_k                 y[:, R_k] += s · x_a[:, C_k] ΔW_kᵀ
    backward  dx_a[:, C_k] += s · dY[:, R_k] ΔW_k      (ΔW_k regenerated, never saved)
              H_k  = s · (dY[:, R_k]ᵀ x_a[:, C_k]) ⊙ M_k
              dB_k = H_k A_kᵀ        dA_k = B_kᵀ H_k
    base      y = x W0ᵀ + b,  dx = dY W0,  db = Σ dY

FLOPs per step: (4 + 6/K)·N·D² (the exact floor of KERNELS.md §1) plus O(N·D) gathers. Memory: saved for backward
are ``x`` when there is no dropout (nothing new), W0 and the factors — nothing D²-sized. A distinct ``x_a`` (dropout's
output, private to the layer) is saved as its K gathered bands ``x_a[:, C_k]`` instead of itself when its dtype is
the factors' (the same bytes, one gather fewer in the backward); otherwise ``x_a`` itself. Every other gathered slice
(``dY[:, R_k]``, ``x[:, C_k]``, the per-block products) lives only inside one loop step, so the transient overhead is
about N·D/K elements; the scale s is folded into the anchor, the smallest operand. Column gathers use
``torch.gather`` with a broadcast index (multi-threaded on CPU, where ``index_select`` along dim 1 is serial), each
band its own contiguous buffer (GEMMs on column slices of one wide permuted buffer measured slower than the gathers
they save). With no dropout (``x_a is x``) the adapter's input gradient is added in place into the base one.
Precision follows :mod:`smoa_kernels.reference`: base in the input dtype, adapter in the factors' dtype.

Merged step (:func:`_use_merged`; KERNELS.md §1's "merged W_eff per step", exact when dropout p = 0): with no dropout,
one dtype for x, W0 and the factors (base and adapter precision then coincide, so nothing is rounded away), autocast
off, and ``d_out·d_in·K ≤ N·(d_in + d_out)``, :class:`SMoABlockwiseFunction` forms ``W_eff = W0 + s·ΔW`` (W0 with
its K diagonal blocks rewritten, one row band at a time) and runs ``y = x W_effᵀ + b`` and ``dx = dY W_eff``; only
the factor gradients ``H_k`` use the blocks (gathers of ``dY[:, R_k]`` and ``x[:, C_k]``). FLOPs (4 + 2/K)·N·D² plus
O(D²) for the merge, no scatter-adds. Memory: the same saved tensors (``x``, W0, the factors; W_eff is regenerated
in the backward, never saved); transient W_eff, d_out·d_in elements in the factors' dtype, alive for one GEMM in the
forward and one in the backward — by the size condition no more than the bands ``x[:, C_k]``, ``y_k`` of the
unmerged forward (N·(d_in + d_out)/K). At 1024×1024, fp32, N = 2048, r = 32, K = 2 (2 CPU threads): ≈1.8× the frozen
layer's step, against ≈2.3× unmerged (medians of interleaved runs).

Quantized bases (:mod:`smoa.peft.bnb`): :class:`SMoABlockwiseAdapterFunction` computes the adapter term alone,
``s · x_a ΔWᵀ``, with the same per-block loops, taking each anchor from a callable ``anchors(R_k, C_k)`` that returns
``W0[R_k][:, C_k]`` — e.g. dequantized from 4-bit data for that block only — so W0 is never needed densely; the base
term then comes from the quantized layer's own GEMM. The provider is called once per block in the forward and once
per block in the backward (the anchor is regenerated, never saved).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from smoa_kernels.blocks import block_bounds

__all__ = [
    "AnchorProvider",
    "SMoABlockwiseAdapterFunction",
    "SMoABlockwiseFunction",
    "smoa_adapter_blockwise",
    "smoa_linear_blockwise",
]

# anchors(R_k, C_k) -> W0[R_k][:, C_k] (|R_k|×|C_k|, any floating dtype): where a quantized base gets its anchors from
AnchorProvider = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def _plan(row_order, col_order, num_blocks):
    """``([((r0, r1), (c0, c1))], rows, cols)``: each block's bounds in permuted coordinates and the two orders with
    each block's chunk sorted. Within a block the order is immaterial (every operand is gathered with the same
    indices); ascending indices make every gather and scatter-add walk memory forward (cache-friendly)."""
    rb, cb = block_bounds(row_order.numel(), num_blocks), block_bounds(col_order.numel(), num_blocks)
    rows = torch.cat([row_order[a:b].sort().values for a, b in rb])
    cols = torch.cat([col_order[a:b].sort().values for a, b in cb])
    return list(zip(rb, cb)), rows, cols


def _blocks(plan, weight, lora_A, lora_B, scale, anchors=None):
    """Yield ``(rb, cb, R_k, C_k, A_k, B_k, s·M_k)`` per block: its bounds in permuted coordinates, its original
    indices, its factors and its anchor gathered in the factors' dtype with the scale folded in (|R_k|×|C_k|, the
    smallest operand, where s costs least). The anchor is gathered from ``weight``, or asked of ``anchors(R_k, C_k)``
    when a provider is given."""
    bounds, rows, cols = plan
    for rb, cb in bounds:
        R_k, C_k = rows[rb[0] : rb[1]], cols[cb[0] : cb[1]]
        if anchors is None:
            anchor = _gather_cols(weight.index_select(0, R_k), C_k)
        else:
            anchor = anchors(R_k, C_k)
        A_k, B_k = lora_A.index_select(1, C_k), lora_B.index_select(0, R_k)
        yield rb, cb, R_k, C_k, A_k, B_k, anchor.to(lora_A.dtype) * scale


def _gather_cols(t, index, dtype=None):
    """``t[:, index]`` as a new contiguous tensor, in ``dtype`` if given. On CPU ``index_select`` along dim 1 runs on
    one thread; ``torch.gather`` with a broadcast index runs on all of them (≈1.4× faster on 2 threads at 2048×512),
    but is the slower loop on one."""
    serial = t.device.type == "cpu" and not torch.compiler.is_compiling() and torch.get_num_threads() == 1
    if serial:  # index_select is the faster serial loop (Dynamo cannot trace get_num_threads: gather there)
        out = t.index_select(1, index)
    else:
        out = torch.gather(t, 1, index.expand(t.shape[0], -1))
    return out if dtype is None else out.to(dtype)


def _adapter_forward(blocks, x_adapter, out, dtype):
    """``out[:, R_k] += s · x_a[:, C_k] ΔW_kᵀ`` for every block, in place. Every operand of the block GEMM is its own
    contiguous buffer: a GEMM reading or writing column slices of a full-width permuted buffer (leading dimension d,
    a multiple of 4 KiB here) measured ≈20% slower than on contiguous bands, more than one wide gather saves.
    Returns the gathered bands ``[x_a[:, C_k]]`` (in ``dtype``)."""
    bands = []
    for _, _, R_k, C_k, A_k, B_k, anchor in blocks:
        x_k = _gather_cols(x_adapter, C_k, dtype)
        out.index_add_(1, R_k, (x_k @ ((B_k @ A_k) * anchor).T).to(out.dtype))
        bands.append(x_k)
    return bands


def _adapter_backward(blocks, grad_out, x_adapter, grad_xa, grad_A, grad_B, dtype, bands=None):
    """The adapter's share of the backward (module docstring), accumulated block by block into ``grad_xa``
    (in place, may be None) and written into ``grad_A``/``grad_B`` (None: not needed). ``bands``: the forward's
    gathered ``[x_a[:, C_k]]`` if it saved them (else x_a is gathered again, one band at a time)."""
    for k, (_, _, R_k, C_k, A_k, B_k, anchor) in enumerate(blocks):
        dy_k = _gather_cols(grad_out, R_k, dtype)
        if grad_xa is not None:
            grad_xa.index_add_(1, C_k, (dy_k @ ((B_k @ A_k) * anchor)).to(grad_xa.dtype))
        if grad_A is not None or grad_B is not None:
            x_k = bands[k] if bands is not None else _gather_cols(x_adapter, C_k, dtype)
            h_k = (dy_k.T @ x_k) * anchor
            if grad_A is not None:  # autocast may have computed these in half precision
                grad_A[:, C_k] = (B_k.T @ h_k).to(grad_A.dtype)
            if grad_B is not None:
                grad_B[R_k, :] = (h_k @ A_k.T).to(grad_B.dtype)


def _use_merged(x, x_adapter, weight, lora_A, lora_B, num_blocks):
    """Whether the step merges ``W_eff = W0 + s·ΔW`` instead (module docstring, "Merged step"): no dropout (x_a is x),
    one dtype for x, W0 and the factors (so base and adapter precision coincide), autocast off, and the D² transient
    no larger than the band transient ``N·(d_in + d_out)/K`` the unmerged forward allocates anyway."""
    d_out, d_in = weight.shape
    return (
        x_adapter is None
        and x.dtype == weight.dtype == lora_A.dtype == lora_B.dtype
        and not torch.is_autocast_enabled(x.device.type)
        and d_out * d_in * num_blocks <= x.shape[0] * (d_in + d_out)
    )


def _merged_weight(plan, weight, lora_A, lora_B, scale):
    """``W_eff = W0 + s·ΔW``: W0 with each diagonal block ``M_k`` replaced by ``M_k + s·(B_k A_k) ⊙ M_k``, built one
    row band ``W0[R_k]`` at a time (its block columns rewritten, then the band copied into place: the row bands
    partition W_eff, so every row is written once); d_out×d_in, freed by the caller after one GEMM."""
    bounds, rows, cols = plan
    merged = torch.empty_like(weight)
    for (r0, r1), (c0, c1) in bounds:
        R_k, C_k = rows[r0:r1], cols[c0:c1]
        band = weight.index_select(0, R_k)
        m_k = _gather_cols(band, C_k)
        delta = lora_B.index_select(0, R_k) @ lora_A.index_select(1, C_k)
        band.index_copy_(1, C_k, torch.addcmul(m_k, delta, m_k, value=scale))
        merged.index_copy_(0, R_k, band)
    return merged


class SMoABlockwiseFunction(torch.autograd.Function):
    """2-D autograd.Function. ``x_adapter=None`` means ``x`` itself (no dropout): the whole input gradient is then
    returned on ``x`` (Dynamo cannot trace a Function given the same tensor twice)."""

    @staticmethod
    def forward(ctx, x, x_adapter, weight, bias, lora_A, lora_B, row_order, col_order, num_blocks, scale):
        ctx.same_input = x_adapter is None
        x_adapter = x if x_adapter is None else x_adapter
        plan = _plan(row_order, col_order, num_blocks)
        ctx.merged = _use_merged(x, None if ctx.same_input else x_adapter, weight, lora_A, lora_B, num_blocks)
        if ctx.merged:  # y = x W_effᵀ + b: the adapter's GEMM and the scatter into y folded into the base GEMM
            out = F.linear(x, _merged_weight(plan, weight, lora_A, lora_B, scale), bias)
            ctx.gathered = False
            ctx.save_for_backward(weight, lora_A, lora_B, row_order, col_order, x)
            ctx.num_blocks, ctx.scale = num_blocks, scale
            device = x.device.type
            ctx.autocast = (device, torch.get_autocast_dtype(device), torch.is_autocast_enabled(device))
            return out
        out = F.linear(x, weight, bias)
        bands = _adapter_forward(_blocks(plan, weight, lora_A, lora_B, scale), x_adapter, out, lora_A.dtype)
        # a distinct x_a (dropout's output, private to the layer) is saved as its gathered bands, in place of x_a
        # itself: the same bytes when the dtypes match, one gather of x_a fewer in the backward. x_a is x: x is
        # saved (it may be shared, e.g. by q/k/v, where gathered copies would be extra memory) and gathered again.
        ctx.gathered = not ctx.same_input and lora_A.dtype == x_adapter.dtype and any(ctx.needs_input_grad[4:6])
        ctx.xa_shape = x_adapter.shape
        saved = bands if ctx.gathered else [x_adapter]
        ctx.save_for_backward(weight, lora_A, lora_B, row_order, col_order, *saved)
        del bands, saved
        ctx.num_blocks, ctx.scale = num_blocks, scale
        device = x.device.type  # backward runs under the forward's autocast state (what custom_bwd does, any device)
        ctx.autocast = (device, torch.get_autocast_dtype(device), torch.is_autocast_enabled(device))
        return out

    @staticmethod
    def backward(ctx, grad_out):
        device, dtype, enabled = ctx.autocast
        with torch.autocast(device_type=device, dtype=dtype, enabled=enabled):
            return SMoABlockwiseFunction._backward(ctx, grad_out)

    @staticmethod
    def _backward(ctx, grad_out):
        weight, lora_A, lora_B, row_order, col_order, *saved = ctx.saved_tensors
        bands, x_adapter = (saved, None) if ctx.gathered else (None, saved[0])
        need_x, need_xa, _, need_b, need_A, need_B = ctx.needs_input_grad[:6]
        need_xa = need_xa or (ctx.same_input and need_x)
        plan = _plan(row_order, col_order, ctx.num_blocks)
        if ctx.merged:  # dx = dY W_eff (W_eff regenerated, never saved); only the factor gradients remain
            grad_x = grad_out @ _merged_weight(plan, weight, lora_A, lora_B, ctx.scale) if need_x else None
            need_xa = False
        else:
            grad_x = grad_out @ weight if need_x else None
        grad_bias = grad_out.sum(0) if need_b else None
        grad_xa = grad_A = grad_B = None
        if need_xa:  # one tensor: the adapter part is added in place into the base gradient
            if ctx.same_input and grad_x is not None:
                grad_xa = grad_x
            elif x_adapter is not None:
                grad_xa = torch.zeros_like(x_adapter)
            else:  # x_a was saved as its bands (same dtype and device)
                grad_xa = bands[0].new_zeros(ctx.xa_shape)
        if need_A:
            grad_A = torch.zeros_like(lora_A)
        if need_B:
            grad_B = torch.zeros_like(lora_B)
        if need_xa or need_A or need_B:
            blocks = _blocks(plan, weight, lora_A, lora_B, ctx.scale)
            _adapter_backward(blocks, grad_out, x_adapter, grad_xa, grad_A, grad_B, lora_A.dtype, bands)
        if grad_xa is grad_x:
            grad_xa = None
        return grad_x, grad_xa, None, grad_bias, grad_A, grad_B, None, None, None, None


def smoa_linear_blockwise(x, x_adapter, weight, bias, lora_A, lora_B, row_order, col_order, num_blocks, scale):
    """Same signature and result as :func:`smoa_kernels.reference.smoa_linear_reference`, any leading dims."""
    lead = x.shape[:-1]
    x2d = x.reshape(-1, x.shape[-1])
    xa2d = None if x_adapter is x else x_adapter.reshape(-1, x.shape[-1])
    y = SMoABlockwiseFunction.apply(
        x2d, xa2d, weight, bias, lora_A, lora_B, row_order, col_order, num_blocks, float(scale)
    )
    return y.reshape(*lead, weight.shape[0])


class SMoABlockwiseAdapterFunction(torch.autograd.Function):
    """2-D autograd.Function for the adapter term alone, ``s · x_a ΔWᵀ`` (no base GEMM, no bias), with every anchor
    ``W0[R_k][:, C_k]`` taken from ``anchors`` (an :data:`AnchorProvider`) block by block, in the forward and again in
    the backward. Gradients: ``x_a`` (the adapter's share only), ``A`` and ``B``. The result has ``x_a``'s dtype."""

    @staticmethod
    def forward(ctx, x_adapter, lora_A, lora_B, row_order, col_order, num_blocks, scale, anchors):
        out = x_adapter.new_zeros(x_adapter.shape[0], row_order.numel(), dtype=lora_A.dtype)
        plan = _plan(row_order, col_order, num_blocks)
        _adapter_forward(_blocks(plan, None, lora_A, lora_B, scale, anchors), x_adapter, out, lora_A.dtype)
        ctx.save_for_backward(x_adapter, lora_A, lora_B, row_order, col_order)
        ctx.num_blocks, ctx.scale, ctx.anchors = num_blocks, scale, anchors
        device = x_adapter.device.type
        ctx.autocast = (device, torch.get_autocast_dtype(device), torch.is_autocast_enabled(device))
        return out.to(x_adapter.dtype)

    @staticmethod
    def backward(ctx, grad_out):
        device, dtype, enabled = ctx.autocast
        x_adapter, lora_A, lora_B, row_order, col_order = ctx.saved_tensors
        need_xa, need_A, need_B = ctx.needs_input_grad[:3]
        grad_xa = torch.zeros_like(x_adapter) if need_xa else None
        grad_A = torch.zeros_like(lora_A) if need_A else None
        grad_B = torch.zeros_like(lora_B) if need_B else None
        if need_xa or need_A or need_B:
            with torch.autocast(device_type=device, dtype=dtype, enabled=enabled):
                plan = _plan(row_order, col_order, ctx.num_blocks)
                blocks = _blocks(plan, None, lora_A, lora_B, ctx.scale, ctx.anchors)
                _adapter_backward(blocks, grad_out, x_adapter, grad_xa, grad_A, grad_B, lora_A.dtype)
        return grad_xa, grad_A, grad_B, None, None, None, None, None


def smoa_adapter_blockwise(
    x_adapter: torch.Tensor,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    row_order: torch.Tensor,
    col_order: torch.Tensor,
    num_blocks: int,
    scale: float,
    anchors: AnchorProvider,
) -> torch.Tensor:
    """``s · x_adapter ΔWᵀ`` (SPEC §2, the adapter term only; any leading dims) with ``M_k = anchors(R_k, C_k)``.

    ``smoa_linear_blockwise(x, x_a, W0, b, ...) == F.linear(x, W0, b) + smoa_adapter_blockwise(x_a, ..., anchors)``
    for ``anchors = lambda R, C: W0[R][:, C]``; a quantized base passes a provider that dequantizes one block at a time.
    """
    lead = x_adapter.shape[:-1]
    y = SMoABlockwiseAdapterFunction.apply(
        x_adapter.reshape(-1, x_adapter.shape[-1]), lora_A, lora_B, row_order, col_order, num_blocks, float(scale),
        anchors,
    )  # fmt: skip
    return y.reshape(*lead, row_order.numel())
