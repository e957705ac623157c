"""benchmarks/recipe_sweep.py: its arguments, and its plumbing end to end on a tiny model on the CPU."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

from conftest import ROOT

spec = importlib.util.spec_from_file_location("recipe_sweep", ROOT / "benchmarks" / "recipe_sweep.py")
sweep = sys.modules["recipe_sweep"] = importlib.util.module_from_spec(spec)
spec.loader.exec_module(sweep)


def test_grid_is_the_product_of_the_given_axes_on_the_base_recipe():
    grid = sweep.parse_grid(["lr=1e-3,2e-3", "epochs=2,3"])
    assert len(grid) == 4
    assert {(g["lr"], g["epochs"]) for g in grid} == {(1e-3, 2), (1e-3, 3), (2e-3, 2), (2e-3, 3)}
    assert all(g["targets"] == "all-linear" and g["warmup"] == 20 for g in grid)
    assert sweep.parse_grid(None)[0] == sweep.BASE_RECIPE
    row = sweep.table_row(grid[3], sweep.parse_decodings("beams=4,lp=0.6,ngram=3")[1])
    assert row == ('SizeRecipe("small (up to 0.5 B)", 0.5e9, 0.002, 3.0, 20, "all-linear", 32, 64, 4, 0.6, 3, '
                   'quantization="none", neftune_alpha=5.0)')
    from phi2cli.models.recipes import SizeRecipe

    assert eval(row, {"SizeRecipe": SizeRecipe}).learning_rate == 0.002  # noqa: S307 (it pastes as code)
    kept = sweep.table_row(dict(grid[0], quant="none", neftune=0), sweep.GREEDY)  # a bf16 base is written into the row
    assert kept.endswith('32, 64, 1, 1.0, 0, quantization="none")')
    assert eval(kept, {"SizeRecipe": SizeRecipe}).quantization == "none"  # noqa: S307
    assert sweep.flags({"quant": "none"}, sweep.RECIPE_FLAGS) == ["--quantization", "none"]
    row_of = lambda recipe: eval(sweep.table_row(recipe, sweep.GREEDY), {"SizeRecipe": SizeRecipe})  # noqa: E731,S307
    noisy = row_of(dict(grid[0], quant="auto", neftune=5))
    assert (noisy.quantization, noisy.neftune_alpha) == ("auto", 5.0)
    whole = row_of(dict(grid[0], quant="auto", maxlen=1024, dropout=0.1))
    assert (whole.max_length, whole.lora_dropout, whole.quantization) == (1024, 0.1, "auto")
    assert sweep.flags({"maxlen": 1024, "dropout": 0.1}, sweep.RECIPE_FLAGS) == \
        ["--max-length", "1024", "--lora-dropout", "0.1"]  # fmt: skip
    assert sweep.flags({"lr": 0.002, "targets": "all-linear"}, sweep.RECIPE_FLAGS) == \
        ["--lr", "0.002", "--lora-targets", "all-linear"]  # fmt: skip


def test_decodings_always_start_with_greedy_and_bad_keys_stop_the_sweep():
    decodings = sweep.parse_decodings("beams=4,lp=0.6,ngram=3; mbr=32,mbrt=0.5")
    assert decodings == [sweep.GREEDY, {"beams": 4, "lp": 0.6, "ngram": 3, "min": 0, "mbr": 0, "mbrt": 0.7},
                         {"beams": 1, "lp": 1.0, "ngram": 0, "min": 0, "mbr": 32, "mbrt": 0.5}]  # fmt: skip
    assert sweep.flags(decodings[1], sweep.DECODING_FLAGS) == \
        ["--num-beams", "4", "--length-penalty", "0.6", "--no-repeat-ngram-size", "3", "--min-new-tokens", "0",
         "--mbr-samples", "0", "--mbr-temperature", "0.7"]  # fmt: skip
    # greedy says --mbr-samples 0: an adapter whose recipe decodes with MBR is still scored greedy
    assert sweep.flags(sweep.GREEDY, sweep.DECODING_FLAGS)[-4:] == ["--mbr-samples", "0", "--mbr-temperature", "0.7"]
    from phi2cli.models.recipes import SizeRecipe

    row = eval(sweep.table_row(sweep.BASE_RECIPE, decodings[2]), {"SizeRecipe": SizeRecipe})  # noqa: S307
    assert (row.mbr_samples, row.mbr_temperature) == (32, 0.5)
    with pytest.raises(SystemExit, match="KEY=VALUE"):
        sweep.parse_decodings("beam=4")
    with pytest.raises(SystemExit, match="KEY=V1,V2"):
        sweep.parse_grid(["rate=1"])


@pytest.mark.slow  # ~3 minutes on 2 CPU cores: 1 train and 4 evaluate subprocesses
def test_sweep_trains_scores_on_validation_then_tests_the_choice(tiny_phi_dir, sample_data_dir, tmp_path):
    from phi2cli.config import DEFAULT_TEMPLATE

    out = tmp_path / "sweep.json"
    argv = [
        "--model", str(tiny_phi_dir), "--data-dir", str(sample_data_dir), "--template", DEFAULT_TEMPLATE,
        "--grid", "lr=0.01,0.02", "--decodings", "beams=2,lp=0.8,ngram=2", "--val-samples", "3",
        "--test-samples", "3", "--time-budget", "0", "--parallel", "1", "--work", str(tmp_path / "work"),
        "--out", str(out),
        "--train-args", "--samples 8 --val-samples 0 --max-steps 1 --max-length 128 --quantization none",
        "--eval-args", "--max-new-tokens 4",
    ]  # fmt: skip
    result = sweep.main(argv)
    assert json.loads(out.read_text()) == result
    recipe_rows = [r for r in result["rows"] if r["phase"] == "recipe"]
    assert len(recipe_rows) == 1 and recipe_rows[0]["recipe"]["lr"] == 0.01  # the budget stopped the second run
    assert result["skipped"][0]["recipe"]["lr"] == 0.02 and "time budget" in result["skipped"][0]["why"]
    decoding_rows = [r for r in result["rows"] if r["phase"] == "decoding"]
    assert [r["decoding"]["beams"] for r in decoding_rows] == [2]
    run = json.loads(Path(recipe_rows[0]["run_dir"], "final", "phi2_run.json").read_text())
    assert run["config"]["train"]["learning_rate"] == 0.01 and run["config"]["lora"]["targets"] == ["all-linear"]
    beam_metrics = json.loads(Path(recipe_rows[0]["run_dir"], "val-decoding-1", "metrics-validation.json").read_text())
    assert (beam_metrics["split"], beam_metrics["samples"], beam_metrics["settings"]["num_beams"]) == ("validation", 3, 2)
    best = max(result["rows"], key=lambda r: r["validation"]["rougeL"])
    assert result["chosen"]["decoding"] == best["decoding"]  # chosen on validation
    assert [t["decoding"]["beams"] for t in result["test"]] == [1, 2]
    assert "base_test" in result["test"][0] and sum(t["chosen_on_validation"] for t in result["test"]) == 1
    test_metrics = json.loads(Path(recipe_rows[0]["run_dir"], "test-0", "metrics-test.json").read_text())
    assert test_metrics["split"] == "test" and "base" in test_metrics

    again = sweep.main([*argv, "--reuse"])  # a cut sweep continues: finished steps are read back
    assert again["rows"] == result["rows"] and again["test"] == result["test"] and again["total_seconds"] < 30


@pytest.mark.slow  # ~3 minutes on 2 CPU cores: 2 concurrent trains, 3 evaluate subprocesses
def test_parallel_recipes_all_train_and_the_best_on_validation_is_tested(tiny_phi_dir, sample_data_dir, tmp_path):
    from phi2cli.config import DEFAULT_TEMPLATE

    result = sweep.main([
        "--model", str(tiny_phi_dir), "--data-dir", str(sample_data_dir), "--template", DEFAULT_TEMPLATE,
        "--grid", "lr=0.01,0.03", "--decodings", "greedy", "--val-samples", "3", "--test-samples", "2",
        "--parallel", "2", "--work", str(tmp_path / "work"), "--out", str(tmp_path / "sweep.json"),
        "--train-args", "--samples 8 --val-samples 0 --max-steps 1 --max-length 128 --quantization none",
        "--eval-args", "--max-new-tokens 4",
    ])  # fmt: skip
    rows = result["rows"]
    assert [r["recipe"]["lr"] for r in rows] == [0.01, 0.03] and not result["skipped"]
    best = max(rows, key=lambda r: r["validation"]["rougeL"])
    assert result["chosen"]["recipe"] == best["recipe"] and result["chosen"]["run_dir"] == best["run_dir"]
    assert len(result["test"]) == 1 and result["test"][0]["chosen_on_validation"]
