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


def quiet_libraries() -> None:
    """Keep library chatter (weight-loading bars, deprecation notes) out of the user's terminal."""
    import logging
    import os

    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", message=".*gradient_checkpointing.*")
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    logging.getLogger("peft").setLevel(logging.ERROR)
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
    except ImportError:
        pass


def split_gguf(name_or_path: str) -> tuple[str, str | None]:
    """'dir/model.gguf' -> ('dir', 'model.gguf'); anything else -> (name_or_path, None)."""
    path = Path(name_or_path)
    if path.suffix.lower() == ".gguf":
        if not path.is_file():
            raise ModelError(f"{path} does not exist; check the --model path")
        return str(path.parent), path.name
    return name_or_path, None


def local_model(name_or_path: str) -> str:
    """Where a model's files are read from: a .gguf file's converted directory (made once, cached),
    else the name or directory as given. Reading the GGUF itself is slow (transformers parses the
    whole file for the tokenizer, again for the config: 9 s and 4 s for SmolLM2-135M on 2 CPU cores,
    every run); its converted directory reads in well under a second."""
    _, gguf_file = split_gguf(name_or_path)
    return gguf_to_directory(name_or_path) if gguf_file else name_or_path


def read_model_config(name_or_path: str) -> Any:
    """The transformers config of a hub id, local directory or .gguf file (through its converted
    directory), without weights; None where it cannot be read here (loading the model says why)."""
    quiet_libraries()
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(local_model(name_or_path))
    except Exception:  # noqa: BLE001 (the model's own load reports the problem in its words)
        return None


def parameter_count(config: Any) -> int:
    """Exact parameter count of the architecture a config describes, built on the meta device (no
    memory, no weights)."""
    import torch
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(config)
    return sum(p.numel() for p in skeleton.parameters())


def _load_error(kind: str, name: str, err: Exception) -> Exception:
    text = str(err)
    path = Path(name).expanduser()
    if path.is_file() and path.suffix.lower() != ".gguf":
        return ModelError(f"{name} is a file, not a {kind}: pass a {kind} directory (as saved by save_pretrained), "
                          f"a .gguf file or a hub id")  # fmt: skip
    if path.is_file():  # a .gguf file that is there but not readable as a model
        return ModelError(f"{name} is not a GGUF {kind} transformers can read "
                          f"({text.splitlines()[0][:140] if text else err!r})")  # fmt: skip
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


def import_libraries(quantized: bool, adapter: bool) -> None:
    """Import what loading a model will use, so that cost is timed apart from reading weights.

    `python -X importtime -m phi2cli summarize` on the H200 machine (transformers 5.24): transformers
    3.2 s, torch 1.7 s, bitsandbytes 1.4 s, peft 0.2 s.
    """
    from phi2cli.compat import import_quantization_libraries

    quiet_libraries()
    import torch  # noqa: F401
    import transformers.modeling_utils  # noqa: F401

    import_quantization_libraries(peft=adapter, bitsandbytes=quantized)


def load_tokenizer(name_or_path: str, padding_side: str = "right") -> Any:
    """Load a tokenizer (hub id, directory or .gguf) and give it a pad token.

    phi-2 has no pad token: we reuse EOS as pad. Collators pad labels with -100 by
    length, never by token id, so the real EOS at the end of every summary keeps its label.
    """
    quiet_libraries()
    from transformers import AutoTokenizer

    location = local_model(name_or_path)  # a .gguf's tokenizer was saved beside its converted weights
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            tokenizer = AutoTokenizer.from_pretrained(location)
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


@dataclass(frozen=True)
class Precision:
    """What the model is loaded as on this machine, resolved from the config."""

    device: str  # "cuda" or "cpu"
    quantization: str  # "4bit", "8bit" or "none"
    compute_dtype: str  # "bfloat16", "float16" or "float32"
    note: str | None = None  # a one-line warning for the user, if something fell back


def resolve_precision(model_cfg: ModelConfig) -> Precision:
    """Pick quantization and dtype for this machine; refuse what cannot work here."""
    import torch

    cuda = torch.cuda.is_available()
    note = None
    quantization = model_cfg.quantization
    if quantization == "auto":
        quantization = "4bit" if cuda else "none"
        if not cuda:
            note = "no CUDA GPU: loading the model in full precision (float32) instead of 4-bit"
    elif quantization in ("4bit", "8bit") and not cuda:
        raise DeviceError(
            f"--quantization {quantization} needs a CUDA GPU (bitsandbytes), and none is visible; "
            f"use --quantization none to train in full precision on the CPU"
        )
    dtype = model_cfg.compute_dtype
    if dtype == "auto":
        dtype = ("bfloat16" if torch.cuda.is_bf16_supported() else "float16") if cuda else "float32"
    elif dtype == "bfloat16" and cuda and not torch.cuda.is_bf16_supported():
        raise DeviceError("this GPU has no bfloat16; use --compute-dtype float16")
    if dtype == "float16":
        note = "float16 compute: phi-2's attention can overflow in fp16; bfloat16 is safer where the GPU has it"
    return Precision("cuda" if cuda else "cpu", quantization, dtype, note)


def gguf_to_directory(gguf_path: str) -> str:
    """Dequantize a .gguf model once into a plain cached directory (the Trainer refuses GGUF models)."""
    path = Path(gguf_path).resolve()
    stat = path.stat()
    from phi2cli.io.files import cache_root

    target = cache_root() / "gguf" / f"{path.stem}-{stat.st_size}-{int(stat.st_mtime)}"
    if (target / "config.json").is_file():
        return str(target)
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from phi2cli.io.files import atomic_directory

    from phi2cli.compat import gguf_parsed_once

    try:
        with gguf_parsed_once():
            model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32)
            tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    except Exception as err:
        raise _load_error("model", gguf_path, err) from None
    # The weights are plain float32 now; drop the GGUF marker that makes save_pretrained refuse.
    model.hf_quantizer = None
    model.is_quantized = False
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    with atomic_directory(target) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    return str(target)


def load_base_model(model_cfg: ModelConfig, precision: Precision, for_training: bool) -> Any:
    """Load the base model as `precision` says (4-bit NF4 with double quant by default on CUDA)."""
    quiet_libraries()
    import torch
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    location = local_model(model_cfg.model)
    dtype = getattr(torch, precision.compute_dtype)
    kwargs: dict[str, Any] = {"dtype": dtype, "attn_implementation": model_cfg.attn_implementation}
    if precision.quantization == "4bit":
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=model_cfg.double_quant,
            bnb_4bit_compute_dtype=dtype,
        )
    elif precision.quantization == "8bit":
        kwargs["quantization_config"] = BitsAndBytesConfig(load_in_8bit=True)
    if precision.device == "cuda":
        import os

        kwargs["device_map"] = {"": int(os.environ.get("LOCAL_RANK", torch.cuda.current_device()))}
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = AutoModelForCausalLM.from_pretrained(location, **kwargs)
    except torch.cuda.OutOfMemoryError:
        raise ModelError("the GPU ran out of memory loading the model; use --quantization 4bit") from None
    except Exception as err:
        raise _load_error("model", model_cfg.model, err) from None
    model.config.use_cache = not for_training  # the KV cache only helps generation
    return model


def dequantize_base(model: Any) -> int:
    """Replace every 4-bit linear layer by a frozen bf16 one holding the same (dequantized NF4) weights.

    The 4-bit path dequantizes each weight in every forward and backward; doing it once (with
    transformers' own `model.dequantize()`) keeps the values bit for bit and leaves only the bf16
    matrix products. Returns how many layers were replaced.
    """
    quantized = sum(type(m).__name__ in ("Linear4bit", "Linear8bitLt") for m in model.modules())
    if not quantized:
        return 0
    before = {id(param) for param in model.parameters()}
    model.dequantize()
    for param in model.parameters():
        if id(param) not in before:  # the new bf16 base weights; LoRA weights keep requires_grad
            param.requires_grad_(False)
    model.is_loaded_in_4bit = False  # prepare the LoRA model as the plain bf16 model it now is
    return quantized


def lora_targets(lora_cfg: LoraConfig, model_type: str | None = None) -> Any:
    """The user's --lora-targets, else the model family's attention q/k/v/output projections."""
    from phi2cli.models.families import default_lora_targets

    targets = list(lora_cfg.targets) or list(default_lora_targets(model_type))
    return "all-linear" if targets == ["all-linear"] else targets


def prepare_lean(model: Any, gradient_checkpointing: bool, upcast_norms: bool = True) -> Any:
    """k-bit training preparation that keeps embeddings and lm_head in bf16.

    peft's prepare_model_for_kbit_training upcasts every non-quantized weight to fp32, which
    doubles the 2 x 131 M embedding and head weights of phi-2 for no gain under bf16 autocast.
    Under autocast the layer norms get fp32 weights; without autocast (upcast_norms=False) they
    stay bf16, where the kernel still accumulates the statistics in fp32.
    """
    import torch

    for param in model.parameters():
        param.requires_grad_(False)
    for module in model.modules():
        if upcast_norms and isinstance(module, torch.nn.LayerNorm):
            module.float()
    if gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    return model


def attach_lora(model: Any, lora_cfg: LoraConfig, gradient_checkpointing: bool, lean: bool = False,
                upcast_norms: bool = True) -> Any:  # fmt: skip
    """Prepare a (quantized) model for training and wrap it with fresh LoRA adapters.

    lean=True keeps embeddings/lm_head in bf16 (the memory-saver profile); the reference recipe
    uses peft's prepare_model_for_kbit_training as published notebooks do.
    """
    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model, prepare_model_for_kbit_training

    quantized = getattr(model, "is_loaded_in_4bit", False) or getattr(model, "is_loaded_in_8bit", False)
    if quantized and lean:
        model = prepare_lean(model, gradient_checkpointing, upcast_norms)
    elif quantized:
        model = prepare_model_for_kbit_training(
            model,
            use_gradient_checkpointing=gradient_checkpointing,
            gradient_checkpointing_kwargs={"use_reentrant": False},
        )
    elif gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    peft_config = PeftLoraConfig(
        r=lora_cfg.r,
        lora_alpha=lora_cfg.alpha,
        lora_dropout=lora_cfg.dropout,
        target_modules=lora_targets(lora_cfg, getattr(model.config, "model_type", None)),
        bias="none",
        task_type="CAUSAL_LM",
    )
    try:
        return get_peft_model(model, peft_config)
    except ValueError as err:
        raise ConfigError(f"--lora-targets: {str(err).splitlines()[0]}") from None


def load_adapter(base: Any, adapter_dir: str | Path, is_trainable: bool = False) -> Any:
    """Attach a saved adapter to a base model; a clear error if it is not an adapter."""
    from peft import PeftModel

    adapter_dir = Path(adapter_dir)
    if not (adapter_dir / "adapter_config.json").is_file():
        raise ModelError(
            f"{adapter_dir} holds no adapter_config.json: not a LoRA adapter directory "
            f"(train one with 'phi2 train', or pass --adapter DIR)"
        )
    try:
        return PeftModel.from_pretrained(base, str(adapter_dir), is_trainable=is_trainable)
    except RuntimeError as err:  # size mismatch: adapter trained on another base model
        raise ModelError(_adapter_mismatch(adapter_dir, base, str(err))) from None


def _adapter_mismatch(adapter_dir: Path, base: Any, error: str) -> str:
    """Say which base model an adapter was trained on when its weights do not fit `base`."""
    import json
    import re

    try:
        trained_on = json.loads((adapter_dir / "adapter_config.json").read_text(encoding="utf-8"))
        trained_on = trained_on.get("base_model_name_or_path")
    except (OSError, ValueError):
        trained_on = None
    shapes = re.search(r"shape torch\.Size\((\[.*?\])\) from checkpoint, the shape in current model is "
                       r"torch\.Size\((\[.*?\])\)", error)  # fmt: skip
    detail = f"LoRA weight {shapes.group(1)} vs {shapes.group(2)} in the base" if shapes else \
        (error.splitlines()[0][:120] if error else "weights do not load")  # fmt: skip
    base_name = getattr(getattr(base, "config", None), "name_or_path", None) or "this base model"
    fix = f"pass --model {trained_on}" if trained_on else "pass the --model it was trained on"
    return f"adapter {adapter_dir} was trained on another base model than {base_name} ({detail}); {fix}"


def memory_report() -> dict[str, float]:
    """Peak GPU memory of this process in GiB (empty on CPU)."""
    import torch

    if not torch.cuda.is_available():
        return {}
    return {
        "peak_allocated_gib": round(torch.cuda.max_memory_allocated() / 2**30, 3),
        "peak_reserved_gib": round(torch.cuda.max_memory_reserved() / 2**30, 3),
    }
