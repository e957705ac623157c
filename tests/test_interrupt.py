"""Ctrl-C / SIGTERM during a real `phi2 train` process: a resumable checkpoint, exit 130, and a resume
that logs the same per-step losses as a run that was never interrupted.

The signal is sent as soon as the trainer's handler is installed (read from /proc/PID/status), so the
product needs no test hook and the run is stopped at an early step whatever the machine's speed.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from phi2cli.cli import app

ROOT = Path(__file__).resolve().parents[1]
STEPS = 8
pytestmark = pytest.mark.skipif(not Path("/proc/self/status").is_file(), reason="reads signal masks from /proc")


def train_args(model: Path, data: Path, *extra: str) -> list[str]:
    """64 examples x 8 per step = 8 steps, no evaluation, a checkpoint only at the end."""
    return ["train", "--model", str(model), "--data-dir", str(data), "--samples", "64", "--val-samples", "0",
            "--max-steps", str(STEPS), "--eval-every", str(STEPS), "--logging-steps", "1", "--lora-dropout", "0",
            "--max-length", "192", *extra]  # fmt: skip


def step_losses(run_dir: Path) -> dict[int, float]:
    """Per-step train losses from the newest checkpoint's trainer_state.json."""
    newest = max(run_dir.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))
    history = json.loads((newest / "trainer_state.json").read_text())["log_history"]
    return {entry["step"]: entry["loss"] for entry in history if "loss" in entry}


def handles_sigterm(pid: int) -> bool:
    """True once the process has its own SIGTERM handler: StopOnSignal is installed, training starts."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("SigCgt:"):
            return bool(int(line.split()[1], 16) >> (signal.SIGTERM - 1) & 1)
    return False


def interrupt_training(cwd: Path, args: list[str], signum: int, timeout: float = 120) -> tuple[int, str]:
    """Start `python -m phi2cli train ...`, send `signum` once training runs; return (exit code, output)."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT),
           os.environ.get("PYTHONPATH")])), "COLUMNS": "300"}  # fmt: skip
    process = subprocess.Popen([sys.executable, "-m", "phi2cli", *args], cwd=cwd, env=env, text=True,
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT)  # fmt: skip
    try:
        deadline = time.monotonic() + timeout
        while process.poll() is None and not handles_sigterm(process.pid):
            if time.monotonic() > deadline:
                pytest.fail("training did not start in time")
            time.sleep(0.02)
        if process.poll() is None:
            process.send_signal(signum)
        output, _ = process.communicate(timeout=timeout)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    return process.returncode, output


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, tiny_phi_dir, sample_data_dir) -> dict[int, float]:
    """Per-step losses of the same command run to the end without a signal."""
    work = tmp_path_factory.mktemp("uninterrupted")
    with contextlib.chdir(work):
        result = CliRunner().invoke(app, train_args(tiny_phi_dir, sample_data_dir))
    assert result.exit_code == 0, result.output
    losses = step_losses(work / "phi2-xsum-finetuned")
    assert sorted(losses) == list(range(1, STEPS + 1))
    return losses


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_signal_saves_a_checkpoint_and_resume_matches_an_uninterrupted_run(
    signum, uninterrupted, tiny_phi_dir, sample_data_dir, tmp_path, monkeypatch
):
    work = tmp_path / "interrupted"
    work.mkdir()
    args = train_args(tiny_phi_dir, sample_data_dir)
    code, output = interrupt_training(work, args, signum)

    assert code == 130, output
    assert "Traceback" not in output
    errors = [line for line in output.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1, output
    run = work / "phi2-xsum-finetuned"
    saved = sorted(run.glob("checkpoint-*"))
    assert len(saved) == 1, output
    step = int(saved[0].name.split("-")[1])
    assert 1 <= step < STEPS, f"stopped at step {step}: the signal came too late to test a resume"
    assert errors[0] == (f"Error: stopped by {signal.Signals(signum).name} at step {step}; checkpoint saved in "
                         f"phi2-xsum-finetuned/checkpoint-{step}. "
                         f"Resume with: phi2 train --resume (with the same options)")  # fmt: skip
    assert {"adapter_model.safetensors", "optimizer.pt", "scheduler.pt", "rng_state.pth",
            "trainer_state.json"} <= {p.name for p in saved[0].iterdir()}  # fmt: skip
    assert not (work / "phi2-xsum-final").exists()  # no final adapter from an unfinished run
    assert sorted(step_losses(run)) == list(range(1, step + 1))

    monkeypatch.chdir(work)
    resumed = CliRunner().invoke(app, [*args, "--resume"])
    assert resumed.exit_code == 0, resumed.output
    assert f"Adapter saved to phi2-xsum-final after {STEPS} steps" in resumed.output
    losses = step_losses(run)
    assert sorted(losses) == list(range(1, STEPS + 1))
    for n in range(1, STEPS + 1):
        assert losses[n] == pytest.approx(uninterrupted[n], abs=1e-4), n
