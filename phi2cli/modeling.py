"""Loading tokenizers, base models (4-bit/8-bit/full) and LoRA adapters.

The only module that touches BitsAndBytesConfig and peft.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from phi2cli.config import LoraConfig, ModelConfig
from phi2cli.errors import ConfigError, DeviceError, HubUnreachableError, ModelError


def split_gguf(name_or_path: str) -> tuple[str, str | None]:
    """'dir/model.gguf' -> ('dir', 'model.gguf'); anything else -> (name_or_path, None)."""
    path = Path(name_or_path)
    if path.suffix.lower() == ".gguf":
        if not path.is_file():
            raise ModelError(f"{path} does not exist; check the --model path")
        return str(path.parent), path.name
    return name_or_path, None


def _load_error(kind: str, name: str, err: Exception) -> Exception:
    text = str(err)
    path = Path(name)
    if path.exists() and path.is_dir():
        return ModelError(f"{name} holds no loadable {kind} ({text.splitlines()[0][:140] if text else err!r})")
    if name.startswith((".", "/", "~")) or (path.suffix and not path.exists()):
        return ModelError(f"{kind} path {name} does not exist; check the path")
    offline = any(s in text.lower() for s in ("offline", "connection", "resolve", "internet", "couldn't connect"))
    if offline or "not a valid model identifier" in text or "does not appear to have" in text:
        return HubUnreachableError(
            f"could not load {kind} '{name}' from the Hugging Face hub (offline or unknown id); "
            f"pass a local directory or .gguf file with --model"
        )
    return ModelError(f"could not load {kind} '{name}': {text.splitlines()[0][:200] if text else err!r}")


def load_tokenizer(name_or_path: str, padding_side: str = "right") -> Any:
    """Load a tokenizer (hub id, directory or .gguf) and give it a pad token.

    phi-2 has no pad token: we reuse EOS as pad. Collators pad labels with -100 by
    length, never by token id, so the real EOS at the end of every summary keeps its label.
    """
    from transformers import AutoTokenizer

    location, gguf_file = split_gguf(name_or_path)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            tokenizer = AutoTokenizer.from_pretrained(location, gguf_file=gguf_file) if gguf_file else \
                AutoTokenizer.from_pretrained(location)  # fmt: skip
    except Exception as err:
        raise _load_error("tokenizer", name_or_path, err) from None
    if tokenizer.eos_token_id is None:
        raise ModelError(f"tokenizer {name_or_path} has no EOS token; summaries need one to end")
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = padding_side
    # We truncate articles ourselves; silence the "longer than the maximum" warning.
    tokenizer.model_max_length = int(1e9)
    return tokenizer
