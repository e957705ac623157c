"""Training recipes by model size: the defaults a run gets for what the user did not set.

phi-2 (and any model of its size class) keeps the reference recipe, the dataclass defaults in
phi2cli.config, exactly. Smaller models learn too little with it (a 135 M model on XSUM gains
5.7 ROUGE-L points less), so their learning rate, LoRA targets, epochs, warm-up and decoding
come from the table below. A value the user gave (flag or config file) always wins.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from phi2cli.config import Phi2Config, apply_overrides

REFERENCE_MODEL = "microsoft/phi-2"  # the reference run's model: never looked up, always the reference recipe
RECIPE_KEYS = ("train.learning_rate", "train.epochs", "train.warmup_steps", "lora.targets", "lora.r", "lora.alpha",
               "generation.num_beams", "generation.length_penalty", "generation.no_repeat_ngram_size",
               "model.quantization", "train.neftune_alpha", "lora.dropout", "data.max_length",
               "train.compile", "train.compile_from_steps", "generation.mbr_samples",
               "generation.mbr_temperature")  # fmt: skip


@dataclass(frozen=True)
class SizeRecipe:
    name: str
    max_parameters: float  # models up to this many parameters use this row
    learning_rate: float
    epochs: float
    warmup_steps: int
    lora_targets: str  # "all-linear" or "attention" (the family's q/k/v/output projections)
    lora_r: int
    lora_alpha: int
    num_beams: int
    length_penalty: float
    no_repeat_ngram_size: int
    quantization: str = "auto"  # "auto" (4-bit NF4 on CUDA) or "none": a small base kept in bf16
    neftune_alpha: float = 0.0  # NEFTune noise on the input embeddings while training (0: off)
    lora_dropout: float = 0.05  # the reference recipe's (the config default; a test checks)
    max_length: int = 1024  # tokens per example, the config default; longer articles are truncated
    compile_from_steps: int = 1900  # the speed profile compiles runs of this many steps or more; the config default
    mbr_samples: int = 0  # summaries: minimum-Bayes-risk choice among the greedy one and this many samples (0: greedy)
    mbr_temperature: float = 0.7  # the config default


# The small row was chosen on the 500 XSUM validation rows with SmolLM2-135M (benchmarks/recipe_sweep.py).
# First sweep: r 32 / alpha 64 scored ROUGE-L 21.70, r 16 21.64, 3 epochs 21.44, lr 2e-3 21.36; beams 4
# with n-gram blocking scored lower (20.88-21.16). Second sweep (benchmarks/results/recipe_sweep_second.json),
# on r 32: the base kept as loaded instead of rounded to NF4 21.65 (4-bit: 21.71), the same plus NEFTune
# alpha 5 22.07 (chosen), plus 3 epochs 21.15. The choice was then scored once on test (docs/RESULTS.md).
# A third sweep from this row (recipe_sweep.json) found nothing better than its own run-to-run spread
# (~0.2): NEFTune 10 21.81, r 64 21.52, dropout 0.1 21.87, lr 5e-4 21.78, the row twice 21.89 / 21.91.
# The medium row lies between the ends, unmeasured. The large row is the reference recipe and must stay
# equal to the config defaults (a test checks it).
#
# Compiling a 135 M model's layers costs more than it saves in a short run: SmolLM2's 374-step job on an
# H200 (benchmarks/results/end_to_end_previous.json, smollm2_compiled vs smollm2_eager) spent 31.3 s compiling and recording
# against 14.1 s without compiling (+17.1 s), for steps 11 ms faster (12.1 s vs 16.3 s): it pays after
# ~1,500 steps. phi-2 (the config default, train.compile_from_steps, which the other rows keep): 200 seed-job
# steps on an H200 with CUDA graphs (benchmarks/results/compile_pays.json) took 0.107 s each compiled and 0.121 s
# eagerly, 0.0144 s saved per step, for a first recording of 24.2 s against 1.0 s and a first evaluation 3.6 s
# longer: 26.8 s to win back, after ~1,860 steps. The memory-saver profile always compiles (74% faster steps).
COMPILE_PAYS_AFTER_STEPS = 1500

# Decoding, chosen on the same validation rows with this row's adapter (benchmarks/mbr_sweep.py,
# benchmarks/results/mbr_validation.json): greedy 21.82; the minimum-Bayes-risk pick among the greedy
# summary and 4 / 8 / 16 / 32 samples at temperature 0.7: 21.99 / 22.19 / 23.15 / 23.94 (at 1.0:
# 21.29 / 21.93 / 22.72 / 23.01; 1.0 with top-p 0.9: 23.56 at 32). Drawing 32 samples of a 135 M model
# is cheap next to its training; the larger rows keep greedy decoding (the reference recipe's).
MBR_SAMPLES_SMALL = 32

SIZE_RECIPES = (
    SizeRecipe("small (up to 0.5 B)", 0.5e9, 1e-3, 2.0, 20, "all-linear", 32, 64, 1, 1.0, 0, "none", 5.0,
               compile_from_steps=COMPILE_PAYS_AFTER_STEPS, mbr_samples=MBR_SAMPLES_SMALL),
    SizeRecipe("medium (0.5-2 B)", 2e9, 5e-4, 2.0, 30, "all-linear", 16, 32, 1, 1.0, 0),  # between the ends, unmeasured
    SizeRecipe("large (over 2 B, reference)", float("inf"), 2e-4, 1.0, 50, "attention", 16, 32, 1, 1.0, 0),
)


@dataclass(frozen=True)
class RecipeChoice:
    """Which table row a run got and the values it took from it (recorded in phi2_run.json)."""

    row: str
    parameters: int | None  # None when the model's size could not be read
    model_type: str | None
    chosen: dict[str, Any]  # dotted key -> value taken from the table
    given: tuple[str, ...]  # recipe keys the user set, left as they were

    def to_dict(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "given": list(self.given)}

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "RecipeChoice":
        """Back from phi2_run.json (a resumed run keeps its recipe record)."""
        chosen = {k: tuple(v) if isinstance(v, list) else v for k, v in values.get("chosen", {}).items()}
        return cls(values.get("row", "?"), values.get("parameters"), values.get("model_type"), chosen,
                   tuple(values.get("given", ())))  # fmt: skip

    def line(self) -> str:
        """One line for the start of a run."""
        size = f"{self.parameters / 1e6:,.0f} M parameters" if self.parameters else \
            "phi-2" if self.model_type == "phi" and self.row == SIZE_RECIPES[-1].name else "size unknown"  # fmt: skip
        family = f", {self.model_type}" if self.model_type and self.parameters else ""
        greedy = self.chosen.get("generation.num_beams") == 1
        mbr = self.chosen.get("generation.mbr_samples")
        decoding = f"greedy + {mbr} samples, the most agreed kept (--mbr-samples {mbr})" if mbr else "greedy decoding"
        parts = [_flag(k, v) for k, v in self.chosen.items()
                 if not (greedy and k in ("generation.length_penalty", "generation.no_repeat_ngram_size"))
                 and not (greedy and mbr and k == "generation.mbr_samples")]  # fmt: skip
        parts = [decoding if p == "--num-beams 1" else p for p in parts]
        text = f"recipe: {self.row} for {size}{family}: " + (", ".join(parts) if parts else "nothing left to choose")
        if self.given:
            text += f" (yours: {', '.join(_FLAGS[k] for k in self.given)})"
        return text


_FLAGS = {"train.learning_rate": "--lr", "train.epochs": "--epochs", "train.warmup_steps": "--warmup-steps",
          "lora.targets": "--lora-targets", "lora.r": "--lora-r", "lora.alpha": "--lora-alpha",
          "generation.num_beams": "--num-beams",
          "generation.length_penalty": "--length-penalty",
          "generation.no_repeat_ngram_size": "--no-repeat-ngram-size", "model.quantization": "--quantization",
          "train.neftune_alpha": "--neftune-alpha", "lora.dropout": "--lora-dropout",
          "data.max_length": "--max-length", "train.compile": "--compile",
          "train.compile_from_steps": "--compile-from-steps",
          "generation.mbr_samples": "--mbr-samples", "generation.mbr_temperature": "--mbr-temperature"}  # fmt: skip


def _flag(key: str, value: Any) -> str:
    """A chosen value as the flag that would set it: --name value, or --name / --no-name for a switch."""
    if key == "lora.targets" and not value:  # empty: the family's attention projections
        return "LoRA on the attention projections"
    if isinstance(value, bool):
        return _FLAGS[key] if value else "--no-" + _FLAGS[key][2:]
    return f"{_FLAGS[key]} {_shown(value)}"


def _shown(value: Any) -> str:
    if isinstance(value, tuple):
        return ",".join(value)
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return f"{value:g}" if isinstance(value, float) else str(value)


def row_for(parameters: int | None) -> SizeRecipe:
    """The table row of a model with this many parameters; the reference row when unknown."""
    if parameters is None:
        return SIZE_RECIPES[-1]
    return next(r for r in SIZE_RECIPES if parameters <= r.max_parameters)


# config key -> SizeRecipe field, for the fields whose defaults are the reference recipe's
OPTIONAL_FIELDS = (("model.quantization", "quantization"), ("train.neftune_alpha", "neftune_alpha"),
                   ("lora.dropout", "lora_dropout"), ("data.max_length", "max_length"),
                   ("generation.mbr_samples", "mbr_samples"), ("generation.mbr_temperature", "mbr_temperature"),
                   ("train.compile_from_steps", "compile_from_steps"))


def recipe_values(row: SizeRecipe, model_type: str | None) -> dict[str, Any]:
    """A row as dotted config values, LoRA targets resolved for the model's family."""
    # "attention": empty, meaning the family's q/k/v/output projections (phi2cli.models.families), found at load
    targets = ("all-linear",) if row.lora_targets == "all-linear" else ()
    # fields with defaults: set only where the row differs from them, so a row without them changes nothing
    defaults = SizeRecipe.__dataclass_fields__
    extra = {key: getattr(row, name) for key, name in OPTIONAL_FIELDS if getattr(row, name) != defaults[name].default}
    return {"train.learning_rate": row.learning_rate, "train.epochs": row.epochs,
            "train.warmup_steps": row.warmup_steps, "lora.targets": targets, "lora.r": row.lora_r,
            "lora.alpha": row.lora_alpha, "generation.num_beams": row.num_beams,
            "generation.length_penalty": row.length_penalty,
            "generation.no_repeat_ngram_size": row.no_repeat_ngram_size, **extra}  # fmt: skip


def apply_recipe(config: Phi2Config, given: set[str] | frozenset[str]) -> tuple[Phi2Config, RecipeChoice]:
    """Fill the recipe keys the user did not set from the row of the model's size.

    Args:
        config: the config built from defaults, file and flags.
        given: dotted keys the user set (config.given_keys).
    Returns:
        (config with the row's values where not given, what was chosen).
    """
    model = config.model.model
    parameters, model_type = (None, "phi") if model == REFERENCE_MODEL else model_size(model)
    row = row_for(parameters)
    # phi-2, or a model whose size cannot be read here: the reference recipe (targets: the family's, found at load)
    values = recipe_values(row, model_type)
    chosen = {k: v for k, v in values.items() if k not in given}
    if given & {"generation.num_beams", "generation.do_sample"}:  # the user's beams or sampling replace the row's MBR
        chosen.pop("generation.mbr_samples", None)
    if "train.compile" in given:  # the user's --compile / --no-compile holds whatever the run's length
        chosen.pop("train.compile_from_steps", None)
        if config.train.compile and "train.compile_from_steps" not in given:
            config = apply_overrides(config, {"train.compile_from_steps": 0})
    yours = tuple(k for k in RECIPE_KEYS if k in given)
    config = apply_overrides(config, chosen, "recipe")
    return config.validate(), RecipeChoice(row.name, parameters, model_type, chosen, yours)


def model_size(model: str) -> tuple[int | None, str | None]:
    """(parameter count, model_type) of a .gguf file (through its converted directory, made once and
    cached, which training reads too), local directory or cached hub model, read without loading
    weights; (None, None) when it cannot be read here."""
    from phi2cli.models.loading import parameter_count, read_model_config

    config = read_model_config(model)  # a .gguf: its converted directory, which training reads too
    if config is None:
        return None, None
    try:
        return parameter_count(config), getattr(config, "model_type", None)
    except Exception:  # an architecture this transformers cannot build fails later, where it is loaded
        return None, None
