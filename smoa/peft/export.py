"""How far a LoRA export (``peft.convert_to_lora`` / ``peft.save_as_lora``) of an SMoA adapter is from the adapter.

SMoA is additive (``W = W0 + s·ΔW``), so PEFT's generic converter applies: it takes each layer's
``get_delta_weight`` (``s·ΔW``) and keeps the top ``rank`` singular triplets. ΔW = (B̂Â ⊙ blockmask) ⊙ W0 is, unlike
LoRA's BA, (nearly) full rank, so the export is exact only at ``rank = min(d_in, d_out)`` and otherwise drops the tail
of ΔW's spectrum. :func:`lora_export_error` states that error per layer.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from .layer import SMoALayer

__all__ = ["lora_export_error"]


@torch.no_grad()
def lora_export_error(
    model: nn.Module, lora_state_dict: dict[str, torch.Tensor], adapter_name: str = "default"
) -> dict[str, float]:
    """``{layer name: ‖s·ΔW − B_lora A_lora‖_F / ‖s·ΔW‖_F}`` for every SMoA layer of ``model`` exported in
    ``lora_state_dict`` (the second return value of ``peft.convert_to_lora(model, rank, adapter_name)``).

    0 means exact; a layer whose ΔW is zero (an untrained adapter) reports the absolute error instead.
    """
    errors = {}
    for name, module in model.named_modules():
        if not isinstance(module, SMoALayer) or adapter_name not in module.smoa_A:
            continue
        key_A, key_B = f"{name}.lora_A.weight", f"{name}.lora_B.weight"
        if key_A not in lora_state_dict or key_B not in lora_state_dict:
            continue
        delta = module.get_delta_weight(adapter_name).float()
        if module.fan_in_fan_out:
            delta = delta.T
        approx = lora_state_dict[key_B].float() @ lora_state_dict[key_A].float()
        norm = torch.linalg.matrix_norm(delta)
        error = torch.linalg.matrix_norm(delta - approx)
        errors[name] = float(error / norm) if norm > 0 else float(error)
    return errors
