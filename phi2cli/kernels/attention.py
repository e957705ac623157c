"""A varlen flash-attention kernel for padding-free batches, plugged into transformers.

Packed rows carry cumulative sequence lengths; torch's varlen attention (flash) then attends
within each example only, doing no work across examples. Without those lengths (e.g. eval of a
padded batch) it defers to transformers' SDPA implementation.
"""

from __future__ import annotations

from typing import Any

import torch

NAME = "phi2_varlen"


def varlen_available(head_dim: int = 80) -> bool:
    """True where torch's varlen flash kernel exists and runs for this head size (phi-2: 80)."""
    if not torch.cuda.is_available():
        return False
    try:
        from torch.nn.attention.varlen import varlen_attn

        probe = torch.randn(8, 2, head_dim, device="cuda", dtype=torch.bfloat16)
        cu = torch.tensor([0, 3, 8], device="cuda", dtype=torch.int32)
        varlen_attn(probe, probe, probe, cu, cu, 5, 5, window_size=(-1, 0))
    except Exception:  # old torch, or no kernel for this GPU / head size
        return False
    return True


def _attention(module: Any, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
               attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
               **kwargs: Any) -> tuple[torch.Tensor, None]:  # fmt: skip
    cu = kwargs.get("cu_seq_lens_q")
    if cu is None or query.shape[0] != 1 or attention_mask is not None:
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout,
                                      scaling=scaling, **kwargs)  # fmt: skip
    # [1, heads, tokens, dim] -> [tokens, heads, dim]
    q, k, v = (t[0].transpose(0, 1) for t in (query, key, value))
    dtype = q.dtype if q.dtype in (torch.float16, torch.bfloat16) else torch.bfloat16
    cu = cu.to(device=q.device, dtype=torch.int32)
    longest = int(kwargs.get("max_length_q") or int((cu[1:] - cu[:-1]).max()))
    out = causal_varlen(q.to(dtype), k.to(dtype), v.to(dtype), cu, longest, scaling)
    return out.to(query.dtype).unsqueeze(0), None  # [1, tokens, heads, dim]


def causal_varlen(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, cu: torch.Tensor, longest: int,
                  scale: float | None) -> torch.Tensor:  # fmt: skip
    """Causal attention within each packed sequence ([tokens, heads, dim]; cu: cumulative lengths, int32)."""
    from torch.nn.attention.varlen import varlen_attn

    return varlen_attn(query, key, value, cu, cu, longest, longest, scale=scale, window_size=(-1, 0))


def _no_mask(*args: Any, **kwargs: Any) -> None:
    return None


def register(head_dim: int = 80) -> bool:
    """Register the kernel with transformers; False where it cannot run (CPU, old torch)."""
    if not varlen_available(head_dim):
        return False
    from transformers import AttentionInterface, AttentionMaskInterface

    AttentionInterface.register(NAME, _attention)
    AttentionMaskInterface.register(NAME, _no_mask)
    return True
