"""A command's side of `phi2 serve`: hand the work to the running server, or learn that there is none.

Imports no torch, so a served `phi2 summarize` starts as fast as `phi2 --help`.
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from phi2cli import errors
from phi2cli.errors import Phi2Error
from phi2cli.serving.protocol import identity, receive, send, socket_path

Listener = Callable[[dict[str, Any]], None]  # gets the task / advance / text / queued events


@dataclass
class Outcome:
    result: dict[str, Any] | None  # the server's answer; None: run the command in this process
    note: str | None = None  # what the user should know (why the server did not run it), else None


def connect(path: Path | None = None) -> socket.socket | None:
    """A connection to the server at `path` (default: socket_path()), or None when none answers there."""
    path = path or socket_path()
    if not path.exists():
        return None
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.connect(str(path))
    except OSError:  # a socket file left by a server that was killed: nobody listens
        sock.close()
        return None
    return sock


def request(command: str, args: dict[str, Any], listener: Listener | None = None,
            path: Path | None = None) -> Outcome:  # fmt: skip
    """Run `command` ("summarize", "evaluate", "status", "stop") in the running server.

    Returns:
        Outcome: its result, or None (with a note when there was a server) for the caller to run it itself.
    Raises:
        Phi2Error: the server's own error for this request (same type, message and exit code as here).
    """
    sock = connect(path)
    if sock is None:
        return Outcome(None)
    with sock, sock.makefile("rwb") as stream:
        try:
            send(stream, {"command": command, "args": args, "cwd": os.getcwd(), "identity": identity()})
            while True:
                message = receive(stream)
                if message is None:
                    break
                event = message.get("event")
                if event == "done":
                    return Outcome(message["result"])
                if event == "error":
                    raise _error(message)
                if event == "decline":
                    return Outcome(None, f"phi2 serve did not take this command ({message['reason']}); running it here")
                if listener is not None:
                    listener(message)
        except (ConnectionError, OSError) as err:  # the server went away mid-request
            return Outcome(None, f"phi2 serve stopped while working on this command ({err}); running it here")
    return Outcome(None, "phi2 serve stopped while working on this command; running it here")


def _error(message: dict[str, Any]) -> Phi2Error:
    kind = getattr(errors, str(message.get("type")), None)
    if not (isinstance(kind, type) and issubclass(kind, Phi2Error)):
        kind = Phi2Error
    error = kind(message.get("message", "phi2 serve failed"))
    error.exit_code = int(message.get("exit_code", 1))
    return error
