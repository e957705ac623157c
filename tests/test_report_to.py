"""`phi2 train --report-to`: the Trainer's own logging integrations, read back from the files they write."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from phi2cli.cli import app

runner = CliRunner()


def run(*args: str):
    result = runner.invoke(app, list(args), env={"COLUMNS": "200"})
    return result, result.output


def test_tensorboard_event_file_holds_the_logged_loss_and_learning_rate(tiny_phi_dir, sample_data_dir):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    result, out = run("prepare", "--data-dir", str(sample_data_dir), "--model", str(tiny_phi_dir), "--samples", "8",
                      "--val-samples", "2", "--max-length", "128", "-o", "prepared")  # fmt: skip
    assert result.exit_code == 0, out
    result, out = run("train", "--prepared", "prepared", "--model", str(tiny_phi_dir), "--max-steps", "2",
                      "--eval-every", "2", "--logging-steps", "1", "--warmup-steps", "0",
                      "--report-to", "tensorboard")  # fmt: skip
    assert result.exit_code == 0, out
    run_dir = Path("phi2-xsum-finetuned")
    events = list((run_dir / "runs").glob("*/events.out.tfevents.*"))
    assert len(events) == 1, events
    accumulator = EventAccumulator(str(events[0]))
    accumulator.Reload()
    scalars = {tag: {e.step: e.value for e in accumulator.Scalars(tag)} for tag in accumulator.Tags()["scalars"]}
    state = json.loads((run_dir / "checkpoint-2" / "trainer_state.json").read_text(encoding="utf-8"))
    logged = [e for e in state["log_history"] if "loss" in e]
    assert [e["step"] for e in logged] == [1, 2]
    assert scalars["train/loss"] == pytest.approx({e["step"]: e["loss"] for e in logged}, rel=1e-6)
    assert scalars["train/learning_rate"] == pytest.approx({e["step"]: e["learning_rate"] for e in logged}, rel=1e-6)
    evals = {e["step"]: e["eval_loss"] for e in state["log_history"] if "eval_loss" in e}
    assert scalars["eval/loss"] == pytest.approx(evals, rel=1e-6) and set(evals) == {2}
    assert json.loads((run_dir / "phi2_run.json").read_text())["config"]["train"]["report_to"] == "tensorboard"

    # the same run's report carries its Run section from phi2_run.json
    result, out = run("report", str(run_dir), "--format", "markdown")
    assert result.exit_code == 0, out
    facts = json.loads((run_dir / "phi2_run.json").read_text())
    assert "### Run" in out and "| Device | cpu |" in out and f"| Profile | {facts['plan']['profile']} |" in out


def test_default_reports_nowhere():
    from phi2cli.config import Phi2Config
    from phi2cli.training.trainer_inputs import report_targets

    assert Phi2Config().train.report_to == "none" and report_targets("none") == []


def test_missing_backend_package_is_one_line_before_anything_loads(monkeypatch, tiny_phi_dir, sample_data_dir):
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "mlflow" else real_find_spec(name, *a))  # fmt: skip
    result, out = run("train", "--model", str(tiny_phi_dir), "--data-dir", str(sample_data_dir), "--samples", "4",
                      "--max-steps", "1", "--report-to", "mlflow")  # fmt: skip
    assert result.exit_code == 2
    assert out.strip().startswith("Error: --report-to mlflow needs the 'mlflow' package, which is not installed; "
                          "run 'pip install mlflow' or pass --report-to none")  # fmt: skip
    assert len(out.strip().splitlines()) == 1 and not Path("phi2-xsum-finetuned").exists()
    result, out = run("train", "--model", str(tiny_phi_dir), "--report-to", "comet")
    assert result.exit_code == 2 and "--report-to must be one of none, tensorboard, wandb, mlflow (got 'comet')" in out
