"""Backend choice: which implementation computes an SMoA layer.

``reference`` — the dense oracle (:mod:`smoa_kernels.reference`), the authors' formulation; ``torch`` — the blockwise
pure-PyTorch path (:mod:`smoa_kernels.blockwise`); ``triton`` — the fused kernels (:mod:`smoa_kernels.triton`);
``auto`` — ``triton`` for CUDA tensors when it is available and the GPU is one the kernels are built and checked for
(:data:`smoa_kernels.triton.configs.SUPPORTED_CAPABILITIES`, with enough shared memory), ``torch`` otherwise (with a
one-time notice on an unsupported GPU).

The active name comes from, in order: a layer's own ``backend=`` argument, the innermost :func:`use_backend` context,
the ``SMOA_BACKEND`` environment variable, and ``"auto"``. A backend asked for by name is used or an error is
raised — never a silent fallback.

:func:`use_backend` is per thread: the stack lives in a ``threading.local``, so two threads entering and leaving
their own blocks in any interleaving never run each other's backend. ``torch.compile`` reads that attribute and guards
on it — a compiled model recompiles when the backend changes, with no graph break (a ``contextvars.ContextVar`` would
break the graph at every SMoA layer).

A base weight that requires grad (a user-unfrozen W0) makes the adapter depend on W0 twice (base term and anchor).
The ``reference`` backend differentiates both through autograd; the ``torch`` backend's Function does not compute
``dW0``, so such a call is routed to ``reference`` (exact, slower; warned once), and so is ``auto``; ``triton``
asked for by name refuses it.
"""

from __future__ import annotations

import contextlib
import functools
import os
import threading
import warnings
from collections.abc import Callable, Iterator

import torch

__all__ = ["BACKENDS", "available_backends", "get_backend", "resolve_backend", "smoa_linear", "use_backend"]

BACKENDS = ("reference", "torch", "triton", "auto")
ENV_VAR = "SMOA_BACKEND"
_local = threading.local()  # _local.stack: this thread's use_backend stack, innermost last
_warned_weight_grad = False
_noticed_fallback = False  # the one-time notice of 'auto' choosing 'torch' on an unsupported GPU


def _stack() -> list[str]:
    stack = getattr(_local, "stack", None)
    if stack is None:
        stack = _local.stack = []
    return stack


def check_backend_name(name: str, argument: str = "backend") -> str:
    if name not in BACKENDS:
        raise ValueError(f"{argument}={name!r} is not a known SMoA backend; choose one of {BACKENDS}")
    return name


def get_backend() -> str:
    """The backend name in force here: the innermost :func:`use_backend`, else ``$SMOA_BACKEND``, else ``auto``."""
    stack = getattr(_local, "stack", None)
    if stack:
        return stack[-1]
    env = os.environ.get(ENV_VAR)
    if env:
        return check_backend_name(env.strip(), argument=ENV_VAR)
    return "auto"


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[str]:
    """Context manager: compute every SMoA layer without its own ``backend=`` with ``name`` inside the block."""
    stack = _stack()
    stack.append(check_backend_name(name))
    depth = len(stack)
    try:
        yield name
    finally:
        del stack[depth - 1 :]  # this block's entry (and any left by an inner block that was never exited)


def _triton_status() -> tuple[bool, str]:
    try:
        from smoa_kernels import triton as triton_smoa
    except ImportError as error:  # triton not installed (macOS, Windows) or the kernels module failed to import
        return False, f"the Triton kernels cannot be imported ({error})"
    return triton_smoa.is_available()


@functools.cache
def _device_support(device_type: str, index: int | None) -> tuple[bool, str]:
    """Whether the Triton kernels are built for this device (cached per device: a capability never changes)."""
    from smoa_kernels.triton import configs

    device = torch.device(device_type, index) if index is not None else torch.device(device_type)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    return configs.device_support(device)


def _triton_device_status(device: torch.device) -> tuple[bool, str]:
    ok, reason = _triton_status()
    if not ok:
        return ok, reason
    return _device_support(device.type, device.index)


def _notice_torch_fallback(reason: str) -> None:
    global _noticed_fallback
    if not _noticed_fallback and not torch.compiler.is_compiling():
        _noticed_fallback = True
        warnings.warn(f"SMoA: backend 'auto' uses the 'torch' backend on this GPU: {reason}", stacklevel=4)


def available_backends() -> dict[str, tuple[bool, str]]:
    """``{name: (available, reason)}`` for the concrete backends on this machine."""
    return {"reference": (True, ""), "torch": (True, ""), "triton": _triton_status()}


def resolve_backend(name: str | None, device: torch.device) -> str:
    """The concrete backend (``reference``/``torch``/``triton``) that computes tensors on ``device``."""
    name = get_backend() if name is None else check_backend_name(name)
    if name == "auto":
        if device.type != "cuda" or not _triton_status()[0]:
            return "torch"
        ok, reason = _device_support(device.type, device.index)
        if not ok:  # a GPU the kernels are not built for (pre-Ampere, or newer than the compile gate covers)
            _notice_torch_fallback(reason)
            return "torch"
        return "triton"
    if name == "triton":
        ok, reason = _triton_device_status(device)
        if not ok:
            raise RuntimeError(f"SMoA backend 'triton' was requested but is not available: {reason}")
    return name


def _implementation(name: str) -> Callable[..., torch.Tensor]:
    if name == "reference":
        from smoa_kernels.reference import smoa_linear_reference

        return smoa_linear_reference
    if name == "torch":
        from smoa_kernels.blockwise import smoa_linear_blockwise

        return smoa_linear_blockwise
    from smoa_kernels.triton import smoa_linear_triton

    return smoa_linear_triton


def smoa_linear(
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
    backend: str | None = None,
) -> torch.Tensor:
    """``y = x W0ᵀ + b + s · x_adapter ΔWᵀ`` (SPEC §2) with the chosen backend; see the module docstring."""
    name = resolve_backend(backend, x.device)
    if name != "reference" and weight.requires_grad and torch.is_grad_enabled():
        # 'torch' has no dW0; 'triton' refuses W0 gradients, so only an explicit request for it reaches it
        if name == "torch" or (backend or get_backend()) == "auto":
            name = _route_weight_grad()
    fn = _implementation(name)
    return fn(x, x_adapter, weight, bias, lora_A, lora_B, row_order, col_order, num_blocks, scale)


def _route_weight_grad() -> str:
    """The ``torch`` Function has no ``dW0``: a trainable W0 is computed by ``reference``, whose autograd gives the
    exact gradient of the full function (base term and anchor)."""
    global _warned_weight_grad
    if not _warned_weight_grad and not torch.compiler.is_compiling():
        _warned_weight_grad = True
        warnings.warn(
            "SMoA: the base weight W0 requires grad, which the 'torch'/'triton' backends do not differentiate; "
            "computing these layers with the 'reference' backend (exact dW0, including the adapter's dependence on W0; "
            "slower). Freeze W0 (weight.requires_grad_(False)) for the fast path.",
            stacklevel=3,
        )
    return "reference"
