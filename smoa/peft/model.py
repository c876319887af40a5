"""``SMoAModel``: the PEFT ``BaseTuner`` that finds the targeted layers and wraps them in ``smoa.peft.layer.Linear``.

Beyond PEFT's template (``tuners/hira/model.py``) it guarantees the "bad input leaves the model unchanged" contract:

- attaching (``get_peft_model``, ``add_adapter``) is all-or-nothing: a target SMoA cannot adapt (a non-Linear
  module, a quantized layer that is not bitsandbytes' — those go to ``smoa.peft.bnb`` —, an invalid
  ``r``/``num_blocks`` for its shape) raises and every layer already wrapped is rolled back;
- loading (``PeftModel.from_pretrained``, ``load_adapter``) checks the whole checkpoint against the model — every
  SMoA layer has its factors and orders, shapes match, orders are permutations, factors are finite, the saved
  partition (K, r, shape) is the config's — before a single tensor is copied, and on failure removes the adapter it
  had attached for that checkpoint and gives every parameter back its ``requires_grad`` flag;
- transformers' ``PreTrainedModel.load_adapter`` (its own loader) is made all-or-nothing the same way for SMoA
  adapters: :func:`_all_or_nothing_load_adapter` wraps it, checks the loaded layers, and rolls back on any failure;
- mixed-adapter batches (``model(..., adapter_names=[...])``) route each sub-batch through its adapter, as LoRA.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import json
import os
import warnings
from functools import partial

import torch
from peft.tuners.tuners_utils import BaseTuner, BaseTunerLayer
from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING
from peft.utils.other import get_pattern_key
from torch import nn

from smoa.checkpoint import check_order, missing_orders_allowed
from smoa.model import ModelSnapshot, all_or_nothing, guard_loads
from smoa.partition import partition_progress, precomputed_orders

from .bnb import dispatch_bnb
from .config import SMoAConfig
from .layer import SMoALayer, dispatch_default

__all__ = ["SMoAModel"]


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
        # a model loaded in 4/8-bit (is_loaded_in_4bit/8bit) is fine: each layer is dispatched on its own type
        with all_or_nothing(model):  # a target that cannot be adapted: every layer already wrapped is given back
            weights = self._spectral_target_weights(model, adapter_name, kwargs.get("state_dict"))
            float64 = getattr(self.peft_config.get(adapter_name), "svd_dtype", None) == "float64"
            svd_dtype = torch.float64 if float64 else torch.float32
            total = self._count_targets(model, adapter_name)
            if total is None and weights is not None:  # all-linear: resolved here for the precomputation
                total = len(weights)
            with partition_progress(total), precomputed_orders(weights or (), svd_dtype):
                super().inject_adapter(model, adapter_name, *args, **kwargs)
        guard_loads(self)  # load_state_dict of the tuner, the PeftModel or any module inside: SMoA entries first

    def _spectral_target_weights(self, model: nn.Module, adapter_name: str, state_dict) -> list[torch.Tensor] | None:
        """W0 (as ``update_layer`` will see it) of every layer this injection will give spectral orders, so that
        :func:`smoa.partition.precomputed_orders` can compute them all at once; ``None`` where that is not known up
        front. A layer missed or added here changes nothing but the time: a cache miss is computed as before."""
        config = self.peft_config.get(adapter_name)
        if (config is None or state_dict is not None or getattr(config, "ordering", None) != "spectral"
                or getattr(config, "_orders_from_checkpoint", False) or getattr(config, "target_modules", None) is None
                or getattr(config, "target_parameters", None)):  # fmt: skip
            return None
        try:
            from peft.tuners.tuners_utils import _ExcludedModule, _maybe_include_all_linear_layers

            resolved = _maybe_include_all_linear_layers(copy.deepcopy(config), model)
            weights = []
            for key, module in model.named_modules():
                result = self._check_target_module_exists(resolved, key) if key else None
                if not result or isinstance(result, _ExcludedModule):
                    continue
                base = module.get_base_layer() if isinstance(module, BaseTunerLayer) else module
                weight = getattr(base, "weight", None)
                if isinstance(base, nn.Linear) and isinstance(weight, torch.Tensor):
                    transposed = isinstance(module, SMoALayer) and module.fan_in_fan_out
                    weights.append(weight.T if transposed else weight)
                elif type(base).__name__ == "Conv1D" and isinstance(weight, torch.Tensor):
                    weights.append(weight.T)
            return weights
        except Exception:
            return None

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
        new_module = dispatch_bnb(target, adapter_name, config, target_name=current_key, **kwargs)
        if new_module is None and _is_quantized_layer(base):
            raise NotImplementedError(
                f"target module {current_key!r} is a quantized {type(base).__module__}.{type(base).__name__}: SMoA "
                "supports bitsandbytes Linear4bit/Linear8bitLt quantized bases only (not GPTQ/AWQ/HQQ/torchao/...); "
                "load the base in bitsandbytes 4/8-bit or in bf16/fp16/fp32, or exclude the module"
            )
        if new_module is None:
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

    def _cast_adapter_dtype(self, adapter_name: str, autocast_adapter_dtype: bool = True) -> None:
        # PEFT upcasts half-precision factors by swapping their .data: a B known to be zero stays known zero
        known = {module: {name for name in module.smoa_B if module._B_known_zero(name)}
                 for module in self.model.modules() if isinstance(module, SMoALayer)}  # fmt: skip
        super()._cast_adapter_dtype(adapter_name, autocast_adapter_dtype)
        for module, names in known.items():
            module._restamp_zero_B(names)

    # ---- merging: every layer or none -------------------------------------------------------------------------
    def _merge_every_layer(self, adapter_names, safe_merge: bool) -> None:
        """Merge ``adapter_names`` into every tuner layer, or into none: when a layer refuses (``safe_merge=True`` and
        NaN/Inf, no orders, ...), the layers merged before it are unmerged (bit for bit for SMoA layers over a float
        base; a quantized base gets its former quantized weight back) and the error names the layer."""
        from peft.tuners.tuners_utils import onload_layer

        layers = [(name, module) for name, module in self.model.named_modules() if isinstance(module, BaseTunerLayer)]
        snapshot = ModelSnapshot(*(module for _, module in layers))  # merged_adapters, records, replaced weights
        # a bitsandbytes 8-bit base keeps its matmul state (cached CB/SCB, ...) in a plain object: give that back too
        states = {}
        for _, module in layers:
            state = getattr(module.get_base_layer(), "state", None)
            if state is not None and hasattr(state, "__dict__") and not isinstance(state, (dict, nn.Module)):
                states[id(state)] = (state, dict(vars(state)))
        done = []
        try:
            for name, layer in layers:
                weight = getattr(layer.get_base_layer(), "weight", None)
                in_place = isinstance(weight, torch.Tensor) and weight.is_floating_point()
                previous = weight.detach().clone() if layer.merged and in_place else None
                was_merged = layer.merged
                try:
                    with onload_layer(layer):
                        layer.merge(safe_merge=safe_merge, adapter_names=adapter_names)
                except Exception as error:
                    merged = f"the {len(done)} layers merged before it were unmerged" if done else "it was the first"
                    raise type(error)(f"{error} [layer {name!r}; no layer was merged: {merged}]") from error
                done.append((layer, was_merged, previous, weight if in_place else None))
        except Exception:
            for layer, was_merged, previous, weight in reversed(done):
                if weight is None:  # a quantized base: the merge replaced the weight, the snapshot gives it back
                    continue
                if not was_merged and layer.merged:
                    with warnings.catch_warnings():
                        warnings.simplefilter("ignore")
                        layer.unmerge()
                elif previous is not None:
                    with torch.no_grad():
                        weight.copy_(previous)
            snapshot.restore(check_writes=False)
            for state, attributes in states.values():
                vars(state).clear()
                vars(state).update(attributes)
            raise

    def merge_adapter(self, adapter_names: list[str] | None = None, safe_merge: bool = False) -> None:
        """PEFT's ``merge_adapter``, all or nothing: a layer that refuses leaves every layer unmerged as before."""
        self._check_merge_allowed()
        self._merge_every_layer(adapter_names, safe_merge)

    def _unload_and_optionally_merge(self, merge=True, progressbar=False, safe_merge=False, adapter_names=None):
        # merge_and_unload: every layer is merged first (all or nothing), and only then does PEFT unload them
        if merge:
            self._check_merge_allowed()
            self._merge_every_layer(adapter_names, safe_merge)
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="All adapters are already merged")
            return super()._unload_and_optionally_merge(merge, progressbar, safe_merge, adapter_names)

    # ---- mixed-adapter batches (LoRA's protocol: adapter_names is injected into every SMoA layer's forward) -------
    @contextlib.contextmanager
    def _enable_peft_forward_hooks(self, *args, **kwargs):
        adapter_names = kwargs.pop("adapter_names", None)
        if adapter_names is None:
            yield
            return
        if self.training:
            raise ValueError("Cannot pass `adapter_names` when the model is in training mode.")
        if isinstance(adapter_names, str) or not all(isinstance(name, str) for name in adapter_names):
            raise TypeError(f"adapter_names={adapter_names!r} must be a list of str (one adapter name per sample)")
        known = set()
        for module in self.modules():
            if isinstance(module, SMoALayer):
                known |= set(module.smoa_A.keys())
        unknown = {name for name in adapter_names if name != "__base__"} - known
        if unknown:
            raise ValueError(f"Trying to infer with non-existing adapter(s): {', '.join(sorted(unknown))}")
        from peft.utils.other import AuxiliaryTrainingWrapper

        handles = []
        for module in self.modules():
            if isinstance(module, (SMoALayer, AuxiliaryTrainingWrapper)):
                hook = partial(_adapter_names_pre_forward_hook, adapter_names=list(adapter_names))
                handles.append(module.register_forward_pre_hook(hook, with_kwargs=True))
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()

    # ---- loading: validate the whole checkpoint before anything is copied ---------------------------------------
    @classmethod
    def _remap_adapter_state_dict_for_load(cls, model, config, adapter_name, state_dict):
        state_dict = super()._remap_adapter_state_dict_for_load(model, config, adapter_name, state_dict)
        _check_checkpoint(model, adapter_name, state_dict)  # the PeftModel entry points roll back what was attached
        return state_dict


def _adapter_names_pre_forward_hook(module, args, kwargs, adapter_names):
    kwargs["adapter_names"] = adapter_names
    return args, kwargs


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
        expected.add(f"{name}.smoa_partition_info.{adapter_name}")  # optional: adapters saved before it existed
        for attr, size in (("smoa_row_order", module.out_features), ("smoa_col_order", module.in_features)):
            key = f"{name}.{attr}.{adapter_name}"
            expected.add(key)
            if key not in state_dict:
                if not missing_orders_allowed():
                    problems.append(
                        f"{key}: missing (expected: an SMoA checkpoint carries its orders; found: no such key) — "
                        "re-save it with save_pretrained/get_peft_model_state_dict, or opt in with "
                        "smoa.allow_missing_orders() to recompute them from W0"
                    )
                continue
            try:
                check_order(key, state_dict[key], size)
            except ValueError as error:
                problems.append(str(error))
        for attr in ("smoa_A", "smoa_B"):
            key = f"{name}.{attr}.{adapter_name}.weight"
            expected.add(key)
            if key not in state_dict:
                shape = tuple(model_state[key].shape) if key in model_state else "?"
                problems.append(
                    f"{key}: missing (expected a factor of shape {shape}; found: no such key) — is this checkpoint "
                    "for this model, these target_modules and this adapter name?"
                )
            elif key in model_state and tuple(state_dict[key].shape) != tuple(model_state[key].shape):
                problems.append(
                    f"{key}: shape {tuple(state_dict[key].shape)} found in the checkpoint, "
                    f"{tuple(model_state[key].shape)} expected by this model (r={module.r[adapter_name]}, "
                    f"num_blocks={module.num_blocks[adapter_name]}, {module.out_features}x{module.in_features}) — load "
                    "it with the config and base model it was trained with"
                )
        if not problems:  # finiteness, integer orders of any dtype, the saved partition against this config
            try:
                module._check_adapter_state(state_dict, f"{name}.", adapter_name)
            except (ValueError, RuntimeError) as error:
                problems.append(str(error))
    stray = sorted(
        key
        for key in state_dict
        if any(
            f".{attr}." in key
            for attr in ("smoa_A", "smoa_B", "smoa_row_order", "smoa_col_order", "smoa_partition_info")
        )
        and key not in expected
    )
    if stray:
        problems.append(
            f"{len(stray)} SMoA tensors match no SMoA layer of this model (expected none), e.g. {stray[:3]} — check "
            "target_modules and the base model"
        )
    if problems:
        raise ValueError(
            f"the SMoA checkpoint for adapter {adapter_name!r} does not fit this model (was it trained on another "
            f"base model or with another target_modules?); nothing was loaded:\n  - "
            + "\n  - ".join(problems[:10])
            + (f"\n  ... and {len(problems) - 10} more" if len(problems) > 10 else "")
        )


# ---- transformers' PreTrainedModel.load_adapter: all-or-nothing for SMoA adapters -----------------------------------
def _check_loaded_adapter(model: nn.Module, adapter_name: str, loading_info) -> None:
    """After transformers' loader: every SMoA layer of ``adapter_name`` got its factors and valid orders."""
    problems = []
    for key in sorted(getattr(loading_info, "missing_keys", None) or ()):
        if "smoa_" in key and adapter_name in key:
            problems.append(f"{key}: missing from the checkpoint (expected by this model's SMoA layer; found: no key)")
    for entry in sorted(getattr(loading_info, "mismatched_keys", None) or (), key=str):
        if "smoa_" in str(entry):
            problems.append(
                f"{entry}: the checkpoint's shape (found) differs from this model's (expected) — load it onto the "
                "base model and with the config it was trained with"
            )
    for name, module in model.named_modules():
        if not isinstance(module, SMoALayer) or adapter_name not in module.smoa_A:
            continue
        rows, cols = module.smoa_row_order[adapter_name], module.smoa_col_order[adapter_name]
        if adapter_name in module._smoa_orders_pending and not (bool(rows[0] >= 0) and bool(cols[0] >= 0)):
            problems.append(
                f"{name}.smoa_row_order.{adapter_name}: missing (expected: an SMoA checkpoint carries its orders; "
                "found: no such key) — re-save the adapter with save_pretrained"
            )
            continue
        state = {f"{name}.smoa_{attr}.{adapter_name}": getattr(module, f"smoa_{attr}")[adapter_name]
                 for attr in ("row_order", "col_order", "partition_info")}  # fmt: skip
        state[f"{name}.smoa_A.{adapter_name}.weight"] = module.smoa_A[adapter_name].weight
        state[f"{name}.smoa_B.{adapter_name}.weight"] = module.smoa_B[adapter_name].weight
        try:
            module._check_adapter_state(state, f"{name}.", adapter_name)
        except (ValueError, RuntimeError) as error:
            problems.append(str(error))
    if problems:
        raise ValueError(
            f"the SMoA adapter {adapter_name!r} does not fit this model; nothing was loaded:\n  - "
            + "\n  - ".join(problems[:10])
        )


def _has_smoa(model: nn.Module) -> bool:
    configs = getattr(model, "peft_config", None)
    return any(isinstance(module, SMoALayer) for module in model.modules()) or (
        isinstance(configs, dict) and any(isinstance(config, SMoAConfig) for config in configs.values())
    )


def _folder_is_smoa(path) -> bool:
    """Whether ``path`` (a local adapter folder, or its subfolder) holds an SMoA adapter config; False otherwise."""
    from .config import is_smoa_peft_type

    try:
        with open(os.path.join(str(path), "adapter_config.json")) as handle:
            return is_smoa_peft_type(json.load(handle).get("peft_type"))
    except (OSError, ValueError, TypeError, AttributeError):
        return False


def _all_or_nothing_load_adapter(load_adapter):
    @functools.wraps(load_adapter)
    def wrapper(self, peft_model_id=None, adapter_name=None, *args, **kwargs):
        name = adapter_name if adapter_name is not None else "default"
        involved = (
            _has_smoa(self)
            or isinstance(kwargs.get("peft_config"), SMoAConfig)
            or _folder_is_smoa(os.path.join(str(peft_model_id or ""), kwargs.get("subfolder") or ""))
        )
        snapshot = ModelSnapshot(self)
        try:
            info = load_adapter(self, peft_model_id, adapter_name, *args, **kwargs)
            if isinstance(getattr(self, "peft_config", {}).get(name), SMoAConfig):
                _check_loaded_adapter(self, name, info)
            return info
        except Exception as error:
            if not (involved or _has_smoa(self)):
                raise
            snapshot.restore()
            if not isinstance(error, ValueError) or "nothing was loaded" not in str(error):
                raise ValueError(
                    f"loading the SMoA adapter {peft_model_id!r} as {name!r} failed, nothing was loaded (the model "
                    f"is as it was): {error}"
                ) from error
            raise

    wrapper._smoa_all_or_nothing = True
    return wrapper


def _patch_transformers_load_adapter() -> None:
    try:
        from transformers.integrations.peft import PeftAdapterMixin
    except ImportError:  # pragma: no cover - transformers without the PEFT integration
        return
    if not getattr(PeftAdapterMixin.load_adapter, "_smoa_all_or_nothing", False):
        PeftAdapterMixin.load_adapter = _all_or_nothing_load_adapter(PeftAdapterMixin.load_adapter)


_patch_transformers_load_adapter()


# ---- writing adapter folders: safetensors only ----------------------------------------------------------------------
# smoa refuses to read a pickle adapter_model.bin for SMoA (a pickle can run code, see smoa.peft.config), so it does not
# write one either: PeftModel.save_pretrained(safe_serialization=False) raises before anything is written when one of
# the adapters it would save is an SMoA adapter (other methods are untouched). Installed on import, idempotently.
def _safetensors_only(save_pretrained):
    import functools

    @functools.wraps(save_pretrained)
    def checked(self, save_directory, safe_serialization: bool = True, selected_adapters=None, *args, **kwargs):
        if not safe_serialization:
            names = list(self.peft_config) if selected_adapters is None else list(selected_adapters)
            smoa = [name for name in names if isinstance(self.peft_config.get(name), SMoAConfig)]
            if smoa:
                raise ValueError(
                    f"safe_serialization=False: SMoA adapters ({', '.join(smoa)}) are written as safetensors only "
                    f"(smoa refuses to unpickle adapter_model.bin files, which can run code); nothing was written to "
                    f"{save_directory!r}. Call save_pretrained() with safe_serialization=True (the default)"
                )
        result = save_pretrained(self, save_directory, safe_serialization, selected_adapters, *args, **kwargs)
        names = list(self.peft_config) if selected_adapters is None else list(selected_adapters)
        if any(isinstance(self.peft_config.get(name), SMoAConfig) for name in names):
            _add_readme_note(save_directory)
        return result

    checked._smoa_checked = True
    return checked


README_NOTE = (
    '\n## Loading this adapter\n\nThis folder holds an SMoA adapter (`peft_type` "SMOA"), which PEFT alone does not '
    "know (it fails with `KeyError: 'SMOA'`). Install the `smoa` package and `import smoa` before "
    "`PeftConfig.from_pretrained` / `PeftModel.from_pretrained` / `model.load_adapter`.\n"
)


def _add_readme_note(save_directory) -> None:
    path = os.path.join(str(save_directory), "README.md")
    text = ""
    if os.path.isfile(path):
        with open(path, encoding="utf-8") as handle:
            text = handle.read()
    if README_NOTE not in text:
        with open(path, "a", encoding="utf-8") as handle:
            handle.write(README_NOTE)


def _install_safetensors_only() -> None:
    from peft import PeftModel

    if not getattr(PeftModel.save_pretrained, "_smoa_checked", False):
        PeftModel.save_pretrained = _safetensors_only(PeftModel.save_pretrained)


_install_safetensors_only()


# ---- PeftModel.from_pretrained / load_adapter: all-or-nothing for SMoA adapters ------------------------------------
# PEFT attaches the adapter (replacing modules, changing requires_grad flags, the module's peft_config) before it reads
# the weights; a load that then fails leaves the model changed. For every load that involves SMoA (an SMoAConfig, an
# SMoA folder, or a model already holding SMoA layers) smoa checks what it can up front (a folder whose tensors are
# not the config's method) and otherwise gives back the model as it was (smoa.model.ModelSnapshot) before re-raising.
def _check_config_fits_folder(config, folder: str) -> None:
    """Refuse, before anything changes, an explicit ``config=`` whose method is not the one of the folder's tensors."""
    from peft.utils import SAFETENSORS_WEIGHTS_NAME
    from safetensors import safe_open

    from .config import _check_smoa_weights

    weights = os.path.join(folder, SAFETENSORS_WEIGHTS_NAME)
    if config is None or not os.path.isfile(weights):
        return
    try:
        with safe_open(weights, framework="pt") as handle:
            keys = list(handle.keys())
    except Exception as error:
        raise ValueError(
            f"{weights} is not a readable safetensors file ({error}); nothing was loaded — re-download or re-save the "
            "adapter"
        ) from error
    smoa_keys = [key for key in keys if ".smoa_" in key or key.startswith("smoa_")]
    saved_type = None
    with contextlib.suppress(OSError, ValueError, AttributeError):
        with open(os.path.join(folder, "adapter_config.json")) as handle:
            saved_type = json.load(handle).get("peft_type")
    if isinstance(config, SMoAConfig) and not smoa_keys:
        kinds = sorted({key.rsplit(".", 2)[-2] if key.count(".") >= 2 else key for key in keys})[:4]
        raise ValueError(
            f"config=SMoAConfig(...) but {weights} holds no SMoA tensors: expected smoa_A/smoa_B/smoa_row_order/"
            f"smoa_col_order entries, found {len(keys)} tensors such as {kinds} (its adapter_config.json says "
            f"peft_type={saved_type!r}); nothing was loaded. Load that folder without config= (with its own method), "
            "or point to an SMoA adapter folder"
        )
    if not isinstance(config, SMoAConfig) and smoa_keys:
        raise ValueError(
            f"config={type(config).__name__}(...) but {weights} holds an SMoA adapter ({len(smoa_keys)} smoa_ tensors, "
            f"e.g. {smoa_keys[0]!r}); loading it as {getattr(config, 'peft_type', None)!r} would silently drop them. "
            "Nothing was loaded: load it without config= (after `import smoa`) or with an SMoAConfig"
        )
    if smoa_keys:
        _check_smoa_weights(weights, config.to_dict(), "the config= argument")


def _all_or_nothing_from_pretrained(from_pretrained):
    import inspect

    function = from_pretrained.__func__
    signature = inspect.signature(function)

    @functools.wraps(function)
    def wrapper(cls, model, model_id, *args, **kwargs):
        bound = signature.bind_partial(cls, model, model_id, *args, **kwargs).arguments
        config = bound.get("config")
        folder = os.path.join(str(model_id), (bound.get("kwargs") or {}).get("subfolder") or "")
        _check_config_fits_folder(config, folder)
        if not (isinstance(config, SMoAConfig) or _folder_is_smoa(folder) or _has_smoa(model)):
            return function(cls, model, model_id, *args, **kwargs)
        with all_or_nothing(model), _naming_source(model_id):
            return function(cls, model, model_id, *args, **kwargs)

    wrapper._smoa_all_or_nothing = True
    return classmethod(wrapper)


@contextlib.contextmanager
def _naming_source(model_id):
    """Errors of a load name the adapter folder (or hub id) they came from."""
    try:
        yield
    except (ValueError, RuntimeError) as error:
        if str(model_id) in str(error) or type(error) not in (ValueError, RuntimeError):
            raise
        raise type(error)(f"loading {str(model_id)!r}: {error}") from error


def _all_or_nothing_peft_load_adapter(load_adapter):
    @functools.wraps(load_adapter)
    def wrapper(self, model_id, *args, **kwargs):
        folder = os.path.join(str(model_id), kwargs.get("subfolder") or "")
        if not (_folder_is_smoa(folder) or _has_smoa(self)):
            return load_adapter(self, model_id, *args, **kwargs)
        with all_or_nothing(self), _naming_source(model_id):
            return load_adapter(self, model_id, *args, **kwargs)

    wrapper._smoa_all_or_nothing = True
    return wrapper


def _install_all_or_nothing_loads() -> None:
    from peft import PeftModel

    if not getattr(PeftModel.from_pretrained, "_smoa_all_or_nothing", False):
        PeftModel.from_pretrained = _all_or_nothing_from_pretrained(PeftModel.from_pretrained)
    if not getattr(PeftModel.load_adapter, "_smoa_all_or_nothing", False):
        PeftModel.load_adapter = _all_or_nothing_peft_load_adapter(PeftModel.load_adapter)


_install_all_or_nothing_loads()
