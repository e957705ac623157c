"""`export`: fold a LoRA adapter into a full-precision copy of its base model, saved as a plain
transformers model directory (safetensors + tokenizer + README) that needs neither peft nor phi2cli,
or as one GGUF file with an Ollama Modelfile beside it.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from phi2cli.errors import ConfigError, RunError

DEFAULT_OUTPUT = "phi2-xsum-merged"
EXPORT_DTYPES = ("bfloat16", "float16", "float32")
EXPORT_FORMATS = ("hf", "gguf")


@dataclass(frozen=True)
class ExportResult:
    output_dir: Path
    base_model: str
    adapter_dir: Path
    dtype: str
    files: list[str]


def check_output(output_dir: str | Path, overwrite: bool) -> Path:
    """Refuse a file, or a non-empty directory unless overwrite."""
    path = Path(output_dir)
    if path.exists() and not path.is_dir():
        raise RunError(f"--output {path} is a file; choose a directory path")
    if path.is_dir() and any(path.iterdir()) and not overwrite:
        raise RunError(f"{path} already exists and is not empty; pass --overwrite to replace it or choose --output")
    from phi2cli.io.files import check_writable_dir

    return check_writable_dir(path)  # before loading the model, not after


def _readme(base_model: str, adapter_dir: Path, dtype: str, template: str, output: Path) -> str:
    prompt = template.replace("{document}", "<article>")
    return (
        f"# phi-2 fine-tuned for XSUM summarization (merged)\n\n"
        f"Base model `{base_model}` with the LoRA adapter from `{adapter_dir}` merged into its weights "
        f"(`{dtype}`). A standard transformers model: no peft needed.\n\n"
        f"```python\nfrom transformers import AutoModelForCausalLM, AutoTokenizer\n\n"
        f"model = AutoModelForCausalLM.from_pretrained(\"{output}\")\n"
        f"tokenizer = AutoTokenizer.from_pretrained(\"{output}\")\n```\n\n"
        f"Prompt it as in training, then generate greedily and keep the first line:\n\n"
        f"```text\n{prompt}\n```\n"
    )


def export_merged(adapter_dir: str | Path, output_dir: str | Path = DEFAULT_OUTPUT, dtype: str = "bfloat16",
                  overwrite: bool = False, model: str | None = None) -> ExportResult:  # fmt: skip
    """Merge the adapter into an unquantized base model and save it atomically.

    The base is loaded in `dtype` on the CPU (not 4-bit: merging into NF4 weights would round the
    adapter away), the adapter merged with peft's merge_and_unload, and the result saved with the
    tokenizer the run used.

    Args:
        adapter_dir: a directory written by 'phi2 train' (adapter + phi2_run.json).
        output_dir: the model directory to write.
        dtype: bfloat16, float16 or float32.
        overwrite: replace a non-empty output directory.
        model: base model override (hub id or path); the run's saved base model by default.
    Returns:
        ExportResult with the saved files.
    Raises:
        ConfigError (bad dtype), RunError (output exists), ModelError (adapter/base unloadable).
    """
    from phi2cli.io.files import atomic_directory, write_text_atomic

    if dtype not in EXPORT_DTYPES:
        raise ConfigError(f"--dtype must be one of {', '.join(EXPORT_DTYPES)} (got '{dtype}')")
    adapter, config = _run_of(adapter_dir, model)
    output = check_output(output_dir, overwrite)
    merged, tokenizer = _merge(adapter, config, dtype)
    with atomic_directory(output) as tmp:
        merged.save_pretrained(str(tmp), safe_serialization=True)
        tokenizer.save_pretrained(str(tmp))
        write_text_atomic(tmp / "README.md", _readme(config.model.model, adapter, dtype, config.data.template, output))
    files = sorted(p.name for p in output.iterdir())
    return ExportResult(output, config.model.model, adapter, dtype, files)


def _run_of(adapter_dir: str | Path, model: str | None) -> tuple[Path, Any]:
    """The checked adapter directory and its run's config (base model overridden by `model`)."""
    from phi2cli.config import apply_overrides
    from phi2cli.inference.trained_model import check_adapter_dir, run_config_for

    adapter = check_adapter_dir(adapter_dir)
    config, _ = run_config_for(adapter)
    return adapter, apply_overrides(config, {"model.model": model})


def _merge(adapter: Path, config: Any, dtype: str) -> tuple[Any, Any]:
    """(base model with the adapter merged in, loaded on the CPU in `dtype`; the run's tokenizer)."""
    from phi2cli.io.hub import check_hub_access
    from phi2cli.models.loading import Precision, load_adapter, load_base_model, load_tokenizer

    check_hub_access(config, tokenizer=not (adapter / "tokenizer_config.json").is_file())

    model_cfg = dataclasses.replace(config.model, quantization="none", compute_dtype=dtype)
    base = load_base_model(model_cfg, Precision("cpu", "none", dtype), for_training=False)
    tokenizer_source = str(adapter) if (adapter / "tokenizer_config.json").is_file() else \
        (config.model.tokenizer or config.model.model)  # fmt: skip
    tokenizer = load_tokenizer(tokenizer_source)
    merged: Any = load_adapter(base, adapter).merge_and_unload()
    merged.config.use_cache = True
    return merged, tokenizer


@dataclass(frozen=True)
class GGUFExportResult:
    gguf_path: Path
    modelfile: Path
    base_model: str
    adapter_dir: Path
    architecture: str
    gguf_type: str
    tensors: int


def gguf_paths(output: str | Path | None, gguf_type: str, overwrite: bool) -> tuple[Path, Path]:
    """(the .gguf file, its Modelfile); refuses existing files unless overwrite, and non-.gguf names."""
    from phi2cli.io.files import check_writable_dir

    path = Path(output) if output is not None else Path(f"{DEFAULT_OUTPUT}-{gguf_type}.gguf")
    if path.suffix.lower() != ".gguf":
        raise ConfigError(f"--output must name a .gguf file with --format gguf (got '{path}')")
    if path.is_dir():
        raise RunError(f"--output {path} is a directory; name a .gguf file")
    modelfile = path.with_suffix(".Modelfile")
    existing = [str(p) for p in (path, modelfile) if p.exists()]
    if existing and not overwrite:
        raise RunError(f"{' and '.join(existing)} already exist(s); pass --overwrite to replace or choose --output")
    check_writable_dir(path.parent)  # before loading the model, not after
    return path, modelfile


def export_gguf(adapter_dir: str | Path, output: str | Path | None = None, gguf_type: str = "q8_0",
                overwrite: bool = False, model: str | None = None) -> GGUFExportResult:  # fmt: skip
    """Merge the adapter (in float32, on the CPU) and write one GGUF file plus an Ollama Modelfile.

    Args:
        adapter_dir: a directory written by 'phi2 train' (adapter + phi2_run.json).
        output: the .gguf file; DEFAULT_OUTPUT-<gguf_type>.gguf by default. The Modelfile goes
            beside it with the suffix .Modelfile.
        gguf_type: f16 or q8_0 (matrices; vectors and norms stay f32).
        overwrite: replace existing files.
        model: base model override (hub id or path); the run's saved base model by default.
    Returns:
        GGUFExportResult.
    Raises:
        ConfigError (bad gguf_type or output name), RunError (output exists), ModelError (family or
        tokenizer GGUF cannot express; adapter/base unloadable).
    """
    from phi2cli.data.prompts import prompt_text
    from phi2cli.io.files import write_text_atomic
    from phi2cli.io.gguf_export import check_gguf_type, gguf_architecture, render_modelfile, write_gguf

    check_gguf_type(gguf_type)
    adapter, config = _run_of(adapter_dir, model)
    path, modelfile = gguf_paths(output, gguf_type, overwrite)
    from phi2cli.models.loading import read_model_config

    base_config = read_model_config(config.model.model)
    if base_config is not None:
        gguf_architecture(base_config)  # an unsupported family fails before the weights load
    merged, tokenizer = _merge(adapter, config, "float32")  # rounded once, to f16/q8_0, not twice
    prefix, suffix, _ = prompt_text(config.data.template, tokenizer)
    name = f"{Path(config.model.model).stem} fine-tuned for XSUM summarization"
    summary = write_gguf(merged, tokenizer, path, gguf_type, name)
    write_text_atomic(modelfile, render_modelfile(path.name, prefix, suffix, [tokenizer.eos_token, "\n"],
                                                  config.data.max_length, config.generation.max_new_tokens))  # fmt: skip
    return GGUFExportResult(path, modelfile, config.model.model, adapter, summary.architecture, gguf_type,
                            summary.tensors)  # fmt: skip
