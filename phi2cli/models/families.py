"""What the engine needs to know about each decoder family, in one place.

A family spec names the attention and MLP projections, the decoder layer class, the default LoRA
targets and the attention arguments the fast kernels must honour. Shapes (heads, key/value heads,
head_dim, window) are read from each model's own config, never assumed. A model of another family
runs the plain Hugging Face path (with a one-line note), never a crash.

Imports nothing heavy: `phi2 --help` and config validation use it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class FamilySpec:
    name: str  # our name for the family
    model_types: tuple[str, ...]  # transformers' config.model_type values it covers
    layer_classes: tuple[str, ...]  # the decoder layer class names (compiled one by one)
    attention: tuple[str, str, str, str]  # q, k, v, output projection module names
    mlp: tuple[str, ...]  # MLP projection module names
    lora_targets: tuple[str, ...]  # adapted by default: the attention's q/k/v and output projection
    rotary: str  # "partial" (rotates the first partial_rotary_factor of each head) or "full"
    norm: str  # "layernorm" or "rmsnorm"


FAMILIES = (
    FamilySpec("phi", ("phi",), ("PhiDecoderLayer",), ("q_proj", "k_proj", "v_proj", "dense"), ("fc1", "fc2"),
               ("q_proj", "k_proj", "v_proj", "dense"), "partial", "layernorm"),
    FamilySpec("llama", ("llama", "mistral"), ("LlamaDecoderLayer", "MistralDecoderLayer"), ("q_proj", "k_proj", "v_proj", "o_proj"),
               ("gate_proj", "up_proj", "down_proj"), ("q_proj", "k_proj", "v_proj", "o_proj"), "full", "rmsnorm"),
    FamilySpec("qwen2", ("qwen2",), ("Qwen2DecoderLayer",), ("q_proj", "k_proj", "v_proj", "o_proj"),
               ("gate_proj", "up_proj", "down_proj"), ("q_proj", "k_proj", "v_proj", "o_proj"), "full", "rmsnorm"),
)  # fmt: skip
DEFAULT_FAMILY = FAMILIES[0]  # the reference recipe's model (phi-2)
# transformers model_type -> GGUF general.architecture, for the types the GGUF export writes and reads
GGUF_ARCHITECTURES = {"phi": "phi2", "llama": "llama", "qwen2": "qwen2"}


def family_of(model_type: str | None) -> FamilySpec | None:
    """The spec covering transformers' model_type, or None for a family the engine does not know."""
    for spec in FAMILIES:
        if model_type in spec.model_types:
            return spec
    return None


@dataclass(frozen=True)
class AttentionShape:
    """The attention arguments of one model, read from its config."""

    heads: int
    kv_heads: int
    head_dim: int
    sliding_window: int | None  # attend to at most this many keys back (None: unlimited)
    softcap: float | None  # attention logit softcap (no varlen kernel has one)
    dropout: float


def attention_shape(config: Any) -> AttentionShape:
    """Head counts (key/value heads too), head_dim from the config (not hidden/heads where it says so)."""
    heads = int(config.num_attention_heads)
    kv_heads = int(getattr(config, "num_key_value_heads", None) or heads)
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    window = getattr(config, "sliding_window", None)
    if window is not None and getattr(config, "use_sliding_window", True) is False:
        window = None  # Qwen2 carries a window size it does not use
    softcap = getattr(config, "attn_logit_softcapping", None)
    dropout = float(getattr(config, "attention_dropout", 0.0) or 0.0)
    return AttentionShape(heads, kv_heads, int(head_dim), int(window) if window else None, softcap, dropout)


def varlen_refusal(shape: AttentionShape) -> str | None:
    """Why the packed varlen kernel cannot run this attention exactly; None when it can."""
    if shape.softcap:
        return "the attention uses a logit softcap, which the varlen kernel does not apply"
    if shape.dropout:
        return "the attention uses dropout, which the varlen kernel does not apply"
    if shape.heads % shape.kv_heads:
        return f"{shape.heads} query heads do not divide into {shape.kv_heads} key/value heads"
    return None


def default_lora_targets(model_type: str | None) -> tuple[str, ...]:
    """The family's attention projections; an unknown family gets PEFT's 'all-linear'."""
    spec = family_of(model_type)
    return spec.lora_targets if spec else ("all-linear",)


def unknown_family_note(model_type: str | None) -> str:
    return (f"model type '{model_type}' is not one of the engine's families (phi, llama/mistral, qwen2): "
            f"running the plain Hugging Face path (no fused kernels, compile or CUDA graphs)")  # fmt: skip


@dataclass(frozen=True)
class ModelShape:
    """What the memory estimate of a profile scales with."""

    parameters: int
    layers: int
    width: int  # hidden + intermediate size: what each layer keeps per token for backward grows with

    def weight_gib(self, bytes_per_parameter: float = 2.0) -> float:
        return self.parameters * bytes_per_parameter / 2**30

    def activation_ratio(self, other: "ModelShape") -> float:
        """Activation memory per token of this shape relative to `other`'s."""
        return (self.layers * self.width) / (other.layers * other.width)


def model_shape(config: Any) -> ModelShape | None:
    """Parameter count and layer shape from a transformers config (no weights needed); None where the
    config lacks the usual decoder fields."""
    try:
        return _model_shape(config)
    except (AttributeError, TypeError, ValueError, ZeroDivisionError):
        return None


def _model_shape(config: Any) -> ModelShape:
    hidden, layers = int(config.hidden_size), int(config.num_hidden_layers)
    intermediate = int(getattr(config, "intermediate_size", None) or 4 * hidden)
    shape = attention_shape(config)
    spec = family_of(getattr(config, "model_type", None))
    mlp_matrices = len(spec.mlp) if spec else 3
    attention = hidden * shape.head_dim * (2 * shape.heads + 2 * shape.kv_heads)
    embeddings = int(config.vocab_size) * hidden * (1 if getattr(config, "tie_word_embeddings", False) else 2)
    parameters = embeddings + layers * (attention + mlp_matrices * hidden * intermediate)
    return ModelShape(parameters, layers, hidden + intermediate)


PHI2_SHAPE = ModelShape(2_779_683_840, 32, 2560 + 10240)  # microsoft/phi-2, what the memory constants were measured on
