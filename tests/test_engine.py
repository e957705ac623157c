"""The QLoRA engine on CPU with a tiny random Phi model, phi-2's real tokenizer and real XSUM rows."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import TrainerCallback
from typer.testing import CliRunner

from phi2cli.cli import app
from phi2cli.config import Phi2Config, apply_overrides
from phi2cli.training.engine import train
from phi2cli.errors import DeviceError, RunError

runner = CliRunner()


def tiny_config(model_dir: Path, data_dir: Path, **overrides) -> Phi2Config:
    values = {
        "model.model": str(model_dir), "data.data_dir": str(data_dir), "data.samples": 16,
        "data.val_samples": 8, "data.max_length": 192, "train.max_steps": 4, "train.eval_every": 2,
        "train.logging_steps": 1, "train.warmup_steps": 0,
    }  # fmt: skip
    values.update(overrides)
    return apply_overrides(Phi2Config(), values).validate()


class Grab(TrainerCallback):
    """Keeps the trained model and stops early at a given step when asked."""

    def __init__(self, stop_at: int | None = None) -> None:
        self.model = None
        self.stop_at = stop_at

    def on_step_end(self, args, state, control, **kwargs):
        if self.stop_at is not None and state.global_step == self.stop_at:
            control.should_save = True
            control.should_training_stop = True

    def on_train_end(self, args, state, control, model=None, **kwargs):
        self.model = model


def train_losses(output_dir: Path) -> dict[int, float]:
    newest = sorted(output_dir.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))[-1]
    history = json.loads((newest / "trainer_state.json").read_text())["log_history"]
    return {e["step"]: e["loss"] for e in history if "loss" in e}


def test_short_run_writes_the_documented_files(tiny_phi_dir, sample_data_dir):
    result = runner.invoke(app, ["train", "--model", str(tiny_phi_dir), "--data-dir", str(sample_data_dir),
                                 "--samples", "16", "--val-samples", "8", "--max-steps", "4", "--eval-every", "2",
                                 "--max-length", "192"], env={"COLUMNS": "200"})  # fmt: skip
    assert result.exit_code == 0, result.output
    out, final = Path("phi2-xsum-finetuned"), Path("phi2-xsum-final")
    assert sorted(p.name for p in out.iterdir()) == ["checkpoint-2", "checkpoint-4", "phi2_run.json", "prepared"]
    for checkpoint in ("checkpoint-2", "checkpoint-4"):
        names = {p.name for p in (out / checkpoint).iterdir()}
        assert {"adapter_config.json", "adapter_model.safetensors", "optimizer.pt", "scheduler.pt",
                "rng_state.pth", "trainer_state.json"} <= names  # fmt: skip
    assert {"adapter_config.json", "adapter_model.safetensors", "phi2_run.json", "tokenizer.json",
            "tokenizer_config.json"} <= {p.name for p in final.iterdir()}  # fmt: skip
    run = json.loads((final / "phi2_run.json").read_text())
    assert run["config"]["model"]["model"] == str(tiny_phi_dir)
    # a tiny model gets the small row of the size recipes: LoRA on every linear layer
    assert run["config"]["lora"] == {"r": 32, "alpha": 64, "dropout": 0.05, "targets": ["all-linear"]}
    assert run["recipe"]["row"].startswith("small") and "recipe: small" in result.output
    assert run["plan"]["micro_batch"] * run["plan"]["grad_accum"] == 8
    assert run["config"]["model"]["quantization"] == "none"  # the small row keeps a small base as loaded
    assert "no CUDA GPU" not in result.output  # nothing was asked of a GPU
    assert "Adapter saved to phi2-xsum-final after 4 steps" in result.output
    # plain peft loads the final adapter
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    tuned = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(str(tiny_phi_dir)), str(final))
    assert sum("lora_A" in n for n, _ in tuned.named_parameters()) == 2 * 6  # 2 layers x q, k, v, dense, fc1, fc2


def test_lora_weights_change_and_base_weights_do_not(tiny_phi_dir, sample_data_dir):
    original = load_file(str(tiny_phi_dir / "model.safetensors"))
    grab = Grab()
    train(tiny_config(tiny_phi_dir, sample_data_dir, **{"train.learning_rate": 1e-2}), callbacks=[grab])
    trained = {n: p.detach().cpu() for n, p in grab.model.named_parameters()}
    base = {n.replace("base_model.model.", "").replace(".base_layer", ""): p for n, p in trained.items()
            if "lora_" not in n}  # fmt: skip
    assert set(base) == set(original)
    for name, tensor in original.items():
        assert torch.equal(base[name], tensor), f"base weight {name} changed"
    lora_b = [p for n, p in trained.items() if "lora_B" in n]
    assert lora_b and all(p.abs().sum() > 0 for p in lora_b)  # B starts at zero: it moved
    assert all(not p.requires_grad for n, p in grab.model.named_parameters() if "lora_" not in n)


def test_loss_is_finite_and_falls_on_a_repeated_batch(tiny_phi_dir, sample_data_dir):
    config = tiny_config(tiny_phi_dir, sample_data_dir, **{
        "data.samples": 8, "data.val_samples": 0, "train.max_steps": 12, "train.learning_rate": 1e-2,
        "lora.dropout": 0.0})  # fmt: skip
    train(config)
    losses = train_losses(Path(config.train.output_dir))
    assert all(math.isfinite(v) for v in losses.values())
    steps = sorted(losses)
    assert all(losses[a] > losses[b] for a, b in zip(steps, steps[1:])), losses  # falls at every step
    assert losses[12] < losses[1] - 0.15, losses


def test_best_checkpoint_has_the_lowest_eval_loss_and_is_the_final_adapter(tiny_phi_dir, sample_data_dir):
    config = tiny_config(tiny_phi_dir, sample_data_dir, **{"train.max_steps": 6, "train.learning_rate": 3e-2})
    result = train(config)
    state = json.loads((Path(config.train.output_dir) / "checkpoint-6" / "trainer_state.json").read_text())
    evals = {e["step"]: e["eval_loss"] for e in state["log_history"] if "eval_loss" in e}
    assert set(evals) == {2, 4, 6}
    best_step = min(evals, key=evals.get)
    assert result.best_checkpoint.endswith(f"checkpoint-{best_step}")
    assert result.best_metric == pytest.approx(evals[best_step])
    best = load_file(str(Path(result.best_checkpoint) / "adapter_model.safetensors"))
    final = load_file(str(result.final_dir / "adapter_model.safetensors"))
    assert best.keys() == final.keys() and all(torch.equal(best[k], final[k]) for k in best)


def test_resume_logs_the_same_losses_as_an_uninterrupted_run(tiny_phi_dir, sample_data_dir, tmp_path):
    common = {"train.max_steps": 6, "train.eval_every": 3, "train.learning_rate": 1e-2}
    full = tiny_config(tiny_phi_dir, sample_data_dir, **common, **{"train.output_dir": str(tmp_path / "full"),
                                                                   "train.final_dir": str(tmp_path / "full-final")})
    train(full)
    split = tiny_config(tiny_phi_dir, sample_data_dir, **common, **{"train.output_dir": str(tmp_path / "split"),
                                                                    "train.final_dir": str(tmp_path / "split-final")})
    train(split, callbacks=[Grab(stop_at=3)])
    assert sorted(p.name for p in (tmp_path / "split").glob("checkpoint-*")) == ["checkpoint-3"]
    train(split, resume=True)
    uninterrupted, resumed = train_losses(tmp_path / "full"), train_losses(tmp_path / "split")
    assert sorted(resumed) == [1, 2, 3, 4, 5, 6]
    for step in range(1, 7):  # tolerance: float32 CPU math, same order of operations
        assert resumed[step] == pytest.approx(uninterrupted[step], abs=1e-5), step


def test_existing_run_is_never_overwritten_silently(tiny_phi_dir, sample_data_dir):
    config = tiny_config(tiny_phi_dir, sample_data_dir, **{"train.max_steps": 2})
    train(config)
    marker = Path(config.train.output_dir) / "checkpoint-2" / "adapter_model.safetensors"
    before = marker.read_bytes()
    with pytest.raises(RunError, match="already holds a run; pass --resume .* or --overwrite"):
        train(config)
    assert marker.read_bytes() == before
    result = runner.invoke(app, ["train", "--model", str(tiny_phi_dir), "--data-dir", str(sample_data_dir)])
    assert result.exit_code == 1 and "already holds a run" in result.output
    train(config, overwrite=True)
    assert marker.exists()


def test_no_compile_flag_is_recorded_with_the_engine_plan(tiny_phi_dir, sample_data_dir, tmp_path):
    args = ["train", "--model", str(tiny_phi_dir), "--data-dir", str(sample_data_dir), "--samples", "8",
            "--val-samples", "0", "--max-steps", "1", "--max-length", "128", "--no-compile",
            "--output-dir", str(tmp_path / "run"), "--final-dir", str(tmp_path / "final")]  # fmt: skip
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    run = json.loads((tmp_path / "final" / "phi2_run.json").read_text())
    assert run["config"]["train"]["compile"] is False and Phi2Config().train.compile is True
    plan = run["plan"]
    assert plan["profile"] == "speed" and not plan["compile"]
    assert plan["fused_kernels"]
    assert set(run["fast_paths"]) == {"dequantized_base", "varlen_attention", "lean_lora", "tanh_gelu", "compile", "torch_nf4",
                                      "flat_optimizer", "cuda_graphs"}  # uncompiled layers get no extra path


def test_resume_with_nothing_written_yet_starts_from_step_zero_with_a_note(tiny_phi_dir, sample_data_dir, tmp_path):
    """A run killed before it wrote anything (or never started): --resume trains from step 0 and says so."""
    config = tiny_config(tiny_phi_dir, sample_data_dir, **{"train.max_steps": 1, "train.output_dir": str(tmp_path / "run"),
                                                            "train.final_dir": str(tmp_path / "final")})  # fmt: skip
    result = train(config, resume=True)
    assert result.global_step == 1 and (tmp_path / "final" / "adapter_config.json").is_file()
    assert result.notes[0] == f"nothing to resume in {tmp_path / 'run'} yet: training starts from step 0"


def test_resume_of_a_finished_adapter_without_checkpoints_is_refused(tiny_phi_dir, sample_data_dir, tmp_path):
    (tmp_path / "run").mkdir()
    (tmp_path / "final").mkdir()
    (tmp_path / "final" / "adapter_config.json").write_text("{}")
    config = tiny_config(tiny_phi_dir, sample_data_dir, **{"train.output_dir": str(tmp_path / "run"),
                                                            "train.final_dir": str(tmp_path / "final")})  # fmt: skip
    with pytest.raises(RunError, match="nothing to resume"):
        train(config, resume=True)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only refusal")
def test_explicit_4bit_without_cuda_says_why(tiny_phi_dir, sample_data_dir):
    with pytest.raises(DeviceError, match="needs a CUDA GPU"):
        train(tiny_config(tiny_phi_dir, sample_data_dir, **{"model.quantization": "4bit"}))
    result = runner.invoke(app, ["train", "--model", str(tiny_phi_dir), "--data-dir", str(sample_data_dir),
                                 "--quantization", "4bit"])  # fmt: skip
    assert result.exit_code == 1 and "--quantization 4bit needs a CUDA GPU" in result.output


def test_reference_profile_pads_dynamically_and_matches_the_fast_loss(tiny_phi_dir, sample_data_dir, tmp_path):
    """Same data, same seed: the padded reference path and the packed fast path learn the same."""
    losses = {}
    for profile in ("reference", "speed"):
        config = tiny_config(tiny_phi_dir, sample_data_dir, **{
            "train.profile": profile, "train.max_steps": 3, "data.val_samples": 0, "lora.dropout": 0.0,
            "train.output_dir": str(tmp_path / profile), "train.final_dir": str(tmp_path / f"{profile}-final")})
        result = train(config)
        assert result.plan.profile == profile
        assert (result.plan.micro_batch, result.plan.grad_accum) == ((1, 8) if profile == "reference" else (8, 1))
        losses[profile] = train_losses(tmp_path / profile)
    for step in (1, 2, 3):
        assert losses["speed"][step] == pytest.approx(losses["reference"][step], rel=1e-4), step


def test_progress_shows_what_it_waits_for_until_the_first_step():
    import io
    from types import SimpleNamespace

    from rich.console import Console

    from phi2cli.training.engine import COMPILE_NOTE
    from phi2cli.training.trainer import ProgressCallback
    from phi2cli.cli.ui import TrainingDisplay

    def render(events):
        out = io.StringIO()
        display = TrainingDisplay(Console(file=out, width=250, force_terminal=False))
        with display:
            callback = ProgressCallback(display.update, lambda: 4000, waiting=COMPILE_NOTE)
            callback.on_train_begin(None, SimpleNamespace(global_step=0, max_steps=10), None)
            for step in events:
                callback.on_step_end(None, SimpleNamespace(global_step=step, max_steps=10, epoch=0.1), None)
        return out.getvalue()

    assert "compiling the decoder layers" in render([])
    after = render([1])
    assert "compiling" not in after and "tok/s" in after and "1/10" in after


def test_flat_8bit_optimizer_trains_and_resumes_exactly_like_bitsandbytes_per_tensor(
        tiny_phi_dir, sample_data_dir, tmp_path, monkeypatch):  # fmt: skip
    """The flat optimizer inside the real Trainer (bitsandbytes' 8-bit AdamW runs on CPU too):
    the same losses as bitsandbytes updating tensor by tensor, and a resumed run continues exactly
    (the checkpoint holds the learning rate of the next step, and the loaded weights are updated)."""
    pytest.importorskip("bitsandbytes")
    import dataclasses

    from phi2cli.training import engine
    from phi2cli.kernels.optim import FlatAdamW8bit

    seen = []

    class Optimizer(TrainerCallback):
        def on_train_begin(self, args, state, control, optimizer=None, **kwargs):
            seen.append(type(getattr(optimizer, "optimizer", optimizer)))

    def run(name, flat, **kw):
        original = engine.resolve_plan
        monkeypatch.setattr(engine, "resolve_plan", lambda *a, **k: dataclasses.replace(
            original(*a, **k), optimizer="adamw_8bit", flat_optimizer=flat))  # fmt: skip
        config = tiny_config(tiny_phi_dir, sample_data_dir, **{
            "train.max_steps": 6, "train.eval_every": 3, "train.learning_rate": 1e-2, "lora.r": 64,
            "lora.dropout": 0.0, "train.output_dir": str(tmp_path / name),
            "train.final_dir": str(tmp_path / f"{name}-final")})  # fmt: skip  (r 64: 4,096-element LoRA matrices, 8-bit state)
        train(config, callbacks=[Optimizer(), *kw.pop("callbacks", [])], **kw)
        monkeypatch.setattr(engine, "resolve_plan", original)
        return config

    run("per-tensor", flat=False)
    run("flat", flat=True)
    split = run("split", flat=True, callbacks=[Grab(stop_at=3)])
    assert FlatAdamW8bit not in seen[:1] and seen[1:] == [FlatAdamW8bit, FlatAdamW8bit]
    recorded = json.loads((tmp_path / "flat-final" / "phi2_run.json").read_text())["fast_paths"]
    assert recorded["flat_optimizer"]["status"] == "active", recorded  # not hidden by accelerate's wrapper
    monkeypatch.setattr(engine, "resolve_plan", lambda *a, **k: dataclasses.replace(
        engine_plan(*a, **k), optimizer="adamw_8bit", flat_optimizer=True))  # fmt: skip
    train(split, resume=True)
    per_tensor, flat, resumed = (train_losses(tmp_path / n) for n in ("per-tensor", "flat", "split"))
    assert sorted(flat) == sorted(resumed) == [1, 2, 3, 4, 5, 6]
    for step in flat:
        assert flat[step] == pytest.approx(per_tensor[step], abs=1e-5), step
        assert resumed[step] == pytest.approx(flat[step], abs=1e-5), step
    assert flat[6] < flat[1]  # it learns


def engine_plan(*args, **kwargs):
    from phi2cli.training.plan import resolve_plan

    return resolve_plan(*args, **kwargs)


def test_memory_saver_learns_exactly_what_speed_learns(tiny_phi_dir, sample_data_dir, tmp_path):
    """Same data and seed: gradient checkpointing (memory-saver) recomputes the same forward,
    dropout masks included, so both profiles log the same losses on a CPU (fp32)."""
    losses = {}
    for profile in ("speed", "memory-saver"):
        config = tiny_config(tiny_phi_dir, sample_data_dir, **{
            "train.profile": profile, "train.max_steps": 4, "train.learning_rate": 1e-2,
            "train.output_dir": str(tmp_path / profile), "train.final_dir": str(tmp_path / f"{profile}-final")})  # fmt: skip
        result = train(config)
        assert result.plan.profile == profile and result.plan.gradient_checkpointing == (profile == "memory-saver")
        losses[profile] = train_losses(tmp_path / profile)
    assert sorted(losses["speed"]) == [1, 2, 3, 4]
    for step, loss in losses["speed"].items():
        assert losses["memory-saver"][step] == pytest.approx(loss, abs=1e-5), step
