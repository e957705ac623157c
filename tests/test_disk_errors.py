"""A full disk or an unwritable path gives the documented one-line message from every command that writes.

The disk is filled by making the real writers (safetensors, our atomic writes) fail the way they do on a full
disk; unwritable paths are real ones (/proc takes no new files, /sys refuses writes even to root).
"""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest
from safetensors import SafetensorError
from typer.testing import CliRunner

from phi2cli.cli import app

FIXTURES = Path(__file__).parent / "fixtures"
SAFETENSORS_FULL = "Error while serializing: I/O error: No space left on device (os error 28)"


def invoke(args):
    return CliRunner().invoke(app, args, env={"COLUMNS": "300"})


def one_error_line(output: str) -> str:
    assert "Traceback" not in output, output
    lines = [line for line in output.splitlines() if line.startswith("Error:")]
    assert len(lines) == 1, output
    return lines[0]


def full_safetensors(*args, **kwargs):
    raise SafetensorError(SAFETENSORS_FULL)


def test_export_on_a_full_disk_says_disk_full(monkeypatch, trained, tmp_path):
    import transformers.modeling_utils

    monkeypatch.setattr(transformers.modeling_utils, "safe_save_file", full_safetensors)
    output = tmp_path / "exports" / "merged"
    result = invoke(["export", "--adapter", str(trained / "phi2-xsum-final"), "--output", str(output)])
    assert result.exit_code == 1
    assert one_error_line(result.output) == f"Error: disk full while writing {output}; free space and run the command again"
    assert os.listdir(output.parent) == []  # no half-written export left behind


def test_train_checkpoint_on_a_full_disk_says_disk_full(monkeypatch, tiny_phi_dir, sample_data_dir):
    import peft.peft_model

    monkeypatch.setattr(peft.peft_model, "safe_save_file", full_safetensors)
    result = invoke(["train", "--model", str(tiny_phi_dir), "--data-dir", str(sample_data_dir), "--samples", "8",
                     "--val-samples", "0", "--max-steps", "1", "--eval-every", "1", "--max-length", "160"])  # fmt: skip
    assert result.exit_code == 1
    assert one_error_line(result.output) == ("Error: disk full while writing phi2-xsum-finetuned; "
                                             "free space and run the command again")  # fmt: skip
    assert not Path("phi2-xsum-final").exists()


def test_prepare_on_a_full_disk_says_disk_full_and_keeps_nothing(monkeypatch, tiny_phi_dir, sample_data_dir):
    def fsync(fd):  # the data reached the file; flushing it to the device finds no space
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", fsync)
    result = invoke(["prepare", "--model", str(tiny_phi_dir), "--data-dir", str(sample_data_dir), "--samples", "4",
                     "--val-samples", "2", "--output", "out/prepared"])  # fmt: skip
    assert result.exit_code == 1
    assert one_error_line(result.output) == ("Error: disk full while writing out/prepared/manifest.json; "
                                             "free space and run the command again")  # fmt: skip
    assert os.listdir("out") == []  # neither the dataset nor its temp directory stays behind


def test_report_plot_into_proc_is_one_line():
    if not Path("/proc").is_dir():
        pytest.skip("no /proc on this system")
    result = invoke(["report", str(FIXTURES / "trainer_state_reference.json"), "--plot", "/proc/x.png", "--no-chart"])
    assert result.exit_code == 1
    assert one_error_line(result.output) == ("Error: cannot write /proc/x.png: /proc does not accept new files; "
                                             "choose a writable output directory")  # fmt: skip


def test_report_output_into_sys_is_permission_denied():
    if not Path("/sys/kernel").is_dir():
        pytest.skip("no /sys on this system")
    result = invoke(["report", str(FIXTURES / "trainer_state_reference.json"), "-f", "markdown", "-o", "/sys/x.md"])
    assert result.exit_code == 1
    assert one_error_line(result.output) == ("Error: cannot write /sys/x.md: permission denied; "
                                             "choose a writable output directory")  # fmt: skip


def test_any_command_turns_an_unwrapped_full_disk_into_the_line(monkeypatch, tmp_path):
    """A writer we do not wrap (a library's own file) still gives the line, not 'OSError: ...'."""
    from phi2cli.cli import report

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "cache.bin"))

    monkeypatch.setattr(report, "build_report", full)
    result = invoke(["report", str(FIXTURES / "trainer_state_reference.json")])
    assert result.exit_code == 1
    assert one_error_line(result.output) == (f"Error: disk full while writing {tmp_path / 'cache.bin'}; "
                                             f"free space and run the command again")  # fmt: skip
