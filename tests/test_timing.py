"""The run's time split and rates measured over training steps only (never evaluation or saving)."""

from __future__ import annotations

import json
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
from transformers import TrainerCallback

from phi2cli.config import Phi2Config, apply_overrides


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_slow_evaluation_and_save_stay_out_of_every_rate(monkeypatch):
    """Steps of 0.1 s with 1,000 tokens each; at step 10 an evaluation of 5 s and a save of 3 s,
    at the last step (20) the same again: rates stay 10,000 tokens/s and the phases add up."""
    from phi2cli.training.timing import ThroughputMeter

    clock = Clock()
    monkeypatch.setattr("phi2cli.training.trainer.time.perf_counter", clock)
    tokens = {"n": 0}
    meter = ThroughputMeter(lambda: tokens["n"], skip=2, recordings=lambda: 1)
    state = SimpleNamespace(global_step=0, max_steps=20)
    meter.on_train_begin(None, state, None)
    for step in range(1, 21):
        control = SimpleNamespace(should_evaluate=step in (10, 20), should_save=step in (10, 20))
        meter.on_step_begin(None, state, control)
        clock.now += 0.1
        tokens["n"] += 1000
        state.global_step = step
        meter.on_step_end(None, state, control)
        if step % 5 == 0:
            meter.on_log(None, state, control, logs={"loss": 1.0})
        if control.should_evaluate:
            clock.now += 5.0
            meter.on_log(None, state, control, logs={"eval_loss": 1.0})
            meter.on_evaluate(None, state, control)
            clock.now += 3.0
            meter.on_save(None, state, control)
    clock.now += 2.0  # restoring the best checkpoint after the last save
    meter.on_train_end(SimpleNamespace(device="cpu"), state, control)
    result = meter.result
    assert result["tokens_per_s"] == pytest.approx(10_000, rel=1e-6)  # steps 3-20: 18,000 tokens in 1.8 s
    assert result["steady_tokens_per_s"] == pytest.approx(10_000, rel=1e-6)
    assert result["steady_from_step"] == 5
    assert result["train_steps_seconds"] == pytest.approx(2.0)
    assert result["evaluation_seconds"] == pytest.approx(10.0)
    assert result["save_seconds"] == pytest.approx(8.0)  # two saves and restoring the best
    assert result["first_step_seconds"] == pytest.approx(0.1)
    assert result["real_tokens"] == 20_000


def test_save_without_evaluation_and_logs_between_steps_are_billed_right(monkeypatch):
    from phi2cli.training.timing import ThroughputMeter

    clock = Clock()
    monkeypatch.setattr("phi2cli.training.trainer.time.perf_counter", clock)
    meter = ThroughputMeter(lambda: 0, skip=1)
    state = SimpleNamespace(global_step=0, max_steps=3)
    meter.on_train_begin(None, state, None)
    for step in (1, 2, 3):
        control = SimpleNamespace(should_evaluate=False, should_save=step == 2)
        meter.on_step_begin(None, state, control)
        clock.now += 1.0
        state.global_step = step
        meter.on_step_end(None, state, control)
        clock.now += 0.5  # logging: training's
        meter.on_log(None, state, control, logs={"loss": 1.0})
        if control.should_save:
            clock.now += 4.0
            meter.on_save(None, state, control)
        clock.now += 0.25  # the next batch is fetched before the next step begins: training's
    meter.on_train_end(SimpleNamespace(device="cpu"), state, None)
    assert meter.result["train_steps_seconds"] == pytest.approx(3 * 1.5 + 3 * 0.25)
    assert meter.result["save_seconds"] == pytest.approx(4.0)  # the step after the save starts on the clock
    assert meter.result["evaluation_seconds"] == 0.0


def test_time_split_takes_recording_out_of_the_training_steps():
    from phi2cli.training.timing import finish_timing, time_split
    from phi2cli.training.plan import resolve_plan

    compiled = apply_overrides(Phi2Config(), {"train.compile_from_steps": 0})  # compiled whatever the length
    plan = resolve_plan(compiled, cuda=True, quantized=True, free_gib=140.0)
    throughput = {"train_steps_seconds": 50.0, "evaluation_seconds": 6.0, "save_seconds": 2.0,
                  "first_step_seconds": 20.0, "real_tokens": 400_000,
                  "cuda_graphs": {"record_seconds": 30.0}}  # fmt: skip
    timing = time_split(throughput, plan, load_seconds=8.0, data_seconds=1.5)
    assert timing["compile_record_s"] == 30.0 and timing["train_steps_s"] == 20.0
    assert timing["train_steps_tokens_per_s"] == 20_000.0
    eager = time_split({k: v for k, v in throughput.items() if k != "cuda_graphs"}, plan, 8.0, 1.5)
    assert eager["compile_record_s"] == 20.0  # compiled layers without graphs: the first step compiles
    started = time.perf_counter() - 100.0
    finish_timing(timing, started, final_save_started=time.perf_counter() - 1.0)
    assert timing["save_s"] == pytest.approx(3.0, abs=0.05)
    assert timing["wall_s"] == pytest.approx(100.0, abs=0.05)
    assert timing["other_s"] == pytest.approx(100.0 - (8.0 + 1.5 + 30.0 + 20.0 + 6.0 + 3.0), abs=0.1)


class SlowEvaluationAndSave(TrainerCallback):
    """Makes every evaluation and every save 0.6 s slower (as a big model's would be)."""

    def on_evaluate(self, args, state, control, **kwargs):
        time.sleep(0.6)

    def on_save(self, args, state, control, **kwargs):
        time.sleep(0.6)


def test_train_records_and_prints_the_split(tiny_phi_dir, sample_data_dir):
    """A real run: evaluations and saves land in their phases, the split is in phi2_run.json and
    the train command prints it on one line."""
    from phi2cli.cli.train import timing_line
    from phi2cli.training.engine import train

    config = apply_overrides(Phi2Config(), {
        "model.model": str(tiny_phi_dir), "data.data_dir": str(sample_data_dir), "data.samples": 16,
        "data.val_samples": 8, "data.max_length": 192, "train.max_steps": 4, "train.eval_every": 2,
        "train.logging_steps": 1, "train.warmup_steps": 0}).validate()  # fmt: skip
    result = train(config, callbacks=[SlowEvaluationAndSave()])
    timing = result.timing
    assert timing["evaluation_s"] >= 2 * 0.6 and timing["save_s"] >= 2 * 0.6  # evaluations at 2 and 4
    assert timing["train_steps_s"] < timing["wall_s"] - timing["evaluation_s"] - timing["save_s"]
    phases = ("load_s", "data_s", "compile_record_s", "train_steps_s", "evaluation_s", "save_s", "other_s")
    assert sum(timing[k] for k in phases) == pytest.approx(timing["wall_s"], abs=0.05)
    run = json.loads((Path(config.train.final_dir) / "phi2_run.json").read_text())
    assert run["timing"] == timing
    assert timing["train_steps_tokens_per_s"] == pytest.approx(run["throughput"]["real_tokens"] / timing["train_steps_s"], rel=0.02)
    line = timing_line(timing)
    assert line.startswith(f"Time: {timing['wall_s']:.1f} s (load ")
    assert "evaluation" in line and "training steps alone:" in line


def test_summarize_and_evaluate_report_load_time_apart_from_work(final, sample_data_dir):
    """The load (config, model, adapter) is timed apart from the generation and the loss."""
    import re

    from typer.testing import CliRunner

    from phi2cli.cli import app
    from phi2cli.inference.evaluation import Article, summarize

    runner = CliRunner()
    row = json.loads((sample_data_dir / "test.jsonl").read_text().splitlines()[0])
    Path("a.txt").write_text(row["document"][:400])
    result = runner.invoke(app, ["summarize", "a.txt", "--max-new-tokens", "4"])
    assert result.exit_code == 0, result.output
    assert re.search(r"load \d+\.\d s \(libraries \d+\.\d, model \d+\.\d, adapter \d+\.\d\), generation \d+\.\d s",
                     result.stderr)  # fmt: skip
    assert "load" not in result.stdout  # the summary alone on stdout
    timings: dict[str, float] = {}
    summarize([Article("a.txt", row["document"][:400])], final, overrides={"generation.max_new_tokens": 4},
              timings=timings)  # fmt: skip
    assert set(timings) == {"load_seconds", "generation_seconds", "load_phases"}
    assert timings["load_seconds"] > 0 and timings["generation_seconds"] > 0
    phases = timings["load_phases"]
    assert list(phases) == ["libraries", "model", "adapter"] and all(t > 0 for t in phases.values())
    assert sum(phases.values()) <= timings["load_seconds"]
    evaluated = runner.invoke(app, ["evaluate", "--samples", "4", "--max-new-tokens", "2", "-o", "out"])
    assert evaluated.exit_code == 0, evaluated.output
    metrics = json.loads(Path("out/metrics-validation.json").read_text())["timings"]
    phases = metrics["load_phases"]
    assert list(phases) == ["data", "libraries", "model", "adapter", "tokenize"] and min(phases.values()) >= 0
    assert sum(phases.values()) == pytest.approx(metrics["load_seconds"], abs=1e-3)
    split = ", ".join(f"{name} {t:.1f}" for name, t in phases.items())
    assert f"load {metrics['load_seconds']:.1f} s ({split}), loss {metrics['loss_seconds']:.1f} s" in evaluated.output
    assert f"ROUGE {metrics['scoring_seconds']:.1f} s, total {metrics['total_seconds']:.1f} s" in evaluated.output
    assert 0 < metrics["scoring_seconds"] < metrics["total_seconds"]


def test_compiled_kernels_are_cached_in_the_users_cache_directory(monkeypatch, tmp_path):
    import os

    from phi2cli.kernels.compiled import use_compile_cache

    monkeypatch.setattr(os, "environ", {**os.environ})  # what the function sets goes when the test ends
    for name in ("PHI2_CACHE_DIR", "TORCHINDUCTOR_CACHE_DIR", "TRITON_CACHE_DIR"):
        os.environ.pop(name, None)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert use_compile_cache() == tmp_path / "xdg" / "phi2cli"
    assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == str(tmp_path / "xdg" / "phi2cli" / "inductor")
    assert os.environ["TRITON_CACHE_DIR"] == str(tmp_path / "xdg" / "phi2cli" / "triton")
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "mine"))
    monkeypatch.setenv("PHI2_CACHE_DIR", str(tmp_path / "phi2"))
    assert use_compile_cache() == tmp_path / "phi2"
    assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == str(tmp_path / "mine")  # the user's own setting wins
