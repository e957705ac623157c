"""benchmarks/end_to_end.py on the CPU: its parts, the TRL configuration, and a small run of the CLI parts."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from test_bench_multi_gpu import load_benchmark


@pytest.fixture(scope="module")
def bench():
    return load_benchmark("end_to_end")


def test_parts_expand_groups_in_run_order_and_refuse_unknown_names(bench):
    assert bench.parse_parts("ours") == ["seed", "evaluate", "summarize", "served", "report", "smollm2",
                                         "smollm2_compiled"]  # fmt: skip
    assert bench.parse_parts("peers") == ["reference", "trl", "profiles"]
    assert bench.parse_parts("trl,seed,trl") == ["seed", "trl"]
    assert bench.parse_parts("all") == list(bench.PARTS)
    with pytest.raises(SystemExit, match="unknown part 'tlr'"):
        bench.parse_parts("tlr")


def test_cold_and_warm_runs_point_every_compile_cache_at_one_folder(bench, tmp_path):
    env = bench.cache_env(tmp_path / "c")
    assert env == {"PHI2_CACHE_DIR": str(tmp_path / "c"), "TORCHINDUCTOR_CACHE_DIR": str(tmp_path / "c" / "inductor"),
                   "TRITON_CACHE_DIR": str(tmp_path / "c" / "triton")}  # fmt: skip


def test_ratios_are_the_targets_same_run_quotients(bench):
    results = {"train_seed_job_s_cold": 50.0, "reference_seed_job_s": 2500.0,
               "speed": {"tokens_per_s": 50_000.0, "peak_gib": 30.0}, "trl_plain": {"tokens_per_s": 10_000.0},
               "memory_saver": {"tokens_per_s": 9_000.0, "peak_gib": 3.0},
               "trl_gc": {"tokens_per_s": 6_000.0, "peak_gib": 4.6}}  # fmt: skip
    assert bench.ratios(results) == {"seed_job_vs_reference": 50.0, "speed_vs_trl_plain": 5.0,
                                     "memory_saver_vs_trl_gc": 1.5, "memory_saver_peak_le_trl_gc": True}  # fmt: skip
    assert bench.ratios({})["speed_vs_trl_plain"] is None


def test_trl_is_configured_as_the_peer_job(bench, tmp_path):
    pytest.importorskip("trl")
    config = bench.trl_config(tmp_path, steps=25, gradient_checkpointing=True, cuda=False)
    assert (config.per_device_train_batch_size, config.gradient_accumulation_steps, config.max_length) == (8, 1, 512)
    assert config.completion_only_loss is True and config.padding_free is False and config.packing is False
    assert config.gradient_checkpointing is True and config.max_steps == 25


@pytest.mark.slow
def test_trl_child_trains_with_completion_only_loss_on_the_cpu(bench, tiny_phi_dir, sample_data_dir, tmp_path):
    pytest.importorskip("trl")
    ctx = {"work": tmp_path, "model": tiny_phi_dir, "data_dir": sample_data_dir, "trl_steps": 4}
    result = bench.child_trl(ctx, gradient_checkpointing=False)
    assert result["tokens_per_s"] > 0 and result["timed_steps"] == 2
    assert result["completion_only_loss"] is True


@pytest.mark.slow
def test_cli_parts_time_each_command_and_merge_into_one_file(bench, tiny_phi_dir, sample_data_dir, tmp_path):
    """seed (2 steps here), evaluate, summarize and report as subprocesses; a second command adds to the file."""
    out = tmp_path / "e2e.json"
    common = ["--model", str(tiny_phi_dir), "--data-dir", str(sample_data_dir), "--work", str(tmp_path / "w"),
              "--out", str(out), "--seed-steps", "2"]  # fmt: skip
    assert bench.main(["--parts", "seed,summarize,served", *common]) == 0
    assert bench.main(["--parts", "report", *common]) == 0
    result = json.loads(out.read_text())
    for key in ("train_seed_job_s_cold", "train_seed_job_s_warm", "summarize_one_s", "report_s", "serve_ready_s",
                "summarize_one_served_s", "evaluate_500_served_s"):
        assert result[key] is not None and result[key] > 0, (key, result.get(key.replace("_s", "")))
    assert result["seed_job_cold"]["timing"]["train_steps_s"] > 0
    assert "model kept loaded" in result["served"]["summarize_one_again"]["output_tail"]
    assert result["served"]["stop"]["rc"] == 0 and "Stopped phi2 serve" in result["served"]["stop"]["output_tail"]
    assert set(result["commands"]) == {"seed,summarize,served", "report"}
    assert result["environment"]["torch"]


def test_peer_versions_come_from_the_installed_distributions(bench, monkeypatch):
    """liger-kernel has no __version__ attribute: its version is read from its distribution, by that name."""
    import importlib.metadata

    installed, real = {"trl": "1.16.0", "liger-kernel": "0.8.5"}, importlib.metadata.version

    def version(dist):
        if dist not in ("trl", "liger-kernel"):
            return real(dist)
        if dist not in installed:
            raise importlib.metadata.PackageNotFoundError(dist)
        return installed[dist]

    monkeypatch.setattr(importlib.metadata, "version", version)
    info = bench.environment_with_peers()
    assert (info["trl"], info["liger_kernel"]) == ("1.16.0", "0.8.5")
    del installed["liger-kernel"]
    assert bench.environment_with_peers()["liger_kernel"] is None


def test_the_smollm2_parts_train_as_the_example_script_does(bench):
    """The SmolLM2 job's flags (shared with host_overhead.py) are examples/smollm2-xsum.sh's."""
    import shlex

    from conftest import ROOT

    script = (ROOT / "examples" / "smollm2-xsum.sh").read_text(encoding="utf-8")
    command = script[script.index("phi2 train"):script.index("phi2 evaluate")].replace("\\\n", " ")
    words = shlex.split(command)
    flags = bench.SMOLLM2_JOB
    assert [(flag, value) for flag, value in zip(flags[::2], flags[1::2])] == \
        [(word, words[words.index(word) + 1]) for word in flags[::2]]  # fmt: skip


def test_bytecode_is_compiled_once_where_python_writes_none(bench, tmp_path, monkeypatch):
    import sys

    common = sys.modules["common"]
    package = tmp_path / "site" / "somepkg"
    package.mkdir(parents=True)
    (package / "mod.py").write_text("VALUE = 1\n", encoding="utf-8")
    monkeypatch.setenv("PYTHONPYCACHEPREFIX", "recorded")  # so that the test's own setting is undone after it
    monkeypatch.delenv("PYTHONPYCACHEPREFIX")
    kept = common.precompile_bytecode(tmp_path / "pyc", [str(tmp_path / "site")], dont_write=False)
    assert kept["precompiled"] is False
    assert not (tmp_path / "pyc").exists()
    done = common.precompile_bytecode(tmp_path / "pyc", [str(tmp_path / "site")], dont_write=True)
    assert done["precompiled"] is True and done["folder"] == str(tmp_path / "pyc")
    assert list((tmp_path / "pyc").rglob("mod.cpython-*.pyc"))  # where the processes it starts will read it
    import os

    assert os.environ["PYTHONPYCACHEPREFIX"] == str(tmp_path / "pyc")
    assert common.environment()["bytecode_cache"]["folder"] == str(tmp_path / "pyc")
    again = common.precompile_bytecode(tmp_path / "other", [str(tmp_path / "site")], dont_write=True)
    assert again["precompiled"] is False and not (tmp_path / "other").exists()  # a cache folder is already set


def test_import_floor_compiles_bytecode_first_and_records_it(monkeypatch, tmp_path):
    floor = load_benchmark("import_floor")
    calls: list[str] = []

    def precompile(folder):
        calls.append(f"precompile {folder}")
        return {"precompiled": True, "folder": str(folder), "seconds": 1.0}

    def timed(statement):
        calls.append(statement)
        return None if "cuda" in statement else 0.5

    monkeypatch.setattr(floor, "precompile_bytecode", precompile)
    monkeypatch.setattr(floor, "timed", timed)
    out = tmp_path / "floor.json"
    monkeypatch.setattr("sys.argv", ["import_floor.py", "--repeat", "1", "--out", str(out), "--pycache",
                                     str(tmp_path / "pyc")])  # fmt: skip
    floor.main()
    assert calls[0] == f"precompile {tmp_path / 'pyc'}"  # before any statement is timed
    assert calls[1:] == list(floor.STATEMENTS)
    written = json.loads(out.read_text(encoding="utf-8"))
    assert written["bytecode_precompiled"]["folder"] == str(tmp_path / "pyc")
    assert written["seconds"]["import torch"] == [0.5]
    assert written["seconds"]["import torch; torch.cuda.init(); torch.zeros(1, device='cuda')"] == [None]


def test_patched_python_runs_a_module_or_a_script_after_the_patch(tmp_path):
    import subprocess

    patched_python = load_benchmark("common").patched_python
    patch = "import phi2cli.kernels.attention as a; a.FEW_ROWS = 3; "
    script = tmp_path / "show.py"
    script.write_text("import sys, phi2cli.kernels.attention as a\nprint(a.FEW_ROWS, sys.argv[1:])\n")
    shown = subprocess.run(patched_python(patch, [str(script), "x"]), capture_output=True, text=True, check=True)
    assert shown.stdout.split("\n")[0] == "3 ['x']"
    plain = subprocess.run(patched_python("", [str(script)]), capture_output=True, text=True, check=True)
    assert plain.stdout.startswith("8 []")
    module = subprocess.run(patched_python(patch, ["-m", "phi2cli", "--version"]), capture_output=True, text=True)
    assert module.returncode == 0 and module.stdout.strip(), module.stderr
