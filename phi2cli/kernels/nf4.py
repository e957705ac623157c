"""4-bit NF4 linear layers dequantized by torch operations, so torch.compile sees through them.

The memory-saver profile keeps the base weights in 4-bit (bitsandbytes' NF4 codes, half a byte a
weight) and recomputes each decoder layer in the backward (gradient checkpointing). Through
bitsandbytes' Linear4bit every matmul calls its dequantize kernel from Python and torch.compile
stops at each one, so the profile ran its layers eagerly: phi-2 on an H200, 0.49 s a step, 8.7% MFU
(benchmarks/results/end_to_end_before_nf4.json, memory_saver). `NF4Linear` holds the very codes
Linear4bit holds and spells the dequantization as torch operations (a 16-entry table lookup times
each block's scale), so a decoder layer compiles as one graph, the dequantization fused into one
kernel per weight: 0.26 s a step, 16.2% MFU, at 3.15 GiB (end_to_end.json, memory_saver).

The values are bitsandbytes' own: the table and the per-block scales (double quantization undone
once, by bitsandbytes' public `dequantize_blockwise`) are read from the layer's QuantState, and each
weight is table[code] x scale in fp32, rounded once to the compute dtype, as its CUDA kernel does.
The scales are kept in fp32 (4 bytes per 64 weights: 0.16 GB for phi-2, against 0.04 GB double
quantized).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F


class NF4Linear(torch.nn.Module):
    """A frozen linear layer whose weight is stored as NF4 codes and dequantized per call."""

    def __init__(self, codes: torch.Tensor, scales: torch.Tensor, table: torch.Tensor, shape: tuple[int, int],
                 blocksize: int, dtype: torch.dtype, bias: torch.nn.Parameter | None) -> None:  # fmt: skip
        super().__init__()
        self.out_features, self.in_features = shape
        self.blocksize, self.compute_dtype = blocksize, dtype
        self.register_buffer("codes", codes.reshape(-1), persistent=False)  # uint8: two weights a byte
        self.register_buffer("scales", scales.reshape(-1, 1).float(), persistent=False)  # one per block
        self.register_buffer("table", table.float(), persistent=False)  # the 16 NF4 values
        self.bias = bias

    def dequantized(self) -> torch.Tensor:
        """The weight [out, in] in the compute dtype (the first of each pair is the high nibble)."""
        pairs = torch.stack((self.codes >> 4, self.codes & 15), dim=-1).reshape(-1, self.blocksize)
        values = self.table[pairs.long()] * self.scales
        return values.reshape(self.out_features, self.in_features).to(self.compute_dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return F.linear(x, self.dequantized().to(x.dtype), bias)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, nf4 blocks of {self.blocksize}"


def from_linear4bit(layer: Any) -> NF4Linear:
    """The NF4Linear holding `layer`'s (a bitsandbytes Linear4bit, NF4) codes, which it shares."""
    import bitsandbytes as bnb

    state = layer.weight.quant_state
    if state.nested:  # double quantization: the block scales are themselves 8-bit, plus an offset
        scales = bnb.functional.dequantize_blockwise(state.absmax, state.state2) + state.offset
    else:
        scales = state.absmax
    codes = layer.weight.data
    return NF4Linear(codes, scales.to(codes.device), state.code.to(codes.device), tuple(state.shape),
                     state.blocksize, state.dtype, layer.bias)  # fmt: skip


def convertible(module: Any) -> bool:
    """A bitsandbytes Linear4bit holding NF4 codes (FP4 and 8-bit layers stay as they are)."""
    if type(module).__name__ != "Linear4bit" or not type(module).__module__.startswith("bitsandbytes"):
        return False
    state = getattr(module.weight, "quant_state", None)
    return (state is not None and state.quant_type == "nf4" and module.weight.dtype == torch.uint8
            and not getattr(state, "packing_format_for_cpu", False))  # bitsandbytes' CPU inference layout


def swap_linear4bit(model: Any) -> int:
    """Replace every NF4 Linear4bit in `model` (PEFT's wrapped base layers included) by an NF4Linear
    with the same codes and values; returns how many."""
    swapped = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if convertible(child):
                setattr(parent, name, from_linear4bit(child))
                swapped += 1
    return swapped
