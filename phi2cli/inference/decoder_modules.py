"""The pieces of a covered family's causal LM that the static-cache decoder (phi2cli.inference.decode)
and the shared forward (phi2cli.inference.shared_forward) drive directly: embeddings, layers,
rotary table, final norm and head, named by the family spec (phi2cli.models.families)."""

from __future__ import annotations

from typing import Any

import torch


class DecoderModules:
    """The pieces of a covered family's causal LM that prefill and the decoding step share, named by
    the family spec (phi2cli.models.families): Phi's parallel residual and partial rotary, Llama's and
    Qwen2's sequential residual, full rotary and grouped key/value heads."""

    def __init__(self, model: Any) -> None:
        from phi2cli.models.families import family_of

        inner, config = model.model, model.config
        self.spec = family_of(config.model_type)
        self.embed, self.layers, self.rotary = inner.embed_tokens, list(inner.layers), inner.rotary_emb
        self.final_norm = inner.final_layernorm if self.spec.norm == "layernorm" else inner.norm
        self.lm_head = model.lm_head
        self.q_name, self.k_name, self.v_name, self.out_name = self.spec.attention
        attn = self.layers[0].self_attn
        self.heads = int(config.num_attention_heads)
        self.kv_heads = int(getattr(config, "num_key_value_heads", None) or self.heads)
        self.head_dim, self.scaling = int(attn.head_dim), attn.scaling
        self.parallel = self.spec.name == "phi"  # attention and MLP read the same normed input
        self.qk_layernorm = bool(getattr(config, "qk_layernorm", False))
        self.vocab = self.lm_head.out_features
        self.device, self.dtype = self.lm_head.weight.device, self.lm_head.weight.dtype
        self.intermediate = int(getattr(config, "intermediate_size", None) or 4 * config.hidden_size)
        for layer in self.layers:  # every piece the forwards call, so that a missing one shows here
            _ = layer.input_layernorm, layer.mlp, self.parallel or layer.post_attention_layernorm
            if self.qk_layernorm:
                _ = layer.self_attn.q_layernorm, layer.self_attn.k_layernorm

    def linears(self) -> list[Any]:
        """The projections the decoder calls directly or through the layer's MLP."""
        found = [self.lm_head]
        for layer in self.layers:
            found += [getattr(layer.self_attn, name) for name in self.spec.attention]
            found += [getattr(layer.mlp, name) for name in self.spec.mlp]
        return found

    def rotary_table(self, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and sin [length, rotary_dims] for positions 0..length-1, exactly as the model computes them."""
        probe = torch.zeros(1, dtype=self.dtype, device=self.device)
        positions = torch.arange(length, device=self.device)[None]
        cos, sin = self.rotary(probe, positions)
        return cos[0], sin[0]

    def qkv(self, layer: Any, normed: torch.Tensor, cos: torch.Tensor,
            sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:  # fmt: skip
        """Queries [..., heads, head_dim], keys and values [..., kv_heads, head_dim] of the normed
        hidden states, queries and keys rotated."""
        attn, leading = layer.self_attn, normed.shape[:-1]
        query = getattr(attn, self.q_name)(normed).view(*leading, self.heads, self.head_dim)
        key = getattr(attn, self.k_name)(normed).view(*leading, self.kv_heads, self.head_dim)
        value = getattr(attn, self.v_name)(normed).view(*leading, self.kv_heads, self.head_dim)
        if self.qk_layernorm:
            query, key = attn.q_layernorm(query), attn.k_layernorm(key)
        return self._rotate(query, cos, sin), self._rotate(key, cos, sin), value

    def _rotate(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """Rotary embedding of the first cos.shape[-1] dims of each head (all of them, or Phi's part); the rest pass."""
        rotary_dims = cos.shape[-1]
        turned, kept = x[..., :rotary_dims], x[..., rotary_dims:]
        half = rotary_dims // 2
        rotated_half = torch.cat((-turned[..., half:], turned[..., :half]), dim=-1)
        return torch.cat((turned * cos + rotated_half * sin, kept), dim=-1)

    def finish_layer(self, layer: Any, hidden: torch.Tensor, normed: torch.Tensor,
                     attended: torch.Tensor) -> torch.Tensor:  # fmt: skip
        """The residual: Phi's parallel one (attention output + MLP of the same normed input + the
        residual) or the sequential one (h = hidden + attention output; h + MLP(norm(h)))."""
        projected = getattr(layer.self_attn, self.out_name)(attended)
        if self.parallel:
            return projected + layer.mlp(normed) + hidden
        hidden = hidden + projected
        return hidden + layer.mlp(layer.post_attention_layernorm(hidden))

    def next_ids(self, hidden: torch.Tensor, temperature: float = 0.0,
                 uniforms: torch.Tensor | None = None) -> torch.Tensor:  # fmt: skip
        """The greedy token after each hidden state, or (with uniforms [rows]) one drawn from softmax(logits / T)."""
        logits = self.lm_head(self.final_norm(hidden))
        if uniforms is None:
            return logits.argmax(dim=-1)
        from phi2cli.inference.sampling import draw

        return draw(logits, uniforms, temperature)
