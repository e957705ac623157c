"""A trained run at inference: the base model with its adapter merged in, prompted as in training.

Prompts are built exactly as in training (the run's template through PromptFormat, the saved
tokenizer). On CUDA a 4-bit base is dequantized once and the adapter merged into the bf16
weights, so no step pays for NF4 dequantization or LoRA matmuls.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from phi2cli.config import RUN_CONFIG_NAME, Phi2Config, load_run_config
from phi2cli.data.prompts import PromptFormat
from phi2cli.errors import ModelError, RunError


@dataclass
class LoadedModel:
    """A model ready for inference and what is needed to prompt it as in training."""

    model: Any
    tokenizer: Any
    fmt: PromptFormat
    config: Phi2Config
    device: str  # "cuda" or "cpu"
    dtype: str  # weights' compute dtype
    adapter_dir: Path | None = None  # None while it is the base model
    merged: bool = False  # adapter folded into the weights
    notes: list[str] = field(default_factory=list)
    load_phases: dict[str, float] = field(default_factory=dict)  # seconds: libraries, model, adapter


def check_adapter_dir(adapter_dir: str | Path) -> Path:
    """The adapter directory, or a RunError/ModelError saying why it cannot be used."""
    path = Path(adapter_dir)
    if not path.exists():
        raise RunError(f"adapter directory {path} does not exist; train one with 'phi2 train' or pass --adapter DIR")
    if not path.is_dir():
        raise RunError(f"--adapter {path} is a file; pass the directory written by 'phi2 train'")
    if not (path / "adapter_config.json").is_file():
        from phi2cli.io.checkpoints import checkpoints

        saved = checkpoints(path)
        hint = f"it holds checkpoints: pass --adapter {saved[-1]}" if saved else \
            "train one with 'phi2 train', or pass --adapter DIR"  # fmt: skip
        raise ModelError(f"{path} holds no adapter_config.json: not a LoRA adapter directory ({hint})")
    return path


def run_config_for(adapter_dir: str | Path) -> tuple[Phi2Config, dict[str, Any]]:
    """The saved config of the run that wrote `adapter_dir` (in it, or beside a checkpoint-N)."""
    path = Path(adapter_dir)
    for folder in (path, path.parent):
        if (folder / RUN_CONFIG_NAME).is_file():
            return load_run_config(folder)
    raise RunError(
        f"{path} has no {RUN_CONFIG_NAME} (nor has its parent), so its prompt template is unknown; "
        f"pass a directory written by 'phi2 train'"
    )


def _tokenizer_source(config: Phi2Config, adapter_dir: Path | None) -> str:
    if adapter_dir is not None and (adapter_dir / "tokenizer_config.json").is_file():
        return str(adapter_dir)  # the tokenizer saved with the run is the one training used
    return config.model.tokenizer or config.model.model


def load_model(config: Phi2Config, adapter_dir: str | Path | None = None) -> LoadedModel:
    """Load the base model for inference, with the adapter merged in when one is given.

    Args:
        config: the run's config (model, template and max_length are used).
        adapter_dir: a LoRA adapter directory; None for the base model alone.
    Returns:
        LoadedModel in eval mode with the KV cache on.
    Raises:
        ModelError, RunError, DeviceError, HubUnreachableError, ConfigError.
    """
    from phi2cli.models.loading import import_libraries, load_base_model, load_tokenizer, resolve_precision

    from phi2cli.io.hub import check_hub_access

    started = time.perf_counter()
    adapter_path = check_adapter_dir(adapter_dir) if adapter_dir is not None else None
    hub_notes = check_hub_access(config, tokenizer=_tokenizer_source(config, adapter_path) != str(adapter_path))
    precision = resolve_precision(config.model)
    import_libraries(quantized=precision.quantization != "none", adapter=adapter_path is not None)
    libraries_at = time.perf_counter()
    tokenizer = load_tokenizer(_tokenizer_source(config, adapter_path))
    fmt = PromptFormat.create(config.data.template, tokenizer)
    if precision.device == "cuda" and precision.quantization == "4bit":
        from phi2cli.models.dequantized import load_dequantized_base

        base = load_dequantized_base(config.model, precision, for_training=False)  # NF4 values, bf16 matmuls
    else:
        base = load_base_model(config.model, precision, for_training=False)
    notes = hub_notes + ([precision.note] if precision.note and precision.device == "cuda" else [])
    if precision.device == "cuda":
        from phi2cli.kernels.lora import fuse_gelu

        fuse_gelu(base)  # phi-2's gelu_new as one kernel (same formula)
    base.eval()
    base.requires_grad_(False)
    loaded = LoadedModel(base, tokenizer, fmt, config, precision.device, precision.compute_dtype, notes=notes)
    loaded.load_phases.update(libraries=libraries_at - started, model=time.perf_counter() - libraries_at)
    if adapter_path is not None:
        attach_adapter(loaded, adapter_path)
    return loaded


def attach_adapter(loaded: LoadedModel, adapter_dir: str | Path) -> LoadedModel:
    """Load a LoRA adapter onto `loaded.model` and merge it into the weights (in place)."""
    from phi2cli.models.loading import load_adapter

    started = time.perf_counter()
    path = check_adapter_dir(adapter_dir)
    model = load_adapter(loaded.model, path)
    if getattr(model, "is_loaded_in_8bit", False):  # merging into int8 weights would round them
        loaded.notes.append("8-bit base: the adapter is applied unmerged (slower)")
    else:
        model = model.merge_and_unload()
        loaded.merged = True
    model.eval()
    loaded.model, loaded.adapter_dir = model, path
    loaded.load_phases["adapter"] = loaded.load_phases.get("adapter", 0.0) + time.perf_counter() - started
    return loaded
