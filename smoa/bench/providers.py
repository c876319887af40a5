"""What ``smoa bench`` measures: the providers (one layer each, on shared inputs), their oracles and the modes.

Every provider wraps the same frozen W0 (no bias, as in Llama projections) and runs on the same ``x``/``dY``:

================  =========================================================================================
frozen          plain ``nn.Linear``, W0 frozen, x requires grad — the 1.0 line
lora            PEFT ``LoraConfig`` at the same total rank r (α = r, so s = 1)
lora-eq         PEFT ``LoraConfig`` at rank r/K: the same trainable parameters as SMoA
hira            PEFT ``HiraConfig`` at rank r/K (equal parameters); dense ``W0 ⊙ (BA)`` per call
reference       ``SMoALinear`` on the ``reference`` backend: the dense official formulation (SPEC §2)
smoa-torch      ``SMoALinear`` on the ``torch`` backend (blockwise, permuted coordinates)
smoa-triton     ``SMoALinear`` on the ``triton`` backend (exact; ``path="auto"``: the cost model picks; CUDA only)
smoa-triton-fused    the Triton kernels with ``path="fused"``: the single-pass kernel (exact; CUDA only)
smoa-triton-blocked  the Triton kernels with ``path="blocked"``: vendor GEMMs on the K diagonal blocks; its peak
                     memory includes the ΔW_k transient (≈ D²/K elements per layer; exact; CUDA only)
smoa-triton-mw  the Triton kernels' opt-in fast path ``merged_weight=True`` (CUDA only; exact up to rounding)
================  =========================================================================================

SMoA providers also get an ``inference`` row with the adapter merged (``variant="merged"``): a plain linear layer.
Before anything is timed, :meth:`Case.check` compares a provider's output and gradients with the dense formula of
its method (SMoA providers: :func:`smoa_kernels.reference.smoa_linear_reference`; HiRA: the same reference at K = 1
in identity order, SPEC §6) on the benchmark inputs. Factors are drawn so the adapter term is as large as the base
term (B = 0 would make every adapter look right).

New providers (e.g. an opt-in fast path of the kernels) are one :func:`register_provider` call.
"""

from __future__ import annotations

import copy
import dataclasses
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from smoa.backends import use_backend
from smoa.bench.flops import MODES
from smoa.bench.registry import PROVIDERS, Built, Provider, register_provider
from smoa.layer import SMoALinear
from smoa_kernels.reference import smoa_linear_reference

__all__ = [
    "DTYPES",
    "MODES",
    "PROVIDERS",
    "TOLERANCES",
    "BenchInputs",
    "Case",
    "Provider",
    "build_case",
    "parse_dtype",
    "register_provider",
]

DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
}

# Correctness guard: max |y - y_oracle| / max |y_oracle| (and the same for every gradient), by input dtype.
# fp32 leaves room for TF32 in Triton's tl.dot on GPU; a wrong adapter is off by O(1) (its term is as large as
# the base term).
TOLERANCES: dict[torch.dtype, float] = {torch.float32: 5e-3, torch.float16: 1e-2, torch.bfloat16: 4e-2}


def parse_dtype(name: str) -> torch.dtype:
    """``"bf16"`` → ``torch.bfloat16`` etc.; a clear error listing the choices otherwise."""
    key = str(name).lower().removeprefix("torch.")
    if key not in DTYPES:
        raise ValueError(f"dtype={name!r} is not supported; choose one of {sorted(DTYPES)}")
    return DTYPES[key]


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


# ---- shared inputs ---------------------------------------------------------------------------------------------------
@dataclass
class BenchInputs:
    """The frozen W0 and the activations every provider of one (shape, N, dtype) measurement group sees."""

    base: nn.Linear
    x: torch.Tensor  # (N, d_in), requires grad as inside a network
    grad_out: torch.Tensor  # dY, (N, d_out)
    seed: int = 0
    smoa_layers: dict[tuple, SMoALinear] = field(default_factory=dict)  # (r, K[, "merged"]) → layer, reused over N
    oracle_cache: dict[tuple, tuple[torch.Tensor, tuple[torch.Tensor, ...]]] = field(default_factory=dict)

    @property
    def d_in(self) -> int:
        return self.base.in_features

    @property
    def d_out(self) -> int:
        return self.base.out_features

    @property
    def tokens(self) -> int:
        return self.x.shape[0]

    @property
    def dtype(self) -> torch.dtype:
        return self.x.dtype

    @property
    def device(self) -> torch.device:
        return self.x.device

    @staticmethod
    def make_base(d_in: int, d_out: int, dtype: torch.dtype, device, seed: int = 0) -> nn.Linear:
        """W0 drawn like ``nn.Linear``'s default init (U(±1/√d_in)), seeded, frozen, no bias."""
        generator = torch.Generator(device=device).manual_seed(seed)
        bound = 1.0 / math.sqrt(d_in)
        weight = torch.empty(d_out, d_in, device=device).uniform_(-bound, bound, generator=generator)
        base = nn.Linear(d_in, d_out, bias=False, device="meta")
        base.weight = nn.Parameter(weight.to(dtype), requires_grad=False)
        return base

    @classmethod
    def make(cls, d_in: int, d_out: int, tokens: int, dtype: torch.dtype, device, seed: int = 0) -> BenchInputs:
        return cls.with_tokens(cls.make_base(d_in, d_out, dtype, device, seed), tokens, seed)

    @classmethod
    def with_tokens(cls, base: nn.Linear, tokens: int, seed: int = 0, smoa_layers=None) -> BenchInputs:
        """New activations for ``tokens`` rows over an existing W0 (the SMoA layers, and their SVD, are reused)."""
        weight = base.weight
        generator = torch.Generator(device=weight.device).manual_seed(seed + 1)
        x = torch.randn(tokens, base.in_features, device=weight.device, generator=generator).to(weight.dtype)
        grad_out = torch.randn(tokens, base.out_features, device=weight.device, generator=generator).to(weight.dtype)
        return cls(base, x.requires_grad_(True), grad_out, seed, smoa_layers if smoa_layers is not None else {})

    def shared_linear(self) -> nn.Linear:
        """A fresh ``nn.Linear`` holding the same (frozen) W0 Parameter: wrappers may replace it in their parent."""
        linear = nn.Linear(self.d_in, self.d_out, bias=False, device="meta")
        linear.weight = self.base.weight
        return linear

    def smoa_layer(self, r: int, num_blocks: int) -> SMoALinear:
        """The spectral SMoA layer over W0 for (r, K), built once (one SVD) and shared by every SMoA provider."""
        key = (r, num_blocks)
        if key not in self.smoa_layers:
            layer = SMoALinear.from_linear(self.shared_linear(), r=r, num_blocks=num_blocks, init_weights=False)
            _randomize_factors(layer.smoa_A.weight, layer.smoa_B.weight, target_std=1.0, seed=self.seed)
            self.smoa_layers[key] = layer
        return self.smoa_layers[key]

    def merged_layer(self, r: int, num_blocks: int) -> SMoALinear:
        """A merged copy of :meth:`smoa_layer` (its own W0 copy: merging must not touch the shared weight)."""
        key = (r, num_blocks, "merged")
        if key not in self.smoa_layers:
            merged = copy.deepcopy(self.smoa_layer(r, num_blocks))
            merged.merge()
            self.smoa_layers[key] = merged
        return self.smoa_layers[key]


@torch.no_grad()
def _randomize_factors(lora_A: torch.Tensor, lora_B: torch.Tensor, target_std: float, seed: int) -> None:
    """Gaussian factors whose product ``B A`` has entries of std ``target_std`` (var(BA) = ρ·σ⁴)."""
    rank = lora_A.shape[0]
    sigma = (target_std**2 / rank) ** 0.25
    generator = torch.Generator(device=lora_A.device).manual_seed(seed + 2)
    for factor in (lora_A, lora_B):
        factor.copy_(torch.randn(factor.shape, device=factor.device, generator=generator) * sigma)


# ---- providers -------------------------------------------------------------------------------------------------------
class _OneLayer(nn.Module):
    """The smallest model PEFT can wrap: one target module called ``proj``."""

    def __init__(self, proj: nn.Linear) -> None:
        super().__init__()
        self.proj = proj

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x)


def _peft_layer(inputs: BenchInputs, config) -> nn.Module:
    """The PEFT tuner layer (``lora.Linear``/``hira.Linear``) that ``get_peft_model`` puts around W0."""
    from peft import get_peft_model

    return get_peft_model(_OneLayer(inputs.shared_linear()), config).base_model.model.proj


def _build_frozen(inputs: BenchInputs, r: int, num_blocks: int) -> Built:
    linear = inputs.shared_linear()
    return Built(linear, [], lambda x: F.linear(x, inputs.base.weight), ("frozen",))


def _lora(rank_of: Callable[[int, int], int]) -> Callable[[BenchInputs, int, int], Built]:
    def build(inputs: BenchInputs, r: int, num_blocks: int) -> Built:
        from peft import LoraConfig

        rank = rank_of(r, num_blocks)
        layer = _peft_layer(inputs, LoraConfig(r=rank, lora_alpha=rank, lora_dropout=0.0, target_modules=["proj"]))
        lora_A, lora_B = layer.lora_A["default"].weight, layer.lora_B["default"].weight
        scale = layer.scaling["default"]
        target = float(inputs.base.weight.float().std())  # a LoRA ΔW as large as W0
        _randomize_factors(lora_A, lora_B, target_std=target, seed=inputs.seed)

        def oracle(x: torch.Tensor) -> torch.Tensor:  # y = x W0ᵀ + s · x (B A)ᵀ, adapter in the factors' dtype
            base = F.linear(x, inputs.base.weight)
            return base + (scale * F.linear(x.to(lora_A.dtype), lora_B @ lora_A)).to(base.dtype)

        return Built(layer, [lora_A, lora_B], oracle, ("lora", rank))

    return build


def _build_hira(inputs: BenchInputs, r: int, num_blocks: int) -> Built:
    from peft import HiraConfig

    rank = r // num_blocks
    layer = _peft_layer(inputs, HiraConfig(r=rank, hira_dropout=0.0, target_modules=["proj"]))
    hira_A, hira_B = layer.hira_A["default"], layer.hira_B["default"]
    _randomize_factors(hira_A, hira_B, target_std=1.0, seed=inputs.seed)
    rows = torch.arange(inputs.d_out, device=inputs.device)
    cols = torch.arange(inputs.d_in, device=inputs.device)

    def oracle(x: torch.Tensor) -> torch.Tensor:  # SPEC §6: HiRA = SMoA with K = 1, identity order, s = 1
        return smoa_linear_reference(x, x, inputs.base.weight, None, hira_A, hira_B, rows, cols, 1, 1.0)

    return Built(layer, [hira_A, hira_B], oracle, ("hira", rank))


class _OnBackend(nn.Module):
    """Runs an ``SMoALinear`` (whose own ``backend`` is ``None``) inside ``smoa.use_backend(backend)``."""

    def __init__(self, layer: SMoALinear, backend: str) -> None:
        super().__init__()
        self.layer, self.backend = layer, backend

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with use_backend(self.backend):
            return self.layer(x)


def _smoa(backend: str) -> Callable[[BenchInputs, int, int], Built]:
    def build(inputs: BenchInputs, r: int, num_blocks: int) -> Built:
        layer = inputs.smoa_layer(r, num_blocks)
        lora_A, lora_B = layer.smoa_A.weight, layer.smoa_B.weight

        def oracle(x: torch.Tensor) -> torch.Tensor:
            return smoa_linear_reference(
                x, x, layer.weight, layer.bias, lora_A, lora_B, layer.row_order, layer.col_order,
                layer.num_blocks, layer.scale,
            )  # fmt: skip

        merged = inputs.merged_layer(r, num_blocks) if backend != "reference" else None
        return Built(_OnBackend(layer, backend), [lora_A, lora_B], oracle, ("smoa", r, num_blocks), merged)

    return build


class _TritonOption(nn.Module):
    """A Triton launch option of ``smoa_linear_triton`` on the layer's tensors: ``merged_weight=True`` (one dot per
    tile with ``W0 + s·ΔW`` built in registers; exact up to rounding, dropout p = 0 only) or a forced ``path``
    (``"fused"``: the single-pass kernel; ``"blocked"``: vendor GEMMs on the K diagonal blocks)."""

    def __init__(self, layer: SMoALinear, **options) -> None:
        super().__init__()
        self.layer, self.options = layer, options

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        from smoa_kernels.triton import smoa_linear_triton

        layer = self.layer
        return smoa_linear_triton(
            x, x, layer.weight, layer.bias, layer.smoa_A.weight, layer.smoa_B.weight, layer.row_order,
            layer.col_order, layer.num_blocks, layer.scale, **self.options,
        )  # fmt: skip


def _build_triton_path(path: str) -> Callable[[BenchInputs, int, int], Built]:
    def build(inputs: BenchInputs, r: int, num_blocks: int) -> Built:
        built = _smoa("triton")(inputs, r, num_blocks)
        # the [merged] inference row would be smoa-triton's: not repeated
        module = _TritonOption(inputs.smoa_layer(r, num_blocks), path=path)
        return dataclasses.replace(built, module=module, merged=None)

    return build


def _build_triton_merged_weight(inputs: BenchInputs, r: int, num_blocks: int) -> Built:
    built = _smoa("triton")(inputs, r, num_blocks)
    module = _TritonOption(inputs.smoa_layer(r, num_blocks), merged_weight=True)
    return dataclasses.replace(built, module=module, merged=None)


for _provider in (
    Provider("frozen", "frozen", "plain nn.Linear, frozen W0 (the 1.0 line)", _build_frozen, lambda r, K: 0, ""),
    Provider("lora", "lora", "PEFT LoRA at the same total rank r", _lora(lambda r, K: r), lambda r, K: r, "r"),
    Provider(
        "lora-eq", "lora", "PEFT LoRA at rank r/K (SMoA's trainable parameters)", _lora(lambda r, K: r // K),
        lambda r, K: r // K, "r/K",
    ),
    Provider("hira", "hira", "PEFT HiRA at rank r/K (equal parameters)", _build_hira, lambda r, K: r // K, "r/K"),
    Provider(
        "reference", "reference", "SMoA, dense official formulation (reference backend)", _smoa("reference"),
        lambda r, K: r // K, "r,K", backend="reference",
    ),
    Provider(
        "smoa-torch", "smoa", "SMoA, blockwise PyTorch path (torch backend)", _smoa("torch"), lambda r, K: r // K,
        "r,K", backend="torch", merged_variant=True,
    ),
    Provider(
        "smoa-triton", "smoa", "SMoA, Triton kernels, exact path (triton backend, path='auto')", _smoa("triton"),
        lambda r, K: r // K, "r,K", backend="triton", cuda_only=True, merged_variant=True,
    ),
    Provider(
        "smoa-triton-mw", "smoa-merged-weight",
        "SMoA, Triton opt-in fast path merged_weight=True (W0 + sΔW per tile; rounding, p = 0 only)",
        _build_triton_merged_weight, lambda r, K: r // K, "r,K", backend="triton", cuda_only=True,
    ),
    Provider(
        "smoa-triton-fused", "smoa", "SMoA, Triton path='fused' (single-pass kernel, ΔW tiles in registers)",
        _build_triton_path("fused"), lambda r, K: r // K, "r,K", backend="triton", cuda_only=True,
    ),
    Provider(
        "smoa-triton-blocked", "smoa",
        "SMoA, Triton path='blocked' (vendor GEMMs on the K diagonal blocks; peak memory includes the ΔW_k transient)",
        _build_triton_path("blocked"), lambda r, K: r // K, "r,K", backend="triton", cuda_only=True,
    ),
):  # fmt: skip
    register_provider(_provider)


# ---- one measurable case ---------------------------------------------------------------------------------------------
def _relative_error(value: torch.Tensor, expected: torch.Tensor) -> float:
    expected = expected.detach().float()
    scale = expected.abs().max().clamp_min(torch.finfo(torch.float32).tiny)
    return float((value.detach().float() - expected).abs().max() / scale)


def _grads(y: torch.Tensor, wrt: list[torch.Tensor], grad_out: torch.Tensor) -> list[torch.Tensor]:
    """``dy/d(wrt)`` contracted with ``grad_out``; a tensor ``y`` does not depend on gets zeros."""
    grads = torch.autograd.grad(y, wrt, grad_out, allow_unused=True)
    return [torch.zeros_like(t) if g is None else g for g, t in zip(grads, wrt)]


@dataclass
class Case:
    """One provider (and variant) built over one :class:`BenchInputs`: ``step(mode)`` is what gets timed."""

    provider: Provider
    inputs: BenchInputs
    built: Built
    variant: str = ""  # "" or "merged"

    @property
    def module(self) -> nn.Module:
        return self.built.merged if self.variant == "merged" else self.built.module

    @property
    def modes(self) -> tuple[str, ...]:
        return ("inference",) if self.variant == "merged" else MODES

    def wrt(self) -> list[torch.Tensor]:
        """What a training step differentiates: the input (as inside a network) and the trainable factors."""
        return [self.inputs.x, *self.built.trainable]

    def step(self, mode: str) -> Callable[[], Any]:
        """A no-argument callable running ``mode`` once (the ``backward`` graph is built here, outside the timing)."""
        if mode not in self.modes:
            raise ValueError(f"mode={mode!r} is not one of {self.modes} for {self.label}")
        module, x, grad_out, wrt = self.module, self.inputs.x, self.inputs.grad_out, self.wrt()
        if mode == "forward":
            return lambda: module(x)
        if mode == "backward":
            y = module(x)
            return lambda: torch.autograd.grad(y, wrt, grad_out, retain_graph=True)
        if mode == "full":
            return lambda: torch.autograd.grad(module(x), wrt, grad_out)
        x_inference = x.detach()

        def inference():
            with torch.no_grad():
                return module(x_inference)

        return inference

    @property
    def label(self) -> str:
        return f"{self.provider.name} [merged]" if self.variant == "merged" else self.provider.name

    def _oracle(self) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
        cache = self.inputs.oracle_cache
        if self.built.oracle_key not in cache:
            expected = self.built.oracle(self.inputs.x)
            grads = _grads(expected, self.wrt(), self.inputs.grad_out)
            cache[self.built.oracle_key] = (expected.detach(), grads)
        return cache[self.built.oracle_key]

    def check(self) -> tuple[float, int | None]:
        """``(max relative error against the oracle over y and every gradient, bytes saved for backward)``.

        Saved bytes: distinct storages autograd keeps from forward to backward, other than the module's own
        parameters and buffers — the activation memory one layer holds during a training step. The input x counts
        when it is kept (in a network it is the previous layer's output, freed unless someone saves it); ``None``
        when merged.
        """
        expected, expected_grads = self._oracle()
        if self.variant == "merged":
            return _relative_error(self.step("inference")(), expected), None
        resident = {t.untyped_storage().data_ptr() for t in self.module.parameters()}
        resident |= {t.untyped_storage().data_ptr() for t in self.module.buffers()}
        saved: dict[int, int] = {}

        def pack(tensor: torch.Tensor) -> torch.Tensor:
            try:
                storage = tensor.untyped_storage()
                if storage.data_ptr() not in resident:
                    saved[storage.data_ptr()] = storage.nbytes()
            except (RuntimeError, NotImplementedError):  # a tensor without storage (subclass/functional): skip it
                pass
            return tensor

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
            y = self.module(self.inputs.x)
        grads = _grads(y, self.wrt(), self.inputs.grad_out)
        errors = [_relative_error(y, expected)]
        errors += [_relative_error(g, e) for g, e in zip(grads, expected_grads)]
        return max(errors), sum(saved.values())


def build_case(provider: str | Provider, inputs: BenchInputs, r: int, num_blocks: int, variant: str = "") -> Case:
    """Build ``provider`` over ``inputs`` at total rank ``r`` and ``num_blocks`` K (``variant="merged"``: SMoA only)."""
    if isinstance(provider, str):
        if provider not in PROVIDERS:
            raise ValueError(f"provider={provider!r} is not one of {list(PROVIDERS)}")
        provider = PROVIDERS[provider]
    if variant not in ("", "merged"):
        raise ValueError(f"variant={variant!r} must be '' or 'merged'")
    if variant == "merged" and not provider.merged_variant:
        raise ValueError(f"provider {provider.name!r} has no merged variant")
    built = provider.build(inputs, r, num_blocks)
    return Case(provider, inputs, built, variant)
