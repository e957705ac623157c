"""How `phi2` leaves: exit codes and output kept, interpreter teardown skipped once torch is loaded."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}

SCRIPT = """
import atexit, sys
{imports}
from phi2cli.cli.app import leave
atexit.register(lambda: sys.stderr.write("teardown ran\\n"))
sys.stdout.write("x" * 300000)  # more than a pipe holds: must all arrive
sys.stderr.write("last line")
leave({code})
"""


def run(code: str, imports: str = "") -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", SCRIPT.format(imports=imports, code=code)], env=ENV,
                          capture_output=True, text=True, timeout=120)  # fmt: skip


@pytest.mark.parametrize("code, expected", [("0", 0), ("None", 0), ("3", 3), ("130", 130)])
def test_with_torch_loaded_the_code_and_all_output_survive_and_teardown_is_skipped(code, expected):
    done = run(code, imports="import torch")
    assert done.returncode == expected
    assert done.stdout == "x" * 300000
    assert done.stderr == "last line"  # no atexit handler ran: the process left without teardown


def test_without_torch_python_exits_as_usual():
    done = run("2")
    assert done.returncode == 2
    assert done.stdout == "x" * 300000
    assert done.stderr == "last lineteardown ran\n"


def test_a_message_goes_to_stderr_with_exit_code_1():
    done = run("'stopped: disk full'", imports="import torch")
    assert done.returncode == 1
    assert done.stderr == "last linestopped: disk full\n"


def test_the_console_entry_point_keeps_click_exit_codes(tmp_path):
    """`python -m phi2cli` goes through main(): a usage error is 2, --version 0, a Phi2Error its own code."""

    def phi2(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "phi2cli", *args], env=ENV, cwd=tmp_path, capture_output=True,
                              text=True, timeout=120)  # fmt: skip

    assert phi2("--version").returncode == 0
    bad_flag = phi2("train", "--no-such-flag")
    assert bad_flag.returncode == 2 and "No such option" in bad_flag.stderr
    missing = phi2("summarize", "no-such-article.txt")
    assert missing.returncode == 1
    assert "Error: no-such-article.txt does not exist; check the path" in missing.stderr
