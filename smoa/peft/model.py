"""``SMoAModel``: the PEFT ``BaseTuner`` that finds the targeted layers and wraps them in ``smoa.peft.layer.Linear``.

Beyond PEFT's template (``tuners/hira/model.py``) it guarantees the "bad input leaves the model unchanged" contract:

- attaching (``get_peft_model``, ``add_adapter``) is all-or-nothing: a target SMoA cannot adapt (a non-Linear
  module, a quantized base, an invalid ``r``/``num_blocks`` for its shape) raises and every layer already wrapped is
  rolled back;
- loading (``PeftModel.from_pretrained``, ``load_adapter``) checks the whole checkpoint against the model — every
  SMoA layer has its factors and orders, shapes match, orders are permutations — before a single tensor is copied,
  and on failure removes the adapter it had attached for that checkpoint.
"""

from __future__ import annotations

import torch
from peft.tuners.tuners_utils import BaseTuner, BaseTunerLayer
from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING
from peft.utils.other import get_pattern_key
from torch import nn

from smoa.partition import partition_progress, validate_order

from .config import SMoAConfig
from .layer import SMoALayer, dispatch_default

__all__ = ["SMoAModel"]

_QUANTIZED_FLAGS = ("is_loaded_in_8bit", "is_loaded_in_4bit")


def _check_not_quantized(model: nn.Module) -> None:
    flags = [flag for flag in _QUANTIZED_FLAGS if getattr(model, flag, False)]
    if flags:
        raise NotImplementedError(
            f"SMoA on a quantized base model ({', '.join(flags)}) is not supported yet: the spectral partition and the "
            "update ΔW = (BA) ⊙ W0 need W0 as a dense floating-point weight. Load the base model in bf16/fp16/fp32."
        )


def _is_quantized_layer(layer: nn.Module) -> bool:
    """bitsandbytes/GPTQ/AWQ/HQQ/torchao layers; a GGUF checkpoint dequantized on load is a plain float layer."""
    weight = getattr(layer, "weight", None)
    return (
        type(layer).__name__ in ("Linear8bitLt", "Linear4bit")
        or any(hasattr(layer, name) for name in ("qweight", "W_q"))
        or (weight is not None and (not weight.dtype.is_floating_point or hasattr(weight, "quant_state")))
        or (weight is not None and type(weight).__name__ not in ("Parameter", "Tensor", "DTensor"))
    )


class SMoAModel(BaseTuner):
    """Creates an SMoA adapter model from a pretrained model (``get_peft_model(model, SMoAConfig(...))``).

    Example::

        >>> import smoa  # registers the "SMOA" PEFT type
        >>> from peft import get_peft_model
        >>> from smoa.peft import SMoAConfig
        >>> model = get_peft_model(base_model, SMoAConfig(r=8, num_blocks=2, target_modules=["q_proj", "v_proj"]))
    """

    prefix: str = "smoa_"
    tuner_layer_cls = SMoALayer
    target_module_mapping = TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING

    # ---- injection ----------------------------------------------------------------------------------------------
    def inject_adapter(self, model: nn.Module, adapter_name: str, *args, **kwargs) -> None:
        _check_not_quantized(model)
        existing = {id(module) for module in model.modules() if isinstance(module, SMoALayer)}
        try:
            with partition_progress(self._count_targets(model, adapter_name)):
                super().inject_adapter(model, adapter_name, *args, **kwargs)
        except Exception:
            _remove_adapter_layers(model, adapter_name, keep=existing)
            raise

    def _count_targets(self, model: nn.Module, adapter_name: str) -> int | None:
        """How many layers this injection adapts, for the progress bar (``None`` where PEFT resolves it later)."""
        config = self.peft_config.get(adapter_name)
        if config is None or config.target_modules is None or config.target_modules == "all-linear":
            return None
        return sum(bool(self._check_target_module_exists(config, key)) for key, _ in model.named_modules() if key)

    def _create_and_replace(self, config: SMoAConfig, adapter_name, target, target_name, parent, current_key) -> None:
        if current_key is None:
            raise ValueError("Current Key shouldn't be `None`")
        r = config.rank_pattern.get(get_pattern_key(config.rank_pattern.keys(), current_key), config.r)
        alpha = config.alpha_pattern.get(get_pattern_key(config.alpha_pattern.keys(), current_key), config.lora_alpha)
        kwargs = {"r": r, "lora_alpha": alpha, "fan_in_fan_out": config.fan_in_fan_out}
        if isinstance(target, SMoALayer):
            target.update_layer(adapter_name, r, alpha, config=config)
            return
        base = target.get_base_layer() if isinstance(target, BaseTunerLayer) else target
        if _is_quantized_layer(base):
            raise NotImplementedError(
                f"target module {current_key!r} is a quantized {type(base).__name__}: SMoA on 8-bit/4-bit base layers "
                "is not supported yet"
            )
        new_module = dispatch_default(target, adapter_name, config, **kwargs)
        if new_module is None:
            raise TypeError(
                f"target module {current_key!r} is a {type(base).__name__}; SMoA supports torch.nn.Linear and "
                "transformers' Conv1D only (check target_modules / exclude_modules)"
            )
        if adapter_name not in self.active_adapters:
            new_module.requires_grad_(False)  # an additional adapter is not trainable until set_adapter
        self._replace_module(parent, target_name, new_module, target)

    def _replace_module(self, parent, child_name, new_module, child) -> None:
        setattr(parent, child_name, new_module)
        if hasattr(child, "base_layer"):
            child = child.base_layer
        meta = torch.device("meta")
        for name, module in new_module.named_modules():
            if self.prefix in name and not any(p.device == meta for p in module.parameters()):
                module.to(child.weight.device)

    # ---- loading: validate the whole checkpoint before anything is copied ---------------------------------------
    @classmethod
    def _remap_adapter_state_dict_for_load(cls, model, config, adapter_name, state_dict):
        state_dict = super()._remap_adapter_state_dict_for_load(model, config, adapter_name, state_dict)
        try:
            _check_checkpoint(model, adapter_name, state_dict)
        except ValueError:
            _discard_failed_adapter(model, adapter_name)
            raise
        return state_dict


def _remove_adapter_layers(model: nn.Module, adapter_name: str, keep: set[int]) -> None:
    """Undo a partial injection: unwrap layers created for ``adapter_name``, drop it from layers in ``keep``."""
    for name, module in list(model.named_modules()):
        if not isinstance(module, SMoALayer):
            continue
        if id(module) in keep:
            if adapter_name in module.smoa_A:
                module.delete_adapter(adapter_name)
        elif name:
            model.set_submodule(name, module.get_base_layer())


def _discard_failed_adapter(model: nn.Module, adapter_name: str) -> None:
    """After a rejected checkpoint: remove the adapter PEFT attached for it, so that the model is as before."""
    from peft import PeftModel

    if not isinstance(model, PeftModel) or adapter_name not in model.peft_config:
        return
    if len(model.peft_config) > 1:
        model.delete_adapter(adapter_name)
    else:  # PeftModel.from_pretrained on a bare base model: give the base model back its own layers
        base = model.base_model.unload()
        if "peft_config" in vars(base):
            del base.peft_config


def _check_checkpoint(model: nn.Module, adapter_name: str, state_dict: dict[str, torch.Tensor]) -> None:
    """Raise ``ValueError`` unless ``state_dict`` (model keys) holds, for every SMoA layer carrying ``adapter_name``,
    factors of the model's shapes and valid orders; and no SMoA tensor for a layer the model does not have."""
    model_state = model.state_dict()
    expected: set[str] = set()
    problems: list[str] = []
    for name, module in model.named_modules():
        if not isinstance(module, SMoALayer) or adapter_name not in module.smoa_A:
            continue
        name = name.removeprefix("_orig_mod.")
        for attr, size in (("smoa_row_order", module.out_features), ("smoa_col_order", module.in_features)):
            key = f"{name}.{attr}.{adapter_name}"
            expected.add(key)
            if key not in state_dict:
                problems.append(f"{key}: missing (an SMoA checkpoint must carry its orders)")
                continue
            try:
                validate_order(key, state_dict[key], size)
            except ValueError as error:
                problems.append(str(error))
        for attr in ("smoa_A", "smoa_B"):
            key = f"{name}.{attr}.{adapter_name}.weight"
            expected.add(key)
            if key not in state_dict:
                problems.append(f"{key}: missing")
            elif key in model_state and tuple(state_dict[key].shape) != tuple(model_state[key].shape):
                problems.append(
                    f"{key}: shape {tuple(state_dict[key].shape)} in the checkpoint, {tuple(model_state[key].shape)} "
                    f"in this model"
                )
    stray = sorted(
        key
        for key in state_dict
        if any(f".{attr}." in key for attr in ("smoa_A", "smoa_B", "smoa_row_order", "smoa_col_order"))
        and key not in expected
    )
    if stray:
        problems.append(f"{len(stray)} SMoA tensors match no SMoA layer of this model, e.g. {stray[:3]}")
    if problems:
        raise ValueError(
            f"the SMoA checkpoint for adapter {adapter_name!r} does not fit this model (was it trained on another "
            f"base model or with another target_modules?); nothing was loaded:\n  - "
            + "\n  - ".join(problems[:10])
            + (f"\n  ... and {len(problems) - 10} more" if len(problems) > 10 else "")
        )
