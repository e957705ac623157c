"""The README's front-door commands: the CI test command, the offline try-out script."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_ci_runs_exactly_the_readme_test_command():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    block = re.search(r"Run the tests.*?```bash\n(.+?)\n```", readme, re.S).group(1).strip()
    # one command on a fresh clone: it installs pytest and the test extras, then runs the default suite
    assert block == 'python -m pip install -e ".[test]" && python -m pytest'
    ci = (ROOT / ".ci" / "run").read_text(encoding="utf-8")
    assert re.search(r"^" + re.escape(block) + "$", ci, re.M)
    assert "exit 1" in ci.split(block, 1)[1]  # pytest's "no tests" (5) fails CI
    extras = re.search(r"^test = \[(.+)\]$", (ROOT / "pyproject.toml").read_text(encoding="utf-8"), re.M).group(1)
    assert '"pytest' in extras and '"tensorboard' in extras  # what the default run imports beyond the package


def test_readme_speed_numbers_come_from_the_committed_results():
    import json

    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    results = ROOT / "benchmarks" / "results"
    end_to_end = json.loads((results / "end_to_end.json").read_text(encoding="utf-8"))
    for key in ("train_seed_job_s_cold", "train_seed_job_s_warm", "reference_seed_job_s"):  # end to end first
        assert f"**{end_to_end[key]:,.0f} s**" in readme, key
    assert readme.index("end to end**") < readme.index("**A faster engine**")
    for profile in ("speed", "memory_saver", "trl_plain", "trl_gc"):
        assert f"{end_to_end[profile]['tokens_per_s']:,.0f}" in readme, profile
    assert f"**{end_to_end['ratios']['speed_vs_trl_plain']:.1f}×**" in readme
    now = json.loads((results / "train_throughput.json").read_text(encoding="utf-8"))
    before = json.loads((results / "train_throughput_before_graphs.json").read_text(encoding="utf-8"))
    speedup, saver = f"{now['speed']['speedup']:.1f}×", f"{before['memory_saver_eager']['speedup']:.1f}×"
    assert (speedup, saver) == ("41.9×", "8.9×")
    assert f"**{speedup}**" in readme and f"{saver}, 3.93 GiB" in readme
    families = json.loads((results / "families.json").read_text(encoding="utf-8"))["rows"]
    for row in ("phi2", "llama"):  # the current engine's rates, as the README quotes them
        rate, mfu = families[row]["tokens_per_s"], families[row]["mfu"]
        assert f"{rate:,.0f} real" in readme or f"{rate:,.0f} (" in readme, row
        assert f"{100 * mfu:.1f}% MFU" in readme, row
    measured: set[float] = set()  # every number in the committed result files

    def collect(value) -> None:
        if isinstance(value, dict):
            for item in value.values():
                collect(item)
        elif isinstance(value, list):
            for item in value:
                collect(item)
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            measured.add(float(value))

    for file in results.rglob("*.json"):
        collect(json.loads(file.read_text(encoding="utf-8")))
    for claim in set(re.findall(r"\b(\d+(?:\.\d+)?)×", readme)):  # every speed-up the README states ...
        decimals = len(claim.partition(".")[2])
        assert any(round(value, decimals) == float(claim) for value in measured), f"{claim}× is in no result file"
    for name in ("end_to_end.json", "families.json", "multi_gpu.json", "train_throughput.json"):
        assert name in readme and (results / name).is_file()


def test_readme_install_and_run_are_two_commands():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    block = re.search(r"## Install and run.*?```bash\n(.+?)\n```", readme, re.S).group(1)
    assert block.splitlines() == ["pip install -e .", "phi2 train --samples 5000"]


@pytest.mark.slow
def test_offline_tryout_runs_every_command(tmp_path):
    env = {**os.environ, "WORK": str(tmp_path / "tryout"), "HF_HUB_OFFLINE": "1", "PATH": os.environ["PATH"]}
    done = subprocess.run(["bash", str(ROOT / "examples" / "offline-tryout.sh")], env=env, capture_output=True,
                          text=True, timeout=900, cwd=ROOT)  # fmt: skip
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    work = tmp_path / "tryout"
    assert (work / "phi2-xsum-final" / "adapter_model.safetensors").is_file()
    assert (work / "phi2-xsum-final" / "metrics-validation.json").is_file()
    assert (work / "phi2-xsum-merged" / "model.safetensors").is_file()
    assert (work / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "| Step | Training Loss | Learning Rate | Grad Norm | Epoch |" in (work / "report.md").read_text()
    assert "Try-out done" in done.stdout and sys.executable
