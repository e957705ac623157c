"""benchmarks/multi_gpu.py: its arithmetic and argument handling on the CPU (the GPU runs are its job)."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def load_benchmark(name: str):
    sys.path.insert(0, str(ROOT / "benchmarks"))
    spec = importlib.util.spec_from_file_location(f"bench_{name}", ROOT / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def bench():
    return load_benchmark("multi_gpu")


def test_gpu_list_runs_one_gpu_always_and_skips_what_the_machine_lacks(bench):
    assert bench.gpu_counts("1,2,4", 2) == ([1, 2], [4])
    assert bench.gpu_counts("2", 8) == ([1, 2], [])
    assert bench.gpu_counts("4,2,1,2", 4) == ([1, 2, 4], [])
    with pytest.raises(SystemExit, match="comma-separated list"):
        bench.gpu_counts("two", 2)
    with pytest.raises(SystemExit, match="1 or more"):
        bench.gpu_counts("0,2", 2)


def test_weak_runs_ask_for_the_per_gpu_batch_and_launch_only_above_one_gpu(bench):
    strong = bench.train_args("strong", 1, 120, 8, Path("m"), Path("p"), Path("o"), Path("f"), "speed")
    weak = bench.train_args("weak", 4, 60, 8, Path("m"), Path("p"), Path("o"), Path("f"), "speed")
    assert "--per-gpu-batch" not in strong and "--gpus" not in strong
    assert weak[weak.index("--per-gpu-batch") + 1] == "8" and weak[weak.index("--gpus") + 1] == "4"
    assert strong[strong.index("--eval-every") + 1] == "120"  # one evaluation and save, at the end
    assert bench.SAFE_NCCL_ENV == {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1",
                                   "NVSHMEM_DISABLE_NVLS": "1"}  # fmt: skip


def test_scaling_losses_and_files_are_compared_against_one_gpu(bench):
    one = {"tokens_per_s": 20_000.0, "tokens_per_s_wall": 8_000.0, "wall_s": 100.0,
           "losses": {5: 2.5, 10: 2.25}, "eval_losses": {10: 2.2},
           "files": ["checkpoint-10/rng_state.pth", "checkpoint-10/trainer_state.json"]}  # fmt: skip
    two = {"tokens_per_s": 36_000.0, "tokens_per_s_wall": 12_000.0, "wall_s": 80.0,
           "losses": {5: 2.503, 10: 2.2489}, "eval_losses": {10: 2.2001},
           "files": ["checkpoint-10/rng_state_0.pth", "checkpoint-10/rng_state_1.pth",
                     "checkpoint-10/trainer_state.json"]}  # fmt: skip
    four = {**two, "tokens_per_s": 60_000.0, "files": two["files"] + ["stray.txt"]}
    section = bench.compare("strong", {1: one, 2: two, 4: four})
    assert section["scaling"] == 1.8 and section["scaling_wall"] == 1.5 and section["wall_ratio"] == 1.25
    assert section["loss_max_abs_diff"] == pytest.approx(0.003) and section["loss_steps_compared"] == 2
    assert section["same_files"] is True
    assert section["scaling_4"] == 3.0 and section["same_files_4"] is False
    assert section["files_only_gpus_4_4"] == ["stray.txt"]
    assert "files" not in section["gpus_2"]
    weak = bench.compare("weak", {1: one, 2: two})
    assert "loss_max_abs_diff" not in weak and weak["scaling"] == 1.8


@pytest.mark.slow
def test_the_benchmark_runs_through_phi2_train_on_the_cpu(bench, tiny_phi_dir, sample_data_dir, tmp_path):
    """One 'GPU' (the CPU), a tiny model: both modes run as subprocesses and the result has the keys the
    GPU run must fill; a count the machine lacks is skipped, not failed."""
    out = tmp_path / "results"
    code = bench.main(["--gpus", "1,2", "--model", str(tiny_phi_dir), "--data-dir", str(sample_data_dir),
                       "--strong-steps", "4", "--weak-steps", "2", "--per-gpu", "2", "--work", str(tmp_path / "w"),
                       "--out-dir", str(out), "--available-gpus", "1"])  # fmt: skip
    assert code == 0
    result = json.loads((out / "multi_gpu.json").read_text())
    assert result["skipped_gpu_counts"] == [2]
    for mode in ("strong", "weak"):
        run = result[mode]["gpus_1"]
        assert "error" not in run, run
        assert run["tokens_per_s"] > 0 and run["wall_s"] > 0
        assert run["timing"]["train_steps_s"] > 0
    assert result["weak"]["gpus_1"]["plan"]["micro_batch"] == 2
    assert result["full_xsum_epoch_estimate_s"]["gpus_1"] > 0


def test_a_run_of_one_mode_keeps_the_other_modes_earlier_results(bench, tmp_path):
    path = tmp_path / "multi_gpu_4.json"
    path.write_text(json.dumps({"strong": {"scaling": 1.6}, "weak": {"scaling": 1.9},
                                "full_xsum_epoch_estimate_s": {"gpus_1": 5}}))  # fmt: skip
    weak_only = bench.merged(path, {"weak": {"scaling": 2.0}, "full_xsum_epoch_estimate_s": {"gpus_1": 4}}, ["weak"])
    assert weak_only == {"weak": {"scaling": 2.0}, "strong": {"scaling": 1.6}, "full_xsum_epoch_estimate_s": {"gpus_1": 4}}
    strong_only = bench.merged(path, {"strong": {"scaling": 1.7}, "full_xsum_epoch_estimate_s": {}}, ["strong"])
    assert strong_only["weak"] == {"scaling": 1.9} and strong_only["full_xsum_epoch_estimate_s"] == {"gpus_1": 5}
    assert bench.merged(tmp_path / "none.json", {"weak": {}}, ["weak"]) == {"weak": {}}
