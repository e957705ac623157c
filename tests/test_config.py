"""One config for every command: reference-recipe defaults, file then flags, all problems at once."""

from __future__ import annotations

import yaml
from typer.testing import CliRunner

from phi2cli.cli import app
from phi2cli.config import Phi2Config, apply_overrides, build_config, validation_problems

runner = CliRunner()


def test_defaults_are_the_reference_recipe():
    c = Phi2Config()
    assert (c.model.model, c.model.quantization, c.model.double_quant) == ("microsoft/phi-2", "auto", True)
    assert (c.lora.r, c.lora.alpha, c.lora.dropout) == (16, 32, 0.05)
    assert c.lora.targets == ()  # the model family's attention projections
    assert (c.train.optimizer, c.train.learning_rate, c.train.lr_scheduler) == ("paged_adamw_8bit", 2e-4, "cosine")
    assert (c.train.batch_size, c.train.grad_accum, c.train.epochs, c.train.eval_every) == (1, 8, 1.0, 500)
    assert (c.data.samples, c.data.val_samples, c.data.max_length) == (5000, 500, 1024)
    assert (c.train.output_dir, c.train.final_dir) == ("phi2-xsum-finetuned", "phi2-xsum-final")
    assert c.train.gradient_checkpointing and c.data.dataset == "EdinburghNLP/xsum"


def test_phi2_config_prints_yaml_that_loads_back(tmp_path):
    result = runner.invoke(app, ["config"])
    assert result.exit_code == 0
    loaded = yaml.safe_load(result.output)
    assert loaded["lora"]["targets"] == []
    (tmp_path / "phi2.yaml").write_text(result.output, encoding="utf-8")
    assert build_config(tmp_path / "phi2.yaml", {}) == Phi2Config()


def test_file_then_flags(tmp_path):
    (tmp_path / "c.yaml").write_text("lora:\n  r: 8\n  targets: [q_proj, v_proj]\ntrain:\n  learning_rate: 1e-4\n")
    config = build_config(tmp_path / "c.yaml", {"lora.r": 4, "train.max_steps": None})
    assert (config.lora.r, config.lora.targets, config.train.learning_rate) == (4, ("q_proj", "v_proj"), 1e-4)
    assert config.train.max_steps == -1  # None means "flag not given"
    result = runner.invoke(app, ["config", "--config", str(tmp_path / "c.yaml")])
    assert yaml.safe_load(result.output)["lora"]["r"] == 8


def test_comma_separated_targets_and_all_linear():
    assert apply_overrides(Phi2Config(), {"lora.targets": "q_proj, fc1"}).lora.targets == ("q_proj", "fc1")
    assert apply_overrides(Phi2Config(), {"lora.targets": "all-linear"}).lora.targets == ("all-linear",)


def test_validation_collects_every_problem():
    bad = apply_overrides(Phi2Config(), {"data.samples": 0, "lora.r": 0, "train.learning_rate": -1.0})
    problems = validation_problems(bad)
    assert "--samples must be at least 1 (got 0)" in problems
    assert "--lora-r must be at least 1 (got 0)" in problems
    assert "--lr must be positive (got -1.0)" in problems


def test_config_file_problems_are_usage_errors(tmp_path):
    (tmp_path / "bad.yaml").write_text("lora:\n  rank: 8\n")
    result = runner.invoke(app, ["config", "--config", str(tmp_path / "bad.yaml")])
    assert result.exit_code == 2 and "unknown setting 'lora.rank'" in result.output
    (tmp_path / "broken.yaml").write_text("lora: [\n")
    result = runner.invoke(app, ["config", "--config", str(tmp_path / "broken.yaml")])
    assert result.exit_code == 2 and "could not be parsed" in result.output
    result = runner.invoke(app, ["config", "--config", str(tmp_path / "missing.yaml")])
    assert result.exit_code == 2 and "does not exist" in result.output


def test_every_command_has_help_that_explains_its_options():
    result = runner.invoke(app, ["--help"], env={"COLUMNS": "200"})
    for name in ("prepare", "train", "evaluate", "summarize", "export", "report", "config"):
        assert name in result.output
        sub = runner.invoke(app, [name, "--help"], env={"COLUMNS": "200"})
        assert sub.exit_code == 0 and "Usage: phi2 " + name in " ".join(sub.output.split())
    train_help = " ".join(runner.invoke(app, ["train", "--help"], env={"COLUMNS": "200"}).output.split())
    assert "LoRA rank" in train_help and "[default: 16]" in train_help and "--resume" in train_help


def test_readme_quick_start_offline_says_how_to_use_local_files(phi2_tokenizer_dir):
    """`phi2 train --samples 5000` without hub access: one line that says what to do."""
    result = runner.invoke(app, ["train", "--samples", "5000", "--model", str(phi2_tokenizer_dir)])
    assert result.exit_code == 1
    text = " ".join(result.output.split())
    assert ("the local cache lacks: dataset 'EdinburghNLP/xsum' (use --data-dir DIR with train.jsonl and "
            "validation.jsonl)") in text  # fmt: skip
