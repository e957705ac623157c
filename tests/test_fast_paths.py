"""Fast paths are loud and recorded: a forced compile error is reported, recorded and run eagerly."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import torch
from typer.testing import CliRunner

from phi2cli.cli import app
from phi2cli.kernels.compiled import compile_layers
from phi2cli.kernels.fast_paths import FastPaths

runner = CliRunner()


class ForcedCompileError(torch._dynamo.exc.TorchDynamoException):
    pass


def failing_compile(function, **kwargs):
    def compiled(*args, **kw):
        raise ForcedCompileError("backend exploded on purpose")

    return compiled


def test_a_layer_that_cannot_compile_runs_eagerly_and_is_recorded(tiny_phi_dir, monkeypatch):
    from transformers import AutoModelForCausalLM

    monkeypatch.setattr(torch, "compile", failing_compile)
    model = AutoModelForCausalLM.from_pretrained(str(tiny_phi_dir)).eval()
    ids = torch.tensor([[5, 6, 7, 8]])
    with torch.no_grad():
        eager = model(input_ids=ids).logits
    failures = []
    assert compile_layers(model, ("PhiDecoderLayer",), failures.append) == 2
    with torch.no_grad():
        guarded = model(input_ids=ids).logits
        model(input_ids=ids)
    torch.testing.assert_close(guarded, eager)
    assert len(failures) == 1 and isinstance(failures[0], ForcedCompileError)  # reported once, not per layer


def test_compiled_layers_draw_dropout_through_torchs_kernels(tiny_phi_dir, monkeypatch):
    """Inductor's own random numbers made SmolLM2's compiled steps 8% slower (kernels/compiled.py)."""
    from transformers import AutoModelForCausalLM

    calls = []
    monkeypatch.setattr(torch, "compile", lambda function, **kw: calls.append(kw) or function)
    model = AutoModelForCausalLM.from_pretrained(str(tiny_phi_dir))
    assert compile_layers(model, ("PhiDecoderLayer",), lambda error: None) == 2
    assert [kw["options"] for kw in calls] == [{"fallback_random": True}] * 2


def test_an_error_of_the_model_itself_is_not_swallowed(tiny_phi_dir, monkeypatch):
    from transformers import AutoModelForCausalLM

    monkeypatch.setattr(torch, "compile", lambda function, **kw: function)
    model = AutoModelForCausalLM.from_pretrained(str(tiny_phi_dir))
    compile_layers(model, ("PhiDecoderLayer",), lambda error: None)
    try:
        model(input_ids=torch.tensor([[60000]]))  # outside the vocabulary: a real error, raised as is
    except IndexError:
        pass
    else:
        raise AssertionError("an out-of-vocabulary id must raise")


def test_fast_paths_record_and_notes():
    paths = FastPaths()
    paths.active("lean_lora", "8 layers")
    paths.fell_back("compile", "ForcedCompileError: no")
    paths.off("compile", "ignored: already recorded")
    paths.off("cuda_graphs", "no CUDA GPU")
    assert paths.to_dict() == {"lean_lora": {"status": "active", "detail": "8 layers"},
                               "compile": {"status": "fell back", "reason": "ForcedCompileError: no"},
                               "cuda_graphs": {"status": "off", "reason": "no CUDA GPU"}}  # fmt: skip
    assert paths.fallback_notes() == ["fast path 'compile' fell back: ForcedCompileError: no"]


def test_train_reports_and_records_a_forced_compile_error(tiny_phi_dir, sample_data_dir, monkeypatch):
    from phi2cli.training import engine

    resolve = engine.resolve_plan
    monkeypatch.setattr(engine, "resolve_plan", lambda *a, **kw: dataclasses.replace(resolve(*a, **kw), compile=True))
    monkeypatch.setattr(torch, "compile", failing_compile)
    result = runner.invoke(app, ["train", "--model", str(tiny_phi_dir), "--data-dir", str(sample_data_dir),
                                 "--samples", "8", "--val-samples", "4", "--max-steps", "1", "--eval-every", "1",
                                 "--max-length", "128"], env={"COLUMNS": "300"})  # fmt: skip
    assert result.exit_code == 0, result.output
    line = "fast path 'compile' fell back: ForcedCompileError: backend exploded on purpose; the decoder layers run eagerly"
    assert result.output.count(line) == 1, result.output
    run = json.loads(Path("phi2-xsum-final/phi2_run.json").read_text())
    assert run["fast_paths"]["compile"] == {"status": "fell back", "reason": line.split("fell back: ")[1]}
    assert run["fast_paths"]["lean_lora"]["status"] == "active"
    assert run["fast_paths"]["cuda_graphs"]["status"] == "off"
