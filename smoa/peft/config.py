"""``SMoAConfig``: the PEFT configuration of an SMoA adapter (SPEC §1-2), following ``LoraConfig``'s names.

Naming choices (so that a ``LoraConfig(...)`` call becomes an ``SMoAConfig(...)`` call by changing the class name):

- ``r`` is SPEC's r, the **total** rank budget of a layer; block k gets rank ``r // num_blocks``, the first
  ``r % num_blocks`` blocks one more (the authors' split), so the trainable-parameter count equals LoRA's at rank
  ``r / num_blocks`` when it divides. ``block_ranks`` (or a list as a ``rank_pattern`` value) sets the ranks per
  block explicitly. The scale is ``s = lora_alpha / r`` with r the total rank in every case.
- ``lora_alpha`` (LoRA's name, not ``alpha``) sets the scale ``s = lora_alpha / r``. Its default is ``None``, meaning
  ``lora_alpha = r`` for every layer (``s = 1``, the paper's recipe) — also under ``rank_pattern``. LoRA's own default
  is a fixed ``lora_alpha = 8``; pass a number to get LoRA's behaviour.
- ``lora_dropout`` (LoRA's name) is the dropout on the adapter path only.
- ``init_weights``: ``True`` (every ``A_k`` kaiming-uniform over its block's fan-in, ``B = 0``: an exact no-op),
  ``"gaussian"`` (``A_k ~ N(0, 1/r_k)``, ``B = 0``, as LoRA's) or ``False`` (``B`` random too, strong enough that
  ΔW is of W0's own magnitude; for tests and debugging).
- ``bias``: ``"none"`` | ``"all"`` | ``"smoa_only"`` (LoRA's ``"lora_only"``): which base biases train and are saved.

Learning rate: Hadamard adapters (SMoA, HiRA) want about 10× LoRA's learning rate, because their update is scaled
by W0's small entries (ΔW = (BA) ⊙ W0). In this repository's study (MiniLM-L6 on 3-class tweets, ``results/``),
the validation grid picked 3e-2 for SMoA and HiRA against 3e-3 for LoRA; start there (e.g. 1e-2 to 3e-2 with AdamW
for SMoA where you would use 1e-3 to 3e-3 for LoRA) and tune.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import numbers
import os
import re
from dataclasses import dataclass, field
from typing import Literal

from peft.config import PeftConfig, PeftConfigMixin
from peft.utils import SAFETENSORS_WEIGHTS_NAME, WEIGHTS_NAME, PeftType

from smoa.factors import resolve_block_ranks
from smoa.partition import ORDERINGS

__all__ = ["REQUIRES_FIELD", "SVD_DTYPES", "SMoAConfig", "is_smoa_peft_type"]

SVD_DTYPES = ("float32", "float64")
# Written into every saved SMoA adapter_config.json (and a note appended to the folder's README.md): PEFT without smoa
# imported fails with a bare ``KeyError: 'SMOA'``, so the folder itself says what is missing. smoa drops the field
# when it reads the file. A peft_type spelling that PEFT's own KeyError would print (SAVED_PEFT_TYPE) is read too.
REQUIRES_FIELD = "smoa_requires"
REQUIRES_NOTE = "an SMoA adapter: pip install smoa, then `import smoa` before PeftConfig/PeftModel.from_pretrained"
SAVED_PEFT_TYPE = "SMOA (an adapter of the smoa package: pip install smoa, then `import smoa` before loading it)"


def is_smoa_peft_type(value) -> bool:
    """Whether ``value`` (a peft_type read from adapter_config.json) names SMoA: "SMOA" or :data:`SAVED_PEFT_TYPE`."""
    return isinstance(value, str) and (value == "SMOA" or value == SAVED_PEFT_TYPE)


def _check_int(name: str, value, minimum: int = 1) -> None:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {value!r}")
    if value < minimum:
        raise ValueError(f"{name}={value} must be >= {minimum}")


@dataclass
class SMoAConfig(PeftConfig):
    """Configuration of an SMoA adapter (Spectrum Modulation Adapter, arXiv 2605.21147) for :class:`SMoAModel`.

    Args:
        r: total rank budget per layer (SPEC's r); block k gets rank ``r // num_blocks``, the first ``r % num_blocks``
            blocks one more (the authors' split), unless ``block_ranks`` says otherwise. Default 8.
        num_blocks: K, the number of spectral blocks (row/column bands of W0 paired on the diagonal). Default 2.
        lora_alpha: scale numerator, ``s = lora_alpha / r``; ``None`` (default) means ``lora_alpha = r`` (s = 1).
        lora_dropout: dropout probability on the adapter path. Default 0.0.
        target_modules: module names (exact or ``"." + suffix`` match), a regex (full match), or ``"all-linear"``
            (every ``nn.Linear``/``Conv1D`` except the output layer). ``None``: LoRA's per-architecture default.
        exclude_modules: names or a regex of modules never to adapt.
        fan_in_fan_out: ``True`` for layers storing ``weight`` as (fan_in, fan_out), e.g. GPT-2's ``Conv1D``
            (set automatically, with a warning, when a ``Conv1D`` is targeted).
        modules_to_save: extra modules trained and saved in full (e.g. a classification head).
        init_weights: ``True``: ``A_k`` kaiming-uniform(a=√5) over |C_k|, ``B = 0`` (no-op). ``"gaussian"``:
            ``A_k ~ N(0, 1/r_k)``, ``B = 0``. ``False``: ``B`` random too, so that ΔW is of W0's magnitude (tests).
        bias: ``"none"`` (default), ``"all"`` (every bias of the model trains) or ``"smoa_only"`` (the biases of the
            adapted layers), as LoRA's ``bias``; the trained biases are saved with the adapter.
        layers_to_transform, layers_pattern: restrict the adapted layers by index, as in LoRA.
        rank_pattern: ``{name or regex: r}`` overriding ``r`` per layer; a value may also be a list of
            ``num_blocks`` per-block ranks (then r is their sum).
        block_ranks: explicit per-block ranks ``[r_1, ..., r_K]`` (ints >= 0 summing to ``r``) for every layer
            without a ``rank_pattern`` entry; ``None`` (default): the authors' split of ``r``.
        alpha_pattern: ``{name or regex: lora_alpha}`` overriding ``lora_alpha`` per layer.
        ordering: ``"spectral"`` (SPEC §1), or the ablations ``"identity"`` / ``"random"`` (seeded by ``seed``).
        seed: seed of the ``"random"`` ordering.
        svd_dtype: ``"float32"`` or ``"float64"``; kept for compatibility: the spectral partition is computed from the
            smaller Gram matrix in float64 (orders equal to a float64 SVD's, see :mod:`smoa.partition`).

    Learning rate: use about 10× LoRA's (see the module docstring: 3e-2 vs 3e-3 in our study).

    The orders computed from the SVD when the adapter is attached are part of the saved adapter
    (``adapter_model.safetensors``); loading never recomputes them.
    """

    r: int = field(
        default=8,
        metadata={
            "help": "Total rank budget per layer, split over the blocks (r // K each, the first r % K one more)."
        },
    )
    num_blocks: int = field(default=2, metadata={"help": "K, the number of spectral blocks."})
    lora_alpha: float | None = field(
        default=None, metadata={"help": "Scale numerator, s = lora_alpha / r; None means lora_alpha = r (s = 1)."}
    )
    lora_dropout: float = field(default=0.0, metadata={"help": "Dropout on the adapter path."})
    target_modules: list[str] | str | None = field(
        default=None,
        metadata={
            "help": "Module names or a regex of the modules to adapt, or 'all-linear'. None: the per-architecture "
            "default of LoRA."
        },
    )
    exclude_modules: list[str] | str | None = field(
        default=None, metadata={"help": "Module names or a regex of the modules not to adapt."}
    )
    fan_in_fan_out: bool = field(
        default=False, metadata={"help": "True if the layer stores weight as (fan_in, fan_out), e.g. GPT-2 Conv1D."}
    )
    modules_to_save: list[str] | None = field(
        default=None, metadata={"help": "Modules besides the SMoA layers to train and save (e.g. a classifier head)."}
    )
    init_weights: bool | Literal["gaussian"] = field(
        default=True,
        metadata={"help": "True: B = 0 (exact no-op at start); 'gaussian': A ~ N(0, 1/r_k), B = 0; False: B random."},
    )
    bias: Literal["none", "all", "smoa_only"] = field(
        default="none", metadata={"help": "Biases to train and save: 'none', 'all' or 'smoa_only' (adapted layers)."}
    )
    block_ranks: list[int] | None = field(
        default=None, metadata={"help": "Per-block ranks [r_1..r_K] summing to r; None: r split the authors' way."}
    )
    layers_to_transform: list[int] | int | None = field(
        default=None, metadata={"help": "Indices of the layers to adapt (with target_modules as a list)."}
    )
    layers_pattern: list[str] | str | None = field(
        default=None, metadata={"help": "Name of the nn.ModuleList holding the layers, e.g. 'layers' or 'h'."}
    )
    rank_pattern: dict | None = field(
        default_factory=dict, metadata={"help": "{name or regex: r} overriding r per layer."}
    )
    alpha_pattern: dict | None = field(
        default_factory=dict, metadata={"help": "{name or regex: lora_alpha} overriding lora_alpha per layer."}
    )
    ordering: Literal["spectral", "identity", "random"] = field(
        default="spectral", metadata={"help": "Block ordering: 'spectral' (SVD scores), 'identity' or 'random'."}
    )
    seed: int = field(default=0, metadata={"help": "Seed of the 'random' ordering."})
    svd_dtype: Literal["float32", "float64"] = field(
        default="float32",
        metadata={"help": "Kept for compatibility: the ordering is computed in float64 (Gram route)."},
    )

    def __post_init__(self) -> None:
        # A config read back from adapter_config.json carries its peft_type; a fresh one does not. The former comes
        # with saved orders, so the tuner does not run the SVD when it attaches it (see SMoALayer.update_layer).
        self._orders_from_checkpoint = self.peft_type is not None
        super().__post_init__()
        self.peft_type = PeftType.SMOA
        self.target_modules = set(self.target_modules) if isinstance(self.target_modules, list) else self.target_modules
        self.exclude_modules = (
            set(self.exclude_modules) if isinstance(self.exclude_modules, list) else self.exclude_modules
        )
        for argument in ("target_modules", "exclude_modules"):
            pattern = getattr(self, argument)
            if isinstance(pattern, str) and pattern != "all-linear":
                try:
                    re.compile(pattern)
                except re.error as error:
                    raise ValueError(f"{argument}={pattern!r} is not a valid regular expression ({error})") from None
        if isinstance(self.target_modules, str) and self.layers_to_transform is not None:
            raise ValueError("`layers_to_transform` cannot be used when `target_modules` is a str.")
        if isinstance(self.target_modules, str) and self.layers_pattern is not None:
            raise ValueError("`layers_pattern` cannot be used when `target_modules` is a str.")
        if self.layers_pattern and not self.layers_to_transform:
            raise ValueError("When `layers_pattern` is specified, `layers_to_transform` must also be specified.")
        _check_int("r", self.r)
        _check_int("num_blocks", self.num_blocks)
        for name, rank in {"r": self.r, **{f"rank_pattern[{k!r}]": v for k, v in self.rank_pattern.items()}}.items():
            if isinstance(rank, (list, tuple)):  # per-block ranks for that layer
                try:
                    resolve_block_ranks(sum(rank), self.num_blocks, rank)
                except (TypeError, ValueError) as error:
                    raise ValueError(f"{name}={list(rank)}: {error}") from None
                _check_int(f"sum({name})", sum(rank))
            else:
                _check_int(name, rank)
        if self.block_ranks is not None:
            self.block_ranks = list(self.block_ranks) if isinstance(self.block_ranks, tuple) else self.block_ranks
            resolve_block_ranks(self.r, self.num_blocks, self.block_ranks)
        if self.bias not in ("none", "all", "smoa_only"):
            raise ValueError(f"bias={self.bias!r} is not one of ('none', 'all', 'smoa_only')")
        if self.ordering not in ORDERINGS:
            raise ValueError(f"ordering={self.ordering!r} is not one of {ORDERINGS}")
        if self.svd_dtype not in SVD_DTYPES:
            raise ValueError(f"svd_dtype={self.svd_dtype!r} is not one of {SVD_DTYPES}")
        if not isinstance(self.init_weights, bool) and self.init_weights != "gaussian":
            raise ValueError(f"init_weights={self.init_weights!r} must be True, False or 'gaussian'")
        # lora_alpha / lora_dropout are checked per layer by smoa.factors.check_smoa_arguments (one place for the rules)

    def save_pretrained(self, save_directory: str, **kwargs) -> None:
        """PEFT's ``save_pretrained``, plus a ``smoa_requires`` field saying which package reads the folder (PEFT alone
        fails on it with a bare ``KeyError: 'SMOA'``); ``peft_type`` stays ``"SMOA"``."""
        super().save_pretrained(save_directory, **kwargs)
        path = os.path.join(save_directory, "adapter_config.json")
        with open(path) as handle:
            saved = json.load(handle)
        saved[REQUIRES_FIELD] = REQUIRES_NOTE
        with open(path, "w") as handle:
            handle.write(json.dumps(saved, indent=2, sort_keys=True))

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str, subfolder: str | None = None, **kwargs):
        """Load the config (PEFT's ``from_pretrained``) and, for a local adapter folder, check that its
        ``adapter_model.safetensors`` is readable: ``PeftModel.from_pretrained``/``load_adapter`` read the config
        before they touch the model, so a corrupted or truncated file fails here with the model unchanged."""
        config = super().from_pretrained(pretrained_model_name_or_path, subfolder=subfolder, **kwargs)
        folder = os.path.join(str(pretrained_model_name_or_path), subfolder or "")
        weights = os.path.join(folder, SAFETENSORS_WEIGHTS_NAME)
        if os.path.isfile(weights):
            from safetensors import safe_open

            try:
                with safe_open(weights, framework="pt") as handle:
                    handle.keys()
            except Exception as error:
                raise ValueError(
                    f"{weights} is not a readable safetensors file ({error}); nothing was loaded — re-download or "
                    "re-save the adapter"
                ) from error
        return config


# ---- reading adapter folders: clear errors before PEFT or transformers touch a model -------------------------------
# PEFT reads every adapter_config.json through PeftConfigMixin.from_json_file (PeftConfig.from_pretrained,
# PeftModel.from_pretrained, load_adapter, transformers' load_adapter); smoa wraps it (on import) so that:
# - a file that is not valid JSON raises ValueError naming the file;
# - a folder holding an SMoA adapter whose peft_type says something else (e.g. LORA) is refused instead of loading as
#   that method and silently dropping the SMoA tensors;
# - for an SMoA folder, a pickle adapter_model.bin is refused before anything unpickles it, an invalid config is
#   reported with the file's name, and adapter_model.safetensors is checked in full — readable, finite factors,
#   orders that are permutations, the saved partition (K, r, shape) equal to the config's — before any model changes.
_SMOA_FIELDS = {"num_blocks", "ordering", "svd_dtype"}
_validated: dict[tuple, bool] = {}  # (path, mtime, size) of safetensors files already checked


def _has_smoa_tensors(weights: str) -> bool:
    from safetensors import safe_open

    try:
        with safe_open(weights, framework="pt") as handle:
            return any(".smoa_" in key or key.startswith("smoa_") for key in handle.keys())
    except Exception:
        return False


def _check_smoa_weights(weights: str, config: dict, config_file: str) -> None:
    from peft.utils.other import get_pattern_key
    from safetensors import safe_open

    from smoa.checkpoint import check_loaded_tensor, check_order, check_partition_info

    stat = os.stat(weights)
    cache_key = (
        os.path.abspath(weights),
        stat.st_mtime_ns,
        stat.st_size,
        json.dumps(config, sort_keys=True, default=str),
    )
    if cache_key in _validated:
        return
    try:
        with safe_open(weights, framework="pt") as handle:
            tensors = {key: handle.get_tensor(key) for key in handle.keys()}
    except Exception as error:
        raise ValueError(
            f"{weights} is not a readable safetensors file ({error}); nothing was loaded — re-download or re-save the "
            "adapter"
        ) from error
    num_blocks, rank_pattern = config.get("num_blocks", 2), config.get("rank_pattern") or {}
    for key, value in tensors.items():
        try:
            if key.endswith(("smoa_row_order", "smoa_col_order")):
                check_order(f"{key} in {weights}", value, value.numel())
            elif key.endswith("smoa_partition_info"):
                module = key.removesuffix(".smoa_partition_info").removeprefix("base_model.model.")
                r = rank_pattern.get(get_pattern_key(rank_pattern.keys(), module), config.get("r", 8))
                r = sum(r) if isinstance(r, (list, tuple)) else r  # a rank_pattern value of per-block ranks
                d_out, d_in = (int(v) for v in value[3:5].tolist()) if value.numel() >= 5 else (0, 0)
                check_partition_info(f"{key} in {weights}", value, num_blocks, r, d_out, d_in)
            elif value.is_floating_point() or ".smoa_" in key:
                check_loaded_tensor(f"{key} in {weights}", value)
        except ValueError as error:
            raise ValueError(f"{error} (adapter_config.json: {config_file}); nothing was loaded") from None
    _validated[cache_key] = True


def _check_adapter_folder(config: dict, config_file: str) -> None:
    folder = os.path.dirname(os.path.abspath(config_file))
    weights, pickle_file = os.path.join(folder, SAFETENSORS_WEIGHTS_NAME), os.path.join(folder, WEIGHTS_NAME)
    peft_type = config.get("peft_type")
    is_smoa = is_smoa_peft_type(peft_type)
    config.pop(REQUIRES_FIELD, None)  # a note for readers without smoa, not a config field
    if is_smoa:
        config["peft_type"] = "SMOA"  # the member smoa registered
    if not is_smoa and (_SMOA_FIELDS <= config.keys() or (os.path.isfile(weights) and _has_smoa_tensors(weights))):
        raise ValueError(
            f"{config_file} says peft_type={peft_type!r}, but the folder holds an SMoA adapter (its num_blocks/"
            f"ordering fields or smoa_ tensors); loading it as {peft_type!r} would silently drop the SMoA weights. "
            'Set "peft_type": "SMOA" in that file (and `import smoa` before loading)'
        )
    if not is_smoa:
        return
    if os.path.isfile(pickle_file) and not os.path.isfile(weights):
        raise ValueError(
            f"{pickle_file}: SMoA adapters are read from {SAFETENSORS_WEIGHTS_NAME} only; refusing to unpickle a "
            ".bin file (a pickle can run code). Re-save the adapter with save_pretrained() (safetensors)"
        )
    fields = {f.name for f in dataclasses.fields(SMoAConfig)}
    try:  # the dataclass' own checks, reported with the file's name
        SMoAConfig(**{k: v for k, v in config.items() if k in fields and k != "peft_type"})
    except (TypeError, ValueError) as error:
        raise type(error)(f"{config_file}: {error}") from None
    if os.path.isfile(weights):
        _check_smoa_weights(weights, config, config_file)


def _checked_from_json_file(from_json_file):
    @functools.wraps(from_json_file)
    def wrapper(cls, path_json_file: str, **kwargs):
        try:
            config = from_json_file.__func__(cls, path_json_file, **kwargs)
        except json.JSONDecodeError as error:
            raise ValueError(f"{path_json_file} is not valid JSON ({error}): re-save the adapter config") from None
        if not isinstance(config, dict):
            raise ValueError(f"{path_json_file} must hold a JSON object, got {type(config).__name__}")
        _check_adapter_folder(config, path_json_file)
        return config

    wrapper._smoa_checked = True
    return classmethod(wrapper)


if not getattr(PeftConfigMixin.from_json_file, "_smoa_checked", False):
    PeftConfigMixin.from_json_file = _checked_from_json_file(PeftConfigMixin.from_json_file)
