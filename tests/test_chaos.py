"""kill -9 at random moments, then --resume until done: the final adapter equals an uninterrupted run's.

The 20-trial run is benchmarks/chaos.py (slow test below; its last output is in
benchmarks/results/chaos.json). The default run does 3 trials, each killed during training (often
while a checkpoint is written: one is saved every step), and resumes in this process.
"""

from __future__ import annotations

import contextlib
import importlib.util
from pathlib import Path

import pytest
from typer.testing import CliRunner

from phi2cli.cli import app

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.skipif(not Path("/proc/self/status").is_file(), reason="reads signal masks from /proc")


def load_chaos():
    spec = importlib.util.spec_from_file_location("chaos", ROOT / "benchmarks" / "chaos.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def resume_here(folder: Path, args: list[str]) -> tuple[int, str]:
    with contextlib.chdir(folder):
        result = CliRunner().invoke(app, args, env={"COLUMNS": "300"})
    return result.exit_code, result.output


def check(summary: dict) -> None:
    for record in summary["results"]:
        assert [r["exit"] for r in record["resumes"]][-1:] == [0], record
        assert all(r["exit"] == 0 for r in record["resumes"]), record
        assert record["difference"] is not None and record["difference"] <= 1e-5, record
        assert record["lost"] == [], record  # no checkpoint complete before the kill was lost or changed
        assert record["complete_at_end"] == [f"checkpoint-{n}" for n in range(1, summary["steps"] + 1)], record
        assert record["passed"], record
    assert summary["passed"] == summary["trials"]


def test_three_kills_during_training_resume_to_the_uninterrupted_adapter(tmp_path, tiny_phi_dir, sample_data_dir):
    chaos = load_chaos()
    summary = chaos.run_trials(3, tmp_path, tiny_phi_dir, sample_data_dir, seed=1, resume=resume_here,
                               only_training=True)  # fmt: skip
    check(summary)
    assert any(record["killed"] for record in summary["results"]), "no trial was killed: the test proved nothing"


@pytest.mark.slow
def test_twenty_kills_at_random_moments_resume_to_the_uninterrupted_adapter(tmp_path, tiny_phi_dir, sample_data_dir):
    check(load_chaos().run_trials(20, tmp_path, tiny_phi_dir, sample_data_dir, seed=0))
