"""`phi2 serve`: keep the libraries imported and the model loaded for summarize and evaluate."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated, Optional

import typer

from phi2cli.cli.app import command, console
from phi2cli.inference.evaluation import DEFAULT_ADAPTER


@command("serve")
def serve_command(
    adapter: Annotated[Optional[Path], typer.Option(
        "--adapter", "-a", help=f"Adapter to load and warm up at start (default: {DEFAULT_ADAPTER} when it exists; "
        "otherwise models load on the first request).", show_default=False)] = None,
    keep_alive: Annotated[float, typer.Option(
        "--keep-alive", help="Minutes without requests after which the model is unloaded from the GPU (the "
        "server stays; the next request loads it again). 0: never.", min=0)] = 30.0,
    socket: Annotated[Optional[Path], typer.Option(
        "--socket", help="Unix socket to listen on (default: PHI2_SERVE_SOCKET, else serve/phi2.sock in phi2cli's "
        "cache directory). Commands look where PHI2_SERVE_SOCKET points.", show_default=False)] = None,
    status: Annotated[bool, typer.Option("--status", help="Show the running server and exit.")] = False,
    stop: Annotated[bool, typer.Option("--stop", help="Stop the running server and exit.")] = False,
) -> None:  # fmt: skip
    """Keep libraries and the model loaded, so summarize and evaluate start at once.

    While it runs, 'phi2 summarize' and 'phi2 evaluate' of this user, started with the same environment and phi2cli, hand it their work: no torch import, no model to read. They compute and write what they would in a process of their own (--no-server runs them there).

    One command runs at a time; others wait. Only this user can connect (a Unix socket, mode 0600).

    Stop it with Ctrl-C or 'phi2 serve --stop'.
    """  # noqa: E501 (one line per paragraph: --help keeps line breaks)
    from phi2cli.cli.app import fail
    from phi2cli.cli.ui import note
    from phi2cli.serving.protocol import socket_path
    from phi2cli.serving.server import ServeOptions, check_socket_path, refuse_if_running, running_status, serve

    path = (socket.expanduser().absolute() if socket else socket_path())
    if status and stop:
        raise typer.BadParameter("give --status or --stop, not both")
    check_socket_path(path)  # before anything slow
    if status or stop:
        found = running_status(path)
        if found is None:
            if stop:
                console.print(f"No phi2 serve is running (socket {path}).")
                return
            raise fail(f"no phi2 serve is running (socket {path}); start one with 'phi2 serve'")
        if status:
            model = found["model"]
            held = f"{model['model']} + {model['adapter'] or 'no adapter'} on {model['device']}" if model else "none"
            console.print(f"phi2 serve pid {found['pid']} (phi2cli {found['version']}), socket {path}\n"
                          f"  up {(time.time() - found['started']) / 60:.1f} min, {found['requests']} requests, "
                          f"busy: {found['busy'] or 'no'}\n  model loaded: {held}", highlight=False)  # fmt: skip
            return
        from phi2cli.serving.client import request

        request("stop", {}, path=path)
        for _ in range(100):  # it removes its socket on the way out
            if not path.exists():
                break
            time.sleep(0.1)
        console.print(f"Stopped phi2 serve (pid {found['pid']}).")
        return
    chosen = str(adapter) if adapter else (DEFAULT_ADAPTER if (Path(DEFAULT_ADAPTER) / "adapter_config.json").is_file()
                                           else None)  # fmt: skip
    refuse_if_running(path)  # before saying that the slow imports begin (serve checks again)
    note("phi2 serve: importing libraries" + (f", loading {chosen}" if chosen else ""))

    def log(message: str) -> None:
        console.print(f"[dim]{time.strftime('%H:%M:%S')}[/dim] {message}", highlight=False)

    def ready(state: dict) -> None:
        console.print(f"Ready (pid {state['pid']}): phi2 summarize and phi2 evaluate now run here. Socket {path}. "
                      f"Ctrl-C or 'phi2 serve --stop' stops it.", highlight=False)  # fmt: skip

    serve(ServeOptions(path, chosen, keep_alive * 60 if keep_alive else float("inf")), log, ready)
