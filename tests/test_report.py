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

# The published reference run: (step, training loss, learning rate, grad norm, epoch) ...
PUBLISHED = [(100, 2.3373, 1.96e-4, 0.616, 0.16), (200, 2.2274, 1.69e-4, 0.297, 0.32),
             (300, 2.2168, 1.21e-4, 0.244, 0.48), (400, 2.2066, 6.70e-5, 0.278, 0.64),
             (500, 2.2102, 2.28e-5, 0.276, 0.80)]  # fmt: skip
# ... and the same rows as every text format renders them.
REFERENCE_ROWS = [("100", "2.3373", "1.96e-4", "0.616", "0.16"), ("200", "2.2274", "1.69e-4", "0.297", "0.32"),
                  ("300", "2.2168", "1.21e-4", "0.244", "0.48"), ("400", "2.2066", "6.70e-5", "0.278", "0.64"),
                  ("500", "2.2102", "2.28e-5", "0.276", "0.80")]  # fmt: skip


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


def test_fixture_holds_the_published_run_and_nothing_else():
    state = reference()
    train = [(e["step"], e["loss"], e["learning_rate"], e["grad_norm"], e["epoch"])
             for e in state["log_history"] if "loss" in e]  # fmt: skip
    assert train == PUBLISHED
    assert [e for e in state["log_history"] if "loss" not in e] == \
        [{"epoch": 0.8, "eval_loss": 2.1183, "eval_runtime": 184, "step": 500}]  # fmt: skip
    assert (state["best_model_checkpoint"], state["best_metric"], state["global_step"]) == \
        ("./phi2-xsum-finetuned/checkpoint-500", 2.1183, 500)  # fmt: skip
    text = FIXTURE.read_text(encoding="utf-8")  # no runtime, rate or FLOPs the report does not publish
    for unpublished in ("train_runtime", "samples_per_second", "steps_per_second", "total_flos", "max_steps",
                        "train_loss"):  # fmt: skip
        assert unpublished not in text


def test_table_shows_reference_values():
    result, out = run(str(FIXTURE), "--no-chart")
    assert result.exit_code == 0, out
    lines = out.splitlines()
    for row in REFERENCE_ROWS:  # each reference row on one table line, in column order
        assert any(all(cell in line for cell in row) and line.index(row[1]) < line.index(row[2]) for line in lines), row
    assert "2.1183" in out and "./phi2-xsum-finetuned/checkpoint-500" in out
    assert "-0.1271" in out and "-5.44%" in out and "0.244 – 0.616" in out
    # what the report does not publish is left out, not shown as a dash or a made-up number
    assert "Train runtime" not in out and "Samples/s" not in out and "FLOPs" not in out and " of " not in out
    assert "—" not in out and "Run totals" in out and "│ Steps  │ 500" in out
    assert "▁" not in out  # --no-chart


def test_markdown_reproduces_reference_layout():
    result, out = run(str(FIXTURE), "--format", "markdown")
    assert result.exit_code == 0, out
    lines = out.splitlines()
    header = lines.index("| Step | Training Loss | Learning Rate | Grad Norm | Epoch |")
    assert lines[header + 1] == "|---|---|---|---|---|"
    assert lines[header + 2:header + 7] == ["| " + " | ".join(row) + " |" for row in REFERENCE_ROWS]
    assert lines[header + 7] == ""
    assert "| Step | Eval Loss | Runtime (s) |" in lines and "| 500 | 2.1183 | 184 |" in lines
    assert "| Grad norm range | 0.244 – 0.616 |" in lines
    assert "| Checkpoint | ./phi2-xsum-finetuned/checkpoint-500 |" in lines
    assert "| Train loss change | 2.3373 → 2.2102 (-0.1271, -5.44%) |" in lines
    assert "| Train–eval gap at step 500 | -0.0919 (eval 2.1183 − train 2.2102) |" in lines


def test_readme_example_is_the_real_output():
    import re

    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    block = re.search(r"`phi2 report --format markdown` on the published reference run.*?```\n(.+?)```", readme, re.S)
    result, out = run(str(FIXTURE), "--format", "markdown")
    assert result.exit_code == 0, out
    shown = [line for line in block.group(1).splitlines() if line]
    assert len(shown) == 16 and all(line in out.splitlines() for line in shown)


def test_json_carries_raw_numbers_that_round_trip():
    data = report_json(FIXTURE)
    raw = [e for e in reference()["log_history"] if "loss" in e]
    assert [r["step"] for r in data["rows"]] == [100, 200, 300, 400, 500]
    for row, entry in zip(data["rows"], raw):
        assert row == entry  # exact floats, no strings, no rounding
    assert [(r["step"], r["loss"], r["learning_rate"], r["grad_norm"], r["epoch"]) for r in data["rows"]] == PUBLISHED
    assert data["evals"] == [{"step": 500, "epoch": 0.8, "eval_loss": 2.1183, "eval_runtime": 184.0}]
    assert data["best"] == {"checkpoint": "./phi2-xsum-finetuned/checkpoint-500", "metric": 2.1183, "step": 500}
    assert data["totals"]["global_step"] == 500 and data["totals"]["epochs"] == 0.8
    assert all(data["totals"][k] is None for k in ("max_steps", "train_runtime", "total_flos", "train_loss"))
    assert data["run"] is None  # no phi2_run.json beside the fixture


def test_analysis_numbers():
    analysis = summarize_run(reference()).analysis
    assert analysis.loss_change == pytest.approx(-0.1271) and round(analysis.loss_change_pct, 2) == -5.44
    assert (analysis.grad_norm_min, analysis.grad_norm_max) == (0.244, 0.616)
    assert analysis.lr_decay_pct == pytest.approx((1 - 2.28e-5 / 1.96e-4) * 100)
    assert round(analysis.lr_decay_pct, 1) == 88.4
    assert analysis.gap_step == 500 and analysis.train_eval_gap == pytest.approx(2.1183 - 2.2102)


def test_html_is_a_standalone_escaped_page():
    state = reference()
    state["best_model_checkpoint"] = "./runs/<script>alert(1)</script>/checkpoint-500"
    text = render_report(summarize_run(state, "a&b/trainer_state.json"), "html")
    assert text.startswith("<!DOCTYPE html>") and text.rstrip().endswith("</html>")
    assert "<script>" not in text and "&lt;script&gt;alert(1)&lt;/script&gt;" in text and "a&amp;b" in text
    for row in REFERENCE_ROWS:
        assert "<tr>" + "".join(f"<td>{cell}</td>" for cell in row) + "</tr>" in text


def test_number_format_rule():
    assert [fmt_sci(v) for v in (0.000196, 2.28e-5, 2e-4, 3.2418e16, 0.0, None)] == \
        ["1.96e-4", "2.28e-5", "2.00e-4", "3.24e16", "0", "—"]  # fmt: skip


def test_every_thins_the_table_but_not_the_analysis():
    result, out = run(str(FIXTURE), "--format", "markdown", "--every", "200")
    assert result.exit_code == 0, out
    lines = out.splitlines()
    start = lines.index("| Step | Training Loss | Learning Rate | Grad Norm | Epoch |") + 2
    table = lines[start:lines.index("", start)]
    assert table == ["| 200 | 2.2274 | 1.69e-4 | 0.297 | 0.32 |", "| 400 | 2.2066 | 6.70e-5 | 0.278 | 0.64 |"]
    assert "(-0.1271, -5.44%)" in out  # first→last still steps 100→500
    assert [r["step"] for r in report_json(FIXTURE, "--every", "200")["rows"]] == [200, 400]
    result, out = run(str(FIXTURE), "--every", "0")
    assert result.exit_code == 2 and "--every" in out


def test_default_table_picks_about_ten_evenly_spaced_rows(tmp_path):
    # logging every 10 steps of a 630-step run: 63 rows, of which the table shows ten, first and last kept
    run_dir = write_state(tmp_path / "long", [train_entry(step, 3.0 - step / 1000) for step in range(10, 631, 10)])
    result, out = run(str(run_dir), "--format", "markdown")
    assert result.exit_code == 0, out
    lines = out.splitlines()
    start = lines.index("| Step | Training Loss | Learning Rate | Grad Norm | Epoch |") + 2
    steps = [int(line.split("|")[1]) for line in lines[start:lines.index("", start)]]
    assert steps == [10, 80, 150, 220, 290, 360, 430, 500, 570, 630]
    assert "_10 of 63 logged steps, evenly spaced; --every N shows multiples of N_" in lines
    assert "2.9900 → 2.3700" in out  # the analysis still reads every row
    assert [r["step"] for r in report_json(run_dir, "--every", "100")["rows"]] == [100, 200, 300, 400, 500, 600]
    assert len(report_json(run_dir)["rows"]) == 63  # json: the whole history unless --every says otherwise
    result, out = run(str(FIXTURE), "--format", "markdown")  # the reference logs every 100 steps: all five shown
    assert all("| " + " | ".join(row) + " |" in out for row in REFERENCE_ROWS) and "evenly spaced" not in out


RUN_FILE = {"config": {"train": {"output_dir": "x"}}, "gpu": "NVIDIA H200",
            "precision": {"device": "cuda", "quantization": "4bit", "compute_dtype": "bfloat16", "note": None},
            "plan": {"profile": "speed", "world_size": 2, "micro_batch": 8},
            "memory": {"peak_allocated_gib": 6.445, "peak_reserved_gib": 7.293},
            "throughput": {"tokens_per_s": 12825.4, "steady_tokens_per_s": 13001.9, "timed_steps": 372},
            "timing": {"load_model_s": 12.25, "train_seconds": 3725.0, "steps": 625, "note": "text",
                       "eval": {"loss_s": 3.5, "tags": ["x"]}}}  # fmt: skip


def test_run_section_from_phi2_run_json(tmp_path):
    run_dir = write_state(tmp_path / "run", [train_entry(2, 2.0), train_entry(4, 1.5)])
    (run_dir / "phi2_run.json").write_text(json.dumps(RUN_FILE), encoding="utf-8")
    result, out = run(str(run_dir), "--format", "markdown")
    assert result.exit_code == 0, out
    lines = out.splitlines()
    start = lines.index("### Run") + 3
    assert lines[start:lines.index("", start)] == [
        "|---|---|", "| GPU | NVIDIA H200 × 2 |", "| Profile | speed |", "| Precision | 4bit, bfloat16 |",
        "| Peak GPU memory | 6.45 GiB (7.29 GiB reserved) |", "| Tokens/s | 12,825 (steady 13,002) |",
        "| Time: load model | 0m 12s (12.2 s) |", "| Time: train | 1h 02m 05s (3725.0 s) |", "| Time: steps | 625 |",
        "| Time: eval / loss | 0m 04s (3.5 s) |"]
    assert report_json(run_dir)["run"] == {
        "gpu": "NVIDIA H200", "device": "cuda", "processes": 2, "profile": "speed", "quantization": "4bit",
        "compute_dtype": "bfloat16", "peak_allocated_gib": 6.445, "peak_reserved_gib": 7.293, "tokens_per_s": 12825.4,
        "steady_tokens_per_s": 13001.9,
        "timing": {"load_model_s": 12.25, "train_seconds": 3725.0, "steps": 625, "eval": {"loss_s": 3.5}}}
    # a checkpoint's report finds the run's phi2_run.json one level up
    write_state(run_dir / "checkpoint-4", [train_entry(2, 2.0), train_entry(4, 1.5)])
    assert report_json(run_dir / "checkpoint-4")["run"]["profile"] == "speed"


def test_run_section_shows_only_what_was_recorded(tmp_path):
    run_dir = write_state(tmp_path / "cpu", [train_entry(2, 2.0)])
    partial = {"config": {}, "precision": {"device": "cpu", "quantization": "none"}, "plan": {"profile": "reference"}}
    (run_dir / "phi2_run.json").write_text(json.dumps(partial), encoding="utf-8")
    result, out = run(str(run_dir), "--format", "markdown")
    assert result.exit_code == 0, out
    assert "| Device | cpu |" in out and "| Profile | reference |" in out and "| Precision | none |" in out
    assert "memory" not in out and "Tokens/s" not in out and "Time:" not in out and "—" not in out
    (run_dir / "phi2_run.json").write_text("{oops", encoding="utf-8")
    result, out = run(str(run_dir))
    assert result.exit_code == 0 and "phi2_run.json is not readable JSON; Run section skipped" in out
    assert "Profile" not in out and "Device" not in out


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
    assert chart[1].split() == ["train", "█▄▄▄▄", "2.3373", "→", "2.2102"]
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
    text = " ".join(result.output.split())  # help wraps at 80 columns
    for part in ("--format", "--every N", "--plot", "--no-chart", "--output", "multiples of N", "Report a training run",
                 "about ten evenly spaced rows", "Run section"):  # fmt: skip
        assert part in text


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
    assert "| Step | Eval Loss | Runtime (s) | mean_token_accuracy |" in out  # no column nobody logged
    assert "| 4 | 2.4000 | 1.5 | 0.4500 |" in out
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
    assert "samples: 200" in out and "decoding: greedy" in out
    with_mbr = {**METRICS, "settings": {"num_beams": 1, "mbr_samples": 32, "mbr_temperature": 0.7}}
    (isolated_env / "phi2-xsum-final" / "metrics.json").write_text(json.dumps(with_mbr), encoding="utf-8")
    assert "decoding: greedy + 32 samples at temperature 0.7, minimum-Bayes-risk pick" in run("--format", "markdown")[1]


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
