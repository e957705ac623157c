"""Atomic writes: an interrupted command leaves the previous version or nothing, never half a file."""

from __future__ import annotations

import errno
import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterable, Iterator

from phi2cli.errors import Phi2Error


def cache_root() -> Path:
    """phi2cli's cache (compiled kernels, converted .gguf models): PHI2_CACHE_DIR, else
    $XDG_CACHE_HOME/phi2cli, else ~/.cache/phi2cli; it survives reboots and /tmp cleaning."""
    if os.environ.get("PHI2_CACHE_DIR"):
        return Path(os.environ["PHI2_CACHE_DIR"]).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "phi2cli"


# How writers that are not plain Python I/O say the disk is full: safetensors (Rust), torch.save (C++).
_DISK_FULL_TEXTS = ("no space left on device", "storagefull", "os error 28", "file write failed",
                    "disk quota exceeded")  # fmt: skip


def disk_full(err: BaseException) -> bool:
    """True when `err` (an OSError, SafetensorError, torch.save's RuntimeError...) means the disk is full."""
    if isinstance(err, OSError) and err.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    if not (isinstance(err, (OSError, RuntimeError)) or type(err).__name__ == "SafetensorError"):
        return False
    return any(text in str(err).lower() for text in _DISK_FULL_TEXTS)


def storage_error(err: BaseException, path: str | Path) -> Phi2Error | None:
    """The one-line error for a failed write under `path`, or None when `err` is not about storage."""
    if disk_full(err):
        return Phi2Error(f"disk full while writing {path}; free space and run the command again")
    if isinstance(err, OSError):
        return _disk_error(Path(err.filename) if err.filename else Path(path), err)
    return None


def _disk_error(path: Path, err: OSError) -> Phi2Error:
    if disk_full(err):
        return Phi2Error(f"disk full while writing {path}; free space and run the command again")
    if err.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return Phi2Error(f"cannot write {path}: permission denied; choose a writable output directory")
    if err.errno == errno.ENOENT and path.parent.is_dir():  # e.g. /proc: the directory takes no new files
        return Phi2Error(f"cannot write {path}: {path.parent} does not accept new files; "
                         f"choose a writable output directory")  # fmt: skip
    if err.errno == errno.EISDIR:
        return Phi2Error(f"cannot write {path}: it is a directory; give a file name")
    if err.errno == errno.ENOTDIR:
        blocker = next((p for p in path.parents if p.is_file()), None)
        where = f"{blocker} is a file, not a directory" if blocker else "a parent is not a directory"
        return Phi2Error(f"cannot write {path}: {where}; choose another output path")
    return Phi2Error(f"cannot write {path}: {err.strerror or err}")


def check_writable_dir(path: str | Path) -> Path:
    """Fail early, creating nothing, when `path` cannot become a writable directory.

    Raises:
        Phi2Error naming the file in the way or the directory without write permission.
    """
    path = Path(path)
    existing = next((p for p in (path, *path.parents) if p.exists()), None)
    if existing is None:
        return path
    if not existing.is_dir():
        if existing == path:
            raise Phi2Error(f"{path} is a file, not a directory; choose another output path")
        raise Phi2Error(f"cannot create {path}: {existing} is a file, not a directory; choose another output path")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise Phi2Error(f"cannot write to {existing}: permission denied; choose a writable output directory")
    return path


def ensure_writable_dir(path: str | Path) -> Path:
    """Create a directory (and parents) or raise a Phi2Error that says why it cannot be used."""
    path = check_writable_dir(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise _disk_error(path, err) from None
    if not os.access(path, os.W_OK):
        raise Phi2Error(f"cannot write to {path}: permission denied; choose a writable output directory")
    return path


def write_text_atomic(path: str | Path, text: str) -> Path:
    """Write UTF-8 text to path via a temp file in the same directory and an atomic rename."""
    return write_bytes_atomic(path, text.encode("utf-8"))


def write_bytes_atomic(path: str | Path, data: bytes) -> Path:
    """Write bytes to path via a temp file in the same directory and an atomic rename.

    Raises:
        Phi2Error ("disk full while writing ...", permission, a directory in the way); the
        previous file is left as it was and no temp file stays behind.
    """
    path = Path(path)
    ensure_writable_dir(path.parent)
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as err:
        raise _disk_error(path, err) from None
    try:
        os.chmod(tmp, 0o644)  # mkstemp makes 0600; written files should read like any other
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except OSError as err:
        Path(tmp).unlink(missing_ok=True)
        raise _disk_error(path, err) from None
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def write_json_atomic(path: str | Path, data: Any) -> Path:
    return write_text_atomic(path, json.dumps(data, indent=2, ensure_ascii=False) + "\n")


def write_jsonl_atomic(path: str | Path, rows: Iterable[Any]) -> Path:
    return write_text_atomic(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))


def pid_alive(pid: int) -> bool:
    """True while a process with this id runs on this machine (a zombie counts as gone)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(") ")[-1][:1] != "Z"
    except OSError:
        return True


def _owner_pid(name: str, final_name: str) -> int | None:
    """The process id in '.NAME.PID.xxx.partial' or '.NAME.old-PID'; None for other names."""
    if name.startswith(f".{final_name}.old-"):
        rest = name[len(final_name) + 6 :]
    elif name.startswith(f".{final_name}.") and name.endswith(".partial"):
        rest = name[len(final_name) + 2 :].split(".", 1)[0]
    else:
        return None
    return int(rest) if rest.isdigit() else None


def recover_directory(final: str | Path) -> list[str]:
    """Finish or undo a replacement of `final` that a dead process left half done.

    A moved-aside previous version ('.NAME.old-PID') is put back when `final` is missing (undo)
    and removed when `final` is there (the replacement had finished); temp directories
    ('.NAME.PID.*.partial') of processes that no longer run are removed. Directories of live
    processes are left alone. Returns one line per action.
    """
    final = Path(final)
    if not final.parent.is_dir():
        return []
    actions = []
    for entry in sorted(final.parent.iterdir(), key=lambda p: p.name):
        pid = _owner_pid(entry.name, final.name)
        if pid is None or pid_alive(pid) and pid != os.getpid():
            continue
        if entry.name.endswith(".partial"):
            shutil.rmtree(entry, ignore_errors=True)
            actions.append(f"removed {entry.name}, left unfinished by an interrupted process")
        elif not final.exists():
            os.replace(entry, final)
            actions.append(f"restored {final} from {entry.name}: a replacement was interrupted")
        else:
            shutil.rmtree(entry, ignore_errors=True)
            actions.append(f"removed {entry.name}, the previous version of {final.name}")
    return actions


@contextmanager
def atomic_directory(final: str | Path) -> Iterator[Path]:
    """Yield a temp directory beside `final`; on success it replaces `final`.

    The previous version is renamed aside, the new one renamed in, then the previous one
    removed; the names carry this process's id, so a process killed between two renames
    leaves what `recover_directory` (called here first) finishes or undoes. On an error or
    interruption the temp directory is removed and `final` is left as it was.
    """
    final = Path(final)
    ensure_writable_dir(final.parent)
    recover_directory(final)
    try:
        tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.{os.getpid()}.", suffix=".partial", dir=final.parent))
    except OSError as err:
        raise _disk_error(final, err) from None
    tmp.chmod(0o755)  # mkdtemp makes 0700
    old = None
    try:
        yield tmp
        fsync_tree(tmp)
        if final.exists():
            if not final.is_dir():
                raise Phi2Error(f"{final} is a file, not a directory; choose another output path")
            old = final.with_name(f".{final.name}.old-{os.getpid()}")
            os.replace(final, old)
        os.replace(tmp, final)
        fsync_dir(final.parent)
    except OSError as err:
        _roll_back(tmp, final, old)
        raise _disk_error(final, err) from None
    except Phi2Error as err:  # a write inside named the temp directory; the user knows only `final`
        _roll_back(tmp, final, old)
        raise type(err)(str(err).replace(str(tmp), str(final))) from None
    except BaseException as err:
        _roll_back(tmp, final, old)
        if disk_full(err):  # safetensors and torch.save report a full disk in their own exception types
            raise Phi2Error(f"disk full while writing {final}; free space and run the command again") from None
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def fsync_dir(path: str | Path) -> None:
    """Make a directory's entries (a rename into it) durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(root: str | Path) -> None:
    """fsync every file and directory under root, so a rename publishes complete contents."""
    for folder, _, files in os.walk(root):
        for name in files:
            fd = os.open(os.path.join(folder, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        fsync_dir(folder)


def _roll_back(tmp: Path, final: Path, old: Path | None) -> None:
    """Remove the temp directory and put the previous version back if it was moved aside."""
    shutil.rmtree(tmp, ignore_errors=True)
    if old is not None and old.exists() and not final.exists():
        try:
            os.replace(old, final)
        except OSError:  # the original error is the one to report; the previous version stays in `old`
            pass
