"""Hand-written fast paths: varlen attention, the LoRA forward, the flat 8-bit optimizer, CUDA graphs."""
