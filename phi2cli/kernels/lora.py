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


class FusedQKV:
    """q, k and v of one attention layer with their LoRA updates as three batched products.

    PEFT runs each projection apart: a base product, a dropout, the A and B products and the add,
    three times over the same input. Here the frozen base weights are stacked once ([3, out, in];
    the projections' own weights become views of it, so no memory is added) and each forward is
    one batched base product with the biases, one dropout over the three copies of the input
    (three independent masks, as PEFT draws them), one batched A product and one batched B product
    whose epilogue adds the scaled update. Same parameters, same arithmetic, about a third of the
    kernel launches.
    """

    def __init__(self, attention: Any) -> None:
        layers = [attention.q_proj, attention.k_proj, attention.v_proj]
        self.layers = layers
        bases = [layer.base_layer for layer in layers]
        with torch.no_grad():
            self.weight = torch.stack([b.weight for b in bases])  # [3, out, in]
            self.bias = torch.stack([b.bias for b in bases]).unsqueeze(1) if bases[0].bias is not None else None
            for index, base in enumerate(bases):
                base.weight.data = self.weight[index]
                if base.bias is not None:
                    base.bias.data = self.bias[index, 0]
        self.name = layers[0].active_adapters[0]
        self.scaling = layers[0].scaling[self.name]
        self.dropout = layers[0].lora_dropout[self.name]

    @staticmethod
    def supports(attention: Any) -> bool:
        """q/k/v are plain-Linear LoRA layers with one adapter and equal rank, scaling and dropout."""
        from peft.tuners.lora import LoraLayer

        layers = [getattr(attention, name, None) for name in ("q_proj", "k_proj", "v_proj")]
        if not all(isinstance(layer, LoraLayer) and hasattr(layer, "lora_variant") for layer in layers):
            return False
        if not all(type(layer.base_layer) is torch.nn.Linear for layer in layers):
            return False
        name = plain_adapter(layers[0])
        if name is None or any(plain_adapter(layer) != name for layer in layers):
            return False
        shapes = {(layer.base_layer.weight.shape, layer.base_layer.bias is not None, layer.r[name],
                   layer.scaling[name], getattr(layer.lora_dropout[name], "p", 0.0)) for layer in layers}  # fmt: skip
        return len(shapes) == 1

    def active(self) -> bool:
        return all(plain_adapter(layer) == self.name for layer in self.layers)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """[3, tokens, out] for x [tokens, in]."""
        dtype = compute_dtype(x)
        x = x.to(dtype)
        copies = x.unsqueeze(0).expand(3, *x.shape)
        weight = self.weight.to(dtype).transpose(1, 2)
        base = torch.bmm(copies, weight) if self.bias is None else torch.baddbmm(self.bias.to(dtype), copies, weight)
        a = torch.stack([layer.lora_A[self.name].weight for layer in self.layers]).to(dtype)  # [3, r, in]
        b = torch.stack([layer.lora_B[self.name].weight for layer in self.layers]).to(dtype)  # [3, out, r]
        low = torch.bmm(self.dropout(copies), a.transpose(1, 2))  # dropout of an expanded tensor: 3 masks
        return torch.baddbmm(base, low, b.transpose(1, 2), alpha=self.scaling)


def _fused_attention_forward(self: Any, hidden_states: torch.Tensor, position_embeddings: Any = None,
                             attention_mask: Any = None, *args: Any, **kwargs: Any) -> Any:  # fmt: skip
    """Phi's attention forward with q, k, v from FusedQKV; anything it does not cover goes to Phi's own."""
    from phi2cli.compat import attn_implementation, modeling_module

    cache = kwargs.get("cache", kwargs.get("past_key_values"))
    fused = self._phi2_fused_qkv
    if args or cache is not None or position_embeddings is None or not fused.active():
        return type(self).forward(self, hidden_states, position_embeddings, attention_mask, *args, **kwargs)
    kwargs.pop("cache", None)
    kwargs.pop("past_key_values", None)
    phi = modeling_module(self)  # the attention helpers of the installed transformers
    input_shape = hidden_states.shape[:-1]
    hidden_shape = (*input_shape, -1, self.head_dim)
    q, k, v = fused(hidden_states.reshape(-1, hidden_states.shape[-1]))
    query, key, value = (t.view(hidden_shape).transpose(1, 2) for t in (q, k, v))
    if self.qk_layernorm:
        query, key = self.q_layernorm(query), self.k_layernorm(key)
    cos, sin = position_embeddings
    rot = self.rotary_ndims
    query_rot, key_rot = phi.apply_rotary_pos_emb(query[..., :rot], key[..., :rot], cos, sin)
    query = torch.cat((query_rot, query[..., rot:]), dim=-1)
    key = torch.cat((key_rot, key[..., rot:]), dim=-1)
    implementation = attn_implementation(self.config)
    interfaces = phi.ALL_ATTENTION_FUNCTIONS
    if implementation == "eager":
        attend = phi.eager_attention_forward
    elif hasattr(interfaces, "get_interface"):
        attend = interfaces.get_interface(implementation, phi.eager_attention_forward)
    else:
        attend = interfaces[implementation]
    output, weights = attend(self, query, key, value, attention_mask,
                             dropout=0.0 if not self.training else self.attention_dropout, scaling=self.scaling,
                             **kwargs)  # fmt: skip
    output = output.reshape(*input_shape, -1).contiguous()
    return self.dense(output), weights


def install_fused_qkv(model: Any) -> int:
    """Give every Phi attention layer whose q/k/v FusedQKV supports the fused forward; returns how many."""
    fused = 0
    for module in model.modules():
        if type(module).__name__ != "PhiAttention" or not FusedQKV.supports(module):
            continue
        module._phi2_fused_qkv = FusedQKV(module)
        module.forward = types.MethodType(_fused_attention_forward, module)
        fused += 1
    return fused
