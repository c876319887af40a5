"""Whole-model patching without PEFT: :func:`apply_smoa` swaps matching ``nn.Linear`` modules for
:class:`~smoa.layer.SMoALinear` in place; :func:`merge_smoa` turns them back into plain, merged ``nn.Linear``s.

``target_modules`` follows PEFT's habit: a list of names matches a module whose full name equals an entry or ends
with ``"." + entry``; a string is a regular expression that must match the full name; ``"all-linear"`` matches every
``nn.Linear`` except the model's output embedding (``get_output_embeddings()``, e.g. ``lm_head``).
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable, Iterator
from contextlib import contextmanager

import torch
import torch.nn as nn

from smoa.checkpoint import checked_by_the_model
from smoa.layer import SMoALinear
from smoa.partition import partition_progress

__all__ = ["ModelSnapshot", "adapter_state_dict", "apply_smoa", "guard_loads", "merge_smoa", "smoa_layers"]

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
    for param in model.parameters():
        param.requires_grad_(False)
    for name, layer in new_layers.items():
        model.set_submodule(name, layer)
    for layer in smoa_layers(model).values():  # adapters attached by an earlier call stay trainable
        layer.smoa_A.weight.requires_grad_(True)
        layer.smoa_B.weight.requires_grad_(True)
    guard_loads(model)  # a bad SMoA entry in a state dict fails before torch copies any tensor
    logger.info("SMoA: replaced %d linear modules: %s", len(names), ", ".join(names))
    return names


def merge_smoa(model: nn.Module, safe_merge: bool = False) -> nn.Module:
    """Merge every SMoA layer into its weight and replace it by a plain ``nn.Linear`` (same output, no adapter).

    All or nothing: every layer is merged first (``safe_merge=True`` refuses a merge that would put NaN/Inf into a
    weight); if any layer refuses, the layers merged so far are unmerged bit for bit and nothing is replaced."""
    layers = smoa_layers(model)
    merged_here = []
    try:
        for name, layer in layers.items():
            if not layer.merged:
                try:
                    layer.merge(safe_merge=safe_merge)
                except (ValueError, RuntimeError) as error:
                    raise type(error)(f"merge_smoa: layer {name!r}: {error}; no layer was merged") from error
                merged_here.append(layer)
    except Exception:
        for layer in reversed(merged_here):
            layer.unmerge()
        raise
    for name, layer in layers.items():
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


def _has_state_check(module: nn.Module) -> bool:
    return callable(getattr(type(module), "_check_state_dict", None))


def _check_whole_state_dict(module, state_dict, prefix, *args) -> None:
    """Load pre-hook of a model holding SMoA layers: check every SMoA layer's entries before torch copies any tensor,
    so that a bad tensor for the last layer does not leave the plain layers or the first SMoA layers loaded. The
    outermost guarded module checks its whole subtree; the guarded modules inside it then skip (same load call)."""
    if checked_by_the_model(state_dict, prefix):
        return
    checked = state_dict.__dict__.setdefault("_smoa_checked_prefixes", []) if hasattr(state_dict, "__dict__") else []
    for name, layer in module.named_modules():
        if _has_state_check(layer):
            layer._check_state_dict(state_dict, f"{prefix}{name}." if name else prefix)
    checked.append(prefix)


def guard_loads(model: nn.Module) -> None:
    """Make ``load_state_dict`` of ``model`` — and of every module inside it that holds an SMoA layer — validate the
    SMoA entries of the whole state dict before torch copies anything (torch's own loading copies module by module,
    so a layer that raises would otherwise leave the layers before it loaded). Idempotent."""
    holders = set()
    for name, module in model.named_modules():
        if _has_state_check(module):
            parts = name.split(".") if name else []
            for depth in range(len(parts)):  # every ancestor of the SMoA layer inside model, model included
                holders.add(".".join(parts[:depth]))
    for name in sorted(holders):
        module = model.get_submodule(name)
        if not module.__dict__.get("_smoa_load_check", False):
            module.register_load_state_dict_pre_hook(_check_whole_state_dict)
            module._smoa_load_check = True


# ---- all or nothing: a snapshot of a module tree to give back after a failed operation ---------------------------
_CONTAINERS = (dict, list, set)


class ModelSnapshot:
    """What an operation that fails part-way must give back: for every module under ``roots``, its attributes (the
    child modules, parameters, buffers and hooks, ``training``, PEFT's bookkeeping such as ``peft_config``,
    ``active_adapter``, ``merged_adapters``: one level of dicts/lists/sets is copied), and every parameter's
    ``requires_grad`` flag. Tensor values are not copied (that would double the model's memory): :meth:`restore`
    raises if a tensor that existed before was written in place meanwhile, because that could not be undone."""

    def __init__(self, *roots: nn.Module) -> None:
        self._modules: dict[int, tuple[nn.Module, dict, dict]] = {}
        for root in roots:
            for module in root.modules():
                if id(module) not in self._modules:
                    attributes = dict(module.__dict__)
                    contents = {name: _copy_container(value) for name, value in attributes.items()
                                if isinstance(value, _CONTAINERS)}  # fmt: skip
                    self._modules[id(module)] = (module, attributes, contents)
        tensors = {id(t): t for root in roots for t in (*root.parameters(), *root.buffers())}
        self._flags = {t: t.requires_grad for t in tensors.values() if isinstance(t, nn.Parameter)}
        self._versions = {t: t._version for t in tensors.values()}

    def restore(self, check_writes: bool = True) -> None:
        """Give the snapshot back; ``check_writes=False`` when the caller restored the written tensor values itself
        (e.g. a merge undone by a bit-exact unmerge)."""
        for module, attributes, contents in self._modules.values():
            module.__dict__.clear()
            module.__dict__.update(attributes)
            for name, saved in contents.items():
                _refill_container(attributes[name], saved)
        for param, flag in self._flags.items():
            param.requires_grad_(flag)
        written = [t for t, version in self._versions.items() if t._version != version] if check_writes else []
        if written:
            shapes = ", ".join(str(tuple(t.shape)) for t in written[:3])
            raise RuntimeError(
                f"the failed operation wrote into {len(written)} existing tensors (shapes {shapes}) before it failed; "
                "the module tree and flags were restored but those values could not be: reload the model"
            )


def _copy_container(value):
    return dict(value) if isinstance(value, dict) else list(value) if isinstance(value, list) else set(value)


def _refill_container(container, saved) -> None:
    if isinstance(container, dict):
        container.clear()
        container.update(saved)
    elif isinstance(container, list):
        container[:] = saved
    else:
        container.clear()
        container.update(saved)


@contextmanager
def all_or_nothing(*roots: nn.Module) -> Iterator[ModelSnapshot]:
    """Run the block; if it raises, give ``roots`` back as they were (see :class:`ModelSnapshot`) and re-raise."""
    snapshot = ModelSnapshot(*roots)
    try:
        yield snapshot
    except BaseException as error:
        try:
            snapshot.restore()
        except RuntimeError as restore_error:
            raise restore_error from error
        raise
