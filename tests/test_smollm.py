"""The whole chain on a real pretrained model (SmolLM2-135M-Instruct, GGUF) on CPU: loss goes down."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from phi2cli.cli import app

from conftest import SMOLLM2_GGUF

pytestmark = pytest.mark.slow
runner = CliRunner()


@pytest.fixture(scope="module")
def smollm2() -> Path:
    if not SMOLLM2_GGUF.is_file():
        pytest.skip(f"SmolLM2 GGUF not found at {SMOLLM2_GGUF}")
    return SMOLLM2_GGUF


def test_chat_template_training_lowers_eval_loss_of_a_real_model(smollm2, xsum_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("PHI2_CACHE_DIR", str(tmp_path / "cache"))
    result = runner.invoke(app, [
        "train", "--model", str(smollm2), "--template", "chat", "--data-dir", str(xsum_dir), "--samples", "48",
        "--val-samples", "8", "--max-length", "384", "--lr", "1e-3", "--lora-targets", "all-linear",
        "--warmup-steps", "0", "--max-steps", "6", "--eval-every", "6", "--quantization", "none",
    ])  # fmt: skip
    assert result.exit_code == 0, result.output
    run = json.loads(Path("phi2-xsum-final/phi2_run.json").read_text())
    assert run["config"]["data"]["template"] == "chat" and run["eos_token_id"] is not None
    result = runner.invoke(app, ["evaluate", "--samples", "8", "--compare-base", "--max-new-tokens", "40"],
                           env={"COLUMNS": "200"})  # fmt: skip
    assert result.exit_code == 0, result.output
    metrics = json.loads(Path("phi2-xsum-final/metrics-validation.json").read_text())
    assert metrics["tuned"]["eval_loss"] < metrics["base"]["eval_loss"] - 0.05, metrics
    predictions = [json.loads(line) for line in Path("phi2-xsum-final/predictions-validation.jsonl").read_text().splitlines()]
    assert len(predictions) == 8 and all("<|im_end|>" not in p["prediction"] for p in predictions)
