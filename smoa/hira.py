"""Accelerate PEFT's own HiRA with smoa's backends, in the manner of Liger-Kernel's patch API.

HiRA (ICLR 2025) is SMoA with K = 1, identity order and s = 1 (SPEC §6): ``y = x W0ᵀ + b + dropout(x) (W0 ⊙ BA)ᵀ``.
PEFT 0.21's ``hira.Linear`` materialises the dense ``W0 ⊙ (BA)`` every forward, runs a second full GEMM on it and
keeps that d_out×d_in product (twice: ``BA`` and ``W0 ⊙ BA``) alive for the backward. Here the same function is
computed by :func:`smoa.backends.smoa_linear` (the blockwise ``torch`` path on CPU, the Triton kernels on CUDA), which
saves nothing D²-sized for the backward. On the ``torch`` backend in fp32/fp64 with no dropout in effect, the
base and adapter terms share their input and run as one GEMM on ``W0 ⊙ (1 + BA)`` built per call
(:mod:`smoa_kernels.merged_weight`: 6·N·D² FLOPs per training step instead of 10·N·D²; equal to rounding).

- :func:`accelerate` ``(peft_model)``: route every PEFT HiRA ``Linear`` of an existing model through smoa (an
  instance-level ``forward``, like Liger's ``_apply_liger_kernel_to_instance``); :func:`unaccelerate` undoes it.
- :func:`apply_smoa_to_hira` (``apply_liger_kernel_to_llama``'s counterpart): patch the ``hira.Linear`` class, so
  every HiRA layer — also of models wrapped later — is accelerated; :func:`revert_smoa_to_hira` undoes it.

Nothing else changes: parameters, ``state_dict``, adapter files, ``merge``/``unmerge``, multiple adapters, dropout
(called per adapter in PEFT's order, so the random masks are the same) and ``disable_adapter`` are PEFT's own. Cases
the fast path does not cover (disabled or merged adapters, extra forward arguments, a base layer that is not a plain
``nn.Linear``/``Conv1D``, a base weight that is not a dense float tensor or that requires grad) run PEFT's original
forward.

PEFT is imported lazily: this module imports without it.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn

from smoa.backends import check_backend_name, resolve_backend, smoa_linear
from smoa_kernels.merged_weight import merged_weight_applies, smoa_linear_merged_weight_k1

__all__ = ["accelerate", "apply_smoa_to_hira", "is_accelerated", "revert_smoa_to_hira", "unaccelerate"]

_ORIGINAL_FORWARD: dict[str, Any] = {}  # "forward": PEFT's hira.Linear.forward, saved by the first patch
_CLASS_PATCH: dict[str, str | None] = {}  # "backend": the backend of apply_smoa_to_hira while the class is patched
_BACKEND_ATTR = "_smoa_hira_backend"  # instance attribute (not state): the backend of accelerate(model, backend)
_ORDERS_ATTR = "_smoa_hira_identity_orders"  # instance attribute (not state): cached identity orders


def _hira_linear() -> type:
    try:
        from peft.tuners.hira.layer import Linear
    except ImportError as error:  # peft not installed, or a release without HiRA
        raise ImportError(f"smoa.hira accelerates PEFT's HiRA, which cannot be imported ({error})") from error
    if "forward" not in _ORIGINAL_FORWARD:
        _ORIGINAL_FORWARD["forward"] = Linear.__dict__["forward"]
    return Linear


def _identity_orders(layer: nn.Module, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """The identity ``(row_order, col_order)`` of ``layer`` on ``device``, built once and kept on the layer."""
    cached = layer.__dict__.get(_ORDERS_ATTR)
    if cached is None or cached[0].device != device:
        cached = (
            torch.arange(layer.out_features, device=device, dtype=torch.long),
            torch.arange(layer.in_features, device=device, dtype=torch.long),
        )
        layer.__dict__[_ORDERS_ATTR] = cached
    return cached


def _fast_path_applies(layer: nn.Module, args: tuple, kwargs: dict) -> bool:
    if args or kwargs or layer.disable_adapters or layer.merged:
        return False
    base = layer.get_base_layer()
    if layer.base_layer is not base:  # a nested tuner layer: its own forward must run
        return False
    from transformers.pytorch_utils import Conv1D

    if type(base) not in (nn.Linear, Conv1D):
        return False
    weight = base.weight
    if getattr(weight, "requires_grad", False) and torch.is_grad_enabled():  # the backends give no dW0
        return False
    return (
        isinstance(weight, torch.Tensor)
        and type(weight) in (torch.Tensor, nn.Parameter)
        and weight.is_floating_point()
        and weight.device.type != "meta"
    )


def _accelerated_forward(self: nn.Module, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
    """PEFT ``hira.Linear.forward`` computed by :func:`smoa.backends.smoa_linear` (HiRA = SMoA at K = 1, s = 1)."""
    active = [name for name in self.active_adapters if name in self.hira_A]
    if not active or not _fast_path_applies(self, args, kwargs):
        return _ORIGINAL_FORWARD["forward"](self, x, *args, **kwargs)
    backend = self.__dict__.get(_BACKEND_ATTR, _CLASS_PATCH.get("backend"))
    base = self.get_base_layer()
    weight = base.weight.T if self.fan_in_fan_out else base.weight  # W0, d_out×d_in
    rows, cols = _identity_orders(self, weight.device)
    # PEFT's order of operations: per active adapter, cast x to the factors' dtype, then that adapter's dropout
    inputs = [self.hira_dropout[name](self._cast_input_dtype(x, self.hira_A[name].dtype)) for name in active]
    if all(x_adapter is inputs[0] for x_adapter in inputs):
        # one adapter input (no dropout in effect): Σ_a W0 ⊙ (B_a A_a) = W0 ⊙ ([B_1 … B_n][A_1; …; A_n]), one call
        if len(active) == 1:
            lora_A, lora_B = self.hira_A[active[0]], self.hira_B[active[0]]
        else:
            lora_A = torch.cat([self.hira_A[name] for name in active], dim=0)
            lora_B = torch.cat([self.hira_B[name] for name in active], dim=1)
        x_adapter = x if inputs[0] is x else inputs[0]
        if (
            x_adapter is x
            and resolve_backend(backend, x.device) == "torch"
            and merged_weight_applies(x, weight, lora_A, lora_B)
        ):  # fp32/fp64 on the torch backend: W0 ⊙ (1 + BA) in one GEMM (smoa_kernels.merged_weight)
            return smoa_linear_merged_weight_k1(x, weight, base.bias, lora_A, lora_B, 1.0)
        return smoa_linear(x, x_adapter, weight, base.bias, lora_A, lora_B, rows, cols, 1, 1.0, backend=backend)
    result = None
    for name, x_adapter in zip(active, inputs):
        lora_A, lora_B = self.hira_A[name], self.hira_B[name]
        if result is None:
            result = smoa_linear(x, x_adapter, weight, base.bias, lora_A, lora_B, rows, cols, 1, 1.0, backend=backend)
        else:  # a further adapter with its own dropout mask: add its term only (x = 0 makes the base term zero)
            term = smoa_linear(
                torch.zeros_like(x), x_adapter, weight, None, lora_A, lora_B, rows, cols, 1, 1.0, backend=backend
            )
            result = result + term.to(result.dtype)
    return result


def _hira_layers(model: nn.Module) -> list[nn.Module]:
    linear = _hira_linear()
    return [module for module in model.modules() if isinstance(module, linear)]


def accelerate(model: nn.Module, backend: str | None = None) -> nn.Module:
    """Route every PEFT HiRA ``Linear`` of ``model`` (a ``PeftModel``, a ``HiraModel`` or any module containing
    them) through :func:`smoa.backends.smoa_linear`; returns ``model``. Parameters and state are untouched.

    Args:
        model: the model; it must contain at least one ``peft.tuners.hira.Linear``.
        backend: an smoa backend name (``"torch"``, ``"triton"``, ``"reference"``, ``"auto"``), or ``None`` for the
            one in force at each call (:func:`smoa.use_backend`, ``$SMOA_BACKEND``, ``auto``).

    Example::

        >>> model = get_peft_model(base_model, HiraConfig(r=32, target_modules=["q_proj", "v_proj"]))
        >>> smoa.accelerate(model)  # same outputs and gradients, less memory, no dense W0 ⊙ BA per forward
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if backend is not None:
        check_backend_name(backend)
    layers = _hira_layers(model)
    if not layers:
        raise ValueError(
            f"model ({type(model).__name__}) contains no PEFT HiRA Linear layer to accelerate (was it wrapped with "
            "get_peft_model(model, HiraConfig(...))? Embedding/Conv HiRA layers and bitsandbytes ones are not "
            "accelerated)"
        )
    for layer in layers:
        layer.__dict__[_BACKEND_ATTR] = backend
        layer.forward = _accelerated_forward.__get__(layer)
    return model


def unaccelerate(model: nn.Module) -> nn.Module:
    """Undo :func:`accelerate` on ``model``: its HiRA layers run PEFT's forward again; returns ``model``."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    for layer in _hira_layers(model):
        for attr in ("forward", _BACKEND_ATTR, _ORDERS_ATTR):
            layer.__dict__.pop(attr, None)
    return model


def is_accelerated(module: nn.Module) -> bool:
    """Whether ``module`` (a HiRA ``Linear``) runs smoa's forward, through :func:`accelerate` or the class patch."""
    forward = getattr(module.forward, "__func__", None)
    return forward is _accelerated_forward


def apply_smoa_to_hira(backend: str | None = None) -> None:
    """Patch PEFT's ``hira.Linear`` class so that every HiRA ``Linear`` layer, existing or created later, runs
    smoa's forward (for a script that wraps its model afterwards). ``backend`` as in :func:`accelerate`; a layer
    given its own backend by :func:`accelerate` keeps it. Idempotent; :func:`revert_smoa_to_hira` undoes it."""
    if backend is not None:
        check_backend_name(backend)
    linear = _hira_linear()
    _CLASS_PATCH["backend"] = backend
    linear.forward = _accelerated_forward


def revert_smoa_to_hira() -> None:
    """Undo :func:`apply_smoa_to_hira`: PEFT's own ``hira.Linear.forward`` again (instances patched by
    :func:`accelerate` stay accelerated until :func:`unaccelerate`)."""
    linear = _hira_linear()
    linear.forward = _ORIGINAL_FORWARD["forward"]
    _CLASS_PATCH.pop("backend", None)
