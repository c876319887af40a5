"""Triton kernels for the SMoA linear layer (the ``triton`` backend): two paths, one function.

The math (SPEC §2–§4; LoRA-shaped factors ``Â``: r_k×d_in, ``B̂``: d_out×r_k in original coordinates; block k =
rows ``R_k`` × columns ``C_k`` of the spectral orders)::

    ΔW[R_k, C_k] = (B_k A_k) ⊙ W0[R_k, C_k]          (0 off the K diagonal blocks)
    y  = x W0ᵀ + b + s · x_a ΔWᵀ                      (x_a = dropout(x), or x itself)
    dx = dY W0 (+ s · dY ΔW when x_a is x)    dx_a = s · dY ΔW    db = Σ_n dY
    H_k = s · (dY[:, R_k]ᵀ x_a[:, C_k]) ⊙ W0[R_k, C_k]    dB_k = H_k A_kᵀ    dA_k = B_kᵀ H_k

``smoa_linear_triton(..., path="auto" | "fused" | "blocked", merged_weight=False)``:

* ``"fused"`` — :mod:`~smoa_kernels.triton.fused`: one pass over W0 per GEMM with the ΔW tile generated in registers
  (for small N: inference of an unmerged adapter, decode, small micro-batches, where reading W0 dominates).
* ``"blocked"`` — :mod:`~smoa_kernels.triton.blocked`: the full-weight GEMMs and K per-block adapter GEMMs in the
  vendor library on contiguous operands, plus small Triton kernels for the glue (anchor gather + rank product +
  Hadamard, the scatter back to original coordinates, the factor-gradient epilogue). Exactly (4 + 6/K)·N·D² FLOPs
  per training step. For training-sized N.
* ``"auto"`` (default) — :func:`smoa_kernels.cost_model.choose_path` per call, decided inside the custom op (no
  torch.compile guard on N).

The factor gradient is the blocked one on both paths. Layout (one file per op, in the manner of Liger-Kernel's
``ops/``): :mod:`~smoa_kernels.triton.configs` (``KERNEL_CONFIGS``, kernel construction, the single launch point
``configs.launch`` and ``capture_launches`` for the compile gate), :mod:`~smoa_kernels.triton.fused`,
:mod:`~smoa_kernels.triton.blocked`, :mod:`~smoa_kernels.triton.function` (custom ops, autograd.Function,
validation, dispatch, entry point). Run the kernels on the CPU with ``TRITON_INTERPRET=1`` (fp32/fp16; bf16 is refused
there); the mode is read at launch, never at import.
"""

from smoa_kernels.triton import multi_adapter  # noqa: F401  (registers the multi-adapter kernel with configs)
from smoa_kernels.triton.configs import FP32_DOT_PRECISION, KERNEL_CONFIGS, config_dtypes, config_meta, default_config
from smoa_kernels.triton.function import PATHS, SMoATritonFunction, is_available, resolve_path, smoa_linear_triton

__all__ = [
    "FP32_DOT_PRECISION",
    "KERNEL_CONFIGS",
    "PATHS",
    "SMoATritonFunction",
    "config_dtypes",
    "config_meta",
    "default_config",
    "is_available",
    "resolve_path",
    "smoa_linear_triton",
]
