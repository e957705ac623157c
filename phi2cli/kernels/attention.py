"""A varlen flash-attention kernel for padding-free batches, plugged into transformers.

Packed rows carry cumulative sequence lengths; torch's varlen attention (flash) then attends
within each example only, doing no work across examples. Without those lengths (e.g. eval of a
padded batch) it defers to transformers' SDPA implementation. The family's own attention arguments
travel with each call: grouped key/value heads (GQA), the softmax scaling and a sliding window;
a logit softcap has no varlen kernel, so families that use one never register this kernel.
"""

from __future__ import annotations

import functools
import inspect
from typing import Any

import torch
import torch.nn.functional as F

NAME = "phi2_varlen"


def _kernel() -> Any:
    """torch's varlen flash attention (a function of its own so tests can stand in for it on the CPU)."""
    from torch.nn.attention.varlen import varlen_attn

    return varlen_attn


@functools.lru_cache(maxsize=None)
def _kernel_takes(kernel: Any, argument: str) -> bool:
    try:
        return argument in inspect.signature(kernel).parameters
    except (ImportError, TypeError, ValueError):
        return False


def window_size(sliding_window: int | None) -> tuple[int, int]:
    """transformers' sliding_window (attend to the last W keys, itself included) as flash's (left, right)."""
    if sliding_window is None or sliding_window <= 0:
        return (-1, 0)  # causal, unlimited to the left
    return (int(sliding_window) - 1, 0)


def kernel_arguments(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, scale: float | None,
                     sliding_window: int | None) -> tuple[torch.Tensor, torch.Tensor, dict[str, Any]]:  # fmt: skip
    """key, value and keyword arguments for the varlen kernel ([tokens, heads, dim] layout).

    Fewer key/value heads than query heads (GQA) go to the kernel as they are with enable_gqa
    where this torch has it, else each key/value head is repeated for its group of query heads.
    """
    heads, kv_heads = query.shape[1], key.shape[1]
    if heads % kv_heads:
        raise ValueError(f"{heads} query heads cannot share {kv_heads} key/value heads evenly")
    kwargs: dict[str, Any] = {"scale": scale, "window_size": window_size(sliding_window)}
    if kv_heads != heads:
        if _kernel_takes(_kernel(), "enable_gqa"):
            kwargs["enable_gqa"] = True
        else:  # older torch: no grouped heads in the kernel
            key = key.repeat_interleave(heads // kv_heads, dim=1)
            value = value.repeat_interleave(heads // kv_heads, dim=1)
    return key, value, kwargs


def causal_varlen(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, cu: torch.Tensor, longest: int,
                  scale: float | None, sliding_window: int | None = None) -> torch.Tensor:  # fmt: skip
    """Causal attention within each packed sequence.

    query [tokens, heads, dim], key/value [tokens, kv_heads, dim]; cu: cumulative lengths (int32).
    """
    key, value, kwargs = kernel_arguments(query, key, value, scale, sliding_window)
    return _kernel()(query, key, value, cu, cu, longest, longest, **kwargs)


def varlen_available(head_dim: int = 80, heads: int = 2, kv_heads: int | None = None,
                     sliding_window: int | None = None) -> bool:  # fmt: skip
    """True where torch's varlen flash kernel exists and runs for this attention shape."""
    if not torch.cuda.is_available():
        return False
    try:
        kv_heads = kv_heads or heads
        query = torch.randn(8, heads, head_dim, device="cuda", dtype=torch.bfloat16)
        key = torch.randn(8, kv_heads, head_dim, device="cuda", dtype=torch.bfloat16)
        cu = torch.tensor([0, 3, 8], device="cuda", dtype=torch.int32)
        causal_varlen(query, key, key, cu, 5, None, sliding_window)
    except Exception:  # old torch, or no kernel for this GPU / head size / head grouping
        return False
    return True


# The decoding step's masked attention for a few rows (`phi2 summarize` of an article or a handful):
# torch's default kernels less cuDNN. cuDNN builds an execution plan the first time it meets a shape,
# 46-663 ms on one H200 (torch 2.11), where the other kernels need under 1.5 ms; for 8 rows of phi-2's heads
# its warm call is 0.041 ms faster, 80 ms over a 60-token summary's 32 layers, so skipping it pays in a
# fresh process: one article's generation took 0.6 s against 1.3 s (benchmarks/results/decode_attention*.json).
# From 32 rows on cuDNN's warm kernel wins (0.42 against 1.14 ms a layer at 256 rows), so an evaluation's
# batches keep it; so do grouped key/value heads, whose other kernels are 7-35x slower warm.
DECODE_BACKENDS = ("FLASH_ATTENTION", "EFFICIENT_ATTENTION", "MATH")
FEW_ROWS = 8


def decode_attention(query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, mask: torch.Tensor,
                     scale: float | None) -> torch.Tensor:  # fmt: skip
    """softmax(q k^T scale + mask) v over a static KV cache: query [rows, heads, 1, dim], keys and values
    [rows, kv_heads, cache, dim], mask [rows, 1, 1, cache]. Up to FEW_ROWS rows without grouped heads
    run on DECODE_BACKENDS, the rest on torch's own choice."""
    grouped = keys.shape[1] != query.shape[1]
    if grouped or query.shape[0] > FEW_ROWS or not DECODE_BACKENDS:
        return F.scaled_dot_product_attention(query, keys, values, attn_mask=mask, scale=scale, enable_gqa=grouped)
    from torch.nn.attention import SDPBackend, sdpa_kernel

    with sdpa_kernel([getattr(SDPBackend, name) for name in DECODE_BACKENDS]):
        return F.scaled_dot_product_attention(query, keys, values, attn_mask=mask, scale=scale)


def _attention(module: Any, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
               attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
               **kwargs: Any) -> tuple[torch.Tensor, None]:  # fmt: skip
    cu = kwargs.get("cu_seq_lens_q")
    if cu is None or query.shape[0] != 1 or attention_mask is not None:
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout,
                                      scaling=scaling, **kwargs)  # fmt: skip
    if kwargs.get("softcap") is not None:
        raise ValueError("the varlen kernel has no logit softcap; this family must not register it")
    # [1, heads, tokens, dim] -> [tokens, heads, dim]
    q, k, v = (t[0].transpose(0, 1) for t in (query, key, value))
    dtype = q.dtype if q.dtype in (torch.float16, torch.bfloat16) else torch.bfloat16
    cu = cu.to(device=q.device, dtype=torch.int32)
    longest = int(kwargs.get("max_length_q") or int((cu[1:] - cu[:-1]).max()))
    out = causal_varlen(q.to(dtype), k.to(dtype), v.to(dtype), cu, longest, scaling, kwargs.get("sliding_window"))
    return out.to(query.dtype).unsqueeze(0), None  # [1, tokens, heads, dim]


def _no_mask(*args: Any, **kwargs: Any) -> None:
    return None


def register(head_dim: int = 80, heads: int = 2, kv_heads: int | None = None,
             sliding_window: int | None = None) -> bool:  # fmt: skip
    """Register the kernel with transformers; False where it cannot run (CPU, old torch, this shape)."""
    if not varlen_available(head_dim, heads, kv_heads, sliding_window):
        return False
    from transformers import AttentionInterface, AttentionMaskInterface

    AttentionInterface.register(NAME, _attention)
    AttentionMaskInterface.register(NAME, _no_mask)
    return True
