"""One configuration model shared by every command.

Defaults are the reference QLoRA recipe for phi-2 on XSUM. A config is built from the
defaults, then a YAML/TOML file (``--config``), then command-line flags, in that order.
Each field carries a one-line reason, which is also the ``--help`` text of its flag.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from phi2cli.errors import ConfigError

DEFAULT_TEMPLATE = "Instruct: Summarize the following news article in one sentence.\n{document}\nOutput:"
RUN_CONFIG_NAME = "phi2_run.json"

QUANTIZATIONS = ("auto", "4bit", "8bit", "none")
COMPUTE_DTYPES = ("auto", "bfloat16", "float16", "float32")
LOSS_ON = ("summary", "all")
PROFILES = ("auto", "speed", "memory-saver", "reference")
REPORT_TO = ("none", "tensorboard", "wandb", "mlflow")


def _f(default: Any, reason: str, **kwargs: Any) -> Any:
    """A dataclass field whose metadata holds its one-line reason (used as --help)."""
    if isinstance(default, (list, dict, set)):
        raise TypeError("use tuples for sequence defaults")
    return field(default=default, metadata={"help": reason}, **kwargs)


@dataclass(frozen=True)
class DataConfig:
    dataset: str = _f("EdinburghNLP/xsum", "Hub dataset used when no local files are given.")
    data_dir: str | None = _f(None, "Directory with train/validation/test files (.jsonl, .json, .csv, .parquet).")
    train_file: str | None = _f(None, "Local train file; overrides --data-dir for this split.")
    validation_file: str | None = _f(None, "Local validation file; overrides --data-dir for this split.")
    test_file: str | None = _f(None, "Local test file; overrides --data-dir for this split.")
    document_field: str = _f("document", "Column that holds the article text.")
    summary_field: str = _f("summary", "Column that holds the reference summary.")
    id_field: str = _f("id", "Column that holds the example id (optional in the data).")
    samples: int = _f(5000, "Train examples to sample (5,000 x 1 epoch / 8 per step = 625 steps).")
    val_samples: int = _f(500, "Validation examples to sample for eval loss.")
    seed: int = _f(42, "Seed for sampling, so the same examples are picked every time.")
    template: str = _f(DEFAULT_TEMPLATE, "Prompt with {document}; 'chat' uses the tokenizer's chat template.")
    max_length: int = _f(1024, "Max tokens per example; the article is truncated, never the summary.")
    loss_on: str = _f("summary", "'summary': loss on the summary only (prompt masked); 'all': whole sequence.")
    prepared_dir: str = _f("phi2-xsum-prepared", "Where 'phi2 prepare' writes the tokenized dataset.")


@dataclass(frozen=True)
class ModelConfig:
    model: str = _f("microsoft/phi-2", "Base model: hub id, local directory, or local .gguf file.")
    tokenizer: str | None = _f(None, "Tokenizer (hub id or directory); defaults to the model's.")
    quantization: str = _f("auto", "4bit (NF4 QLoRA), 8bit, none; auto = 4bit on CUDA, none on CPU.")
    compute_dtype: str = _f("auto", "Compute dtype; auto = bfloat16 where the GPU has it, else float16.")
    double_quant: bool = _f(True, "Quantize the quantization constants too (saves ~0.4 bit/param).")
    attn_implementation: str = _f("sdpa", "Attention kernel: sdpa, eager, flash_attention_2.")


@dataclass(frozen=True)
class LoraConfig:
    r: int = _f(16, "LoRA rank: capacity of the adapter.")
    alpha: int = _f(32, "LoRA scaling numerator (scale = alpha / r).")
    dropout: float = _f(0.05, "Dropout on the LoRA input, against over-fitting.")
    targets: tuple[str, ...] = _f(
        (), "Modules that get adapters; empty: the model family's attention q/k/v/output; 'all-linear': every linear layer."
    )


@dataclass(frozen=True)
class TrainConfig:
    output_dir: str = _f("phi2-xsum-finetuned", "Checkpoints (checkpoint-N) and trainer state go here.")
    final_dir: str = _f("phi2-xsum-final", "The best adapter, tokenizer and run config go here.")
    learning_rate: float = _f(2e-4, "Peak learning rate of the LoRA weights.")
    lr_scheduler: str = _f("cosine", "Learning-rate schedule after warm-up.")
    warmup_steps: int = _f(50, "Linear warm-up steps before the schedule starts.")
    batch_size: int = _f(1, "Examples per device per micro-batch.")
    grad_accum: int = _f(8, "Micro-batches per optimizer step (batch x grad-accum x GPUs = 8).")
    per_gpu_batch: int = _f(0, "Examples per GPU per step (weak scaling: global batch = this x GPUs, learning rate x sqrt(global / (batch x grad-accum))); 0 keeps the global batch and splits it over the GPUs.")
    epochs: float = _f(1.0, "Passes over the train samples.")
    max_steps: int = _f(-1, "Stop after this many optimizer steps (-1: run all epochs).")
    eval_every: int = _f(500, "Evaluate (and save a checkpoint) every N optimizer steps.")
    logging_steps: int = _f(10, "Log loss, learning rate, grad norm every N steps.")
    eval_batch_size: int = _f(0, "Examples per batch during evaluation; 0: 64 on the speed profile (packed rows, no gradients kept), else 8.")
    optimizer: str = _f("paged_adamw_8bit", "Optimizer (Trainer name); 8-bit paged AdamW saves memory.")
    weight_decay: float = _f(0.0, "Weight decay on the LoRA weights.")
    max_grad_norm: float = _f(1.0, "Gradient clipping norm.")
    gradient_checkpointing: bool = _f(True, "Recompute activations in backward to save memory.")
    profile: str = _f("auto", "Engine profile: speed, memory-saver, reference; auto picks from free GPU memory.")
    compile: bool = _f(True, "torch.compile the decoder layers (CUDA; speed and memory-saver profiles): on an H200, phi-2's steps 14% faster on the speed profile and 74% on the memory-saver, after a one-time compile of ~25 s (cached on disk for later runs).")
    compile_from_steps: int = _f(1900, "The speed profile compiles only runs of at least this many optimizer steps (0: every run); a shorter run finishes sooner without compiling. --compile sets 0.")
    cuda_graphs: bool = _f(True, "Replay each training step from a CUDA graph (CUDA, bf16, speed profile): the CPU stops being the bottleneck; each new batch shape is recorded once (about a second).")
    graph_bucket: int = _f(0, "CUDA graphs: tokens a newly recorded batch shape is rounded up to (a multiple of 64); 0 picks it from the run's length: coarse for short runs (fewer recordings), fine for long ones (less padding).")
    seed: int = _f(42, "Seed for LoRA init, dropout and data order: same seed, same run.")
    report_to: str = _f("none", "Also log loss, learning rate and eval to: tensorboard, wandb, mlflow or none.")
    neftune_alpha: float = _f(0.0, "NEFTune: uniform noise of this scale on the input embeddings while training (0: off; the paper tries 5 to 15).")


@dataclass(frozen=True)
class GenerationConfig:
    max_new_tokens: int = _f(60, "Most tokens generated per summary (XSUM summaries are ~25 tokens).")
    num_beams: int = _f(1, "Beam search width; 1 is greedy.")
    length_penalty: float = _f(1.0, "Beam search: score / length**penalty; above 1 favours longer summaries, below 1 shorter.")
    no_repeat_ngram_size: int = _f(0, "Never repeat an n-gram of this many tokens in a summary (0: off).")
    min_new_tokens: int = _f(0, "Fewest tokens generated before a summary may end (0: no minimum).")
    do_sample: bool = _f(False, "Sample instead of greedy/beam decoding.")
    temperature: float = _f(1.0, "Sampling temperature (with --sample).")
    top_p: float = _f(1.0, "Nucleus sampling mass (with --sample).")
    mbr_samples: int = _f(0, "Minimum-Bayes-risk decoding: also sample this many summaries per article and keep the one "
                             "that agrees most (ROUGE-L) with the others and the greedy one; 0: off (the recipe of models "
                             "under 0.5 B sets 32). "
                             "--num-beams above 1 or --sample turn it off unless it is given too.")
    mbr_temperature: float = _f(0.7, "Sampling temperature of the --mbr-samples summaries.")
    batch_size: int = _f(32, "Articles summarized per batch.")


SECTIONS: dict[str, type] = {
    "data": DataConfig,
    "model": ModelConfig,
    "lora": LoraConfig,
    "train": TrainConfig,
    "generation": GenerationConfig,
}


@dataclass(frozen=True)
class Phi2Config:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    generation: GenerationConfig = field(default_factory=GenerationConfig)

    def to_dict(self) -> dict[str, Any]:
        return {name: _section_dict(getattr(self, name)) for name in SECTIONS}

    @classmethod
    def from_dict(cls, values: Mapping[str, Any], source: str = "config") -> "Phi2Config":
        """Build a config from nested section dicts; unknown keys are an error."""
        return apply_overrides(cls(), flatten(values, source), source)

    def validate(self) -> "Phi2Config":
        """Check every value; raise one ConfigError listing all problems."""
        problems = validation_problems(self)
        if problems:
            raise ConfigError("; ".join(problems))
        return self


def _section_dict(section: Any) -> dict[str, Any]:
    out = dataclasses.asdict(section)
    return {k: list(v) if isinstance(v, tuple) else v for k, v in out.items()}


def field_help(dotted: str) -> str:
    """The one-line reason of a field, e.g. field_help('lora.r')."""
    section, name = dotted.split(".")
    for f in dataclasses.fields(SECTIONS[section]):
        if f.name == name:
            return f.metadata["help"]
    raise KeyError(dotted)


def field_default(dotted: str) -> Any:
    """The default value of a field, e.g. field_default('lora.r') == 16."""
    section, name = dotted.split(".")
    return getattr(SECTIONS[section](), name)


def flatten(values: Mapping[str, Any], source: str) -> dict[str, Any]:
    """{'lora': {'r': 8}} -> {'lora.r': 8}; rejects unknown sections."""
    if not isinstance(values, Mapping):
        raise ConfigError(f"{source}: expected sections {', '.join(SECTIONS)} at the top level")
    flat: dict[str, Any] = {}
    for section, body in values.items():
        if section not in SECTIONS:
            raise ConfigError(f"{source}: unknown section '{section}' (known: {', '.join(SECTIONS)})")
        if body is None:
            continue
        if not isinstance(body, Mapping):
            raise ConfigError(f"{source}: section '{section}' must be a mapping of settings")
        for key, value in body.items():
            flat[f"{section}.{key}"] = value
    return flat


def apply_overrides(config: Phi2Config, overrides: Mapping[str, Any], source: str = "flags") -> Phi2Config:
    """Return a copy of config with dotted keys replaced; None values are skipped."""
    by_section: dict[str, dict[str, Any]] = {}
    for dotted, value in overrides.items():
        if value is None:
            continue
        section, _, name = dotted.partition(".")
        cls = SECTIONS.get(section)
        known = {f.name: f for f in dataclasses.fields(cls)} if cls else {}
        if name not in known:
            options = f"known in {section}: {', '.join(known)}" if known else f"sections: {', '.join(SECTIONS)}"
            raise ConfigError(f"{source}: unknown setting '{dotted}' ({options})")
        by_section.setdefault(section, {})[name] = _coerce(value, known[name], dotted, source)
    changes = {s: dataclasses.replace(getattr(config, s), **kv) for s, kv in by_section.items()}
    return dataclasses.replace(config, **changes)


def _coerce(value: Any, spec: dataclasses.Field, dotted: str, source: str) -> Any:
    default = spec.default
    try:
        if isinstance(default, bool):
            if isinstance(value, str):
                return value.strip().lower() in ("1", "true", "yes", "on")
            return bool(value)
        if isinstance(default, tuple):
            if isinstance(value, str):
                value = [v.strip() for v in value.split(",") if v.strip()]
            return tuple(str(v) for v in value)
        if isinstance(default, float):
            return float(value)
        if isinstance(default, int):
            if isinstance(value, float) and not value.is_integer():
                raise ValueError(value)
            return int(value)
    except (TypeError, ValueError):
        kind = {"int": "an integer", "float": "a number", "tuple": "a list"}.get(type(default).__name__, "text")
        raise ConfigError(f"{source}: '{dotted}' must be {kind}, got {value!r}") from None
    return value


def validation_problems(config: Phi2Config) -> list[str]:
    """Every problem with the config's values, as short messages naming the flag."""
    d, m, lo, t, g = config.data, config.model, config.lora, config.train, config.generation
    problems: list[str] = []

    def need(ok: bool, message: str) -> None:
        if not ok:
            problems.append(message)

    need(d.samples >= 1, f"--samples must be at least 1 (got {d.samples})")
    need(d.val_samples >= 0, f"--val-samples must be 0 or more (got {d.val_samples})")
    need(d.max_length >= 16, f"--max-length must be at least 16 tokens (got {d.max_length})")
    need(d.loss_on in LOSS_ON, f"--loss-on must be one of {', '.join(LOSS_ON)} (got '{d.loss_on}')")
    need(
        d.template == "chat" or d.template.count("{document}") == 1,
        "--template must contain {document} exactly once (or be 'chat')",
    )
    need(m.quantization in QUANTIZATIONS, f"--quantization must be one of {', '.join(QUANTIZATIONS)}")
    need(m.compute_dtype in COMPUTE_DTYPES, f"--compute-dtype must be one of {', '.join(COMPUTE_DTYPES)}")
    need(lo.r >= 1, f"--lora-r must be at least 1 (got {lo.r})")
    need(lo.alpha > 0, f"--lora-alpha must be positive (got {lo.alpha})")
    need(0.0 <= lo.dropout < 1.0, f"--lora-dropout must be in [0, 1) (got {lo.dropout})")
    need(t.learning_rate > 0, f"--lr must be positive (got {t.learning_rate})")
    need(t.warmup_steps >= 0, f"--warmup-steps must be 0 or more (got {t.warmup_steps})")
    need(t.batch_size >= 1, f"--batch-size must be at least 1 (got {t.batch_size})")
    need(t.grad_accum >= 1, f"--grad-accum must be at least 1 (got {t.grad_accum})")
    need(t.per_gpu_batch >= 0, f"--per-gpu-batch must be 0 (keep the global batch) or more (got {t.per_gpu_batch})")
    need(t.epochs > 0, f"--epochs must be positive (got {t.epochs})")
    need(t.max_steps == -1 or t.max_steps >= 1, f"--max-steps must be -1 or at least 1 (got {t.max_steps})")
    need(t.eval_every >= 1, f"--eval-every must be at least 1 (got {t.eval_every})")
    need(t.logging_steps >= 1, f"--logging-steps must be at least 1 (got {t.logging_steps})")
    need(t.eval_batch_size >= 0, f"--eval-batch-size must be 0 (chosen by the profile) or positive (got {t.eval_batch_size})")
    need(t.max_grad_norm > 0, f"--max-grad-norm must be positive (got {t.max_grad_norm})")
    need(t.profile in PROFILES, f"--profile must be one of {', '.join(PROFILES)} (got '{t.profile}')")
    need(t.report_to in REPORT_TO, f"--report-to must be one of {', '.join(REPORT_TO)} (got '{t.report_to}')")
    need(g.max_new_tokens >= 1, f"--max-new-tokens must be at least 1 (got {g.max_new_tokens})")
    need(g.num_beams >= 1, f"--num-beams must be at least 1 (got {g.num_beams})")
    need(math.isfinite(g.length_penalty), f"--length-penalty must be a finite number (got {g.length_penalty})")
    need(g.no_repeat_ngram_size >= 0, f"--no-repeat-ngram-size must be 0 or more (got {g.no_repeat_ngram_size})")
    need(0 <= g.min_new_tokens <= g.max_new_tokens,
         f"--min-new-tokens must be between 0 and --max-new-tokens {g.max_new_tokens} (got {g.min_new_tokens})")
    need(t.graph_bucket == 0 or (t.graph_bucket >= 64 and t.graph_bucket % 64 == 0),
         f"--graph-bucket must be 0 (chosen from the run's length) or a multiple of 64 (got {t.graph_bucket})")
    need(t.compile_from_steps >= 0, f"--compile-from-steps must be 0 (every run) or positive (got {t.compile_from_steps})")
    need(t.neftune_alpha >= 0, f"--neftune-alpha must be 0 (off) or positive (got {t.neftune_alpha})")
    need(g.temperature > 0, f"--temperature must be positive (got {g.temperature})")
    need(0 < g.top_p <= 1, f"--top-p must be in (0, 1] (got {g.top_p})")
    need(g.batch_size >= 1, f"--gen-batch-size must be at least 1 (got {g.batch_size})")
    need(g.mbr_samples >= 0, f"--mbr-samples must be 0 (off) or positive (got {g.mbr_samples})")
    need(g.mbr_temperature > 0, f"--mbr-temperature must be positive (got {g.mbr_temperature})")
    need(not g.mbr_samples or (g.num_beams == 1 and not g.do_sample),
         f"--mbr-samples {g.mbr_samples} chooses among sampled summaries and the greedy one: "
         f"use it with --num-beams 1 and without --sample, or pass --mbr-samples 0")
    return problems


def read_config_file(path: str | Path) -> dict[str, Any]:
    """Read a YAML (.yaml/.yml) or TOML (.toml) config file into nested dicts."""
    path = Path(path)
    if path.is_dir():
        raise ConfigError(f"config file {path} is a directory; pass a .yaml or .toml file")
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist (write one with 'phi2 config > {path.name}')")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise ConfigError(f"config file {path} is not UTF-8 text; save it as UTF-8") from None
    try:
        if path.suffix.lower() == ".toml":
            try:
                import tomllib
            except ModuleNotFoundError:  # Python 3.10
                import tomli as tomllib  # type: ignore[no-redef]
            return tomllib.loads(text)
        import yaml

        loaded = yaml.safe_load(text)
    except Exception as err:  # TOML errors carry the line number in their text, YAML errors in a mark
        mark = getattr(err, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark is not None else str(path)
        reason = str(getattr(err, "problem", None) or str(err).splitlines()[0])
        raise ConfigError(f"config file {where} could not be parsed: {reason}; fix it") from None
    return loaded or {}


def given_keys(config_file: str | Path | None, overrides: Mapping[str, Any]) -> set[str]:
    """Dotted keys the user set, in the config file or as flags (None means 'not given')."""
    given = {key for key, value in overrides.items() if value is not None}
    if config_file is not None:
        given |= set(flatten(read_config_file(config_file), str(config_file)))
    return given


def build_config(config_file: str | Path | None, overrides: Mapping[str, Any]) -> Phi2Config:
    """Defaults, then the config file, then flags (None means 'not given'); validated."""
    config = Phi2Config()
    if config_file is not None:
        config = Phi2Config.from_dict(read_config_file(config_file), source=str(config_file))
    return apply_overrides(config, overrides).validate()


def save_run_config(config: Phi2Config, directory: str | Path, extra: Mapping[str, Any] | None = None) -> Path:
    """Write the resolved config (plus resolved facts like the tokenizer) as the run's config."""
    from phi2cli.io.files import write_json_atomic

    body = {"config": config.to_dict(), **(extra or {})}
    return write_json_atomic(Path(directory) / RUN_CONFIG_NAME, body)


def load_run_config(directory: str | Path) -> tuple[Phi2Config, dict[str, Any]]:
    """Read a run's saved config; returns (config, extra facts saved beside it)."""
    path = Path(directory) / RUN_CONFIG_NAME
    try:
        body = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"{directory} holds no {RUN_CONFIG_NAME}: is it a phi2 run directory?") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ConfigError(f"{path} is corrupt ({err}); re-run training or pass settings as flags") from None
    config = Phi2Config.from_dict(body.get("config", {}), source=str(path))
    extra = {k: v for k, v in body.items() if k != "config"}
    return config, extra


def dump_yaml(config: Phi2Config) -> str:
    """The config as a commented-free YAML document, suitable for --config."""
    import yaml

    return yaml.safe_dump(config.to_dict(), sort_keys=False, allow_unicode=True)


PATH_FIELDS = ("model.model", "model.tokenizer", "data.data_dir", "data.train_file", "data.validation_file",
               "data.test_file")  # fmt: skip


def resolve_local_path(value: str | None) -> str | None:
    """An existing local path made absolute (hub ids and missing paths are returned as given)."""
    if value and Path(value).expanduser().exists():
        return str(Path(value).expanduser().resolve())
    return value


def with_absolute_paths(config: Phi2Config) -> Phi2Config:
    """Local paths made absolute, so a saved run config works from any working directory."""
    values = {}
    for dotted in PATH_FIELDS:
        section, name = dotted.split(".")
        values[dotted] = resolve_local_path(getattr(getattr(config, section), name))
    return apply_overrides(config, values)
