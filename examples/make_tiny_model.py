"""Build a tiny randomly initialised Phi model with phi-2's real tokenizer, for offline try-outs.

    python examples/make_tiny_model.py runs/tiny-phi-2

The model has phi-2's architecture and vocabulary but 2 layers of width 64, so every phi2
command runs on a CPU in seconds. Its summaries are noise: it shows the pipeline, not quality.
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import torch
from transformers import PhiConfig, PhiForCausalLM

TOKENIZER_DIR = Path(__file__).resolve().parent / "tiny-phi-2-tokenizer"


def main(out: Path) -> None:
    config = PhiConfig(
        vocab_size=51200, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        partial_rotary_factor=0.4, hidden_act="gelu_new", max_position_embeddings=2048,
        bos_token_id=50256, eos_token_id=50256, tie_word_embeddings=False,
    )  # fmt: skip
    torch.manual_seed(0)
    PhiForCausalLM(config).save_pretrained(out)
    for item in TOKENIZER_DIR.iterdir():
        if item.name != "config.json" and item.suffix != ".md":
            shutil.copy(item, out / item.name)
    print(f"tiny Phi model written to {out}")


if __name__ == "__main__":
    main(Path(sys.argv[1] if len(sys.argv) > 1 else "runs/tiny-phi-2"))
