"""The fused multi-adapter forward for small N (decode, short prefill): one kernel serves every adapter segment.

Math (SPEC §3, per adapter a): ``y[t] = x[t] W0ᵀ + b + x[t] (U_a V_a ⊙ W0)ᵀ`` with the block-extended factors of the
single-adapter fused kernel (:mod:`smoa_kernels.triton.fused`): ``U_a[o, k·r + j] = s_a·B̂_a[o, j]·[blk_row[o] = k]``,
``V_a[k·r + j, c] = Â_a[j, c]·[blk_col[c] = k]``, so ``U_a V_a = s_a·(B̂_a Â_a) ⊙ blockmask`` exactly. They are
stacked per slot (0: base only, all zeros; 1 + a: adapter a; T + 1: the poison slot, U = NaN) and built once per
:class:`~smoa_kernels.multi_adapter.MultiAdapterBank` and activation dtype, not per call.

Work decomposition. Tokens are sorted by slot (:func:`smoa_kernels.multi_adapter.build_segments`, on the device).
Program ``pid`` handles output tile ``pid // n_work`` and work item ``pid % n_work``, a token tile of BLOCK_N sorted
positions inside one segment; the kernel finds which from the segment offsets itself (a scalar walk over the
segments' tile counts), so the table does not depend on the config and nothing is read on
the host. ``n_work = cdiv(N, BLOCK_N) + n_seg`` bounds the tiles of any segmentation; programs past the last tile
return at once. The programs of one output tile are adjacent in launch order: the W0 tile (BLOCK_O × d_in) is read
from HBM once and from L2 by the other segments' programs. Per iteration the loop is the fused kernel's
(``P = U_tile V_tile``, ``Δ = P ⊙ W0_tile``, two accumulators), with the token tile gathered through ``perm`` and the
output scattered back through it. Cost per segment tile: the rank product (2·RANK_PAD FLOPs per weight element) and
the two dots; a segment shorter than BLOCK_N pads its dots (smoa_kernels.cost_model_multi models both).

An out-of-range adapter index lands in the poison slot: its rows come out NaN, nothing is read out of bounds.
Forward only (no autograd.Function): :func:`smoa_kernels.multi_adapter.multi_adapter_linear` refuses a call that
needs a gradient on this path.
"""

from __future__ import annotations

import contextlib
import threading

import torch

from smoa_kernels.blocks import block_ids
from smoa_kernels.triton import configs
from smoa_kernels.triton.configs import tl, triton

__all__ = ["KERNEL", "MAX_RANK_PAD", "multi_adapter_forward", "serves", "triton_operands"]

KERNEL = "multi_gemm"
# The largest block-extended rank pad served: the U tile (BLOCK_O × RANK_PAD) lives in registers and the V tile in
# every pipeline stage; 64 keeps every shipped config under 99 KB of shared memory (the least supported GPU).
MAX_RANK_PAD = 64
_HALF, _FP32 = ("fp16", "bf16"), ("fp32",)
# Tiles of the single-adapter fused kernel (no wgmma waits at 32 output rows); BLOCK_N = 16 first: decode segments
# are short, and a segment shorter than BLOCK_N pads its dots.
CONFIGS = [
    {"BLOCK_O": 32, "BLOCK_N": 16, "BLOCK_R": 64, "num_warps": 4, "num_stages": 3, "dtypes": _HALF},
    {"BLOCK_O": 32, "BLOCK_N": 16, "BLOCK_R": 16, "num_warps": 4, "num_stages": 3, "dtypes": _FP32},
    {"BLOCK_O": 32, "BLOCK_N": 32, "BLOCK_R": 64, "num_warps": 4, "num_stages": 4, "dtypes": _HALF},
]


def _multi_gemm_kernel(
    X,
    OUT,
    BIAS,
    W,
    U,
    V,
    PERM,
    OFFSETS,
    n_rows,
    d_out,
    d_red,
    n_seg,
    n_bucket,
    stride_xn,
    stride_on,
    stride_wo,
    stride_us,
    stride_uo,
    stride_vs,
    stride_vt,
    HAS_BIAS: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    RANK_PAD: tl.constexpr,
    BLOCK_O: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_R: tl.constexpr,
):
    """``OUT[t, o] = Σ_c X[t, c] W[o, c] (1 + P_a[o, c]) + bias[o]`` for the tokens ``t`` of one segment tile,
    ``P_a = U_a V_a`` of the segment's slot (module docstring). X, W, U, V row-major with unit inner stride."""
    pid = tl.program_id(0)
    n_work = (n_rows + BLOCK_N - 1) // BLOCK_N + n_seg
    pid_o = pid // n_work
    work = pid % n_work

    # which segment and which of its tiles: walk the segments' tile counts cdiv(len_s, BLOCK_N) (T + 2 scalar
    # steps; no tl.sum/tl.cumsum, whose combine functions the interpreter cannot run when Triton was imported compiled)
    seg = n_seg
    row0 = 0
    row_stop = 0
    tiles_before = 0
    start = tl.load(OFFSETS)
    for s in range(0, n_seg):
        stop = tl.load(OFFSETS + s + 1)
        tiles = (stop - start + BLOCK_N - 1) // BLOCK_N
        hit = (work >= tiles_before) & (work < tiles_before + tiles)
        seg = tl.where(hit, s, seg)
        row0 = tl.where(hit, start + (work - tiles_before) * BLOCK_N, row0)
        row_stop = tl.where(hit, stop, row_stop)
        tiles_before += tiles
        start = stop
    if seg >= n_seg:  # past the last tile of the batch
        return

    offs_j = row0 + tl.arange(0, BLOCK_N)
    mask_n = offs_j < row_stop
    tok = tl.load(PERM + offs_j, mask=mask_n, other=0).to(tl.int64)
    offs_o = pid_o.to(tl.int64) * BLOCK_O + tl.arange(0, BLOCK_O)
    mask_o = offs_o < d_out
    offs_t = tl.arange(0, RANK_PAD)
    offs_k = tl.arange(0, BLOCK_R)
    dot_dtype = X.dtype.element_ty
    slot = seg.to(tl.int64)

    u = tl.load(U + slot * stride_us + offs_o[:, None] * stride_uo + offs_t[None, :], mask=mask_o[:, None], other=0.0)
    w_ptrs = W + offs_o[:, None] * stride_wo + offs_k[None, :]
    x_ptrs = X + tok[None, :] * stride_xn + offs_k[:, None]
    v_ptrs = V + slot * stride_vs + offs_t[:, None] * stride_vt + offs_k[None, :]

    acc = tl.full((BLOCK_O, BLOCK_N), 0.0, tl.float32)
    acc_d = tl.full((BLOCK_O, BLOCK_N), 0.0, tl.float32)
    tl.assume(d_red > 0)  # the launcher never launches d_red = 0 (as the fused kernel: no zero-trip path)
    for r_start in range(0, d_red, BLOCK_R):
        mask_r = offs_k < d_red - r_start
        v = tl.load(v_ptrs, mask=mask_r[None, :], other=0.0)
        p = tl.dot(u, v, input_precision=DOT_PRECISION)
        w = tl.load(w_ptrs, mask=mask_o[:, None] & mask_r[None, :], other=0.0)
        x_t = tl.load(x_ptrs, mask=mask_r[:, None] & mask_n[None, :], other=0.0)
        delta = p.to(dot_dtype) * w
        acc_d = tl.dot(delta, x_t, acc_d, input_precision=DOT_PRECISION)
        acc = tl.dot(w, x_t, acc, input_precision=DOT_PRECISION)
        v_ptrs += BLOCK_R
        w_ptrs += BLOCK_R
        x_ptrs += BLOCK_R

    acc += acc_d
    if HAS_BIAS:
        acc += tl.load(BIAS + offs_o, mask=mask_o, other=0.0).to(tl.float32)[:, None]
    tl.store(
        OUT + tok[None, :] * stride_on + offs_o[:, None],
        acc.to(OUT.dtype.element_ty),
        mask=mask_o[:, None] & mask_n[None, :],
    )


def _register() -> None:
    """Register the kernel with :mod:`smoa_kernels.triton.configs` (its configs, source, autotune key and lock), so
    that it is launched through ``configs.launch`` (interpreter, deterministic mode, autotune, the compile gate's
    capture) like every other kernel, without editing that module."""
    if KERNEL in configs.KERNEL_CONFIGS:
        return
    configs.KERNEL_CONFIGS[KERNEL] = CONFIGS
    configs.KERNEL_SOURCES[KERNEL] = (__name__, "_multi_gemm_kernel")
    configs._AUTOTUNE_KEYS[KERNEL] = ["d_out", "d_red", "n_bucket", "RANK_PAD", "HAS_BIAS", "DOT_PRECISION"]
    configs._RESET_TO_ZERO[KERNEL] = None
    configs._RESTORE_VALUE[KERNEL] = None
    configs._ACTIVATION_ARG[KERNEL] = "X"
    configs._AUTOTUNE_LOCKS[KERNEL] = threading.Lock()


_register()


def _rank_pad(bank) -> int:
    return configs._rank_pad(bank.num_blocks * bank.rank)


def serves(bank, dtype: torch.dtype) -> tuple[bool, str]:
    """Whether the kernel serves this bank's rank layout in ``dtype``: ``(True, "")`` or ``(False, reason)``."""
    if triton is None:
        return False, configs.TRITON_IMPORT_ERROR
    if dtype not in configs.FLOAT_DTYPES:
        return False, f"dtype {dtype} is not float32/float16/bfloat16"
    pad = _rank_pad(bank)
    if pad > MAX_RANK_PAD:
        return False, (f"num_blocks={bank.num_blocks} × r_k={bank.rank} needs a block-extended rank pad of {pad} > "
                       f"{MAX_RANK_PAD}, more than the multi-adapter kernel serves; use backend='torch'")  # fmt: skip
    return True, ""


def triton_operands(bank, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """The stacked block-extended factors ``(U, V)`` of every slot in ``dtype`` (module docstring): U
    (T + 2, d_out, RANK_PAD), V (T + 2, RANK_PAD, d_in padded to 16); built once per bank and dtype."""
    cached = bank._triton_operands.get(dtype)
    if cached is not None:
        return cached
    weight, K, rank = bank.weight, bank.num_blocks, bank.rank
    d_out, d_in = weight.shape
    pad, red_pad = _rank_pad(bank), -(-d_in // 16) * 16
    T = bank.num_adapters
    device = weight.device
    u = torch.zeros((T + 2, d_out, pad), dtype=dtype, device=device)
    v = torch.zeros((T + 2, pad, red_pad), dtype=dtype, device=device)
    u[T + 1] = float("nan")  # the poison slot: P = NaN, so every output of an out-of-range token is NaN
    blocks = torch.arange(K, device=device)
    on_row = block_ids(bank.row_order, K, torch.int64)[:, None] == blocks  # d_out × K
    on_col = block_ids(bank.col_order, K, torch.int64)[None, :] == blocks[:, None]  # K × d_in
    for a in range(T):
        A, B, s = bank.lora_A[a], bank.lora_B[a], bank.scales[a]
        u_a = torch.where(on_row[:, :, None], B[:, None, :] * s, 0)  # d_out × K × r
        v_a = torch.where(on_col[:, None, :], A[None, :, :], 0)  # K × r × d_in
        u[a + 1, :, : K * rank] = u_a.reshape(d_out, K * rank).to(dtype)
        v[a + 1, : K * rank, :d_in] = v_a.reshape(K * rank, d_in).to(dtype)
    bank._triton_operands[dtype] = (u, v)
    return u, v


@torch.library.custom_op("smoa_kernels::multi_adapter_forward", mutates_args=())
def _forward_op(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    u: torch.Tensor,
    v: torch.Tensor,
    perm: torch.Tensor,
    offsets: torch.Tensor,
) -> torch.Tensor:
    """One launch of the kernel (2-D x, contiguous operands); opaque to torch.compile."""
    n_rows, d_in = x.shape
    d_out = weight.shape[0]
    out = torch.empty((n_rows, d_out), dtype=x.dtype, device=x.device)
    if n_rows == 0 or d_out == 0:
        return out
    if d_in == 0:
        return out.copy_((bias if bias is not None else out.new_zeros(d_out)).expand(n_rows, d_out))
    n_seg = offsets.numel() - 1

    def grid(meta):
        return (triton.cdiv(d_out, meta["BLOCK_O"]) * (triton.cdiv(n_rows, meta["BLOCK_N"]) + n_seg),)

    with torch.cuda.device(x.device) if x.is_cuda else contextlib.nullcontext():
        configs.launch(
            KERNEL,
            grid,
            x,
            out,
            bias if bias is not None else out,
            weight,
            u,
            v,
            perm,
            offsets,
            n_rows,
            d_out,
            d_in,
            n_seg,
            configs._n_bucket(n_rows),
            x.stride(0),
            out.stride(0),
            weight.stride(0),
            u.stride(0),
            u.stride(1),
            v.stride(0),
            v.stride(1),
            HAS_BIAS=bias is not None,
            DOT_PRECISION=configs._dot_precision(x.dtype),
            RANK_PAD=u.shape[2],
        )
    return out


@_forward_op.register_fake
def _(x, weight, bias, u, v, perm, offsets):
    return x.new_empty((x.shape[0], weight.shape[0]))


def multi_adapter_forward(
    x2: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, bank, segments
) -> torch.Tensor:
    """The fused forward on 2-D ``x2`` (base ``weight``, the layer's W0) for ``bank``'s adapters and the batch's
    ``segments``. Refuses (``ValueError`` / ``TypeError``, before any launch): a rank layout the kernel does not serve,
    CPU tensors without ``TRITON_INTERPRET=1``, bf16 under the interpreter (it stores bf16 as raw integers)."""
    ok, reason = serves(bank, x2.dtype)
    if not ok:
        raise ValueError(f"backend='triton' cannot serve this batch: {reason}")
    if x2.device.type == "cpu" and not configs._interpreting():
        raise ValueError("x is a CPU tensor: the triton kernels need CUDA tensors (or TRITON_INTERPRET=1 for testing)")
    if configs._interpreting() and not configs.capturing() and x2.dtype == torch.bfloat16:
        raise TypeError(
            "x.dtype=torch.bfloat16 cannot run under the Triton interpreter (TRITON_INTERPRET=1): it stores bf16 as "
            "raw 16-bit integers; use float16/float32 there, or backend='torch'"
        )
    if weight.dtype != x2.dtype:
        raise TypeError(f"x.dtype={x2.dtype} does not match weight.dtype={weight.dtype}")
    u, v = triton_operands(bank, x2.dtype)
    x2 = x2 if x2.stride(-1) == 1 else x2.contiguous()
    weight = weight if weight.stride(-1) == 1 else weight.contiguous()
    bias = None if bias is None else bias.contiguous()
    perm = segments.perm.to(torch.int32)
    offsets = segments.offsets.to(torch.int32)
    return torch.ops.smoa_kernels.multi_adapter_forward(x2, weight, bias, u, v, perm, offsets)
