"""The `phi2 serve` process: libraries imported once, the last model kept loaded, one command at a time.

Why it exists: `phi2 summarize` of one article on an H200 spends ~5 s importing torch and
transformers and ~2 s reading the model before 0.9 s of generation (benchmarks/results/
end_to_end.json, import_floor.json); a resident process pays that once.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import gc
import itertools
import json
import os
import signal
import socketserver
import threading
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from phi2cli.errors import ConfigError, Phi2Error, RunError
from phi2cli.serving import client
from phi2cli.serving.protocol import MAX_SOCKET_PATH, identity, mismatch, receive, send

Emit = Callable[[dict[str, Any]], None]
WARM_UP_TEXT = ("The council said the bridge would reopen on Monday after repairs to its deck, "
                "which was damaged by a lorry last month.")  # fmt: skip


@dataclass(frozen=True)
class ServeOptions:
    socket: Path
    adapter_dir: str | None = None  # loaded (and warmed up) before the first request; None: on demand
    keep_alive_s: float = 1800.0  # idle this long, the model is unloaded (the process and its imports stay)


# What phi2's own commands write into a run folder and loading never reads: `phi2 evaluate`'s results.
RESULT_FILES = ("metrics-*.json", "predictions-*.jsonl")


def _folder_state(path: Path) -> list[tuple[str, int, int]]:
    """(name, mtime, size) of the files directly in `path` that loading may read: a retrained adapter or a
    re-converted model differs, an evaluation's results beside it do not."""
    if not path.is_dir():
        return []
    files = [(p.name, p.stat()) for p in sorted(path.iterdir())
             if p.is_file() and not any(fnmatch.fnmatch(p.name, pattern) for pattern in RESULT_FILES)]  # fmt: skip
    return [(name, found.st_mtime_ns, found.st_size) for name, found in files]


def model_key(config: Any, adapter_dir: str | Path | None) -> str:
    """What load_model's result depends on: the model settings, the template, the adapter's and model's files."""
    adapter = Path(adapter_dir).resolve() if adapter_dir is not None else None
    model = Path(config.model.model).expanduser()
    parts = [dataclasses.asdict(config.model), config.data.template, str(adapter),
             _folder_state(adapter) if adapter else [], _folder_state(model) if model.exists() else []]  # fmt: skip
    return json.dumps(parts, sort_keys=True, default=str)


class ModelCache:
    """The model of the last request, kept loaded (one: a second would double the GPU memory held)."""

    def __init__(self) -> None:
        self.key: str | None = None
        self.loaded: Any = None  # the LoadedModel kept between requests
        self.lent: Any = None  # the LoadedModel the running request holds
        self.lent_key: tuple[str, Any] | None = None  # its model_key, taken before its files were read, and its adapter
        self.loads = self.reuses = 0

    def load(self, config: Any, adapter_dir: str | Path | None = None) -> Any:
        """load_model's result for (config, adapter_dir): the kept one when its key matches, else a new one."""
        from phi2cli.inference.trained_model import load_model

        key = model_key(config, adapter_dir)  # before loading: files changed meanwhile make the next key differ
        if self.loaded is not None and key == self.key:
            self.reuses += 1
            self.lent = dataclasses.replace(self.loaded, config=config, notes=list(self.loaded.notes), load_phases={})
        else:
            self.release()
            self.lent = load_model(config, adapter_dir)
            self.loads += 1
        self.lent_key = (key, self.lent.adapter_dir)
        return self.lent

    def settle(self, failed: bool) -> None:
        """After a request: keep the model it used (compare-base merged the adapter into it), or drop it when
        the request failed while holding it."""
        if failed and self.lent is not None:  # it may have left the weights half-merged: never serve them again
            self.release()
        elif self.lent is not None:
            key, adapter = self.lent_key
            if self.lent.adapter_dir != adapter:  # the request merged an adapter in: key what the model holds now
                key = model_key(self.lent.config, self.lent.adapter_dir)
            self.loaded, self.key = self.lent, key
        self.lent = self.lent_key = None

    def release(self) -> None:
        """Drop the model and give its GPU memory back."""
        self.loaded = self.lent = self.key = self.lent_key = None
        gc.collect()
        import torch

        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    def describe(self) -> dict[str, Any] | None:
        if self.loaded is None:
            return None
        adapter = self.loaded.adapter_dir
        return {"model": self.loaded.config.model.model, "adapter": str(adapter) if adapter else None,
                "device": self.loaded.device, "dtype": self.loaded.dtype}  # fmt: skip


class _TextEvents:
    """A text stream whose writes travel to the client as 'text' events (a streamed summary)."""

    def __init__(self, emit: Emit) -> None:
        self.emit = emit

    def write(self, text: str) -> int:
        self.emit({"event": "text", "text": text})
        return len(text)

    def flush(self) -> None:
        pass


def run_summarize(cache: ModelCache, args: dict[str, Any], emit: Emit) -> dict[str, Any]:
    from phi2cli.inference.evaluation import Article, summarize

    articles = [Article(a["source"], a["text"]) for a in args["articles"]]
    timings: dict[str, Any] = {}
    results, notes = summarize(articles, args["adapter"], args["base_only"], args["overrides"],
                               args["gen_batch_size"], stream=_TextEvents(emit) if args["stream"] else None,
                               timings=timings, load=cache.load)  # fmt: skip
    return {"results": [dataclasses.asdict(r) for r in results], "notes": notes, "timings": timings}


def run_evaluate(cache: ModelCache, args: dict[str, Any], emit: Emit) -> dict[str, Any]:
    from phi2cli.inference.evaluation import EvaluateOptions, evaluate

    numbers = itertools.count()

    def track(description: str, total: int) -> Callable[[int], None]:
        task = next(numbers)
        emit({"event": "task", "id": task, "description": description, "total": total})
        return lambda n: emit({"event": "advance", "id": task, "n": n})

    result = evaluate(EvaluateOptions(**args["options"]), track, load=cache.load)
    return {"metrics": result.metrics, "metrics_path": str(result.metrics_path),
            "predictions_path": str(result.predictions_path), "notes": result.notes}  # fmt: skip


JOBS = {"summarize": run_summarize, "evaluate": run_evaluate}


class Server:
    """Answers requests on a Unix socket; jobs run one at a time, status and stop at once."""

    def __init__(self, options: ServeOptions, log: Callable[[str], None]) -> None:
        self.options, self.log = options, log
        self.cache = ModelCache()
        self.gpu = threading.Lock()  # one job at a time: they share the model and the GPU
        self.identity = identity()
        self.started = time.time()
        self.last_job = time.monotonic()
        self.requests = 0
        self.busy: str | None = None
        self.stopping = threading.Event()
        self.listener: socketserver.ThreadingUnixStreamServer | None = None
        self.home = os.getcwd()

    def status(self) -> dict[str, Any]:
        return {"pid": os.getpid(), "socket": str(self.options.socket), "version": self.identity["version"],
                "started": self.started, "requests": self.requests, "busy": self.busy,
                "model": self.cache.describe(), "loads": self.cache.loads, "reuses": self.cache.reuses,
                "keep_alive_s": self.options.keep_alive_s}  # fmt: skip

    def handle(self, request: dict[str, Any], emit: Emit) -> None:
        command = request.get("command")
        if command == "status":
            emit({"event": "done", "result": self.status()})
            return
        if command == "stop":
            emit({"event": "done", "result": self.status()})
            self.log("stopping ('phi2 serve --stop')")
            self.stopping.set()
            threading.Thread(target=self.listener.shutdown, daemon=True).start()
            return
        if command not in JOBS:
            emit({"event": "error", "type": "ConfigError", "message": f"phi2 serve has no command {command!r}",
                  "exit_code": 2})  # fmt: skip
            return
        why = mismatch(request.get("identity") or {}, self.identity)
        if why:
            emit({"event": "decline", "reason": f"pid {os.getpid()}: {why}"})
            return
        if not self.gpu.acquire(blocking=False):
            emit({"event": "queued", "busy": self.busy})
            self.gpu.acquire()
        started, failed = time.perf_counter(), True
        try:
            self.busy, self.requests = command, self.requests + 1
            os.chdir(request["cwd"])  # the client's relative paths mean what they mean in its shell
            reuses = self.cache.reuses
            result = JOBS[command](self.cache, request["args"], emit)
            result["server"] = {"pid": os.getpid(), "model_kept": self.cache.reuses > reuses}
            failed = False
            emit({"event": "done", "result": result})
            self.log(f"{command} in {request['cwd']}: {time.perf_counter() - started:.1f} s")
        except Phi2Error as err:
            self._answer_error(emit, type(err).__name__, str(err), err.exit_code)
            self.log(f"{command}: {type(err).__name__}: {err}")
        except (BrokenPipeError, ConnectionResetError):
            self.log(f"{command}: the client left; its request was dropped")
        except Exception as err:  # a bug, or CUDA running out of memory: the traceback stays in this terminal
            self.log(f"{command} failed:\n{traceback.format_exc()}")
            first = str(err).splitlines()[0] if str(err) else ""
            self._answer_error(emit, "Phi2Error", f"{type(err).__name__}: {first} (phi2 serve's terminal shows "
                                                  f"the traceback)", 1)  # fmt: skip
        finally:
            self.cache.settle(failed)
            os.chdir(self.home)
            self.busy, self.last_job = None, time.monotonic()
            self.gpu.release()

    @staticmethod
    def _answer_error(emit: Emit, kind: str, message: str, exit_code: int) -> None:
        try:
            emit({"event": "error", "type": kind, "message": message, "exit_code": exit_code})
        except OSError:  # the client is gone: nobody to tell
            pass

    def preload(self, adapter_dir: str) -> None:
        """Load the adapter's model and summarize one short text, so the first request finds both warm."""
        from phi2cli.inference.evaluation import Article, resolve_config, summarize

        with self.gpu:
            self.busy = "loading"
            started = time.perf_counter()
            try:
                summarize([Article("warm-up", WARM_UP_TEXT)], adapter_dir, False, {}, None, load=self.cache.load)
                self.cache.settle(False)
                model = resolve_config(adapter_dir, {}).model.model
                self.log(f"loaded {model} with {adapter_dir} ({time.perf_counter() - started:.1f} s)")
            except Phi2Error as err:
                self.cache.settle(True)
                self.log(f"could not load {adapter_dir} ({err}); models load on the first request")
            finally:
                self.busy = None

    def unload_when_idle(self) -> None:
        while not self.stopping.wait(min(5.0, self.options.keep_alive_s / 4)):
            idle = time.monotonic() - self.last_job
            if self.cache.loaded is not None and idle > self.options.keep_alive_s and self.gpu.acquire(blocking=False):
                try:
                    self.cache.release()
                    self.log(f"idle {idle / 60:.0f} min: unloaded the model (it loads again on the next request)")
                finally:
                    self.gpu.release()


def check_socket_path(path: Path) -> None:
    if len(os.fsencode(str(path))) > MAX_SOCKET_PATH:
        raise ConfigError(f"the socket path {path} is longer than a Unix socket allows ({MAX_SOCKET_PATH} bytes); "
                          f"set PHI2_SERVE_SOCKET or --socket to a shorter path")  # fmt: skip


def refuse_if_running(path: Path) -> None:
    """Raises RunError when a server already answers on `path` (one socket, one server)."""
    other = running_status(path)
    if other is not None:
        raise RunError(f"phi2 serve is already running (pid {other['pid']}, socket {path}); "
                       f"stop it with 'phi2 serve --stop' or give this one another --socket")  # fmt: skip


def running_status(path: Path) -> dict[str, Any] | None:
    """The status of the server answering at `path`, or None when none does."""
    try:
        return client.request("status", {}, path=path).result
    except Phi2Error:
        return None


def serve(options: ServeOptions, log: Callable[[str], None], ready: Callable[[dict[str, Any]], None]) -> None:
    """Run the server until Ctrl-C, SIGTERM or `phi2 serve --stop`; the socket is removed on the way out.

    Raises:
        RunError when a server already answers on the socket; ConfigError for a socket path too long.
    """
    from phi2cli.models.loading import import_libraries

    path = options.socket
    check_socket_path(path)
    refuse_if_running(path)
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    if path.exists() or path.is_symlink():
        path.unlink()  # left by a server that was killed: nothing answers there (checked above)
    server = Server(options, log)
    import_libraries(quantized=True, adapter=True)

    class Handler(socketserver.StreamRequestHandler):
        def handle(self) -> None:
            request = receive(self.rfile)
            if request is not None:
                server.handle(request, lambda message: send(self.wfile, message))

    previous_umask = os.umask(0o177)  # the socket is created 0600: only this user can connect
    try:
        listener = socketserver.ThreadingUnixStreamServer(str(path), Handler)
    finally:
        os.umask(previous_umask)
    listener.daemon_threads = True
    server.listener = listener
    ours = path.stat().st_ino
    in_main = threading.current_thread() is threading.main_thread()  # only the main thread may set handlers
    previous_term = signal.signal(signal.SIGTERM, _interrupt) if in_main else None
    try:
        if options.adapter_dir:
            server.preload(options.adapter_dir)
        threading.Thread(target=server.unload_when_idle, daemon=True).start()
        ready(server.status())
        listener.serve_forever(poll_interval=0.2)
    except KeyboardInterrupt:
        log("stopping (interrupted)")
    finally:
        server.stopping.set()
        if in_main:
            signal.signal(signal.SIGTERM, previous_term)
        listener.server_close()
        try:
            if path.stat().st_ino == ours:  # never remove a socket another server made since
                path.unlink()
        except FileNotFoundError:
            pass


def _interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt
