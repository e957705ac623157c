"""Crash safety of `phi2 train`: finished runs, half-written checkpoints, two runs at once, host memory,
and the logged losses of a resumed run.

The default run reuses the session's tiny trained run (conftest `trained`) and trains nothing itself;
the tests that train (marked slow) share one 4-step run, copied per test."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from safetensors.torch import load_file
from typer.testing import CliRunner

from phi2cli.cli import app

ROOT = Path(__file__).resolve().parents[1]
runner = CliRunner()


def invoke(args: list[str]):
    return runner.invoke(app, args, env={"COLUMNS": "300"})


def train_args(model: Path, data: Path, *extra: str) -> list[str]:
    """4 steps of 8 examples, a checkpoint every 2 steps, a loss logged every 3 (so a resume from
    checkpoint-2 cuts a logging window)."""
    return ["train", "--model", str(model), "--data-dir", str(data), "--samples", "32", "--val-samples", "0",
            "--max-steps", "4", "--eval-every", "2", "--logging-steps", "3", "--lora-dropout", "0",
            "--max-length", "128", "--warmup-steps", "0", "--lr", "0.01", *extra]  # fmt: skip


@pytest.fixture(scope="module")
def finished(tmp_path_factory, tiny_phi_dir, sample_data_dir) -> Path:
    """A finished 4-step run: phi2-xsum-finetuned/checkpoint-{2,4} and phi2-xsum-final/."""
    root = tmp_path_factory.mktemp("finished-run")
    here = os.getcwd()
    os.chdir(root)
    try:
        result = invoke(train_args(tiny_phi_dir, sample_data_dir))
    finally:
        os.chdir(here)
    assert result.exit_code == 0, result.output
    return root


TRAINED_ARGS = ["--samples", "16", "--val-samples", "8", "--max-steps", "2", "--eval-every", "2",
                "--max-length", "256", "--warmup-steps", "0", "--lr", "0.01"]  # conftest's `trained` run


@pytest.fixture
def trained_copy(trained, isolated_env, tiny_phi_dir, sample_data_dir) -> tuple[Path, list[str]]:
    """A copy of the session's finished 2-step run and the command that made it."""
    for name in ("phi2-xsum-finetuned", "phi2-xsum-final"):
        shutil.copytree(trained / name, isolated_env / name)
    return isolated_env, ["train", "--data-dir", str(sample_data_dir), "--model", str(tiny_phi_dir), *TRAINED_ARGS]


@pytest.fixture
def run(finished, isolated_env) -> Path:
    """This test's own copy of the finished run, in its working directory."""
    for name in ("phi2-xsum-finetuned", "phi2-xsum-final"):
        shutil.copytree(finished / name, isolated_env / name)
    return isolated_env


def snapshot(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}  # fmt: skip


def logged_losses(run_dir: Path) -> dict[int, float]:
    newest = max(run_dir.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))
    history = json.loads((newest / "trainer_state.json").read_text())["log_history"]
    return {entry["step"]: entry["loss"] for entry in history if "loss" in entry}


def same_adapter(a: Path, b: Path) -> bool:
    left, right = load_file(str(a / "adapter_model.safetensors")), load_file(str(b / "adapter_model.safetensors"))
    return left.keys() == right.keys() and all(float((left[k] - right[k]).abs().max()) <= 1e-5 for k in left)


def test_resume_of_a_finished_run_changes_nothing(trained_copy):
    run, command = trained_copy
    (run / "phi2-xsum-final" / "metrics.json").write_text('{"rouge1": 1.0}\n')  # what phi2 evaluate added
    (run / "phi2-xsum-final" / "predictions.jsonl").write_text('{"id": "1"}\n')
    before = snapshot(run)
    for max_steps in ("2", "1"):
        result = invoke([*command, "--max-steps", max_steps, "--resume"])
        assert result.exit_code == 0, result.output
        assert (f"The run in phi2-xsum-finetuned had already finished at step 2 (adapter in phi2-xsum-final); "
                f"nothing changed. A larger --max-steps with --resume trains further.") in result.output  # fmt: skip
        assert snapshot(run) == before


def test_resume_after_the_last_checkpoint_saves_the_missing_final_adapter(trained_copy, trained):
    run, command = trained_copy
    shutil.rmtree(run / "phi2-xsum-final")  # killed after checkpoint-2, before the final adapter was saved
    result = invoke([*command, "--resume"])
    assert result.exit_code == 0, result.output
    assert "Warning: training had ended at step 2; saved the final adapter from checkpoint-2" in result.output
    assert sorted(p.name for p in (run / "phi2-xsum-finetuned").glob("checkpoint-*")) == ["checkpoint-2"]
    assert same_adapter(run / "phi2-xsum-final", trained / "phi2-xsum-final")
    saved = json.loads((run / "phi2-xsum-final" / "phi2_run.json").read_text())
    assert saved["global_step"] == 2 and saved["best_checkpoint"].endswith("checkpoint-2")


@pytest.mark.slow
def test_resume_with_a_larger_max_steps_trains_on(run, tiny_phi_dir, sample_data_dir):
    result = invoke(train_args(tiny_phi_dir, sample_data_dir, "--max-steps", "6", "--resume"))
    assert result.exit_code == 0, result.output
    assert "Adapter saved to phi2-xsum-final after 6 steps" in result.output
    assert sorted(p.name for p in (run / "phi2-xsum-finetuned").glob("checkpoint-*")) == \
        ["checkpoint-2", "checkpoint-4", "checkpoint-6"]  # fmt: skip
    assert json.loads((run / "phi2-xsum-final" / "phi2_run.json").read_text())["global_step"] == 6


@pytest.mark.slow
def test_a_half_written_checkpoint_is_skipped_with_a_note(run, finished, tiny_phi_dir, sample_data_dir):
    newest = run / "phi2-xsum-finetuned" / "checkpoint-4"
    optimizer = (newest / "optimizer.pt").read_bytes()
    (newest / "optimizer.pt").write_bytes(optimizer[: len(optimizer) // 2])  # as a full disk leaves it
    shutil.rmtree(run / "phi2-xsum-final")  # the run had not got to its end
    result = invoke(train_args(tiny_phi_dir, sample_data_dir, "--resume"))
    assert result.exit_code == 0, result.output
    assert "Warning: checkpoint-4 is incomplete (optimizer.pt is truncated): resuming from checkpoint-2" in \
        result.output.splitlines(), result.output  # fmt: skip
    assert same_adapter(run / "phi2-xsum-final", finished / "phi2-xsum-final")


@pytest.mark.slow
def test_a_failed_checkpoint_write_leaves_no_checkpoint_dir(tiny_phi_dir, sample_data_dir, monkeypatch, isolated_env):
    from transformers import Trainer

    real_save = Trainer._save_rng_state

    def disk_full_at_step_4(self, output_dir):
        if self.state.global_step == 4:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(self, output_dir)

    monkeypatch.setattr(Trainer, "_save_rng_state", disk_full_at_step_4)
    result = invoke(train_args(tiny_phi_dir, sample_data_dir))
    assert result.exit_code != 0
    out = isolated_env / "phi2-xsum-finetuned"
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-2"]  # never a half checkpoint-4
    monkeypatch.setattr(Trainer, "_save_rng_state", real_save)
    resumed = invoke(train_args(tiny_phi_dir, sample_data_dir, "--resume"))
    assert resumed.exit_code == 0, resumed.output
    assert sorted(p.name for p in out.iterdir() if p.name.startswith((".checkpoint", "checkpoint"))) == \
        ["checkpoint-2", "checkpoint-4"]  # the staged leftover is gone  # fmt: skip


@pytest.mark.slow
def test_resumed_run_logs_the_same_losses_across_a_cut_logging_window(run, finished, tiny_phi_dir, sample_data_dir):
    shutil.rmtree(run / "phi2-xsum-finetuned" / "checkpoint-4")
    shutil.rmtree(run / "phi2-xsum-final")
    result = invoke(train_args(tiny_phi_dir, sample_data_dir, "--resume"))  # from checkpoint-2
    assert result.exit_code == 0, result.output
    uninterrupted = logged_losses(finished / "phi2-xsum-finetuned")
    resumed = logged_losses(run / "phi2-xsum-finetuned")
    assert sorted(resumed) == sorted(uninterrupted) == [3]  # the step-3 loss averages steps 1-3 in both
    assert resumed[3] == pytest.approx(uninterrupted[3], abs=1e-6)


def hold_lock(directory: Path) -> subprocess.Popen:
    """Another process that holds the output directory's lock until killed."""
    code = ("import sys, time; from phi2cli.io.lock import RunLock; RunLock(sys.argv[1]).acquire(); "
            "print('held', flush=True); time.sleep(600)")  # fmt: skip
    process = subprocess.Popen([sys.executable, "-c", code, str(directory)], stdout=subprocess.PIPE, text=True,
                               env={**os.environ, "PYTHONPATH": str(ROOT)})  # fmt: skip
    assert process.stdout.readline().strip() == "held"
    return process


def test_a_second_run_into_the_same_output_dir_refuses_in_one_line(trained_copy):
    run, command = trained_copy
    other = hold_lock(run / "phi2-xsum-finetuned")
    try:
        before = snapshot(run)
        for extra in ([], ["--max-steps", "4", "--resume"], ["--overwrite"]):
            result = invoke([*command, *extra])
            assert result.exit_code == 1, result.output
            assert result.output.strip() == (
                f"Error: another phi2 train (PID {other.pid} on {socket.gethostname()}) is writing to "
                f"phi2-xsum-finetuned; wait for it to finish or choose another --output-dir")  # fmt: skip
            assert snapshot(run) == before
    finally:
        other.kill()
        other.wait()


def test_a_stale_lock_of_a_dead_process_is_taken_over_with_a_note(trained_copy):
    run, command = trained_copy
    other = hold_lock(run / "phi2-xsum-finetuned")
    other.kill()  # kill -9: the lock file stays, its flock is gone
    other.wait()
    assert (run / "phi2-xsum-finetuned" / ".phi2-train.lock").is_file()
    result = invoke([*command, "--resume"])
    assert result.exit_code == 0, result.output
    assert (f"Warning: took over the lock of PID {other.pid} on {socket.gethostname()} in phi2-xsum-finetuned: "
            f"that run had ended without releasing it") in result.output.splitlines()  # fmt: skip
    assert not (run / "phi2-xsum-finetuned" / ".phi2-train.lock").exists()  # released at the end


def test_a_batch_that_cannot_fit_in_host_memory_is_refused_before_loading(tiny_phi_dir, sample_data_dir,
                                                                          monkeypatch, isolated_env):  # fmt: skip
    from phi2cli.training import engine, host_memory

    monkeypatch.setattr(host_memory, "available_bytes", lambda: 3 * host_memory.GIB)
    monkeypatch.setattr(engine, "build_model", lambda *a: pytest.fail("the model was loaded"))
    began = time.monotonic()
    result = invoke(["train", "--model", str(tiny_phi_dir), "--data-dir", str(sample_data_dir),
                                 "--batch-size", "100000", "--max-steps", "1"])  # fmt: skip
    assert result.exit_code == 1
    message = " ".join(result.output.split())
    assert message.count("Error") == 1  # the run's warnings (no CUDA GPU, ...) may come first
    assert message[message.index("Error"):].startswith("Error: training on the CPU needs about ")
    assert "examples, " in message and "but 3.0 GiB is available; use a smaller --batch-size x --grad-accum" in message
    assert time.monotonic() - began < 60


def test_the_host_memory_estimate_passes_an_ordinary_cpu_run(tiny_phi_dir, sample_data_dir, monkeypatch):
    from phi2cli.config import Phi2Config, apply_overrides
    from phi2cli.models.loading import resolve_precision
    from phi2cli.training import host_memory
    from phi2cli.training.plan import resolve_plan

    config = apply_overrides(Phi2Config(), {"model.model": str(tiny_phi_dir), "data.max_length": 512})
    precision = resolve_precision(config.model)
    plan = resolve_plan(config, cuda=False, quantized=False, free_gib=None)
    rows = {"prompt_tokens": [500] * 16, "summary_tokens": [30] * 16}

    class Rows(dict):
        column_names = list(rows)

    monkeypatch.setattr(host_memory, "available_bytes", lambda: 3 * host_memory.GIB)
    host_memory.check_host_memory(config, plan, precision, Rows(rows))  # 8 x 530 tokens: well under 3 GiB
    monkeypatch.setattr(host_memory, "available_bytes", lambda: host_memory.GIB)  # the runtime alone is 1 GiB
    with pytest.raises(Exception, match="needs about 1 GiB of memory .* but 1.0 GiB is available"):
        host_memory.check_host_memory(config, plan, precision, Rows(rows))


@pytest.mark.slow
def test_a_second_train_while_one_trains_refuses_and_takes_over_after_a_kill(tiny_phi_dir, sample_data_dir,
                                                                             isolated_env):  # fmt: skip
    import signal

    args = train_args(tiny_phi_dir, sample_data_dir, "--eval-every", "1")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "COLUMNS": "300"}
    first = subprocess.Popen([sys.executable, "-m", "phi2cli", *args], env=env, stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL)  # fmt: skip
    try:
        deadline = time.monotonic() + 300
        while first.poll() is None and not sigterm_handled(first.pid):  # training has started
            assert time.monotonic() < deadline, "training did not start in time"
            time.sleep(0.05)
        second = invoke(args)
        assert second.exit_code == 1
        assert second.output.strip() == (
            f"Error: another phi2 train (PID {first.pid} on {socket.gethostname()}) is writing to "
            f"phi2-xsum-finetuned; wait for it to finish or choose another --output-dir")  # fmt: skip
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait()
    resumed = invoke([*args, "--resume"])
    assert resumed.exit_code == 0, resumed.output
    assert f"Warning: took over the lock of PID {first.pid} on {socket.gethostname()}" in resumed.output
    assert "Adapter saved to phi2-xsum-final after 4 steps" in resumed.output


def sigterm_handled(pid: int) -> bool:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("SigCgt:"):
            return bool(int(line.split()[1], 16) >> 14 & 1)  # bit 15 - 1: SIGTERM
    return False
