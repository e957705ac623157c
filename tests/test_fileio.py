"""Atomic writes: a failure or interruption mid-write leaves the previous version and no temp files."""

from __future__ import annotations

import errno
import json
import os
import stat
from pathlib import Path

import pytest

from phi2cli.io import files as fileio
from phi2cli.errors import Phi2Error
from phi2cli.io.files import atomic_directory, check_writable_dir, write_json_atomic, write_text_atomic

DISK_FULL = "disk full while writing {}; free space and run the command again"


def names(folder: Path) -> list[str]:
    """Every entry, hidden ones (temp files, moved-aside directories) included."""
    return sorted(p.name for p in folder.iterdir())


@pytest.fixture
def folder(isolated_env) -> Path:
    """The test's own empty working directory (conftest's autouse fixture made it)."""
    return isolated_env


def fail_with(error: BaseException):
    def fail(*args, **kwargs):
        raise error

    return fail


def test_write_text_atomic_replaces_the_file_readable_by_all(folder):
    target = folder / "metrics.json"
    write_text_atomic(target, "old")
    write_text_atomic(target, "new")
    assert target.read_text() == "new"
    assert stat.S_IMODE(target.stat().st_mode) == 0o644
    assert names(folder) == ["metrics.json"]


@pytest.mark.parametrize("error", [RuntimeError("boom"), KeyboardInterrupt()], ids=["exception", "ctrl-c"])
def test_exception_mid_write_keeps_the_previous_file(folder, monkeypatch, error):
    target = write_text_atomic(folder / "phi2_run.json", "previous")
    monkeypatch.setattr(os, "fsync", fail_with(error))  # the new text is in the temp file, not yet renamed
    with pytest.raises(type(error)):
        write_text_atomic(target, "half")
    assert target.read_text() == "previous"
    assert names(folder) == ["phi2_run.json"]


@pytest.mark.parametrize("where", ["fsync", "replace"])
def test_disk_full_while_writing_json_keeps_the_last_good_file(folder, monkeypatch, where):
    target = write_json_atomic(folder / "metrics.json", {"rouge1": 30.0})
    monkeypatch.setattr(os, where, fail_with(OSError(errno.ENOSPC, "No space left on device")))
    with pytest.raises(Phi2Error) as raised:
        write_json_atomic(target, {"rouge1": 31.0})
    assert str(raised.value) == DISK_FULL.format(target)
    assert json.loads(target.read_text()) == {"rouge1": 30.0}
    assert names(folder) == ["metrics.json"]


def test_write_into_a_directory_or_under_a_file_says_what_is_in_the_way(folder):
    (folder / "report.md").mkdir()
    with pytest.raises(Phi2Error, match=r"report\.md: it is a directory; give a file name$"):
        write_text_atomic(folder / "report.md", "x")
    (folder / "out").write_text("a file")
    with pytest.raises(Phi2Error, match=r"out is a file, not a directory; choose another output path$"):
        write_text_atomic(folder / "out" / "report.md", "x")
    assert names(folder) == ["out", "report.md"] and not any((folder / "report.md").iterdir())


def test_check_writable_dir_creates_nothing(folder):
    assert check_writable_dir(folder / "a" / "b") == folder / "a" / "b"
    assert names(folder) == []
    (folder / "f").write_text("")
    with pytest.raises(Phi2Error, match=r"^cannot create .*f/a: .*f is a file, not a directory"):
        check_writable_dir(folder / "f" / "a")


def make_version(folder: Path, text: str) -> None:
    with atomic_directory(folder) as tmp:
        (tmp / "adapter_model.safetensors").write_text(text)
        (tmp / "adapter_config.json").write_text(text)


def test_atomic_directory_replaces_the_previous_version(folder):
    final = folder / "phi2-xsum-final"
    make_version(final, "v1")
    make_version(final, "v2")
    assert (final / "adapter_model.safetensors").read_text() == "v2"
    assert names(folder) == ["phi2-xsum-final"] and stat.S_IMODE(final.stat().st_mode) == 0o755


@pytest.mark.parametrize("error", [RuntimeError("boom"), KeyboardInterrupt()], ids=["exception", "ctrl-c"])
def test_exception_mid_directory_keeps_the_previous_version(folder, error):
    final = folder / "phi2-xsum-final"
    make_version(final, "v1")
    with pytest.raises(type(error)):
        with atomic_directory(final) as tmp:
            (tmp / "adapter_model.safetensors").write_text("half of v2")
            raise error
    assert (final / "adapter_model.safetensors").read_text() == "v1"
    assert names(folder) == ["phi2-xsum-final"]


def test_disk_full_while_saving_a_directory_keeps_the_last_good_checkpoint(folder):
    final = folder / "phi2-xsum-final"
    make_version(final, "v1")
    with pytest.raises(Phi2Error) as raised:
        with atomic_directory(final) as tmp:
            (tmp / "adapter_config.json").write_text("v2")
            raise OSError(errno.ENOSPC, "No space left on device")  # as save_pretrained would
    assert str(raised.value) == DISK_FULL.format(final)
    assert (final / "adapter_model.safetensors").read_text() == "v1"
    assert names(folder) == ["phi2-xsum-final"]


def test_disk_full_at_the_final_rename_puts_the_previous_version_back(folder, monkeypatch):
    final = folder / "phi2-xsum-final"
    make_version(final, "v1")
    real_replace = os.replace

    def replace(src, dst):  # the previous version is already moved aside when this rename fails
        if Path(src).name.endswith(".partial"):
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_replace(src, dst)

    monkeypatch.setattr(fileio.os, "replace", replace)
    with pytest.raises(Phi2Error, match="^disk full while writing"):
        make_version(final, "v2")
    assert (final / "adapter_model.safetensors").read_text() == "v1"
    assert names(folder) == ["phi2-xsum-final"]


def test_interrupted_prepare_keeps_the_previous_dataset(folder, monkeypatch, phi2_tokenizer_dir, sample_data_dir):
    from phi2cli.data import prepare as data
    from phi2cli.config import Phi2Config, apply_overrides
    from phi2cli.models.loading import load_tokenizer

    config = apply_overrides(Phi2Config(), {"data.data_dir": str(sample_data_dir), "data.samples": 4,
                                            "data.val_samples": 2, "model.model": str(phi2_tokenizer_dir)})  # fmt: skip
    tokenizer = load_tokenizer(str(phi2_tokenizer_dir))
    target = folder / "prepared"
    first = data.prepare(config, tokenizer, target)
    monkeypatch.setattr(data, "write_json_atomic", fail_with(KeyboardInterrupt()))  # Ctrl-C before the manifest
    with pytest.raises(KeyboardInterrupt):
        data.prepare(apply_overrides(config, {"data.samples": 8}), tokenizer, target, overwrite=True)
    dataset, manifest = data.load_prepared(target)
    assert manifest == json.loads(json.dumps(first.manifest)) and len(dataset["train"]) == 4
    assert names(folder) == ["prepared"]


def crash_inside_a_replacement(final: Path, text: str, when: str) -> int:
    """Run make_version in a child process that dies (no clean-up of any kind) at `when`:
    'between-renames' (previous version moved aside, new one not in) or 'sigterm' (while writing).
    Returns the child's exit status."""
    import subprocess
    import sys
    import textwrap

    code = textwrap.dedent(f"""
        import os, signal, sys
        from pathlib import Path
        from phi2cli.io import files
        final = Path({str(final)!r})
        real_replace = os.replace
        def replace(src, dst):
            if {when!r} == "between-renames" and Path(src).name.endswith(".partial"):
                os._exit(9)  # as kill -9 would: the previous version is aside, the new one not in
            return real_replace(src, dst)
        files.os.replace = replace
        with files.atomic_directory(final) as tmp:
            (tmp / "adapter_model.safetensors").write_text({text!r})
            if {when!r} == "sigterm":
                os.kill(os.getpid(), signal.SIGTERM)  # default action: the process ends at once
    """)  # fmt: skip
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": str(root)}
    return subprocess.run([sys.executable, "-c", code], env=env).returncode


def test_a_kill_between_the_two_renames_never_leaves_nothing(folder):
    final = folder / "phi2-xsum-final"
    make_version(final, "v1")
    assert crash_inside_a_replacement(final, "v2", "between-renames") == 9
    moved_aside = [n for n in names(folder) if ".old-" in n]
    assert len(moved_aside) == 1 and not final.exists()  # what the dead process left

    actions = fileio.recover_directory(final)  # what the next writer (or a resumed run) does first
    assert actions[-1] == f"restored {final} from {moved_aside[0]}: a replacement was interrupted"
    assert (final / "adapter_model.safetensors").read_text() == "v1"
    assert names(folder) == ["phi2-xsum-final"]


def test_the_next_write_finishes_a_replacement_that_had_renamed_the_new_version_in(folder):
    final = folder / "phi2-xsum-final"
    make_version(final, "v2")
    (folder / ".phi2-xsum-final.old-999999999").mkdir()  # a dead process's previous version, already replaced
    make_version(final, "v3")
    assert (final / "adapter_model.safetensors").read_text() == "v3"
    assert names(folder) == ["phi2-xsum-final"]


def test_sigterm_while_writing_leaves_no_hidden_directory_after_the_next_write(folder):
    final = folder / "prepared"
    make_version(final, "v1")
    assert crash_inside_a_replacement(final, "half of v2", "sigterm") == -15
    assert any(n.endswith(".partial") for n in names(folder))  # the dead process could not clean up
    make_version(final, "v3")
    assert (final / "adapter_model.safetensors").read_text() == "v3"
    assert names(folder) == ["prepared"]


def test_a_live_process_temp_directory_is_left_alone(folder):
    final = folder / "prepared"
    busy = folder / f".prepared.{os.getppid()}.abc.partial"  # the parent of this test: alive
    busy.mkdir()
    assert fileio.recover_directory(final) == []
    assert busy.is_dir()


def test_one_cache_root_for_compiled_kernels_and_converted_models(tmp_path, monkeypatch):
    from phi2cli.io.files import cache_root
    from phi2cli.kernels.compiled import use_compile_cache

    monkeypatch.delenv("PHI2_CACHE_DIR", raising=False)
    for name in ("TORCHINDUCTOR_CACHE_DIR", "TRITON_CACHE_DIR"):  # restored after the test, whatever it sets
        monkeypatch.setenv(name, "")
        monkeypatch.delenv(name)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    assert cache_root() == tmp_path / "home" / ".cache" / "phi2cli"
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_root() == tmp_path / "xdg" / "phi2cli"
    monkeypatch.setenv("PHI2_CACHE_DIR", str(tmp_path / "mine"))
    assert cache_root() == tmp_path / "mine" == use_compile_cache()
    import os

    assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == str(tmp_path / "mine" / "inductor")
