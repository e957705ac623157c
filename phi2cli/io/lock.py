"""One training run per output directory: a lock file that names its owner (PID and host).

The lock is an flock on the file, so the kernel releases it when its process ends, however it
ends (kill -9 included): a lock file whose flock is free was left by a process that is gone.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
from pathlib import Path

from phi2cli.errors import RunError

LOCK_NAME = ".phi2-train.lock"


class RunLock:
    """Held by the process that trains into `directory`; `acquire` refuses while another holds it."""

    def __init__(self, directory: str | Path) -> None:
        self.path = Path(directory) / LOCK_NAME
        self.fd: int | None = None
        self.made_directory = False  # removed again on release if still empty (a refused run leaves nothing)

    def acquire(self) -> str | None:
        """Take the lock; returns a note when a dead process's lock was taken over.

        Raises:
            RunError naming the process (PID, host) that trains into the directory now.
        """
        if not self.path.parent.exists():
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.made_directory = True
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                owner = _read_owner(fd)
                os.close(fd)
                who = f"PID {owner.get('pid', '?')} on {owner.get('host', '?')}"
                raise RunError(f"another phi2 train ({who}) is writing to {self.path.parent}; "
                               f"wait for it to finish or choose another --output-dir") from None  # fmt: skip
            try:
                same_file = os.fstat(fd).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:  # its owner released (removed) it between our open and flock
                same_file = False
            if same_file:
                break
            os.close(fd)
        previous = _read_owner(fd)
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps({"pid": os.getpid(), "host": socket.gethostname()}) + "\n").encode(), 0)
        os.fsync(fd)
        self.fd = fd
        if previous.get("pid") and previous.get("pid") != os.getpid():
            return (f"took over the lock of PID {previous['pid']} on {previous.get('host', '?')} in "
                    f"{self.path.parent}: that run had ended without releasing it")  # fmt: skip
        return None

    def release(self) -> None:
        if self.fd is None:
            return
        try:
            self.path.unlink(missing_ok=True)
        finally:
            os.close(self.fd)  # closing the descriptor drops the flock
            self.fd = None
        if self.made_directory:
            try:
                self.path.parent.rmdir()
            except OSError:  # the run wrote something: keep it
                pass


def _read_owner(fd: int) -> dict:
    try:
        return json.loads(os.pread(fd, 4096, 0) or b"{}")
    except ValueError:
        return {}
