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
    assert block == "python -m pytest"
    ci = (ROOT / ".ci" / "run").read_text(encoding="utf-8")
    assert re.search(r"^python -m pytest$", ci, re.M)
    assert "exit 1" in ci.split("python -m pytest", 1)[1]  # pytest's "no tests" (5) fails CI


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
