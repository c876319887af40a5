"""SMoA as a first-class PEFT method: ``import smoa.peft`` (or ``import smoa``) registers the ``"SMOA"`` PEFT type, so
``get_peft_model(model, SMoAConfig(...))``, ``PeftModel.from_pretrained``, ``PeftConfig.from_pretrained``,
transformers' ``load_adapter`` and ``trl.SFTTrainer(peft_config=SMoAConfig(...))`` work like for LoRA.

PEFT's ``register_peft_method`` only accepts members of its closed ``PeftType`` enum, so :func:`_extend_peft_type`
adds ``PeftType.SMOA`` first — the smallest shim that works, touching private ``Enum`` internals. It is checked
right after it runs (and by ``tests/test_peft.py``); a PEFT release that breaks it raises ``RuntimeError`` at import
instead of misbehaving later. Supported range: ``peft>=0.21.2,<0.22`` (pinned in ``pyproject.toml``).

Without PEFT installed this package imports as empty (``PEFT_AVAILABLE = False``), so ``import smoa`` never fails.
"""

from __future__ import annotations

try:
    import peft as _peft
    import transformers as _transformers  # noqa: F401  (the layer dispatches on transformers' Conv1D)
except ImportError as _error:  # the optional [peft] extra is not installed
    PEFT_AVAILABLE = False
    PEFT_IMPORT_ERROR: ImportError | None = _error
    __all__ = ["PEFT_AVAILABLE"]
else:
    PEFT_AVAILABLE = True
    PEFT_IMPORT_ERROR = None
    from peft.utils.peft_types import PeftType

    PEFT_TYPE_NAME = "SMOA"
    SUPPORTED_PEFT = ">=0.21.2,<0.22"

    def _extend_peft_type(name: str = PEFT_TYPE_NAME) -> PeftType:
        """Add ``name`` to PEFT's closed ``PeftType`` (a ``str`` Enum) as a real member, idempotently."""
        if name in PeftType.__members__:
            return PeftType[name]
        member = str.__new__(PeftType, name)
        member._name_ = name
        member._value_ = name
        member.__objclass__ = PeftType
        if hasattr(PeftType, "_sort_order_"):  # Python >= 3.11 keeps a definition-order index per member
            member._sort_order_ = len(PeftType._member_names_)
        type.__setattr__(PeftType, name, member)
        PeftType._member_map_[name] = member
        PeftType._value2member_map_[name] = member
        PeftType._member_names_.append(name)
        return member

    def _check_peft_type(name: str = PEFT_TYPE_NAME) -> None:
        member = getattr(PeftType, name, None)
        ok = (
            isinstance(member, PeftType)
            and PeftType(name) is member
            and PeftType[name] is member
            and member in list(PeftType)
            and member == name
            and member.value == name
        )
        if not ok:
            raise RuntimeError(
                f"smoa could not add {name!r} to peft.utils.PeftType with peft {_peft.__version__}; this smoa release "
                f"supports peft{SUPPORTED_PEFT}. Install a supported peft version or a newer smoa."
            )

    _extend_peft_type()
    _check_peft_type()

    from .config import SMoAConfig
    from .export import lora_export_error
    from .layer import Linear, SMoALayer
    from .model import SMoAModel

    def register() -> None:
        """Register SMoA with PEFT (idempotent; done on import)."""
        from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING
        from peft.utils.peft_types import register_peft_method

        registered = PEFT_TYPE_TO_CONFIG_MAPPING.get(PeftType.SMOA)
        if registered is SMoAConfig:
            return
        if registered is not None:
            raise RuntimeError(
                f"peft {_peft.__version__} already has a PEFT type 'SMOA' ({registered.__module__}); this smoa release "
                f"supports peft{SUPPORTED_PEFT}"
            )
        register_peft_method(name="smoa", config_cls=SMoAConfig, model_cls=SMoAModel, prefix="smoa_")

    register()

    __all__ = [
        "PEFT_AVAILABLE",
        "Linear",
        "SMoAConfig",
        "SMoALayer",
        "SMoAModel",
        "lora_export_error",
        "register",
    ]
