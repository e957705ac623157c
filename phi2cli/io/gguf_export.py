"""GGUF for llama.cpp and Ollama: a merged transformers model written with the `gguf` package's writer.

Tensor names come from gguf's own name maps; only what llama.cpp's loaders expect differently from
transformers' layout is done here (Llama's rotary q/k row order, phi-2's partial rotary). Imports no
torch at module level.
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from phi2cli.errors import ConfigError, ModelError, Phi2Error

GGUF_TYPES = ("f16", "q8_0")
Q8_BLOCK = 32  # q8_0 quantizes rows in blocks of 32 values; narrower rows stay f16

QK_PERMUTED = {"llama"}  # model_types whose q/k rows llama.cpp expects reordered for its rotary layout
# Architectures whose llama.cpp loader needs output.weight even when the embeddings are tied.
OUTPUT_REQUIRED = ("PHI2",)


@dataclass(frozen=True)
class GGUFSummary:
    path: Path
    architecture: str  # gguf's name: phi2, llama, qwen2
    gguf_type: str
    tensors: int


def check_gguf_type(gguf_type: str) -> str:
    if gguf_type not in GGUF_TYPES:
        raise ConfigError(f"--gguf-type must be one of {', '.join(GGUF_TYPES)} (got '{gguf_type}')")
    return gguf_type


def gguf_architecture(config: Any) -> tuple[Any, bool]:
    """(gguf.MODEL_ARCH, permute q/k) for a transformers config, or a ModelError for other families."""
    import gguf

    from phi2cli.models.families import GGUF_ARCHITECTURES

    model_type = getattr(config, "model_type", None)
    if model_type not in GGUF_ARCHITECTURES:
        raise ModelError(
            f"GGUF export supports {', '.join(sorted(GGUF_ARCHITECTURES))} models; this one is '{model_type}'; "
            f"use 'phi2 export' without --format gguf for a transformers directory"
        )
    return getattr(gguf.MODEL_ARCH, GGUF_ARCHITECTURES[model_type].upper()), model_type in QK_PERMUTED


def _rope(config: Any, key: str, default: float) -> float:
    """A rotary setting: in config.rope_parameters since transformers 5, a config attribute before."""
    params = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type != "default":
        raise ModelError(f"GGUF export does not handle rope scaling '{rope_type}' yet; export with --format hf")
    return float(params.get(key, getattr(config, key, default)))


def _head_dim(config: Any) -> int:
    return int(getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads)


def add_hyperparameters(writer: Any, arch_name: str, config: Any) -> None:
    """The architecture keys llama.cpp reads for this family."""
    heads = config.num_attention_heads
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_head_count(heads)
    writer.add_head_count_kv(getattr(config, "num_key_value_heads", None) or heads)
    if arch_name == "PHI2":
        writer.add_layer_norm_eps(config.layer_norm_eps)
        # phi-2 rotates only the first partial_rotary_factor of each head (32 of 80 dims)
        writer.add_rope_dimension_count(int(_rope(config, "partial_rotary_factor", 1.0) * _head_dim(config)))
    else:
        writer.add_layer_norm_rms_eps(config.rms_norm_eps)
        writer.add_rope_dimension_count(_head_dim(config))
        writer.add_vocab_size(config.vocab_size)
        if _head_dim(config) != config.hidden_size // heads:
            writer.add_key_length(_head_dim(config))
            writer.add_value_length(_head_dim(config))
    writer.add_rope_freq_base(_rope(config, "rope_theta", 10000.0))


def pre_tokenizer_name(tokenizer_json: dict[str, Any]) -> str:
    """llama.cpp's pre-tokenizer name for a byte-level BPE tokenizer.json, read from its structure."""
    pre = tokenizer_json.get("pre_tokenizer") or {}
    steps = pre.get("pretokenizers", [pre]) if pre.get("type") == "Sequence" else [pre]
    kinds = [step.get("type") for step in steps]
    if kinds == ["ByteLevel"] and steps[0].get("use_regex", True):
        return "gpt-2"  # GPT-2's split regex (phi-2, and SmolLM2 as transformers reads it from GGUF)
    if kinds == ["Digits", "ByteLevel"] and steps[0].get("individual_digits") and steps[1].get("use_regex", True):
        return "smollm"  # single digits, then GPT-2's regex
    if kinds == ["Split", "ByteLevel"]:
        pattern = steps[0].get("pattern", {}).get("Regex", "")
        if r"\p{N}{1,3}" in pattern:
            return "llama-bpe"  # Llama 3: numbers in groups of up to three
        if r"|\p{N}|" in pattern:
            return "qwen2"  # Qwen2: single digits
    raise ModelError(
        f"GGUF export knows byte-level BPE tokenizers of GPT-2, SmolLM, Llama 3 and Qwen2 style; "
        f"this tokenizer pre-splits text with {kinds or 'nothing'}"
    )


def add_tokenizer(writer: Any, tokenizer: Any, vocab_size: int) -> None:
    """Vocabulary, merges, special ids and chat template of a byte-level BPE ('gpt2') tokenizer."""
    import json

    import gguf

    with tempfile.TemporaryDirectory() as saved:
        tokenizer.save_pretrained(saved)
        tokenizer_file = Path(saved) / "tokenizer.json"
        if not tokenizer_file.is_file():
            raise ModelError("GGUF export needs a fast tokenizer (tokenizer.json); this one has none")
        tokenizer_json = json.loads(tokenizer_file.read_text(encoding="utf-8"))
        if tokenizer_json.get("model", {}).get("type") != "BPE" or "ByteLevel" not in json.dumps(
                tokenizer_json.get("pre_tokenizer")):  # fmt: skip
            raise ModelError("GGUF export handles byte-level BPE tokenizers (GPT-2 style) only")
        special_vocab = gguf.SpecialVocab(saved, load_merges=True, n_vocab=vocab_size)
    by_id = {index: token for token, index in tokenizer.get_vocab().items()}
    added = tokenizer.added_tokens_decoder
    tokens, types = [], []
    for index in range(vocab_size):  # embedding rows beyond the tokenizer (phi-2: 51200 > 50295) are unused
        if index not in by_id:
            tokens.append(f"[PAD{index}]")
            types.append(gguf.TokenType.UNUSED)
        elif index in added:
            tokens.append(by_id[index])
            types.append(gguf.TokenType.CONTROL if added[index].special else gguf.TokenType.USER_DEFINED)
        else:
            tokens.append(by_id[index])
            types.append(gguf.TokenType.NORMAL)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre_tokenizer_name(tokenizer_json))
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    # Training and 'phi2 summarize' encode prompts with no BOS/EOS added; runtimes must do the same.
    special_vocab.add_special_token = {"bos": False, "eos": False}
    if tokenizer.pad_token_id is not None:
        special_vocab.special_token_ids["pad"] = int(tokenizer.pad_token_id)
    special_vocab.add_to_gguf(writer, quiet=True)


def _permute_rotary(weight: Any, heads: int) -> Any:
    """transformers' half-split rotary rows -> llama.cpp's interleaved pairs, per head."""
    rows = weight.shape[0]
    return weight.reshape(heads, 2, rows // heads // 2, *weight.shape[1:]).transpose(1, 2).reshape(weight.shape)


def gguf_tensors(model: Any, arch: Any, permute: bool) -> list[tuple[str, Any]]:
    """(gguf name, float32 numpy array) for every weight, in llama.cpp's layout."""
    import gguf
    import torch

    config = model.config
    name_map = gguf.get_tensor_name_map(arch, config.num_hidden_layers)
    tied = bool(getattr(config, "tie_word_embeddings", False)) and arch.name not in OUTPUT_REQUIRED
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    out = []
    for name, tensor in model.state_dict().items():
        if tied and name.startswith("lm_head."):
            continue  # the runtime reuses token_embd, as transformers does
        gguf_name = name_map.get_name(name, try_suffixes=(".weight", ".bias"))
        if gguf_name is None:
            raise ModelError(f"no GGUF name for tensor '{name}' of this {arch.name.lower()} model")
        data = tensor.detach().to(torch.float32)
        if permute and name.endswith(("q_proj.weight", "q_proj.bias")):
            data = _permute_rotary(data, heads)
        elif permute and name.endswith(("k_proj.weight", "k_proj.bias")):
            data = _permute_rotary(data, kv_heads)
        out.append((gguf_name, data.cpu().numpy()))
    return out


def encode_tensor(data: Any, gguf_type: str) -> tuple[Any, Any]:
    """(array, GGML type): vectors and norms stay f32; matrices become f16 or q8_0."""
    import gguf
    import numpy as np

    types = gguf.GGMLQuantizationType
    if data.ndim < 2:
        return data.astype(np.float32), types.F32
    if gguf_type == "q8_0" and data.shape[-1] % Q8_BLOCK == 0:
        return gguf.quants.quantize(data, types.Q8_0), types.Q8_0
    return data.astype(np.float16), types.F16


def write_gguf(model: Any, tokenizer: Any, path: str | Path, gguf_type: str, name: str) -> GGUFSummary:
    """Write `model` (a merged transformers causal LM) and `tokenizer` as one GGUF file, atomically.

    Args:
        model: PhiForCausalLM, LlamaForCausalLM or Qwen2ForCausalLM with plain (unquantized) weights.
        tokenizer: its byte-level BPE tokenizer, as training used it.
        path: the .gguf file to write (replaced in one rename).
        gguf_type: f16 or q8_0 for the matrices (vectors stay f32).
        name: general.name written in the file.
    Returns:
        GGUFSummary.
    Raises:
        ModelError (family or tokenizer GGUF cannot express), ConfigError (gguf_type), Phi2Error (disk).
    """
    import gguf

    check_gguf_type(gguf_type)
    arch, permute = gguf_architecture(model.config)
    path = Path(path)
    tensors = [(tensor_name, *encode_tensor(data, gguf_type)) for tensor_name, data in
               gguf_tensors(model, arch, permute)]  # fmt: skip
    file_type = gguf.LlamaFileType.MOSTLY_Q8_0 if gguf_type == "q8_0" else gguf.LlamaFileType.MOSTLY_F16
    from phi2cli.io.files import ensure_writable_dir

    ensure_writable_dir(path.parent)
    partial = path.with_name(f".{path.name}.partial")
    try:
        writer = gguf.GGUFWriter(partial, gguf.MODEL_ARCH_NAMES[arch])
        writer.add_type(gguf.GGUFType.MODEL)
        writer.add_name(name)
        writer.add_file_type(file_type)
        add_hyperparameters(writer, arch.name, model.config)
        add_tokenizer(writer, tokenizer, model.config.vocab_size)
        for tensor_name, data, dtype in tensors:
            writer.add_tensor(tensor_name, data, raw_dtype=dtype)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        os.replace(partial, path)
    except OSError as err:
        partial.unlink(missing_ok=True)
        raise Phi2Error(f"cannot write {path}: {err.strerror or err}") from None
    except BaseException:
        partial.unlink(missing_ok=True)
        raise
    return GGUFSummary(path, gguf.MODEL_ARCH_NAMES[arch], gguf_type, len(tensors))


def render_modelfile(gguf_file: str, prefix: str, suffix: str, stops: list[str], num_ctx: int,
                     num_predict: int) -> str:  # fmt: skip
    """An Ollama Modelfile: the run's prompt around {{ .Prompt }}, its stop strings, greedy decoding.

    Args:
        gguf_file: the .gguf file name, relative to the Modelfile.
        prefix, suffix: the training prompt's text before and after the article.
        stops: strings that end a summary (the EOS token's text, a newline).
        num_ctx, num_predict: the run's max_length and max_new_tokens.
    """
    for text in (prefix, suffix, *stops):
        if '"""' in text:
            raise ModelError('the prompt template holds """, which a Modelfile cannot quote; export with --format hf')

    def literal(text: str) -> str:  # Go template text: a literal '{{' must be emitted by an action
        return text.replace("{{", '{{ "{{" }}')

    lines = [
        "# Ollama model of a phi2cli fine-tune: ollama create NAME -f THIS_FILE; ollama run NAME < article.txt",
        f"FROM ./{gguf_file}",
        f'TEMPLATE """{literal(prefix)}{{{{ .Prompt }}}}{literal(suffix)}"""',
        *(f'PARAMETER stop """{stop}"""' for stop in stops),
        "PARAMETER temperature 0",  # greedy, as 'phi2 summarize' decodes
        f"PARAMETER num_ctx {num_ctx}",
        f"PARAMETER num_predict {num_predict}",
    ]
    return "\n".join(lines) + "\n"
