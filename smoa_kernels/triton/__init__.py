"""Fused Triton kernels for the SMoA linear layer: kernels, launchers, the autograd.Function and the custom ops.

The math (SPEC §2–§4, LoRA-shaped form of §3, ``Â``: r_k×d_in, ``B̂``: d_out×r_k, original coordinates)::

    P  = B̂ Â                                   (rank-r_k product, never materialised beyond one tile)
    ΔW = P ⊙ W0 ⊙ [blk_row[i] == blk_col[c]]    (generated tile by tile in registers)
    y  = x W0ᵀ + b + s · x_a ΔWᵀ                 (x_a = dropout(x), or x itself)

    dx   = dY W0            (+ s · dY ΔW when x_a is x: one fused pass over W0)
    dx_a = s · dY ΔW        (its own pass when dropout gives a distinct x_a)
    H_k  = s · (dY[:, R_k]ᵀ x_a[:, C_k]) ⊙ W0[R_k, C_k]      (diagonal blocks of G = dYᵀ x_a only)
    dB_k = H_k A_kᵀ      dA_k = B_kᵀ H_k      db = Σ_n dY

Design, from ../shared/KERNELS.md's cost model. Forward and dX run in one of two coordinate systems, chosen per call
by ``smoa_linear_triton(..., coordinates=...)``; the factor gradient always runs in permuted coordinates.

* ``coordinates="original"`` (**the default**) — **forward and dX in original coordinates** (``_smoa_gemm_kernel``).
  Each program owns an output tile, walks the reduction dimension and, per step, loads the W0 tile the base GEMM needs
  anyway, the matching ``B̂``/``Â`` tiles (rank padded to ≥ 16 with masked loads) and two int32 block-id vectors, builds
  ``s·ΔW`` in registers (``tl.dot(B̂, Â) * W0``, masked to ``blk_row == blk_col``) and accumulates ``W0·xᵀ + sΔW·x_aᵀ``
  into ONE fp32 accumulator. All loads are coalesced (no gathers, no mask buffer, no d_out×d_in temporary). The weight
  tile is the left-hand ``tl.dot`` operand (``yᵀ_tile = W_tile @ xᵀ_tile``) so Hopper can feed the generated tile from
  registers. dX is the same kernel with the roles of rows and columns swapped (strides transposed), so there is one GEMM
  kernel to tune and to check. Cost: 4·N·D² per pass (base + adapter dot) plus the ΔW regeneration (each weight tile is
  rebuilt by N/BLOCK_N programs: RANK_PAD/BLOCK_N of one dot). The adapter dot touches every tile because the spectral
  orders scatter the blocks over the whole matrix — the price of staying gather-free; the permuted alternative is the
  next item.
* ``coordinates="permuted"`` — **base GEMMs by cuBLAS, adapter on the diagonal blocks only**
  (``_smoa_perm_adapter_kernel``). Forward: ``x_a[:, col_order]`` is gathered once (and saved for backward in place
  of x_a: same size, and it is exactly what the factor gradient reads), ``y = x W0ᵀ + b`` by ``F.linear``, then the
  kernel adds ``s · x_a[:, C_k] ΔW_kᵀ`` into ``y[:, R_k]``. dX: ``dY[:, row_order]`` is gathered once (shared with the
  factor gradient), ``dx = dY W0`` by cuBLAS, and the same kernel (transposed strides) adds ``s · dY[:, R_k] ΔW_k``
  into ``dx[:, C_k]`` (or writes ``dx_a`` when dropout makes it distinct). Programs are (band tile, token tile) ×
  block k; each owns the outputs ``(tokens, R_k[tile])`` and, in its epilogue, reads the base term at those
  (scattered) columns, adds its fp32 accumulator and stores — every output element is written by exactly one
  program, so it is deterministic with no atomics and no separate scatter pass. ``ΔW_k`` sub-tiles are generated in
  registers from W0 loaded at ``(row_order[p], col_order[q])`` (index vectors loaded, pointers computed) and the
  factor rows/columns at the same indices; the gathered activations are contiguous within a band. Bands of unequal
  size (``tensor_split``) are masked; the grid covers the largest band.
* **Step cost**: original: forward 4·N·D², dX 4·N·D², factor gradient 2·N·D²/K, i.e. (8 + 2/K)·N·D² against the
  floor (4 + 6/K)·N·D² of KERNELS.md §1 (1.29× it at K = 2, 1.52× at K = 4), all in Triton GEMMs. Permuted: forward
  2·N·D² (cuBLAS) + 2·N·D²/K, dX the same, factor gradient 2·N·D²/K: exactly the floor (4 + 6/K)·N·D², plus memory
  traffic the original path does not have — the two gathers (2·N·D elements written and read) and the scattered
  read-modify-write of y and dx (2·N·D elements each way) — and W0 sub-tiles loaded element-wise (uncoalesced; each
  diagonal W0 element is reloaded by N/BLOCK_N programs, mostly from L2). The ``merged_weight`` fast path below is
  (4 + 2/K)·N·D² plus the regeneration, original coordinates only.
* ``coordinates="auto"`` picks by :func:`choose_coordinates`: "permuted" when K ≥ 2 and the FLOPs saved per token and
  feature, 2·min(d_in, d_out)·(1 − 1/K), reach ``AUTO_PERMUTED_MIN_SAVED_FLOPS`` = 4096 (the ≈ 4 extra elements moved
  per token and feature cost ≈ 2400 FLOP-equivalents at H100's bf16 ridge of ≈ 300 FLOP/byte; the rest is margin
  for the uncoalesced W0 loads), e.g. D = 4096 at K = 2, D ≥ 2731 at K = 4; otherwise "original". It depends on the
  weight shape and K only (both sides scale linearly in N), so it never adds a guard on N under torch.compile. The
  threshold is modelled, not measured: ``"original"`` stays the default until the ``smoa-triton-perm`` benchmark
  provider has been timed against ``smoa-triton`` on a GPU.
* **The factor gradient runs in permuted coordinates** (``_smoa_factor_grad_kernel``): ``dY[:, row_order]`` and
  ``x_a[:, col_order]`` are gathered once (2·N·D elements), after which the diagonal blocks are contiguous bands and
  only they are computed: 2·N·D²/K FLOPs, K× less than a dense ``dYᵀx``. The G tile never leaves registers: the
  epilogue multiplies it by the (gathered, read once per tile) ``s·W0`` tile and contracts it with the factor tiles
  (``dB̂ += H Âᵀ``, ``dÂ += B̂ᵀ H``), 16 ranks at a time so that r_k > 16 does not grow the operand tiles.
* **torch.compile**: the launches live in ``torch.library`` custom ops (``smoa_kernels::triton_forward`` /
  ``triton_backward``, and ``triton_forward_permuted`` / ``triton_backward_permuted``) with shape-only fake
  implementations, called from the autograd.Function, so a compiled graph
  holds them as opaque nodes (fullgraph works); the block ids are computed with static shapes only.
* **Saved for backward**: ``x_a`` (or ``x`` when they are the same tensor — nothing extra; permuted coordinates:
  ``x_a[:, col_order]`` instead, the same size), W0, the factors, the two orders and (original coordinates) two
  int32 block-id vectors. Nothing D²-sized; ΔW is regenerated in the backward kernels.
* **Determinism**: no kernel uses atomics (the permuted adapter GEMM owns every output element it writes). In the factor
  gradient each program writes its tile's contribution to a partial buffer slot it owns (``dB̂`` partials indexed by
  column tile, ``dÂ`` partials by row tile; fp32, about ``(D/K/BLOCK)·D·r_k`` elements each) and one ``torch.sum``
  reduces them, so results are bitwise reproducible for a given config. Autotuning may pick a different config (hence a
  different summation order) on another run; with ``torch.use_deterministic_algorithms(True)`` the single default config
  is always used. No atomic path is shipped.
* **Precision**: every ``tl.dot`` accumulates in fp32. The big dots take the activation dtype (fp16/bf16 tensor cores);
  the generated ``s·ΔW`` tile is built in fp32 and rounded to the activation dtype only as a dot operand (relative
  error of the adapter term ≈ one ulp of that dtype, never relative to W0 — unlike merging ΔW into W0 first). With
  16-bit activations the factor tiles are rounded to the activation dtype for the rank-r_k product. The factor
  gradient's epilogue (H and its contraction with the factors) runs in fp32 with ``input_precision="ieee"``. For fp32
  activations the dots honour ``torch.backends.cuda.matmul.allow_tf32``: one TF32 dot when True, three ("tf32x3",
  fp32-level error) when False — an FMA-based "ieee" dot spills in every tile tried. The interpreter is always exact.
  Results are cast to the input dtype (outputs, dX) and the factors' dtype (dÂ, dB̂).
* **Opt-in fast path** (``merged_weight=True``, exact only up to rounding when x_a is x): the kernel forms
  ``W_eff = W0 + s·ΔW`` in registers and issues ONE dot per tile (2·N·D² per pass, the frozen layer's cost plus the
  rank regeneration). Rounding W_eff to bf16 drops relative updates below ≈2⁻⁹ of W0, so it is never the default.
* ``db`` and the base ``dY W0`` term when x_a is distinct use cuBLAS through torch (nothing to fuse there); in
  permuted coordinates so do ``x W0ᵀ + b`` and ``dY W0`` always. With 16-bit activations the permuted path rounds
  the base term to the activation dtype before the adapter term is added (one extra rounding of y and dx).

Run the kernels on the CPU with ``TRITON_INTERPRET=1`` (tests/kernels/test_triton_smoa.py). The interpreter mode is
read when a kernel is first launched, not at import, so importing this module never fixes the mode for other code.

Layout (one file per op, in the manner of Liger-Kernel's ``ops/``): :mod:`~smoa_kernels.triton.configs` (the config
list, kernel construction, the single launch point), :mod:`~smoa_kernels.triton.fused` (the single-pass GEMM),
:mod:`~smoa_kernels.triton.permuted` (the diagonal-block adapter GEMM), :mod:`~smoa_kernels.triton.factor_grad` and
:mod:`~smoa_kernels.triton.function` (custom ops, autograd.Function, validation, entry point).
"""

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
