"""``smoa bench`` providers over a 4-bit base (QLoRA-style): the benchmark's W0 quantized to NF4 with double
quantization by bitsandbytes (``bnb.nn.Linear4bit``, compute dtype = the benchmark dtype), then adapted by PEFT:

================  ===========================================================================================
lora-4bit         PEFT LoRA (``tuners/lora/bnb.py``) at the same total rank r
hira-4bit         PEFT HiRA (``tuners/hira/bnb.py``) at rank r/K; dequantizes the whole W0 per call
smoa-4bit         SMoA (:mod:`smoa.peft.bnb`) at total rank r, K blocks; anchors dequantized block by block
================  ===========================================================================================

The oracle of each is its dense formula on the weight bitsandbytes dequantizes (``dequantize_4bit``). Peak memory
and time are measured by the harness like for every provider; the 4-bit base is its own copy of W0 (bitsandbytes
quantizes on ``.to(device)``). Runs on the CPU at small shapes (bitsandbytes 0.50 has CPU kernels) and on a GPU at
the canonical ones; skipped with the reason when bitsandbytes is not installed (``pip install 'smoa[bnb]'``).
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from smoa.bench.providers import BenchInputs, _OneLayer, _randomize_factors
from smoa.bench.registry import Built, Provider, register_provider
from smoa_kernels.reference import smoa_linear_reference

__all__ = ["quantized_base"]


def quantized_base(inputs: BenchInputs) -> nn.Module:
    """The benchmark's W0 as an NF4 (double-quantized) ``Linear4bit`` on the inputs' device, built once per W0."""
    key = ("bnb-base",)
    if key not in inputs.smoa_layers:
        import bitsandbytes as bnb

        weight = inputs.base.weight.detach()
        layer = bnb.nn.Linear4bit(inputs.d_in, inputs.d_out, bias=False, compute_dtype=inputs.dtype,
                                  compress_statistics=True, quant_type="nf4", device="meta")  # fmt: skip
        layer.weight = bnb.nn.Params4bit(
            weight.to("cpu").clone(), requires_grad=False, quant_type="nf4", compress_statistics=True
        )
        inputs.smoa_layers[key] = layer.to(inputs.device)
    return inputs.smoa_layers[key]


def _dequantized(layer: nn.Module) -> torch.Tensor:
    import bitsandbytes as bnb

    return bnb.functional.dequantize_4bit(layer.weight.data, layer.weight.quant_state)


def _peft_over_4bit(inputs: BenchInputs, config) -> nn.Module:
    """``get_peft_model`` over a fresh module holding the shared 4-bit base (PEFT replaces it in its parent)."""
    from peft import get_peft_model

    import smoa  # noqa: F401  (registers SMOA with PEFT)

    model = _OneLayer(quantized_base(inputs))
    model.is_loaded_in_4bit = True  # what transformers sets for load_in_4bit: PEFT dispatches to tuners/*/bnb.py on it
    return get_peft_model(model, config).base_model.model.proj


def _build_lora(inputs: BenchInputs, r: int, num_blocks: int) -> Built:
    from peft import LoraConfig

    layer = _peft_over_4bit(inputs, LoraConfig(r=r, lora_alpha=r, lora_dropout=0.0, target_modules=["proj"]))
    lora_A, lora_B = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    weight = _dequantized(layer.get_base_layer())
    _randomize_factors(lora_A, lora_B, target_std=float(weight.float().std()), seed=inputs.seed)
    scale = layer.scaling["default"]

    def oracle(x: torch.Tensor) -> torch.Tensor:
        base = F.linear(x, weight.to(x.dtype))
        return base + (scale * F.linear(x.to(lora_A.dtype), lora_B @ lora_A)).to(base.dtype)

    return Built(layer, [lora_A, lora_B], oracle, ("lora-4bit", r))


def _build_hira(inputs: BenchInputs, r: int, num_blocks: int) -> Built:
    from peft import HiraConfig

    rank = r // num_blocks
    layer = _peft_over_4bit(inputs, HiraConfig(r=rank, hira_dropout=0.0, target_modules=["proj"]))
    hira_A, hira_B = layer.hira_A["default"], layer.hira_B["default"]
    _randomize_factors(hira_A, hira_B, target_std=1.0, seed=inputs.seed)
    weight = _dequantized(layer.get_base_layer())
    rows = torch.arange(inputs.d_out, device=inputs.device)
    cols = torch.arange(inputs.d_in, device=inputs.device)

    def oracle(x: torch.Tensor) -> torch.Tensor:  # SPEC §6: HiRA = SMoA with K = 1, identity order, s = 1
        return smoa_linear_reference(x, x, weight.to(x.dtype), None, hira_A, hira_B, rows, cols, 1, 1.0)

    return Built(layer, [hira_A, hira_B], oracle, ("hira-4bit", rank))


def _build_smoa(inputs: BenchInputs, r: int, num_blocks: int) -> Built:
    key = ("smoa-4bit", r, num_blocks)
    if key not in inputs.smoa_layers:  # one SVD per (W0, r, K), reused over the token counts
        from smoa.peft import SMoAConfig

        config = SMoAConfig(r=r, num_blocks=num_blocks, init_weights=False, target_modules=["proj"])
        layer = _peft_over_4bit(inputs, config)
        _randomize_factors(layer.smoa_A["default"].weight, layer.smoa_B["default"].weight, 1.0, seed=inputs.seed)
        inputs.smoa_layers[key] = layer
    layer = inputs.smoa_layers[key]
    lora_A, lora_B = layer.smoa_A["default"].weight, layer.smoa_B["default"].weight
    rows, cols = layer.smoa_row_order["default"], layer.smoa_col_order["default"]
    weight = _dequantized(layer.get_base_layer())

    def oracle(x: torch.Tensor) -> torch.Tensor:
        return smoa_linear_reference(
            x, x, weight.to(x.dtype), None, lora_A, lora_B, rows, cols, num_blocks, layer.scaling["default"]
        )

    return Built(layer, [lora_A, lora_B], oracle, ("smoa-4bit", r, num_blocks))


@dataclass(frozen=True)
class _BnbProvider(Provider):
    def unavailable(self, device: torch.device) -> str | None:
        if importlib.util.find_spec("bitsandbytes") is None:
            return "bitsandbytes is not installed (pip install 'smoa[bnb]')"
        if importlib.util.find_spec("peft") is None:
            return "peft is not installed (pip install 'smoa[bench]')"
        if torch.device(device).type not in ("cpu", "cuda"):
            return f"bitsandbytes 4-bit has no kernels for {torch.device(device).type} in this setup"
        return None


for _provider in (
    _BnbProvider("lora-4bit", "lora", "PEFT LoRA at total rank r over an NF4 (double-quantized) base", _build_lora,
                 lambda r, K: r, "r"),
    _BnbProvider("hira-4bit", "hira", "PEFT HiRA at rank r/K over an NF4 base (dense dequantized W0 per call)",
                 _build_hira, lambda r, K: r // K, "r/K"),
    _BnbProvider("smoa-4bit", "smoa", "SMoA over an NF4 base (torch backend, anchors dequantized per block)",
                 _build_smoa, lambda r, K: r // K, "r,K"),
):  # fmt: skip
    register_provider(_provider)
