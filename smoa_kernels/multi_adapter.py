"""Many SMoA adapters of one base layer in one batch: ``y[t] = x[t] W0ᵀ + b + s_a · x[t] ΔW_aᵀ``, ``a = index[t]``.

Every adapter of one base shares W0, the bias and the spectral orders (hence the blocks R_k × C_k and the anchors
``W0[R_k, C_k]``); an adapter differs only in its factors ``(Â_a, B̂_a)`` and its scale ``s_a``. A token whose index is
``-1`` gets the base layer only. This module is the reference, the torch path, the segment table and the entry point
:func:`multi_adapter_linear`; the fused small-N Triton forward is :mod:`smoa_kernels.triton.multi_adapter`.

Segment table (:func:`build_segments`, on the device, no host sync, once per batch and shareable by every layer of
the batch): each token gets a *slot* — 0 for base-only, ``1 + a`` for adapter ``a``, ``T + 1`` for an index out of
range — tokens are stably sorted by slot (``perm``) and ``offsets[s] : offsets[s + 1]`` are the positions in ``perm``
of slot ``s`` (counts by a scatter-add into ``T + 2`` bins, so no shape depends on the data).

Paths (``backend=``):

* ``"torch"`` — the base GEMM once for all N tokens, then the blocked adapter term (per block k:
  ``(B_k A_k) ⊙ M_k``, one GEMM on the segment's gathered tokens and columns ``C_k``) per adapter segment,
  scatter-added into the rows of its tokens. Reads the segment offsets on the host once per batch (one
  device-to-host copy of T + 3 integers, cached on the :class:`AdapterSegments`). Built from differentiable torch
  ops: autograd works (gradients of x, bias and every adapter's factors).
* ``"triton"`` — :mod:`smoa_kernels.triton.multi_adapter`: one kernel, each program one output tile × one token tile
  of one segment, programs of one output tile adjacent so that W0's tile is read from HBM once and from L2 by the
  others; the ΔW_a tile is generated in registers from the W0 tile as in the single-adapter fused kernel. Forward
  only: refused (``ValueError``) when autograd would need a gradient — use ``backend="torch"`` for that.
* ``"auto"`` — for CUDA tensors when no gradient is needed and the kernel serves the factors' block-extended rank,
  whichever of the two :mod:`smoa_kernels.cost_model_multi` estimates faster for N tokens over T adapters (host
  arithmetic, no sync); torch otherwise.

Bad ``adapter_index``: a wrong dtype (not int32/int64), shape (not ``x.shape[:-1]``) or device raises before anything
runs. Values outside ``[-1, T)``: with ``check_index=True`` (the default for CPU tensors, where the check costs no
sync) a ``ValueError`` naming the first bad value and its token; on CUDA the default is no host sync and the token's
output row is NaN (the kernel reads a poison slot: no out-of-bounds read; the torch path fills the rows with NaN).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F

from smoa_kernels.reference import smoa_linear_reference

__all__ = [
    "AdapterFactors",
    "AdapterSegments",
    "MultiAdapterBank",
    "build_segments",
    "multi_adapter_linear",
    "multi_adapter_reference",
    "multi_adapter_torch",
]

BACKENDS = ("auto", "torch", "triton")
BASE_NAME = "__base__"  # PEFT's name for "no adapter" in adapter_names=
INDEX_DTYPES = (torch.int32, torch.int64)


@dataclasses.dataclass(frozen=True)
class AdapterFactors:
    """One adapter's factors in the LoRA-shaped layout of SPEC §3: ``lora_A`` (r_k × d_in), ``lora_B`` (d_out × r_k),
    its scale ``s = α / r``. ``num_blocks``, ``row_order``, ``col_order`` (optional): what the adapter was trained
    with; when given they must equal the batch's (checked once, when a :class:`MultiAdapterBank` is built).
    ``block_ranks`` (optional): uneven block ranks, stored zero-padded to r_k = max (as :mod:`smoa_kernels.reference`
    stores them) — served as they are."""

    lora_A: torch.Tensor
    lora_B: torch.Tensor
    scale: float = 1.0
    num_blocks: int | None = None
    row_order: torch.Tensor | None = None
    col_order: torch.Tensor | None = None
    block_ranks: tuple[int, ...] | None = None


def _as_factors(adapter, position: int) -> AdapterFactors:
    if isinstance(adapter, AdapterFactors):
        return adapter
    if isinstance(adapter, Mapping):
        unknown = set(adapter) - {f.name for f in dataclasses.fields(AdapterFactors)}
        if unknown:
            raise TypeError(f"adapters[{position}] has unknown keys {sorted(unknown)}")
        return AdapterFactors(**adapter)
    if isinstance(adapter, (tuple, list)) and len(adapter) in (2, 3):
        return AdapterFactors(*adapter)
    raise TypeError(
        f"adapters[{position}] must be an AdapterFactors, a mapping with lora_A/lora_B/scale or a tuple "
        f"(lora_A, lora_B[, scale]), got {type(adapter).__name__}"
    )


@dataclasses.dataclass
class AdapterSegments:
    """Tokens grouped by adapter (module docstring): ``perm`` (N, int64, tokens sorted by slot, stable),
    ``offsets`` (T + 3, int64: slot s owns ``perm[offsets[s]:offsets[s+1]]``; slot 0 base-only, 1 + a adapter a,
    T + 1 out of range), ``num_adapters`` T. All on the index's device; ``host_offsets()`` copies the offsets to the
    host once (the torch path) and caches them."""

    perm: torch.Tensor
    offsets: torch.Tensor
    num_adapters: int
    _host: list[int] | None = None

    @property
    def num_tokens(self) -> int:
        return self.perm.numel()

    def host_offsets(self) -> list[int]:
        if self._host is None:
            self._host = [int(v) for v in self.offsets.tolist()]
        return self._host


def _check_index(adapter_index: torch.Tensor, lead: tuple[int, ...], device: torch.device) -> None:
    if not isinstance(adapter_index, torch.Tensor):
        raise TypeError(f"adapter_index must be a torch.Tensor, got {type(adapter_index).__name__}")
    if adapter_index.dtype not in INDEX_DTYPES:
        raise TypeError(f"adapter_index.dtype={adapter_index.dtype} must be torch.int32 or torch.int64")
    if tuple(adapter_index.shape) != tuple(lead) and not (adapter_index.dim() == 1 and adapter_index.numel() ==
                                                          _prod(lead)):  # fmt: skip
        raise ValueError(
            f"adapter_index.shape={tuple(adapter_index.shape)} must be x.shape[:-1]={tuple(lead)} (or its flattening)"
        )
    if adapter_index.device != device:
        raise ValueError(f"adapter_index is on {adapter_index.device} but x is on {device}")


def _prod(shape) -> int:
    out = 1
    for s in shape:
        out *= int(s)
    return out


def _check_index_range(index: torch.Tensor, num_adapters: int) -> None:
    """``ValueError`` naming the first value outside ``[-1, T)`` (reads the index on the host)."""
    flat = index.reshape(-1)
    bad = (flat < -1) | (flat >= num_adapters)
    if bool(bad.any()):
        token = int(bad.nonzero()[0, 0])
        raise ValueError(
            f"adapter_index[{token}] = {int(flat[token])} is out of range: values must be -1 (base only) or in "
            f"[0, {num_adapters}) for {num_adapters} adapters"
        )


def build_segments(adapter_index: torch.Tensor, num_adapters: int) -> AdapterSegments:
    """The segment table of one batch (module docstring), on ``adapter_index``'s device, without a host sync.

    Compute it once per batch and pass it to every layer's call (``segments=``)."""
    if not isinstance(adapter_index, torch.Tensor) or adapter_index.dtype not in INDEX_DTYPES:
        raise TypeError("adapter_index must be an int32 or int64 tensor")
    index = adapter_index.reshape(-1).to(torch.int64)
    inside = (index >= 0) & (index < num_adapters)
    slot = torch.where(index == -1, 0, torch.where(inside, index + 1, num_adapters + 1))
    perm = torch.argsort(slot, stable=True)
    counts = torch.zeros(num_adapters + 2, dtype=torch.int64, device=index.device)
    counts.scatter_add_(0, slot, torch.ones_like(slot))
    offsets = torch.cat([counts.new_zeros(1), torch.cumsum(counts, 0)])
    return AdapterSegments(perm, offsets, num_adapters)


@dataclasses.dataclass
class MultiAdapterBank:
    """Every adapter one layer may serve, checked once against the layer (the per-layer helper a serving or PEFT
    integration keeps: build it when adapters are loaded, call it per batch). Holds the factors padded to the
    largest r_k (zero columns/rows: exact), the scales, and — built on first use per activation dtype, then cached —
    the Triton kernel's stacked block-extended factors (one slot per adapter plus the base-only and the poison slot).
    One copy of W0 and of the orders per layer: the bank holds references to the layer's own tensors."""

    weight: torch.Tensor
    row_order: torch.Tensor
    col_order: torch.Tensor
    num_blocks: int
    lora_A: list[torch.Tensor]  # r_max × d_in each
    lora_B: list[torch.Tensor]  # d_out × r_max each
    scales: list[float]
    rank: int  # r_max, the largest r_k
    names: tuple[str, ...] | None = None  # adapter names, when built from a mapping name -> factors
    _triton_operands: dict = dataclasses.field(default_factory=dict)

    @property
    def num_adapters(self) -> int:
        return len(self.lora_A)

    @classmethod
    def build(
        cls,
        weight: torch.Tensor,
        adapters: Sequence,
        row_order: torch.Tensor,
        col_order: torch.Tensor,
        num_blocks: int,
    ) -> MultiAdapterBank:
        """Validate ``adapters`` against the layer and pad them to one rank (see the class docstring). Refuses,
        naming the argument and value: a different ``num_blocks`` or orders than the batch's, factor shapes that do
        not fit the layer, factors of mixed dtypes or devices, orders that are not permutations. Compares orders
        given per adapter with ``torch.equal`` (one host sync here, never per batch)."""
        if isinstance(adapters, MultiAdapterBank):
            return adapters
        if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
            raise ValueError("weight must be a 2-D tensor (d_out, d_in)")
        d_out, d_in = weight.shape
        if isinstance(num_blocks, bool) or not isinstance(num_blocks, int):
            raise TypeError(f"num_blocks must be an int, got {num_blocks!r}")
        if not 1 <= num_blocks <= min(d_out, d_in):
            raise ValueError(f"num_blocks={num_blocks} must be in [1, min(d_out, d_in)={min(d_out, d_in)}]")
        for name, order, n in (("row_order", row_order, d_out), ("col_order", col_order, d_in)):
            if not isinstance(order, torch.Tensor) or order.dtype != torch.int64 or order.shape != (n,):
                found = (f"shape {tuple(order.shape)}, dtype={order.dtype}" if isinstance(order, torch.Tensor)
                         else type(order).__name__)  # fmt: skip
                raise ValueError(f"{name} must be a 1-D int64 tensor of length {n}, found {found}")
            if order.device != weight.device:
                raise ValueError(f"{name} is on {order.device} but weight is on {weight.device}")
            if not torch.equal(order.sort().values, torch.arange(n, device=order.device)):
                raise ValueError(f"{name} is not a permutation of range({n})")
        names = None
        if isinstance(adapters, Mapping) and adapters and all(isinstance(k, str) for k in adapters):
            names = tuple(adapters)
            if BASE_NAME in names:
                raise ValueError(f"{BASE_NAME!r} is reserved for base-only tokens; it cannot name an adapter")
            adapters = list(adapters.values())
        if isinstance(adapters, (torch.Tensor, Mapping)) or not isinstance(adapters, Sequence) or not adapters:
            raise TypeError(
                "adapters must be a non-empty sequence of AdapterFactors, a mapping name -> AdapterFactors, or a "
                "MultiAdapterBank"
            )
        factors = [_as_factors(a, i) for i, a in enumerate(adapters)]
        dtype = factors[0].lora_A.dtype
        rank = max(f.lora_A.shape[0] if f.lora_A.dim() == 2 else 0 for f in factors)
        As, Bs, scales = [], [], []
        for i, f in enumerate(factors):
            A, B = f.lora_A, f.lora_B
            if not isinstance(A, torch.Tensor) or not isinstance(B, torch.Tensor):
                raise TypeError(f"adapters[{i}]: lora_A and lora_B must be tensors")
            if A.dim() != 2 or A.shape[1] != d_in:
                raise ValueError(f"adapters[{i}].lora_A.shape={tuple(A.shape)} must be (r_k, d_in={d_in})")
            if B.dim() != 2 or tuple(B.shape) != (d_out, A.shape[0]):
                raise ValueError(
                    f"adapters[{i}].lora_B.shape={tuple(B.shape)} must be (d_out={d_out}, r_k={A.shape[0]})"
                )
            if A.dtype != dtype or B.dtype != dtype:
                raise TypeError(
                    f"adapters[{i}] has factors of dtype {A.dtype}/{B.dtype}, adapters[0] of {dtype}: one factor "
                    "dtype per batch"
                )
            if dtype not in (torch.float32, torch.float16, torch.bfloat16, torch.float64):
                raise TypeError(f"adapters[{i}]: factor dtype {dtype} is not a floating dtype")
            if A.device != weight.device or B.device != weight.device:
                raise ValueError(f"adapters[{i}]'s factors are on {A.device}, weight on {weight.device}")
            if f.num_blocks is not None and f.num_blocks != num_blocks:
                raise ValueError(
                    f"adapters[{i}].num_blocks={f.num_blocks} but the batch uses num_blocks={num_blocks}: adapters "
                    "with a different K cannot share one pass"
                )
            for name, own, shared in (("row_order", f.row_order, row_order), ("col_order", f.col_order, col_order)):
                if own is not None and own is not shared and not torch.equal(own.to(shared.device), shared):
                    raise ValueError(
                        f"adapters[{i}].{name} differs from the batch's {name}: adapters with different orders "
                        "have different blocks and cannot share one pass"
                    )
            if f.block_ranks is not None:
                ranks = tuple(int(r) for r in f.block_ranks)
                if len(ranks) != num_blocks or min(ranks) < 0 or max(ranks) > A.shape[0]:
                    raise ValueError(
                        f"adapters[{i}].block_ranks={ranks} must be {num_blocks} ranks in [0, r_k={A.shape[0]}] "
                        "(uneven ranks are stored zero-padded to r_k)"
                    )
            scale = f.scale
            if isinstance(scale, bool) or not isinstance(scale, (int, float)):
                raise TypeError(f"adapters[{i}].scale must be a python float, got {scale!r}")
            if not math.isfinite(scale):
                raise ValueError(f"adapters[{i}].scale={scale!r} must be finite (s = alpha / r)")
            pad = rank - A.shape[0]
            if pad:
                A = torch.cat([A, A.new_zeros(pad, d_in)], 0)
                B = torch.cat([B, B.new_zeros(d_out, pad)], 1)
            As.append(A)
            Bs.append(B)
            scales.append(float(scale))
        return cls(weight, row_order, col_order, num_blocks, As, Bs, scales, rank, names)

    def index_for(self, adapter_names: Sequence[str], shape: Sequence[int], device=None) -> torch.Tensor:
        """The int64 ``adapter_index`` of shape ``shape`` (x.shape[:-1], batch first) for PEFT-style per-sample
        ``adapter_names`` (one name per batch row; ``"__base__"`` → -1 = base only), for a bank built from a mapping
        name -> factors. Unknown names raise, naming them. Host-side (a list of names); one small copy to ``device``."""
        if self.names is None:
            raise ValueError("this MultiAdapterBank was built from a sequence, not a mapping name -> factors")
        shape = tuple(int(s) for s in shape)
        if not shape or len(adapter_names) != shape[0]:
            raise ValueError(f"{len(adapter_names)} adapter names for a batch of shape {shape}: one name per row")
        position = {name: i for i, name in enumerate(self.names)}
        unknown = sorted({n for n in adapter_names if n != BASE_NAME and n not in position})
        if unknown:
            raise ValueError(f"adapter names {unknown} are not in this bank ({list(self.names)})")
        rows = torch.tensor([-1 if n == BASE_NAME else position[n] for n in adapter_names], dtype=torch.int64)
        rows = rows.to(device if device is not None else self.weight.device)
        return rows.view(-1, *([1] * (len(shape) - 1))).expand(shape).contiguous()

    def __call__(self, x, bias, adapter_index, *, segments=None, backend="auto", check_index=None):
        """:func:`multi_adapter_linear` with this bank's layer and adapters."""
        return multi_adapter_linear(x, self.weight, bias, self, adapter_index, self.row_order, self.col_order,
                                    self.num_blocks, segments=segments, backend=backend,
                                    check_index=check_index)  # fmt: skip


def multi_adapter_reference(x, weight, bias, adapters, adapter_index, row_order, col_order, num_blocks):
    """The oracle: each adapter run alone through :func:`smoa_kernels.reference.smoa_linear_reference` on its tokens
    (boolean masks, no segment table), base-only tokens through ``F.linear``. Raises on an index out of range."""
    factors = [_as_factors(a, i) for i, a in enumerate(adapters)]
    lead = x.shape[:-1]
    x2 = x.reshape(-1, x.shape[-1])
    index = adapter_index.reshape(-1)
    _check_index_range(index, len(factors))
    y = F.linear(x2, weight, bias)
    for a, f in enumerate(factors):
        mask = index == a
        if bool(mask.any()):
            xa = x2[mask]
            y[mask] = smoa_linear_reference(xa, xa, weight, bias, f.lora_A, f.lora_B, row_order, col_order,
                                            num_blocks, f.scale)  # fmt: skip
    return y.reshape(*lead, weight.shape[0])


def multi_adapter_torch(x2, weight, bias, bank: MultiAdapterBank, segments: AdapterSegments) -> torch.Tensor:
    """The torch path on 2-D ``x2`` (module docstring). Precision as :mod:`smoa_kernels.reference`: base in x's
    dtype, each adapter term in the factors' dtype, cast and added."""
    y = F.linear(x2, weight, bias)  # updated in place below (linear's backward does not read its output)
    offsets = segments.host_offsets()
    T = bank.num_adapters
    poison = segments.perm[offsets[T + 1] : offsets[T + 2]]
    if poison.numel():
        y.index_fill_(0, poison, float("nan"))
    if offsets[T + 1] == offsets[1]:  # no adapter token
        return y
    K = bank.num_blocks
    rows = torch.tensor_split(bank.row_order, K)
    cols = torch.tensor_split(bank.col_order, K)
    fdtype = bank.lora_A[0].dtype
    anchors = [weight.index_select(0, R_k).index_select(1, C_k).to(fdtype) for R_k, C_k in zip(rows, cols)]
    for a in range(T):
        start, stop = offsets[a + 1], offsets[a + 2]
        if start == stop:
            continue
        tokens = segments.perm[start:stop]
        xs = x2.index_select(0, tokens).to(fdtype)
        A, B, s = bank.lora_A[a], bank.lora_B[a], bank.scales[a]
        parts = []
        for R_k, C_k, M_k in zip(rows, cols, anchors):
            delta = (B.index_select(0, R_k) @ A.index_select(1, C_k)) * M_k
            parts.append(xs.index_select(1, C_k) @ (delta.T * s))
        z = torch.cat(parts, 1)  # columns in the order of cat(R_1..R_K) = row_order
        adapter = z.new_zeros(z.shape).index_copy(1, bank.row_order, z)
        y.index_add_(0, tokens, adapter.to(y.dtype))
    return y


def _needs_grad(x, bias, bank: MultiAdapterBank) -> bool:
    if not torch.is_grad_enabled():
        return False
    tensors = [x, bank.weight, *bank.lora_A, *bank.lora_B] + ([bias] if bias is not None else [])
    return any(t.requires_grad for t in tensors)


def _cheaper_path(n_tokens: int, bank: MultiAdapterBank, element_bytes: int, device: torch.device) -> str:
    """``"triton"`` or ``"torch"``, whichever :mod:`smoa_kernels.cost_model_multi` estimates faster for N tokens over
    the bank's T adapters (host arithmetic only: N and T are known without reading the index)."""
    from smoa_kernels import cost_model, cost_model_multi

    gpu = cost_model.gpu_class_for(torch.cuda.get_device_name(device)) if device.type == "cuda" else "h100"
    d_out, d_in = bank.weight.shape
    args = (n_tokens, bank.num_adapters, d_out, d_in, bank.rank * bank.num_blocks, bank.num_blocks, element_bytes,
            gpu)  # fmt: skip
    fused = cost_model_multi.estimate("multi-fused", *args)
    return "triton" if fused <= cost_model_multi.estimate("multi-torch", *args) else "torch"


def multi_adapter_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    adapters,
    adapter_index: torch.Tensor,
    row_order: torch.Tensor,
    col_order: torch.Tensor,
    num_blocks: int,
    *,
    segments: AdapterSegments | None = None,
    backend: str = "auto",
    check_index: bool | None = None,
) -> torch.Tensor:
    """``y[t] = x[t] W0ᵀ + b + s_a · x[t] ΔW_aᵀ`` with ``a = adapter_index[t]`` (``-1``: base only); any leading dims.

    ``adapters``: a sequence of :class:`AdapterFactors` (or ``(lora_A, lora_B, scale)`` tuples / mappings) sharing
    this layer's W0, bias, orders and ``num_blocks``, or a prepared :class:`MultiAdapterBank` (checked once, reused:
    what a serving loop should pass). Adapters of different r_k are padded to the largest (exact). ``segments``: the
    batch's :func:`build_segments` (computed here if not given; share it across layers). ``backend``: ``"auto"``,
    ``"torch"`` or ``"triton"`` (module docstring). ``check_index``: check the index range on the host (default: for
    CPU tensors only; otherwise out-of-range tokens get NaN rows, without a host sync)."""
    if not isinstance(x, torch.Tensor) or x.dim() < 1:
        raise TypeError("x must be a tensor with a last dimension d_in")
    if backend not in BACKENDS:
        raise ValueError(f"backend={backend!r} must be one of {', '.join(map(repr, BACKENDS))}")
    if isinstance(adapters, MultiAdapterBank):
        bank = adapters
        if bank.weight.shape != weight.shape or bank.num_blocks != num_blocks:
            raise ValueError(
                f"the MultiAdapterBank was built for a {tuple(bank.weight.shape)} layer with num_blocks="
                f"{bank.num_blocks}, not {tuple(weight.shape)} with num_blocks={num_blocks}"
            )
        if bank.row_order is not row_order or bank.col_order is not col_order:
            raise ValueError("row_order/col_order are not the tensors the MultiAdapterBank was built with: pass "
                             "bank.row_order and bank.col_order (or call the bank)")  # fmt: skip
    else:
        bank = MultiAdapterBank.build(weight, adapters, row_order, col_order, num_blocks)
    d_out, d_in = weight.shape
    if x.shape[-1] != d_in:
        raise ValueError(f"x.shape={tuple(x.shape)}: the last dimension must be d_in={d_in}")
    if x.dtype != weight.dtype:
        raise TypeError(f"x.dtype={x.dtype} does not match weight.dtype={weight.dtype}")
    if x.device != weight.device:
        raise ValueError(f"x is on {x.device} but weight is on {weight.device}")
    if bias is not None and (bias.shape != (d_out,) or bias.dtype != weight.dtype or bias.device != x.device):
        raise ValueError(f"bias must have shape ({d_out},), dtype {weight.dtype} and x's device")
    lead = tuple(x.shape[:-1])
    _check_index(adapter_index, lead, x.device)
    if check_index is None:
        check_index = x.device.type == "cpu" and not torch.compiler.is_compiling()
    if check_index:
        _check_index_range(adapter_index, bank.num_adapters)
    if segments is None:
        segments = build_segments(adapter_index, bank.num_adapters)
    elif segments.num_adapters != bank.num_adapters or segments.num_tokens != _prod(lead):
        raise ValueError(
            f"segments were built for {segments.num_adapters} adapters and {segments.num_tokens} tokens; this call "
            f"has {bank.num_adapters} adapters and {_prod(lead)} tokens"
        )
    x2 = x.reshape(-1, d_in)
    grad = _needs_grad(x, bias, bank)
    chosen = backend
    if backend == "auto":
        from smoa_kernels.triton import multi_adapter as triton_multi

        chosen = "torch"
        if x.is_cuda and not grad and x2.shape[0] and triton_multi.serves(bank, x.dtype)[0]:
            chosen = _cheaper_path(x2.shape[0], bank, x.element_size(), x.device)
    if chosen == "triton":
        from smoa_kernels.triton import multi_adapter as triton_multi

        if grad:
            raise ValueError(
                "backend='triton' is a forward-only (inference) kernel but a gradient is needed here (grad mode is "
                "on and x, bias or a factor requires grad): run it under torch.no_grad(), or use backend='torch', "
                "which supports autograd"
            )
        y = triton_multi.multi_adapter_forward(x2, weight, bias, bank, segments)
    else:
        y = multi_adapter_torch(x2, weight, bias, bank, segments)
    return y.reshape(*lead, d_out)
