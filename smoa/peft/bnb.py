"""SMoA over bitsandbytes-quantized bases (QLoRA-style): ``Linear4bit`` (NF4/FP4, with or without double
quantization) and ``Linear8bitLt`` (LLM.int8(), ``has_fp16_weights=False``), in the layout of PEFT's own
``tuners/{lora,hira}/bnb.py`` (same class names, same merge behaviour and warnings).

What runs where, per step and per layer:

- **Base term**: ``self.base_layer(x)``, bitsandbytes' own GEMM (and its own gradient for ``x``).
- **Adapter term** ``s · dropout(x) ΔWᵀ``: :func:`smoa_kernels.blockwise.smoa_adapter_blockwise`, whose anchors
  ``W0[R_k][:, C_k]`` come from :class:`Bnb4bitAnchors` / :class:`Int8Anchors`: for each block the rows ``R_k`` are
  dequantized from the packed data (``|R_k| × d_in`` elements, about D²/K, transient) and the columns ``C_k`` taken,
  once in the forward and once in the backward. No dequantized copy of W0 is kept between calls.
- **Attach time**: the spectral partition (SPEC §1) is computed once from the dequantized W0 (one transient dense
  copy per layer, as PEFT's LoRA/HiRA inits do) and saved with the adapter like for a float base.
- **Merge** (``merge``/``merge_and_unload``): as PEFT does for LoRA/HiRA over bitsandbytes — dequantize, merge
  (SMoA's multiplicative ``W0 ⊙ (1 + Σ s·P)``), re-quantize into the same format, with PEFT's warning about rounding.
  ``merge_and_unload`` therefore returns bitsandbytes layers holding the re-quantized merged weight.

Backends: ``auto`` and ``torch`` use the blockwise path above on every device; ``reference`` dequantizes W0 densely
and uses the dense oracle (for tests); ``triton`` raises (its kernels read a dense W0; a fused dequantizing kernel is
future work).
"""

from __future__ import annotations

import sys
import warnings
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from peft.tuners.tuners_utils import BaseTunerLayer, check_adapters_to_merge

from smoa.backends import get_backend
from smoa.factors import check_smoa_arguments
from smoa.merge import modulated_merge, modulated_unmerge, smoa_modulation
from smoa_kernels.blockwise import smoa_adapter_blockwise
from smoa_kernels.reference import dense_delta_weight

from .config import SMoAConfig
from .layer import SMoALayer

__all__ = ["Bnb4bitAnchors", "Int8Anchors", "Linear4bit", "Linear8bitLt", "dispatch_bnb", "is_bnb_layer"]


def _bnb():
    """bitsandbytes if it is imported already (a model holding bitsandbytes layers has imported it), else None."""
    return sys.modules.get("bitsandbytes")


def is_bnb_layer(module: nn.Module) -> bool:
    """True for a bitsandbytes ``Linear4bit`` or ``Linear8bitLt`` (or a subclass)."""
    bnb = _bnb()
    return bnb is not None and isinstance(module, (bnb.nn.Linear4bit, bnb.nn.Linear8bitLt))


# ---- anchor providers: W0[R][:, C] dequantized for the requested rows only -------------------------------------------
class Bnb4bitAnchors:
    """Anchors of a bitsandbytes 4-bit weight (``Params4bit``, NF4 or FP4, nested absmax or not).

    ``rows(R)`` dequantizes W0[R, :] from the packed data: the quantization blocks (``blocksize`` consecutive
    elements of the row-major flattened W0) that cover those rows are gathered and dequantized with bitsandbytes'
    own ``dequantize_4bit`` op. When ``d_in`` is a multiple of ``blocksize`` (every Llama-class projection) a row is
    exactly ``d_in / blocksize`` blocks; otherwise each row takes the ``d_in // blocksize + 2`` blocks around it and
    the row is cut out of them (at most ``2·blocksize`` extra elements per row). A double-quantized absmax is
    dequantized for the gathered blocks only (``code[q] · absmax2[i // blocksize2] + offset``).
    """

    def __init__(self, weight: torch.Tensor) -> None:
        state = weight.quant_state
        self.data = weight.data
        self.packed = weight.data.reshape(-1).view(torch.uint8)
        self.state = state
        self.d_out, self.d_in = int(state.shape[0]), int(state.shape[1])
        self.blocksize = int(state.blocksize)
        self.num_quant_blocks = state.absmax.numel()

    def _absmax(self, index: torch.Tensor) -> torch.Tensor:
        state = self.state
        if not state.nested:
            return state.absmax.index_select(0, index).float()
        inner = state.state2
        codes = state.absmax.index_select(0, index).long()
        scales = inner.absmax.index_select(0, index // int(inner.blocksize))
        return (inner.code.to(scales.device)[codes] * scales + state.offset).float()

    def rows(self, R: torch.Tensor) -> torch.Tensor:
        """W0[R, :] (|R|×d_in) in the quantized weight's dtype."""
        bs, d_in = self.blocksize, self.d_in
        if d_in % bs == 0:
            per_row = d_in // bs
            blocks = (R * per_row).unsqueeze(1) + torch.arange(per_row, device=R.device)
            start = None
        else:
            per_row = d_in // bs + 2
            first = (R * d_in) // bs
            blocks = (first.unsqueeze(1) + torch.arange(per_row, device=R.device)).clamp_(max=self.num_quant_blocks - 1)
            start = R * d_in - first * bs  # where the row begins inside its first gathered block
        blocks = blocks.reshape(-1)
        half = bs // 2  # two 4-bit values per byte; blocksize is even, so blocks start on byte boundaries
        byte_index = (blocks.unsqueeze(1) * half + torch.arange(half, device=R.device)).reshape(-1)
        packed = self.packed.index_select(0, byte_index.clamp_(max=self.packed.numel() - 1))
        values = torch.ops.bitsandbytes.dequantize_4bit.default(
            packed, self._absmax(blocks), bs, self.state.quant_type, [blocks.numel() * bs], self.state.dtype
        ).view(R.numel(), per_row * bs)  # a flat shape: see dense()
        if start is None:
            return values
        return values.gather(1, start.unsqueeze(1) + torch.arange(d_in, device=R.device))

    def __call__(self, R: torch.Tensor, C: torch.Tensor) -> torch.Tensor:
        return self.rows(R).index_select(1, C)

    def dense(self) -> torch.Tensor:
        """The whole dequantized W0 (d_out×d_in): bitsandbytes' ``dequantize_4bit`` op over the flat data.

        Flat, because bitsandbytes 0.50's CPU kernel, given the 2-D shape, indexes absmax per row and returns other
        values when ``d_in`` is not a multiple of ``blocksize`` (e.g. 64×96; the quantization blocks run over the
        flattened weight)."""
        state = self.state
        absmax = self._absmax(torch.arange(self.num_quant_blocks, device=state.absmax.device))
        numel = self.d_out * self.d_in
        return torch.ops.bitsandbytes.dequantize_4bit.default(
            self.packed, absmax, self.blocksize, state.quant_type, [numel], state.dtype
        ).view(self.d_out, self.d_in)


class Int8Anchors:
    """Anchors of an LLM.int8() weight: row-wise int8 with one scale per output row, ``W0[i] = CB[i] · SCB[i] / 127``
    (bitsandbytes' ``int8_vectorwise_dequant``), so W0[R, :] needs the rows R of the int8 data only."""

    def __init__(self, weight: torch.Tensor, state: Any) -> None:
        self.int8 = weight.data
        scb = getattr(weight, "SCB", None)  # a fresh (re-)quantized weight carries it; after a forward the state does
        self.scb = scb if scb is not None else state.SCB

    def rows(self, R: torch.Tensor) -> torch.Tensor:
        return _bnb().functional.int8_vectorwise_dequant(self.int8.index_select(0, R), self.scb.index_select(0, R))

    def __call__(self, R: torch.Tensor, C: torch.Tensor) -> torch.Tensor:
        return self.rows(R).index_select(1, C)

    def dense(self) -> torch.Tensor:
        return _bnb().functional.int8_vectorwise_dequant(self.int8, self.scb)


# ---- the tuner layers ------------------------------------------------------------------------------------------------
class _BnbLinear(nn.Module, SMoALayer):
    """SMoA over a bitsandbytes layer: ``W0`` is the dequantized weight wherever SMoALayer reads it (the SVD at
    attach time, ``get_delta_weight``), the forward adds the blockwise adapter term to bitsandbytes' own output."""

    _kind = ""  # "4-bit" / "8-bit", for the messages

    def __init__(self, base_layer: nn.Module, adapter_name: str, config: SMoAConfig, r: int = 8,
                 lora_alpha: float | None = None, **kwargs) -> None:  # fmt: skip
        super().__init__()
        SMoALayer.__init__(self, base_layer)
        self.fan_in_fan_out = False
        self._active_adapter = adapter_name
        # the checks update_layer makes, before _prepare_base touches the bitsandbytes layer
        check_smoa_arguments(self.in_features, self.out_features, r, config.num_blocks, lora_alpha,
                             config.lora_dropout, config.ordering)  # fmt: skip
        self._prepare_base()
        self.update_layer(adapter_name, r, lora_alpha, config=config)

    def _prepare_base(self) -> None:
        """Bring the bitsandbytes layer into the layout the anchor provider reads (nothing to do by default)."""

    def anchors(self) -> Bnb4bitAnchors | Int8Anchors:
        """The provider of ``W0[R][:, C]`` for the current quantized weight (holds references, copies nothing)."""
        raise NotImplementedError

    def _requantize(self, weight: torch.Tensor) -> None:
        raise NotImplementedError

    # W0 as SMoALayer sees it: dequantized (transient), in the quantized weight's own dtype
    def _base_weight(self) -> torch.Tensor:
        return self.anchors().dense()

    @torch.no_grad()
    def _write_base_weight(self, weight: torch.Tensor) -> None:
        self._requantize(weight)

    @torch.no_grad()
    def _dequantized_original(self) -> torch.Tensor:
        weight = self.anchors().dense()
        if not self.merged:
            return weight
        lost = self._smoa_merge_lost or (None, None)
        return modulated_unmerge(weight, self._bnb_modulation(self.merged_adapters, weight), *lost)

    def _bnb_modulation(self, adapter_names: list[str], weight: torch.Tensor) -> torch.Tensor:
        return smoa_modulation(
            weight,
            [(self.scaling[name], self.smoa_A[name].weight, self.smoa_B[name].weight, *self._orders(name),
              self.num_blocks[name]) for name in adapter_names],
        )  # fmt: skip

    def merge(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> None:
        """Merge ``adapter_names`` (default: the active adapters) into the quantized weight: dequantize,
        ``W = W0 ⊙ (1 + Σ s·P)``, re-quantize (PEFT's LoRA/HiRA behaviour over bitsandbytes, with its warning).

        ``safe_merge=True`` checks the merged weight for NaN/Inf before re-quantizing (the layer is left unchanged)."""
        adapter_names = [name for name in check_adapters_to_merge(self, adapter_names) if name in self.smoa_A]
        if not adapter_names:
            return
        warnings.warn(
            f"Merge smoa module to {self._kind} linear may get different generations due to rounding errors.",
            stacklevel=2,
        )
        with torch.no_grad():
            original = self._dequantized_original()
            modulation = self._bnb_modulation(self.merged_adapters + adapter_names, original)
            merged, lost_index, lost_value = modulated_merge(original, modulation)
            if safe_merge and not torch.isfinite(merged).all():
                raise ValueError(
                    f"NaNs detected in the merged weights. The adapter {', '.join(adapter_names)} seems to be broken"
                )
            self._requantize(merged)
        self._smoa_merge_lost = (lost_index, lost_value)
        self.merged_adapters.extend(adapter_names)

    def unmerge(self) -> None:
        """Dequantize, divide the modulation back out, re-quantize (W0 to the quantization's rounding)."""
        if not self.merged:
            warnings.warn("Already unmerged. Nothing to do.", stacklevel=2)
            return
        warnings.warn(
            f"Unmerge smoa module to {self._kind} linear may get different generations due to rounding errors.",
            stacklevel=2,
        )
        self._requantize(self._dequantized_original())
        self._smoa_merge_lost = None
        self.merged_adapters.clear()

    def get_delta_weight(self, adapter: str) -> torch.Tensor:
        """``s·ΔW`` of ``adapter`` (d_out×d_in) anchored on the dequantized original W0, in the factors' dtype."""
        A, B = self.smoa_A[adapter].weight, self.smoa_B[adapter].weight
        dtype = torch.promote_types(A.dtype, torch.float32)
        rows, cols = self._orders(adapter)
        delta = dense_delta_weight(
            self._dequantized_original().to(dtype), A.to(dtype), B.to(dtype), rows, cols, self.num_blocks[adapter]
        )
        return (delta * self.scaling[adapter]).to(A.dtype)

    def supports_lora_conversion(self, adapter_name: str = "default") -> bool:
        return True

    def _adapter_backend(self) -> str:
        name = get_backend()
        if name == "triton":
            raise NotImplementedError(
                f"SMoA backend 'triton' does not take a bitsandbytes {self._kind} base yet (its kernels read a dense "
                "W0); use backend 'torch' or 'auto', which dequantize the anchors block by block"
            )
        return "reference" if name == "reference" else "torch"

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        if self.disable_adapters:
            if self.merged:
                self.unmerge()
            return self.base_layer(x, *args, **kwargs)
        if self.merged:
            return self.base_layer(x, *args, **kwargs)
        active = [name for name in self.active_adapters if name in self.smoa_A]
        result = self.base_layer(x, *args, **kwargs)
        if not active:
            return result
        # As PEFT does for bitsandbytes bases: a defensive clone (backprop through a view of bnb's output can fail)
        result = result.clone()
        backend = self._adapter_backend()
        anchors = self.anchors()
        for name in active:
            rows, cols = self._orders(name)
            x_adapter = self.smoa_dropout[name](x)
            A, B = self.smoa_A[name].weight, self.smoa_B[name].weight
            if backend == "reference":
                delta = dense_delta_weight(anchors.dense().to(A.dtype), A, B, rows, cols, self.num_blocks[name])
                term = F.linear(x_adapter.to(A.dtype), delta * self.scaling[name])
            else:
                term = smoa_adapter_blockwise(
                    x_adapter, A, B, rows, cols, self.num_blocks[name], self.scaling[name], anchors
                )
            result = result + term.to(result.dtype)
        return result

    _load_from_state_dict = SMoALayer._load_from_state_dict

    def __repr__(self) -> str:
        return "smoa." + super().__repr__()


class Linear4bit(_BnbLinear):
    """SMoA on a bitsandbytes ``Linear4bit`` (NF4 or FP4, ``compress_statistics`` True or False)."""

    _kind = "4-bit"

    def _prepare_base(self) -> None:
        # On a CPU with AVX512-BF16, bitsandbytes 0.50 repacks a Linear4bit's weight in place at its first inference
        # forward (another nibble layout, absmax in bf16): the W0 of inference would then differ from the W0 of
        # training and the provider could not read it. The wrapped layer keeps the standard layout (its CPU GEMM
        # path), and a weight that was repacked already is unpacked with bitsandbytes' own inverse (what it does
        # before saving).
        base = self.get_base_layer()
        weight = base.weight
        if getattr(weight.quant_state, "packing_format_for_cpu", False):
            from bitsandbytes.functional import _convert_weight_packed_for_cpu_inverse

            weight.data, weight.quant_state = _convert_weight_packed_for_cpu_inverse(weight.data, weight.quant_state)
        base.support_avx512bf16_for_cpu = False

    def anchors(self) -> Bnb4bitAnchors:
        return Bnb4bitAnchors(self.get_base_layer().weight)

    def _requantize(self, weight: torch.Tensor) -> None:
        bnb = _bnb()
        base = self.get_base_layer()
        old = base.weight
        base.weight = bnb.nn.Params4bit(
            weight.to("cpu"), requires_grad=False, blocksize=old.blocksize, compress_statistics=old.compress_statistics,
            quant_type=old.quant_type, quant_storage=old.quant_storage, module=base,
        ).to(old.device)  # fmt: skip


class Linear8bitLt(_BnbLinear):
    """SMoA on a bitsandbytes ``Linear8bitLt`` (LLM.int8() with ``has_fp16_weights=False``, any threshold)."""

    _kind = "8-bit"

    def anchors(self) -> Int8Anchors:
        base = self.get_base_layer()
        return Int8Anchors(base.weight, base.state)

    def _requantize(self, weight: torch.Tensor) -> None:
        bnb = _bnb()
        base = self.get_base_layer()
        old = base.weight
        base.weight = bnb.nn.Int8Params(weight.to("cpu"), requires_grad=False, has_fp16_weights=False).to(old.device)
        base.state.reset_grads()


def _check_quantized(target_name: str, base: nn.Module) -> None:
    """Raise for a bitsandbytes layer SMoA cannot adapt, naming the layer and its type."""
    bnb = _bnb()
    kind = type(base).__name__
    weight = base.weight
    if isinstance(base, bnb.nn.Linear4bit):
        if getattr(weight, "quant_state", None) is None or not getattr(weight, "bnb_quantized", True):
            raise ValueError(
                f"target module {target_name!r} is a bitsandbytes {kind} whose weight is not quantized yet (no "
                "quant_state; bitsandbytes quantizes when the layer is moved to its device): call model.to(device) "
                "before get_peft_model"
            )
        return
    if base.state.has_fp16_weights or getattr(weight, "has_fp16_weights", False):
        raise ValueError(
            f"target module {target_name!r} is a bitsandbytes {kind} with has_fp16_weights=True (a trainable fp16 "
            "weight, not an int8 base): SMoA supports Linear8bitLt bases with has_fp16_weights=False, what "
            "load_in_8bit gives"
        )
    if weight.dtype != torch.int8:
        raise ValueError(
            f"target module {target_name!r} is a bitsandbytes {kind} whose weight is not quantized yet (dtype "
            f"{weight.dtype}): call model.to(device) before get_peft_model"
        )


def dispatch_bnb(target: nn.Module, adapter_name: str, config: SMoAConfig, target_name: str = "",
                 **kwargs) -> nn.Module | None:  # fmt: skip
    """``Linear4bit``/``Linear8bitLt`` for a bitsandbytes target, else None (the caller tries the next dispatcher).

    Raises ``ValueError`` naming ``target_name`` for a bitsandbytes layer that cannot work (not quantized yet, or an
    8-bit layer with ``has_fp16_weights=True``) before anything is created.
    """
    base = target.get_base_layer() if isinstance(target, BaseTunerLayer) else target
    if not is_bnb_layer(base):
        return None
    _check_quantized(target_name, base)
    if kwargs.pop("fan_in_fan_out", False):
        warnings.warn(
            f"fan_in_fan_out=True but the target module {target_name!r} is a bitsandbytes layer (a torch.nn.Linear); "
            "using fan_in_fan_out=False",
            stacklevel=2,
        )
    cls = Linear4bit if isinstance(base, _bnb().nn.Linear4bit) else Linear8bitLt
    return cls(target, adapter_name, config=config, **kwargs)
