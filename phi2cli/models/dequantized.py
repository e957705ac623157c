"""The base model with its 4-bit NF4 weight values held in the compute dtype (bf16 matmuls, no 4-bit layers).

The fast paths (speed profile, inference on CUDA) want NF4-rounded weights as plain bf16
matrices: either loaded in 4-bit and dequantized once, or, where the checkpoint is stored in the
compute dtype, loaded as it is and rounded to NF4 in place (bit for bit the same values).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

NF4_BLOCKSIZE = 64  # bitsandbytes' Params4bit default


def round_to_nf4(model: Any, double_quant: bool = True) -> int:
    """Give every linear layer but the output head the weights 4-bit NF4 loading would give it,
    dequantized, without building the 4-bit model first (what dequantize_base returns, in one pass).

    Uses bitsandbytes' public quantize_4bit / dequantize_4bit with Linear4bit's settings (NF4,
    block 64, double quant as configured), on each weight as loaded in the compute dtype.
    """
    import bitsandbytes as bnb
    import torch

    head = model.get_output_embeddings()
    rounded = 0
    with torch.no_grad():
        for module in model.modules():
            if type(module) is not torch.nn.Linear or module is head:
                continue
            weight = module.weight.data
            packed, state = bnb.functional.quantize_4bit(weight, blocksize=NF4_BLOCKSIZE, quant_type="nf4",
                                                         compress_statistics=double_quant, quant_storage=torch.uint8)  # fmt: skip
            weight.copy_(bnb.functional.dequantize_4bit(packed, state).to(weight.dtype))
            rounded += 1
    return rounded


def load_dequantized_base(model_cfg: Any, precision: Any, for_training: bool) -> Any:
    """The base model with 4-bit NF4 values held in the compute dtype (no 4-bit layers left).

    Where the checkpoint is stored in the compute dtype, its weights are loaded as they are and
    rounded to NF4 in place (NF4 sees the very values 4-bit loading gives it); otherwise the
    model is loaded in 4-bit and dequantized, as before.
    """
    from phi2cli.models.loading import dequantize_base, load_base_model

    if precision.quantization == "4bit" and stored_dtype(model_cfg.model) == precision.compute_dtype:
        model = load_base_model(model_cfg, dataclasses.replace(precision, quantization="none"), for_training)
        round_to_nf4(model, model_cfg.double_quant)
        return model
    model = load_base_model(model_cfg, precision, for_training)
    dequantize_base(model)
    return model


def stored_dtype(model: str) -> str | None:
    """The dtype a local model directory's weights are stored in (config.json), else None."""
    from phi2cli.models.loading import split_gguf

    location, gguf_file = split_gguf(model)
    path = Path(location) / "config.json"
    if gguf_file or not path.is_file():
        return None
    try:
        config = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return config.get("dtype") or config.get("torch_dtype")
