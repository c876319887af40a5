"""smoa — SMoA (Spectrum Modulation Adapter) as an ``nn.Linear`` drop-in, with fused kernels and PEFT integration.

Public API: :class:`SMoALinear`, :func:`apply_smoa`, :func:`merge_smoa`, :func:`use_backend`, :func:`get_backend`,
:func:`spectral_orders`.
"""

from smoa.backends import BACKENDS, available_backends, get_backend, use_backend
from smoa.hira import accelerate, apply_smoa_to_hira, revert_smoa_to_hira, unaccelerate
from smoa.layer import SMoALinear
from smoa.model import apply_smoa, merge_smoa, smoa_layers
from smoa.partition import ORDERINGS, compute_orders, spectral_orders, spectral_scores

# isort: split
# Registers "SMOA" as a PEFT method when peft is installed (imports as empty without it, never fails).
from smoa import peft  # noqa: F401  (after the core: smoa.peft builds on it)

__version__ = "0.1.0"

__all__ = [
    "BACKENDS",
    "ORDERINGS",
    "SMoALinear",
    "__version__",
    "accelerate",
    "apply_smoa",
    "apply_smoa_to_hira",
    "available_backends",
    "compute_orders",
    "get_backend",
    "merge_smoa",
    "revert_smoa_to_hira",
    "smoa_layers",
    "spectral_orders",
    "spectral_scores",
    "unaccelerate",
    "use_backend",
]
