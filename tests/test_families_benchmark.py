"""benchmarks/families.py: its argument handling, and its --tiny smoke run on the CPU (slow)."""

from __future__ import annotations

import importlib.util
import json

import pytest

from conftest import ROOT


def load_benchmark():
    import sys

    sys.path.insert(0, str(ROOT / "benchmarks"))
    spec = importlib.util.spec_from_file_location("families_benchmark", ROOT / "benchmarks" / "families.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_rows_are_checked_and_subsets_parse(capsys):
    bench = load_benchmark()
    args = bench.build_parser().parse_args(["--rows", "llama,decoder_hf", "--steps", "5"])
    assert args.rows == ["llama", "decoder_hf"] and args.steps == 5 and args.ablation_steps == 20
    assert bench.build_parser().parse_args([]).rows == list(bench.FAMILY_ROWS + bench.ABLATION_ROWS)
    with pytest.raises(SystemExit) as exit_info:
        bench.build_parser().parse_args(["--rows", "phi2,gpt2"])
    assert exit_info.value.code == 2
    assert "unknown row(s) gpt2" in capsys.readouterr().err


@pytest.mark.slow
def test_tiny_run_measures_every_row_on_the_cpu(tmp_path, xsum_dir):
    bench = load_benchmark()
    out = tmp_path / "families.json"
    bench.main(["--tiny", "--fresh", "--rows", "phi2,llama,peft_lora,adamw_torch_fused,decoder_hf", "--data-dir", str(xsum_dir),
                "--work", str(tmp_path / "work"), "--out", str(out)])  # fmt: skip
    rows = json.loads(out.read_text())["rows"]
    assert not [name for name, row in rows.items() if "error" in row], rows
    for name in ("phi2", "llama", "peft_lora", "adamw_torch_fused"):
        assert rows[name]["tokens_per_s"] > 0 and rows[name]["timed_steps"] == 1
    assert rows["llama"]["lora_targets"] == ["q_proj", "k_proj", "v_proj", "o_proj"]
    assert rows["phi2"]["lora_targets"] == ["q_proj", "k_proj", "v_proj", "dense"]
    assert "lean_lora" in rows["phi2"]["fast_paths_active"]
    assert "lean_lora" in rows["peft_lora"]["fast_paths_fell_back"]  # the ablation really ran PEFT's forward
    assert rows["phi2"]["decoder"] == "static" and rows["llama"]["decoder"] == "static"  # one decoder for both families
    assert rows["phi2"]["evaluate_samples"] == 4
    assert rows["decoder_hf"]["hf"]["decoder"] == "hf" and rows["decoder_hf"]["static"]["decoder"] == "static"
