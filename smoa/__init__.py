"""smoa — SMoA (Spectrum Modulation Adapter) as an ``nn.Linear`` drop-in, with fused kernels and PEFT integration.

Public API: :class:`SMoALinear`, :func:`apply_smoa`, :func:`merge_smoa`, :func:`use_backend`, :func:`get_backend`,
:func:`spectral_orders`.

Importing ``smoa`` is cheap (no torch, no peft): every public name is imported on first use (PEP 562), so the
``smoa`` command answers ``--help`` at once. ``import smoa`` still registers the ``"SMOA"`` PEFT type, in either
order: at once when ``peft`` is already imported, else right after ``peft`` is first imported (a one-shot import
hook). ``import smoa.peft`` registers it directly. To export a new name, add it to ``_EXPORTS``.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys
import warnings

__version__ = "0.1.0"

# public name -> the module that defines it (imported on first access)
_EXPORTS: dict[str, str] = {
    "BACKENDS": "smoa.backends",
    "available_backends": "smoa.backends",
    "get_backend": "smoa.backends",
    "use_backend": "smoa.backends",
    "SMoALinear": "smoa.layer",
    "allow_missing_orders": "smoa.checkpoint",
    "apply_smoa": "smoa.model",
    "merge_smoa": "smoa.model",
    "smoa_layers": "smoa.model",
    "ORDERINGS": "smoa.partition",
    "compute_orders": "smoa.partition",
    "spectral_orders": "smoa.partition",
    "spectral_scores": "smoa.partition",
    "accelerate": "smoa.hira",
    "unaccelerate": "smoa.hira",
    "apply_smoa_to_hira": "smoa.hira",
    "revert_smoa_to_hira": "smoa.hira",
}

__all__ = ["__version__", *sorted(_EXPORTS)]


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is None:  # a subpackage, as `import smoa; smoa.peft.SMoAConfig` or `smoa.backends` always worked
        try:
            return importlib.import_module(f"smoa.{name}")
        except ModuleNotFoundError as error:
            if error.name != f"smoa.{name}":
                raise
        raise AttributeError(f"module 'smoa' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))


# ---- PEFT registration without importing peft now ---------------------------------------------------------------
def _register_with_peft() -> None:
    try:
        importlib.import_module("smoa.peft")
    except Exception as error:  # never break `import peft` itself; `import smoa.peft` raises the real error
        warnings.warn(f"smoa could not register the SMOA PEFT type: {error}", stacklevel=2)


class _RegisteringLoader(importlib.abc.Loader):
    """Wraps peft's own loader: runs it, then registers SMoA with the freshly imported peft."""

    def __init__(self, loader) -> None:
        self._loader = loader

    def create_module(self, spec):
        return self._loader.create_module(spec)

    def exec_module(self, module) -> None:
        self._loader.exec_module(module)
        _register_with_peft()

    def __getattr__(self, name: str):  # get_resource_reader, is_package, get_source, ...
        return getattr(self._loader, name)


class _PeftImportHook(importlib.abc.MetaPathFinder):
    """One-shot ``sys.meta_path`` finder: on the first ``import peft``, find peft's real spec and wrap its loader."""

    def find_spec(self, fullname, path=None, target=None):
        if fullname != "peft":
            return None
        if self in sys.meta_path:
            sys.meta_path.remove(self)
        spec = importlib.util.find_spec("peft")
        if spec is not None and spec.loader is not None:
            spec.loader = _RegisteringLoader(spec.loader)
        return spec


if "peft" in sys.modules:
    _register_with_peft()
elif not any(isinstance(finder, _PeftImportHook) for finder in sys.meta_path):
    sys.meta_path.insert(0, _PeftImportHook())
