"""Whole-model patching without PEFT: :func:`apply_smoa` swaps matching ``nn.Linear`` modules for
:class:`~smoa.layer.SMoALinear` in place; :func:`merge_smoa` turns them back into plain, merged ``nn.Linear``s.

``target_modules`` follows PEFT's habit: a list of names matches a module whose full name equals an entry or ends
with ``"." + entry``; a string is a regular expression that must match the full name; ``"all-linear"`` matches every
``nn.Linear`` except the model's output embedding (``get_output_embeddings()``, e.g. ``lm_head``).
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable

import torch
import torch.nn as nn

from smoa.layer import SMoALinear
from smoa.partition import partition_progress

__all__ = ["adapter_state_dict", "apply_smoa", "merge_smoa", "smoa_layers"]

logger = logging.getLogger(__name__)


def _check_pattern(argument: str, pattern) -> None:
    if isinstance(pattern, str) and pattern != "all-linear":
        try:
            re.compile(pattern)
        except re.error as error:
            raise ValueError(f"{argument}={pattern!r} is not a valid regular expression ({error})") from None


def _name_matches(name: str, targets: str | Iterable[str]) -> bool:
    if isinstance(targets, str):
        return re.fullmatch(targets, name) is not None
    return any(name == t or name.endswith("." + t) for t in targets)


def smoa_layers(model: nn.Module) -> dict[str, SMoALinear]:
    """``{name: layer}`` for every :class:`SMoALinear` in ``model``."""
    return {name: module for name, module in model.named_modules() if isinstance(module, SMoALinear)}


def _select_targets(model: nn.Module, target_modules, exclude_modules) -> list[str]:
    _check_pattern("target_modules", target_modules)
    _check_pattern("exclude_modules", exclude_modules)
    if isinstance(target_modules, str) and target_modules == "all-linear":
        output = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
        names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and m is not output]
    else:
        if target_modules is None or (not isinstance(target_modules, str) and not list(target_modules)):
            raise ValueError(f"target_modules={target_modules!r} must name at least one module (or be 'all-linear')")
        entries = [target_modules] if isinstance(target_modules, str) else list(target_modules)
        names = [n for n, _ in model.named_modules() if n and _name_matches(n, target_modules)]
        for entry in entries:
            if not any(_name_matches(n, [entry] if not isinstance(target_modules, str) else entry) for n in names):
                raise ValueError(f"target_modules entry {entry!r} matches no module of {type(model).__name__}")
    if exclude_modules:
        names = [n for n in names if not _name_matches(n, exclude_modules)]
    if not names:
        raise ValueError(f"target_modules={target_modules!r} with exclude_modules={exclude_modules!r} matches nothing")
    for name in names:
        module = model.get_submodule(name)
        if isinstance(module, SMoALinear):
            raise ValueError(f"module {name!r} already carries an SMoA adapter")
        if not isinstance(module, nn.Linear):
            raise TypeError(f"target module {name!r} is a {type(module).__name__}; SMoA supports torch.nn.Linear only")
    return names


def apply_smoa(
    model: nn.Module,
    target_modules: str | Iterable[str],
    r: int = 8,
    num_blocks: int = 2,
    alpha: float | None = None,
    dropout: float = 0.0,
    ordering: str = "spectral",
    *,
    exclude_modules: str | Iterable[str] | None = None,
    **layer_options,
) -> list[str]:
    """Replace the targeted ``nn.Linear`` modules of ``model`` by :class:`SMoALinear` (sharing their weights), freeze
    every other parameter, and return the replaced module names. Nothing is changed if any argument is invalid.

    ``layer_options`` are passed to :meth:`SMoALinear.from_linear` (``seed``, ``svd_dtype``, ``factor_dtype``,
    ``init_weights``, ``backend``).
    """
    names = _select_targets(model, target_modules, exclude_modules)
    flags = {param: param.requires_grad for param in model.parameters()}
    try:  # every layer is built (and every argument checked) before the model is touched
        with partition_progress(len(names)):
            new_layers = {
                name: SMoALinear.from_linear(
                    model.get_submodule(name), r, num_blocks, alpha, dropout, ordering, **layer_options
                )
                for name in names
            }
    except Exception:
        for param, flag in flags.items():  # a layer built before the failing one froze its nn.Linear
            param.requires_grad_(flag)
        raise
    if not getattr(model, "_smoa_load_check", False):  # a bad layer in a state dict fails before any is loaded
        model.register_load_state_dict_pre_hook(_check_whole_state_dict)
        model._smoa_load_check = True
    for param in model.parameters():
        param.requires_grad_(False)
    for name, layer in new_layers.items():
        model.set_submodule(name, layer)
    for layer in smoa_layers(model).values():  # adapters attached by an earlier call stay trainable
        layer.smoa_A.weight.requires_grad_(True)
        layer.smoa_B.weight.requires_grad_(True)
    logger.info("SMoA: replaced %d linear modules: %s", len(names), ", ".join(names))
    return names


def merge_smoa(model: nn.Module) -> nn.Module:
    """Merge every SMoA layer into its weight and replace it by a plain ``nn.Linear`` (same output, no adapter)."""
    for name, layer in smoa_layers(model).items():
        layer.merge()
        layer.weight.__dict__.pop("_smoa_merged_by", None)  # the merged weight is now the plain layer's own
        linear = nn.Linear(
            layer.in_features, layer.out_features, bias=layer.bias is not None, device="meta", dtype=layer.weight.dtype
        )
        linear.weight = layer.weight
        if layer.bias is not None:
            linear.bias = layer.bias
        model.set_submodule(name, linear)
    return model


def adapter_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every SMoA layer's :meth:`SMoALinear.adapter_state_dict` under its module name (factors, orders, partition
    record; no base weights): the small checkpoint to save, loaded back with ``model.load_state_dict(sd,
    strict=False)``. Unlike a "trainable parameters only" dict it keeps the orders, which a load requires."""
    return {
        f"{name}.{key}": value
        for name, layer in smoa_layers(model).items()
        for key, value in layer.adapter_state_dict().items()
    }


def _check_whole_state_dict(module, state_dict, prefix, *args) -> None:
    """Load pre-hook of a model patched by :func:`apply_smoa`: check every SMoA layer's entries before any module
    loads, so that a bad tensor for the last layer does not leave the first ones loaded."""
    for name, layer in smoa_layers(module).items():
        layer._check_state_dict(state_dict, f"{prefix}{name}." if name else prefix)
