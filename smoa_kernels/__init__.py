"""smoa_kernels — the compute layer of smoa: the dense reference (the oracle), the blockwise PyTorch path and the
fused Triton kernels, all with one signature ``(x, x_adapter, weight, bias, lora_A, lora_B, row_order, col_order,
num_blocks, scale)``. Depends on torch (and triton for the kernels) only."""

from smoa_kernels.blockwise import smoa_linear_blockwise
from smoa_kernels.multi_adapter import multi_adapter_linear
from smoa_kernels.reference import dense_delta_weight, smoa_linear_reference

__all__ = ["dense_delta_weight", "multi_adapter_linear", "smoa_linear_blockwise", "smoa_linear_reference"]
