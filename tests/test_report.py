"""`phi2 report`: the reference run reproduced exactly in every format, real Trainer output, bad input."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from phi2cli.cli import app
from phi2cli.report.summary import fmt_sci, load_trainer_state, render_report, summarize_run

FIXTURE = Path(__file__).parent / "fixtures" / "trainer_state_reference.json"
ROOT = Path(__file__).resolve().parents[1]
runner = CliRunner()

# The reference run as rendered: (step, training loss, learning rate, grad norm, epoch).
REFERENCE_ROWS = [("100", "2.3373", "1.96e-4", "0.616", "0.16"), ("500", "2.2102", "2.28e-5", "0.276", "0.80")]


def run(*args: str):
    result = runner.invoke(app, ["report", *args], env={"COLUMNS": "200"})
    return result, result.output


def reference() -> dict:
    return json.loads(FIXTURE.read_text(encoding="utf-8"))


def write_state(folder: Path, log_history: list, **fields) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    state = {"global_step": max([e.get("step", 0) for e in log_history] + [0]), "max_steps": 10,
             "logging_steps": 2, "log_history": log_history, **fields}  # fmt: skip
    (folder / "trainer_state.json").write_text(json.dumps(state), encoding="utf-8")
    return folder


def train_entry(step: int, loss: float, **extra) -> dict:
    return {"step": step, "loss": loss, "learning_rate": 1e-4 / step, "grad_norm": 0.5, "epoch": step / 10, **extra}


def report_json(path: Path, *args: str) -> dict:
    result, out = run(str(path), "--format", "json", *args)
    assert result.exit_code == 0, out
    return json.loads(result.stdout)


# ------------------------------------------------------------------ the reference run, every format


def test_table_shows_reference_values():
    result, out = run(str(FIXTURE), "--no-chart")
    assert result.exit_code == 0, out
    lines = out.splitlines()
    for row in REFERENCE_ROWS:  # each reference row on one table line, in column order
        assert any(all(cell in line for cell in row) and line.index(row[1]) < line.index(row[2]) for line in lines), row
    assert "2.1183" in out and "./phi2-xsum-finetuned/checkpoint-500" in out
    assert "500 of 625" in out and "3.24e16" in out and "1h 29m 59s" in out
    assert "-0.1271" in out and "-5.44%" in out and "0.276 – 0.616" in out
    assert "▁" not in out  # --no-chart


def test_markdown_reproduces_reference_layout():
    result, out = run(str(FIXTURE), "--format", "markdown")
    assert result.exit_code == 0, out
    lines = out.splitlines()
    header = lines.index("| Step | Training Loss | Learning Rate | Grad Norm | Epoch |")
    assert lines[header + 1] == "|---|---|---|---|---|"
    assert lines[header + 2] == "| 100 | 2.3373 | 1.96e-4 | 0.616 | 0.16 |"
    assert lines[header + 6] == "| 500 | 2.2102 | 2.28e-5 | 0.276 | 0.80 |"
    assert "| 500 | 2.1183 | 151.4 | 3.303 | 0.413 |" in lines
    assert "| Checkpoint | ./phi2-xsum-finetuned/checkpoint-500 |" in lines
    assert "| Train loss change | 2.3373 → 2.2102 (-0.1271, -5.44%) |" in lines
    assert "| Train–eval gap at step 500 | -0.0919 (eval 2.1183 − train 2.2102) |" in lines


def test_json_carries_raw_numbers_that_round_trip():
    data = report_json(FIXTURE)
    raw = [e for e in reference()["log_history"] if "loss" in e]
    assert [r["step"] for r in data["rows"]] == [100, 200, 300, 400, 500]
    for row, entry in zip(data["rows"], raw):
        assert row == entry  # exact floats, no strings, no rounding
    first, last = data["rows"][0], data["rows"][-1]
    assert (first["loss"], first["epoch"], last["loss"], last["epoch"]) == (2.3373, 0.16, 2.2102, 0.8)
    assert first["learning_rate"] == pytest.approx(1.96e-4, rel=3e-3) and fmt_sci(first["learning_rate"]) == "1.96e-4"
    assert last["learning_rate"] == pytest.approx(2.28e-5, rel=3e-3) and fmt_sci(last["learning_rate"]) == "2.28e-5"
    assert first["grad_norm"] == pytest.approx(0.616, abs=5e-4) and last["grad_norm"] == pytest.approx(0.276, abs=5e-4)
    assert data["evals"] == [{"step": 500, "epoch": 0.8, "eval_loss": 2.1183, "eval_runtime": 151.3842,
                              "eval_samples_per_second": 3.303, "eval_steps_per_second": 0.413}]  # fmt: skip
    assert data["best"] == {"checkpoint": "./phi2-xsum-finetuned/checkpoint-500", "metric": 2.1183, "step": 500}
    assert data["totals"]["global_step"] == 500 and data["totals"]["max_steps"] == 625
    assert data["totals"]["total_flos"] == 3.2418369183744e16 and data["totals"]["train_loss"] == 2.2716204376220703


def test_analysis_numbers():
    analysis = summarize_run(reference()).analysis
    assert analysis.loss_change == pytest.approx(-0.1271) and round(analysis.loss_change_pct, 2) == -5.44
    assert (analysis.grad_norm_min, analysis.grad_norm_max) == (0.27633512020111084, 0.6160731315612793)
    assert analysis.lr_decay_pct == pytest.approx((1 - 2.277483070847175e-05 / 0.000196437698012483) * 100)
    assert round(analysis.lr_decay_pct, 1) == 88.4
    assert analysis.gap_step == 500 and analysis.train_eval_gap == pytest.approx(2.1183 - 2.2102)


def test_html_is_a_standalone_escaped_page():
    state = reference()
    state["best_model_checkpoint"] = "./runs/<script>alert(1)</script>/checkpoint-500"
    text = render_report(summarize_run(state, "a&b/trainer_state.json"), "html")
    assert text.startswith("<!DOCTYPE html>") and text.rstrip().endswith("</html>")
    assert "<script>" not in text and "&lt;script&gt;alert(1)&lt;/script&gt;" in text and "a&amp;b" in text
    assert "<td>100</td><td>2.3373</td><td>1.96e-4</td><td>0.616</td><td>0.16</td>" in text
    assert "<td>500</td><td>2.2102</td><td>2.28e-5</td><td>0.276</td><td>0.80</td>" in text


def test_number_format_rule():
    assert [fmt_sci(v) for v in (0.000196, 2.28e-5, 2e-4, 3.2418e16, 0.0, None)] == \
        ["1.96e-4", "2.28e-5", "2.00e-4", "3.24e16", "0", "—"]  # fmt: skip


def test_every_thins_the_table_but_not_the_analysis():
    result, out = run(str(FIXTURE), "--format", "markdown", "--every", "200")
    assert result.exit_code == 0, out
    lines = out.splitlines()
    start = lines.index("| Step | Training Loss | Learning Rate | Grad Norm | Epoch |") + 2
    table = lines[start:lines.index("", start)]
    assert table == ["| 200 | 2.2841 | 1.69e-4 | 0.442 | 0.32 |", "| 400 | 2.2487 | 6.70e-5 | 0.310 | 0.64 |"]
    assert "(-0.1271, -5.44%)" in out  # first→last still steps 100→500
    assert [r["step"] for r in report_json(FIXTURE, "--every", "200")["rows"]] == [200, 400]
    result, out = run(str(FIXTURE), "--every", "0")
    assert result.exit_code == 2 and "--every" in out


def test_plot_writes_a_readable_png(tmp_path):
    from matplotlib.image import imread

    target = tmp_path / "plots" / "loss.png"
    result, out = run(str(FIXTURE), "--plot", str(target))
    assert result.exit_code == 0, out
    assert target.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    image = imread(target)
    assert image.shape[0] > 100 and image.shape[1] > 100
    assert "▁" not in result.stdout and f"Wrote {target}" in result.stderr.replace("\n", "")
    result, out = run(str(FIXTURE), "--plot", "loss.xyz")
    assert result.exit_code == 2 and "cannot write a .xyz plot" in out


def test_terminal_chart_under_the_table():
    result, out = run(str(FIXTURE))
    assert result.exit_code == 0, out
    chart = out[out.index("Loss over steps 100–500"):].splitlines()
    assert chart[1].split() == ["train", "█▇▇▅▄", "2.3373", "→", "2.2102"]
    assert chart[2].split() == ["eval", "▁", "2.1183"]
    assert chart[3].split() == ["lr", "█▇▅▃▁", "1.96e-4", "→", "2.28e-5"]


def test_output_file_and_format_choices(tmp_path):
    result, out = run(str(FIXTURE), "--format", "markdown", "--output", str(tmp_path / "r.md"))
    assert result.exit_code == 0 and result.stdout == ""
    assert "| 100 | 2.3373 | 1.96e-4 | 0.616 | 0.16 |" in (tmp_path / "r.md").read_text(encoding="utf-8")
    result, out = run(str(FIXTURE), "--format", "pdf")
    assert result.exit_code == 2 and "pdf" in out


def test_help_documents_every_option():
    result = runner.invoke(app, ["report", "--help"], env={"COLUMNS": "200"})
    assert result.exit_code == 0
    for text in ("--format", "--every", "--plot", "--no-chart", "--output", "multiples of N", "Report a training run"):
        assert text in result.output


# ------------------------------------------------------------------ which trainer_state.json is read


def test_default_run_uses_newest_checkpoint_numerically(isolated_env):
    run_dir = isolated_env / "phi2-xsum-finetuned"
    write_state(run_dir / "checkpoint-9", [train_entry(9, 1.9)])
    write_state(run_dir / "checkpoint-10", [train_entry(10, 1.5)])
    (run_dir / "checkpoint-11").mkdir()  # a checkpoint being written: no state yet
    state, path = load_trainer_state()
    assert path == Path("phi2-xsum-finetuned/checkpoint-10/trainer_state.json")
    assert report_json(run_dir)["rows"][0]["loss"] == 1.5


def test_top_level_state_preferred_unless_a_checkpoint_is_newer(tmp_path):
    run_dir = write_state(tmp_path / "run", [train_entry(6, 1.2)])
    write_state(run_dir / "checkpoint-4", [train_entry(4, 1.4)])
    assert load_trainer_state(run_dir)[1] == run_dir / "trainer_state.json"
    write_state(run_dir / "checkpoint-8", [train_entry(8, 1.1)])  # resumed after the last save_state()
    assert load_trainer_state(run_dir)[1] == run_dir / "checkpoint-8" / "trainer_state.json"
    assert load_trainer_state(run_dir / "checkpoint-4")[1] == run_dir / "checkpoint-4" / "trainer_state.json"


# ------------------------------------------------------------------ what real files contain


def test_extra_keys_and_missing_grad_norm(tmp_path):
    log = [{"step": 2, "loss": 2.5, "learning_rate": 1e-4, "epoch": 0.1, "mean_token_accuracy": 0.41,
            "num_tokens": 512},
           {"step": 4, "loss": 2.25, "learning_rate": 5e-5, "grad_norm": float("nan"), "epoch": 0.2, "entropy": 1.9},
           {"step": 4, "eval_loss": 2.4, "eval_mean_token_accuracy": 0.45, "eval_runtime": 1.5}]  # fmt: skip
    run_dir = write_state(tmp_path / "trl", log, trial_params={"unknown": [1, 2]})
    result, out = run(str(run_dir), "--format", "markdown")
    assert result.exit_code == 0, out
    assert "| 2 | 2.5000 | 1.00e-4 | — | 0.10 |" in out and "| 4 | 2.2500 | 5.00e-5 | nan | 0.20 |" in out
    assert "| Step | Eval Loss | Runtime (s) | Samples/s | mean_token_accuracy |" in out
    assert "| 4 | 2.4000 | 1.5 | — | 0.4500 |" in out
    data = report_json(run_dir)  # valid JSON: NaN becomes null, extra keys kept as numbers
    assert data["rows"][0]["mean_token_accuracy"] == 0.41 and data["rows"][0]["num_tokens"] == 512
    assert data["rows"][0]["grad_norm"] is None and data["rows"][1]["grad_norm"] is None
    assert data["analysis"]["grad_norm_min"] is None


def test_resumed_run_keeps_last_entry_per_step_sorted(tmp_path):
    log = [train_entry(2, 3.0), train_entry(4, 2.8), {"step": 4, "eval_loss": 2.9},
           train_entry(4, 2.7), {"step": 4, "eval_loss": 2.85}, train_entry(6, 2.5), train_entry(3, 2.9)]  # fmt: skip
    data = report_json(write_state(tmp_path / "resumed", log))
    assert [(r["step"], r["loss"]) for r in data["rows"]] == [(2, 3.0), (3, 2.9), (4, 2.7), (6, 2.5)]
    assert [(e["step"], e["eval_loss"]) for e in data["evals"]] == [(4, 2.85)]
    assert data["analysis"]["train_eval_gap"] == pytest.approx(2.85 - 2.7)  # no best checkpoint: lowest eval


def test_eval_only_history(tmp_path):
    log = [{"step": 5, "eval_loss": 2.2, "epoch": 0.5}, {"step": 10, "eval_loss": 2.1, "epoch": 1.0}]
    result, out = run(str(write_state(tmp_path / "evals", log)))
    assert result.exit_code == 0, out
    assert "Training Loss" not in out and "2.2000" in out and "2.1000" in out
    assert "evaluation entries only" in out


def test_train_only_history_has_no_eval_and_no_gap(tmp_path):
    run_dir = write_state(tmp_path / "train", [train_entry(2, 2.0), train_entry(4, 1.5)])
    result, out = run(str(run_dir))
    assert result.exit_code == 0, out
    assert "Eval Loss" not in out and "Train–eval gap" not in out and "did not evaluate" in out
    assert "2.0000 → 1.5000 (-0.5000, -25.00%)" in out
    assert report_json(run_dir)["best"] is None


def test_gap_uses_train_loss_nearest_before_best_step(tmp_path):
    log = [train_entry(2, 2.0), train_entry(4, 1.8), {"step": 5, "eval_loss": 1.9}, train_entry(6, 1.6)]
    run_dir = write_state(tmp_path / "gap", log, best_model_checkpoint="out/checkpoint-5", best_metric=1.9)
    analysis = report_json(run_dir)["analysis"]
    assert (analysis["gap_step"], analysis["gap_train_step"]) == (5, 4)
    assert analysis["train_eval_gap"] == pytest.approx(0.1)


def test_empty_log_history_says_so(tmp_path):
    result, out = run(str(write_state(tmp_path / "fresh", [])))
    assert result.exit_code == 0, out
    assert "log_history is empty: nothing logged yet (the Trainer logs every 2 steps)" in out
    result, out = run(str(tmp_path / "fresh"), "--plot", "x.png")
    assert result.exit_code == 1 and "nothing to plot" in out and not Path("x.png").exists()


# ------------------------------------------------------------------ metrics.json of `phi2 evaluate`


METRICS = {"model": "microsoft/phi-2", "adapter": "phi2-xsum-final", "split": "test", "samples": 200,
           "settings": {"num_beams": 1},
           "tuned": {"eval_loss": 2.1183, "perplexity": 8.317, "rouge1": 34.1234, "rouge2": 12.98},
           "base": {"eval_loss": 2.61, "rouge1": 21.0311, "rouge2": 5.81},
           "delta": {"eval_loss": -0.4917, "rouge1": 13.0923, "rouge2": 7.17}}  # fmt: skip


def test_rouge_table_from_final_dir_beside_default_run(isolated_env):
    write_state(isolated_env / "phi2-xsum-finetuned" / "checkpoint-4", [train_entry(4, 2.0)])
    (isolated_env / "phi2-xsum-final").mkdir()
    (isolated_env / "phi2-xsum-final" / "metrics.json").write_text(json.dumps(METRICS), encoding="utf-8")
    result, out = run("--format", "markdown")
    assert result.exit_code == 0, out
    assert "| Metric | Tuned | Base | Delta |" in out
    assert "| rouge1 | 34.12 | 21.03 | +13.09 |" in out and "| perplexity | 8.32 | — | — |" in out
    assert "| eval_loss | 2.1183 | 2.6100 | -0.4917 |" in out
    assert "samples: 200" in out


def test_report_shows_the_newest_evaluation_and_names_the_others(isolated_env):
    import os

    write_state(isolated_env / "phi2-xsum-finetuned" / "checkpoint-4", [train_entry(4, 2.0)])
    final = isolated_env / "phi2-xsum-final"
    final.mkdir()
    (final / "metrics-validation.json").write_text(json.dumps({**METRICS, "split": "validation"}), encoding="utf-8")
    (final / "metrics-test.json").write_text(json.dumps(METRICS), encoding="utf-8")
    os.utime(final / "metrics-validation.json", (1_000_000, 1_000_000))  # written long before the test run
    result, out = run("--format", "markdown")
    assert result.exit_code == 0, out
    assert "split: test" in out and "split: validation" not in out
    assert (f"also in {final.resolve()}: metrics-validation.json (this report shows the newest, metrics-test.json)"
            in out)  # fmt: skip


def test_rouge_table_lenient_and_unreadable_metrics_noted(tmp_path):
    run_dir = write_state(tmp_path / "run", [train_entry(2, 2.0)])
    (run_dir / "metrics.json").write_text(json.dumps({"tuned": {"rougeL": 0.28, "note": "x"}}), encoding="utf-8")
    result, out = run(str(run_dir))
    assert result.exit_code == 0 and "rougeL" in out and "0.2800" in out and "Base" not in out
    (run_dir / "metrics.json").write_text("{not json", encoding="utf-8")
    result, out = run(str(run_dir))
    assert result.exit_code == 0 and "is not readable JSON; ROUGE table skipped" in out


# ------------------------------------------------------------------ bad input: exit code 1 and a message


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda d: d / "nope", "does not exist; pass a run directory"),
        (lambda d: d, "no trainer_state.json in"),
        (lambda d: _file(d, ""), "is empty (was the run stopped while saving?)"),
        (lambda d: _file(d, "{'log_history': []"), "is not valid JSON (Expecting property name"),
        (lambda d: _file(d, '{"global_step": 3}'), "has no 'log_history' list"),
        (lambda d: _file(d, "[1, 2]"), "has no 'log_history' list"),
    ],
    ids=["missing", "no-state", "empty", "not-json", "no-log-history", "not-an-object"],
)
def test_bad_input_is_one_line_and_exit_1(tmp_path, make, message):
    result, out = run(str(make(tmp_path)))
    assert result.exit_code == 1
    assert message in out and out.startswith("Error: ") and len(out.strip().splitlines()) == 1


def test_no_default_run_says_what_to_do():
    result, out = run()
    assert result.exit_code == 1
    assert "no run found at ./phi2-xsum-finetuned; train one with 'phi2 train'" in out


def _file(folder: Path, text: str) -> Path:
    path = folder / "trainer_state.json"
    path.write_text(text, encoding="utf-8")
    return path


# ------------------------------------------------------------------ starts instantly: no torch


def test_report_imports_no_torch_or_transformers(tmp_path):
    """`python -m phi2cli report` in a fresh interpreter must not import torch or transformers."""
    result = subprocess.run([sys.executable, "-X", "importtime", "-m", "phi2cli", "report", str(FIXTURE),
                             "--format", "json", "--plot", str(tmp_path / "loss.png")],
                            capture_output=True, text=True, cwd=ROOT, timeout=60)  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    assert json.loads(result.stdout)["best"]["step"] == 500
    lines = [line for line in result.stderr.splitlines() if line.startswith("import time:")]
    imported = {line.rsplit("|", 1)[-1].strip() for line in lines}
    assert "phi2cli.report.summary" in imported and "matplotlib" in imported  # importtime saw the whole run
    heavy = sorted(m for m in imported if m.split(".")[0] in ("torch", "transformers"))
    assert heavy == []


# ------------------------------------------------------------------ a real Hugging Face Trainer run


def test_report_of_a_real_trainer_run(tmp_path):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")

    torch.manual_seed(0)
    config = transformers.PhiConfig(vocab_size=128, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                    num_attention_heads=2, max_position_embeddings=32)  # fmt: skip
    generator = torch.Generator().manual_seed(0)
    rows = []
    for _ in range(24):
        ids = torch.randint(0, 128, (16,), generator=generator)
        rows.append({"input_ids": ids, "labels": ids.clone()})
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path / "run"), max_steps=6, per_device_train_batch_size=2, per_device_eval_batch_size=4,
        learning_rate=1e-3, logging_steps=2, eval_strategy="steps", eval_steps=3, save_strategy="steps",
        save_steps=3, load_best_model_at_end=True, metric_for_best_model="eval_loss", report_to=[], use_cpu=True,
        disable_tqdm=True,
    )  # fmt: skip
    trainer = transformers.Trainer(model=transformers.PhiForCausalLM(config), args=args,
                                   train_dataset=rows, eval_dataset=rows[:8])  # fmt: skip
    trainer.train()

    state = json.loads((tmp_path / "run" / "checkpoint-6" / "trainer_state.json").read_text(encoding="utf-8"))
    train_log = [e for e in state["log_history"] if "loss" in e]
    eval_log = [e for e in state["log_history"] if "eval_loss" in e]
    assert [e["step"] for e in train_log] == [2, 4, 6] and [e["step"] for e in eval_log] == [3, 6]

    result, out = run(str(tmp_path / "run"), "--format", "markdown")  # no top-level state: newest checkpoint
    assert result.exit_code == 0, out
    assert "checkpoint-6/trainer_state.json" in out
    for entry in train_log:
        assert f"| {entry['step']} | {entry['loss']:.4f} | {fmt_sci(entry['learning_rate'])} |" in out
    for entry in eval_log:
        assert f"| {entry['step']} | {entry['eval_loss']:.4f} |" in out
    assert f"| Checkpoint | {state['best_model_checkpoint']} |" in out
    assert "| Steps | 6 of 6 |" in out

    data = report_json(tmp_path / "run" / "checkpoint-3")
    assert [r["step"] for r in data["rows"]] == [2] and data["evals"][0]["eval_loss"] == eval_log[0]["eval_loss"]
    assert math.isfinite(data["analysis"]["train_eval_gap"])
