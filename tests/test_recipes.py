"""Size recipes: the row a model gets, phi-2 untouched, user values win, printed and recorded; NEFTune."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from transformers import TrainerCallback
from typer.testing import CliRunner

from phi2cli.cli import app
from phi2cli.config import Phi2Config, apply_overrides, given_keys
from phi2cli.models.recipes import REFERENCE_MODEL, SIZE_RECIPES, apply_recipe, model_size, recipe_values, row_for

from conftest import SMOLLM2_GGUF

runner = CliRunner()


def test_rows_follow_the_parameter_count():
    assert row_for(135_000_000).name.startswith("small")
    assert row_for(1_100_000_000).name.startswith("medium")
    assert row_for(2_780_000_000).name.startswith("large")
    assert row_for(None) is SIZE_RECIPES[-1]  # unknown size: the reference recipe
    small = recipe_values(row_for(135_000_000), "llama")
    assert (small["train.learning_rate"], small["train.epochs"], small["lora.targets"]) == (1e-3, 2.0, ("all-linear",))


def test_the_large_row_is_the_reference_recipe_and_phi2_is_left_exactly_as_it_was():
    defaults = Phi2Config()
    large = recipe_values(SIZE_RECIPES[-1], "phi")
    for dotted, value in large.items():
        section, name = dotted.split(".")
        assert getattr(getattr(defaults, section), name) == value, dotted
    row = SIZE_RECIPES[-1]  # fields a row leaves out when they equal the reference: the config's defaults
    assert (row.lora_dropout, row.max_length) == (defaults.lora.dropout, defaults.data.max_length)
    config, choice = apply_recipe(defaults, set())
    assert config == defaults
    assert choice.row.startswith("large") and choice.line().startswith("recipe: large (over 2 B, reference) for phi-2")
    assert "--lora-r 16, --lora-alpha 32" in choice.line() and "LoRA on the attention projections" in choice.line()
    assert recipe_values(SIZE_RECIPES[-1], "llama")["lora.targets"] == ()  # the family's, resolved at load
    from phi2cli.models.families import default_lora_targets

    assert default_lora_targets("llama") == ("q_proj", "k_proj", "v_proj", "o_proj")


def test_a_small_model_gets_the_small_row_except_what_the_user_set(tiny_phi_dir, tmp_path):
    (tmp_path / "c.yaml").write_text("train:\n  epochs: 3\n")
    overrides = {"model.model": str(tiny_phi_dir), "train.learning_rate": 0.01, "lora.r": None}
    given = given_keys(tmp_path / "c.yaml", overrides)
    assert given == {"model.model", "train.learning_rate", "train.epochs"}
    from phi2cli.config import build_config

    config, choice = apply_recipe(build_config(tmp_path / "c.yaml", overrides), given)
    assert (config.train.learning_rate, config.train.epochs) == (0.01, 3.0)  # flag and file win
    assert (config.train.warmup_steps, config.lora.targets) == (20, ("all-linear",))  # from the small row
    assert choice.row.startswith("small") and choice.model_type == "phi" and 0 < choice.parameters < 50e6
    assert set(choice.given) == {"train.learning_rate", "train.epochs"}
    assert "train.learning_rate" not in choice.chosen and choice.chosen["train.warmup_steps"] == 20
    line = choice.line()
    assert "--warmup-steps 20" in line and "--lora-targets all-linear" in line and "(yours: --lr, --epochs)" in line
    assert config.generation.mbr_samples == 32 and "greedy + 32 samples, the most agreed kept (--mbr-samples 32)" in line
    assert config.generation.mbr_temperature == 0.7 and "--mbr-temperature" not in line  # the config default


def test_beam_search_set_in_a_config_file_replaces_the_small_rows_mbr(tiny_phi_dir, tmp_path):
    from phi2cli.config import build_config

    (tmp_path / "c.yaml").write_text("generation:\n  num_beams: 4\n")
    overrides = {"model.model": str(tiny_phi_dir)}
    config, choice = apply_recipe(build_config(tmp_path / "c.yaml", overrides), given_keys(tmp_path / "c.yaml", overrides))
    assert (config.generation.num_beams, config.generation.mbr_samples) == (4, 0)
    assert "generation.mbr_samples" not in choice.chosen and "--mbr-samples" not in choice.line()


def test_compiling_pays_from_the_rows_step_count_unless_the_user_chose(tiny_phi_dir):
    from phi2cli.config import build_config
    from phi2cli.models.recipes import COMPILE_PAYS_AFTER_STEPS

    model = {"model.model": str(tiny_phi_dir), "data.samples": 1495}
    config, choice = apply_recipe(build_config(None, model), {"model.model", "data.samples"})
    assert config.train.compile is True and config.train.compile_from_steps == COMPILE_PAYS_AFTER_STEPS == 1500
    assert f"--compile-from-steps {COMPILE_PAYS_AFTER_STEPS}" in choice.line()  # the plan then skips a 374-step run
    asked = {**model, "train.compile": True}
    config, choice = apply_recipe(build_config(None, asked), set(asked))
    assert config.train.compile_from_steps == 0 and choice.given == ("train.compile",)  # --compile: every run
    assert "--compile-from-steps" not in choice.line()
    both = {**asked, "train.compile_from_steps": 50}
    config, _ = apply_recipe(build_config(None, both), set(both))
    assert config.train.compile_from_steps == 50
    config, choice = apply_recipe(build_config(None, {"model.model": REFERENCE_MODEL}), {"model.model"})
    assert config.train.compile_from_steps == 1900 and "--compile-from-steps" not in choice.line()  # the default


def test_a_row_that_keeps_the_base_unquantized_sets_it_unless_the_user_chose(tiny_phi_dir, monkeypatch):
    import dataclasses

    from phi2cli.config import build_config
    from phi2cli.models import recipes

    assert "model.quantization" not in recipe_values(SIZE_RECIPES[-1], "phi")  # auto: 4-bit on CUDA, as given
    assert "train.neftune_alpha" not in recipe_values(SIZE_RECIPES[-1], "phi")  # the reference recipe has no noise
    assert not {"lora.dropout", "data.max_length"} & set(recipe_values(SIZE_RECIPES[-1], "phi"))
    longer = dataclasses.replace(row_for(135_000_000), max_length=2048, lora_dropout=0.1)
    assert (recipe_values(longer, "llama")["data.max_length"], recipe_values(longer, "llama")["lora.dropout"]) == \
        (2048, 0.1)  # fmt: skip
    bf16_small = dataclasses.replace(row_for(135_000_000), quantization="none", neftune_alpha=5.0)
    assert recipe_values(bf16_small, "llama")["model.quantization"] == "none"
    assert recipe_values(bf16_small, "llama")["train.neftune_alpha"] == 5.0
    monkeypatch.setattr(recipes, "SIZE_RECIPES", (bf16_small, *SIZE_RECIPES[1:]))
    config, choice = apply_recipe(build_config(None, {"model.model": str(tiny_phi_dir)}), {"model.model"})
    assert config.model.quantization == "none" and "--quantization none" in choice.line()
    assert config.train.neftune_alpha == 5.0 and "--neftune-alpha 5" in choice.line()
    given = {"model.model", "model.quantization"}
    config, choice = apply_recipe(build_config(None, {"model.model": str(tiny_phi_dir), "model.quantization": "4bit"}),
                                  given)  # fmt: skip
    assert config.model.quantization == "4bit" and "--quantization" in choice.line().split("(yours:")[1]


@pytest.mark.slow  # ~8 s reading the 98 MB file's tensor index
def test_a_gguf_model_is_read_through_its_converted_directory(tmp_path, monkeypatch):
    if not SMOLLM2_GGUF.is_file():
        pytest.skip(f"SmolLM2 GGUF not found at {SMOLLM2_GGUF}")
    from transformers import AutoTokenizer

    from phi2cli.models.loading import load_tokenizer, local_model

    monkeypatch.setenv("PHI2_CACHE_DIR", str(tmp_path / "cache"))
    converted = Path(local_model(str(SMOLLM2_GGUF)))
    assert converted.parent == tmp_path / "cache" / "gguf" and (converted / "config.json").is_file()
    assert local_model(str(SMOLLM2_GGUF)) == str(converted) and local_model("org/name") == "org/name"
    # the GGUF's own tensor count (what the size rows were chosen with)
    assert model_size(str(SMOLLM2_GGUF)) == (134_515_008, "llama")
    assert model_size("no/such-model") == (None, None)
    ours = load_tokenizer(str(SMOLLM2_GGUF))  # from the converted directory, not the GGUF
    direct = AutoTokenizer.from_pretrained(str(SMOLLM2_GGUF.parent), gguf_file=SMOLLM2_GGUF.name)
    text = "The council said on Monday that the bridge will close. It reopens in 2027!"
    assert ours(text)["input_ids"] == direct(text)["input_ids"]
    assert (ours.eos_token_id, ours.chat_template) == (direct.eos_token_id, direct.chat_template)
    assert ours.pad_token_id is not None


def test_a_model_whose_size_cannot_be_read_keeps_the_reference_recipe():
    config = apply_overrides(Phi2Config(), {"model.model": "no-such-org/no-such-model"})
    resolved, choice = apply_recipe(config, {"model.model"})
    assert resolved == config and choice.parameters is None and choice.row.startswith("large")


class NoiseScale(TrainerCallback):
    """The embedding layer's NEFTune alpha at each step (None when NEFTune is off)."""

    def __init__(self) -> None:
        self.alphas: list = []

    def on_step_end(self, args, state, control, model=None, **kwargs):
        self.alphas.append(getattr(model.get_input_embeddings(), "neftune_noise_alpha", None))


def test_train_prints_and_records_the_recipe(tiny_phi_dir, sample_data_dir):
    common = ["train", "--model", str(tiny_phi_dir), "--data-dir", str(sample_data_dir), "--samples", "8",
              "--val-samples", "0", "--max-steps", "1", "--max-length", "128", "--lr", "0.01"]  # fmt: skip
    plain = runner.invoke(app, common, env={"COLUMNS": "300"})
    assert plain.exit_code == 0, plain.output
    assert "recipe: small (up to 0.5 B)" in plain.output and "(yours: --lr, --max-length)" in plain.output
    run = json.loads(Path("phi2-xsum-final/phi2_run.json").read_text())
    assert run["recipe"]["row"].startswith("small")
    assert run["recipe"]["given"] == ["train.learning_rate", "data.max_length"]
    assert run["config"]["train"]["epochs"] == 2.0 and run["config"]["lora"]["targets"] == ["all-linear"]
    assert run["config"]["train"]["learning_rate"] == 0.01 and run["config"]["train"]["neftune_alpha"] == 5.0
    assert run["config"]["model"]["quantization"] == "none"  # the small row keeps the base as loaded


@pytest.mark.slow  # two tiny runs, ~20 s
def test_neftune_noise_changes_the_training_loss(tiny_phi_dir, sample_data_dir):
    common = ["train", "--model", str(tiny_phi_dir), "--data-dir", str(sample_data_dir), "--samples", "8",
              "--val-samples", "0", "--max-steps", "1", "--max-length", "128", "--lr", "0.01", "--overwrite"]  # fmt: skip
    assert runner.invoke(app, [*common, "--neftune-alpha", "0"]).exit_code == 0  # the small row's default is 5
    plain_loss = json.loads(Path("phi2-xsum-finetuned/phi2_run.json").read_text())["train_metrics"]["train_loss"]
    noisy = runner.invoke(app, [*common, "--neftune-alpha", "5"], env={"COLUMNS": "300"})
    assert noisy.exit_code == 0, noisy.output
    run = json.loads(Path("phi2-xsum-final/phi2_run.json").read_text())
    assert run["config"]["train"]["neftune_alpha"] == 5.0
    assert run["train_metrics"]["train_loss"] != pytest.approx(plain_loss, abs=1e-6)  # the noise reached the model


def test_neftune_noise_is_scaled_per_example_on_packed_rows(tiny_phi_dir, sample_data_dir):
    from phi2cli.training.engine import train

    values = {"model.model": str(tiny_phi_dir), "data.data_dir": str(sample_data_dir), "data.samples": 8,
              "data.val_samples": 0, "data.max_length": 128, "train.max_steps": 1, "train.neftune_alpha": 5.0}  # fmt: skip
    scale = NoiseScale()
    result = train(apply_overrides(Phi2Config(), values).validate(), callbacks=[scale])
    assert result.plan.packed and result.plan.micro_batch == 8
    assert scale.alphas == [pytest.approx(5.0 * 8**0.5)]  # 8 examples in the packed row


def test_bad_neftune_alpha_is_a_usage_error():
    result = runner.invoke(app, ["train", "--neftune-alpha", "-1"], env={"COLUMNS": "300"})
    assert result.exit_code == 2 and "--neftune-alpha must be 0 (off) or positive (got -1.0)" in result.output
