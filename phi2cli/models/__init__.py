"""Models: loading tokenizers, 4-bit base models and LoRA adapters."""
