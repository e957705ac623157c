"""A leaner forward for PEFT's LoRA linear layers in training.

PEFT's forward casts each adapted layer's input to the adapters' fp32 dtype, applies dropout
and the scaling in fp32, and adds the update in a kernel of its own: four full-size elementwise
passes per adapted layer, and as many again in the backward. This forward computes the same
update,

    base(x) + B(A(dropout(x))) * scaling,

in the compute dtype: the fp32 master weights A and B (r x in, out x r: small) are cast per call,
and the scaling and the sum are done in the epilogue of the B product (addmm's alpha and input).
Parameters, their names, their fp32 storage and what gets saved stay PEFT's; only the arithmetic
layout changes.
"""

from __future__ import annotations

import types
from typing import Any

import torch
import torch.nn.functional as F


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype matrix products run in here: autocast's when it is on, else the input's."""
    if torch.is_autocast_enabled(x.device.type):
        return torch.get_autocast_dtype(x.device.type)
    return x.dtype


def lora_update(x: torch.Tensor, base_out: torch.Tensor, weight_a: torch.Tensor, weight_b: torch.Tensor,
                scaling: float, dropout: Any) -> torch.Tensor:  # fmt: skip
    """base_out + scaling * dropout(x) @ A^T @ B^T, in x's compute dtype, with the add fused."""
    dtype = compute_dtype(x)
    hidden = dropout(x.to(dtype))
    low = F.linear(hidden, weight_a.to(dtype))  # [..., r]
    out = base_out.to(dtype).reshape(-1, base_out.shape[-1])
    out = torch.addmm(out, low.reshape(-1, low.shape[-1]), weight_b.to(dtype).t(), alpha=scaling)
    return out.view(base_out.shape).to(base_out.dtype)


def plain_adapter(layer: Any) -> str | None:
    """The adapter a LoRA layer runs when that is exactly one plain (no DoRA or other variant),
    unmerged, enabled LoRA adapter; None for anything else, which PEFT's own forward handles."""
    if layer.disable_adapters or layer.merged or len(layer.active_adapters) != 1:
        return None
    name = layer.active_adapters[0]
    return name if name in layer.lora_A and name not in layer.lora_variant else None


def _fast_forward(self: Any, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
    name = None if args or kwargs else plain_adapter(self)
    if name is None:
        return type(self).forward(self, x, *args, **kwargs)  # PEFT's own path for anything else
    result = self.base_layer(x)
    return lora_update(x, result, self.lora_A[name].weight, self.lora_B[name].weight, self.scaling[name],
                       self.lora_dropout[name])  # fmt: skip


def install(model: Any) -> int:
    """Give every plain LoRA linear layer of `model` the lean forward; returns how many."""
    from peft.tuners.lora import LoraLayer

    patched = 0
    for module in model.modules():
        if not isinstance(module, LoraLayer) or not hasattr(module, "lora_A"):
            continue
        if not all(isinstance(a, torch.nn.Linear) for a in module.lora_A.values()):
            continue  # embeddings / convolutions keep PEFT's forward
        if not hasattr(module, "lora_variant"):
            continue  # a PEFT without variants: its forward is not the one this mirrors
        module.forward = types.MethodType(_fast_forward, module)
        patched += 1
    return patched


def fuse_gelu(model: Any) -> int:
    """Swap transformers' NewGELUActivation (phi-2's gelu_new) for torch's tanh GELU; returns how many.

    Both compute 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))); transformers spells it as
    eight elementwise kernels on the 10,240-wide MLP activations (and more in the backward),
    torch's `gelu(approximate="tanh")` as one.
    """
    from transformers.activations import GELUTanh, NewGELUActivation

    swapped = 0
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if type(child) is NewGELUActivation:
                setattr(module, name, GELUTanh())
                swapped += 1
    return swapped
