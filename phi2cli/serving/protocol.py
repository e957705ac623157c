"""What a `phi2 serve` process and its clients agree on: where the socket is, who may use it, the messages.

No torch here: a client imports this and nothing heavy.

Messages are JSON objects, one per line, over a Unix socket only its user can open (mode 0600).
A client sends one request:
    {"command": "summarize" | "evaluate" | "status" | "stop", "args": {...}, "cwd": ..., "identity": {...}}
and reads events until the last one:
    {"event": "decline", "reason": ...}            the server will not run it here (the client runs it itself)
    {"event": "queued"}                            another request is running; this one waits
    {"event": "task", "id": N, "description": ..., "total": N} / {"event": "advance", "id": N, "n": N}
    {"event": "text", "text": ...}                 a streamed summary's next piece
    {"event": "done", "result": {...}} / {"event": "error", "type": ..., "message": ..., "exit_code": N}
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, BinaryIO

SOCKET_ENV = "PHI2_SERVE_SOCKET"  # where the socket is, instead of the cache directory's serve/phi2.sock
# Environment variables that change what a command computes or where it reads: a server started
# with other values would not give this shell's answer, so the client runs the command itself.
_ENV_PREFIXES = ("HF_", "PHI2_", "CUDA_", "PYTORCH_", "TORCH", "TRANSFORMERS_", "BNB_", "TOKENIZERS_")
_ENV_IGNORED = {"PHI2_DEBUG", SOCKET_ENV, "TRANSFORMERS_VERBOSITY", "TOKENIZERS_PARALLELISM"}
MAX_SOCKET_PATH = 104  # sun_path holds 104 bytes on macOS, 108 on Linux (with its NUL)


def socket_path() -> Path:
    """The server's socket: PHI2_SERVE_SOCKET, else serve/phi2.sock in phi2cli's cache directory."""
    if os.environ.get(SOCKET_ENV):
        return Path(os.environ[SOCKET_ENV]).expanduser().absolute()
    from phi2cli.io.files import cache_root

    return (cache_root() / "serve" / "phi2.sock").absolute()


def identity() -> dict[str, Any]:
    """What must match between a client and the server: phi2cli's version and location, the environment
    (the socket's mode already keeps other users out)."""
    import phi2cli

    env = {k: v for k, v in sorted(os.environ.items()) if k.startswith(_ENV_PREFIXES) and k not in _ENV_IGNORED}
    return {"version": phi2cli.__version__, "package": str(Path(phi2cli.__file__).resolve().parent), "env": env}


def mismatch(client: dict[str, Any], server: dict[str, Any]) -> str | None:
    """Why a client's request must not run in this server (None when it may), in words."""
    if client.get("package") != server["package"] or client.get("version") != server["version"]:
        return (f"it runs phi2cli {server['version']} from {server['package']}, this shell "
                f"{client.get('version')} from {client.get('package')}")  # fmt: skip
    theirs, ours = client.get("env", {}), server["env"]
    differing = sorted(k for k in set(theirs) | set(ours) if theirs.get(k) != ours.get(k))
    if differing:
        return f"its environment differs from this shell's in {', '.join(differing)}"
    return None


def send(stream: BinaryIO, message: dict[str, Any]) -> None:
    stream.write(json.dumps(message, ensure_ascii=False).encode("utf-8") + b"\n")
    stream.flush()


def receive(stream: BinaryIO) -> dict[str, Any] | None:
    """The next message, or None at the end of the stream (the other side closed it)."""
    line = stream.readline()
    if not line:
        return None
    return json.loads(line.decode("utf-8"))
