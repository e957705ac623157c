"""`phi2 serve`: summarize and evaluate handed to a resident process give the same answers and files."""

from __future__ import annotations

import json
import os
import shutil
import socket
import stat
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from conftest import ROOT
from phi2cli.cli import app
from phi2cli.serving import client
from phi2cli.serving.protocol import SOCKET_ENV, identity, mismatch
from phi2cli.serving.server import ServeOptions, running_status, serve

runner = CliRunner()
ARTICLE = ROOT / "examples" / "article.txt"


@pytest.fixture
def short_socket(monkeypatch):
    """A socket path short enough for AF_UNIX (pytest's tmp paths can be too long), pointed at by PHI2_SERVE_SOCKET."""
    folder = Path(tempfile.mkdtemp(prefix="p2s", dir="/tmp"))
    path = folder / "s.sock"
    monkeypatch.setenv(SOCKET_ENV, str(path))
    yield path
    shutil.rmtree(folder, ignore_errors=True)


def wait_for(check, seconds: float = 60.0):
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"not true within {seconds} s: {check}")


@pytest.fixture
def server(short_socket, final):
    """A server in a thread of this process (same environment), the test's adapter preloaded; stopped after."""
    logs: list[str] = []
    ready = threading.Event()
    options = ServeOptions(short_socket, str(final.name), keep_alive_s=3600.0)
    thread = threading.Thread(target=serve, args=(options, logs.append, lambda state: ready.set()), daemon=True)
    thread.start()
    assert ready.wait(120), logs
    yield short_socket, logs
    client.request("stop", {}, path=short_socket)
    thread.join(30)
    assert not thread.is_alive()
    assert not short_socket.exists()  # the server removes its socket on the way out


def status(path: Path) -> dict:
    found = running_status(path)
    assert found is not None
    return found


def test_served_summarize_prints_what_a_process_of_its_own_prints(server):
    path, _ = server
    served = runner.invoke(app, ["summarize", str(ARTICLE)])
    assert served.exit_code == 0, served.output
    assert f"served by phi2 serve (pid {os.getpid()}, model kept loaded)" in served.stderr
    alone = runner.invoke(app, ["summarize", "--no-server", str(ARTICLE)])
    assert alone.exit_code == 0, alone.output
    assert "served by" not in alone.stderr
    assert served.stdout == alone.stdout and served.stdout.strip()
    state = status(path)
    assert (state["requests"], state["loads"], state["reuses"]) == (1, 1, 1)  # loaded (and warmed up) once, reused once
    assert state["model"]["adapter"] == "phi2-xsum-final"


def test_served_evaluate_writes_the_same_files(server, final):
    served = runner.invoke(app, ["evaluate", "--samples", "4"])
    assert served.exit_code == 0, served.output
    assert "served by phi2 serve" in served.stderr
    metrics_path = final / "metrics-validation.json"
    predictions_path = final / "predictions-validation.jsonl"
    served_metrics, served_predictions = json.loads(metrics_path.read_text()), predictions_path.read_text()
    alone = runner.invoke(app, ["evaluate", "--samples", "4", "--no-server"])
    assert alone.exit_code == 0, alone.output
    metrics = json.loads(metrics_path.read_text())
    assert served_metrics.pop("timings")["load_phases"].keys() == {"data", "tokenize"}  # no libraries or model read
    assert metrics.pop("timings")["load_phases"]["libraries"] >= 0
    assert served_metrics == metrics
    assert served_predictions == predictions_path.read_text() and len(served_predictions.splitlines()) == 4


def test_a_served_error_has_the_message_and_exit_code_of_its_own_process(server):
    path, logs = server
    served = runner.invoke(app, ["summarize", "--adapter", "missing", str(ARTICLE)])
    alone = runner.invoke(app, ["summarize", "--no-server", "--adapter", "missing", str(ARTICLE)])
    assert served.exit_code == alone.exit_code == 1
    assert served.stderr == alone.stderr and "adapter directory missing does not exist" in served.stderr
    assert any("RunError" in line for line in logs)
    assert status(path)["model"] is not None  # an error before the model was lent keeps it loaded


def test_a_shell_with_another_environment_runs_the_command_itself(server, monkeypatch, tmp_path):
    monkeypatch.setenv("PHI2_CACHE_DIR", str(tmp_path / "other-cache"))
    result = runner.invoke(app, ["summarize", str(ARTICLE)])
    assert result.exit_code == 0, result.output
    assert "differs from this shell's in PHI2_CACHE_DIR); running it here" in " ".join(result.stderr.split())
    assert "served by" not in result.stderr and result.stdout.strip()
    assert mismatch({**identity(), "version": "0.0.0"}, identity()).startswith("it runs phi2cli")


def test_a_changed_adapter_is_loaded_again(server, final):
    path, _ = server
    weights = final / "adapter_model.safetensors"
    later = weights.stat().st_mtime_ns + 10**9
    os.utime(weights, ns=(later, later))  # what retraining into the same folder does to the key
    result = runner.invoke(app, ["summarize", str(ARTICLE)])
    assert result.exit_code == 0, result.output
    assert "model loaded for this command" in result.stderr
    assert status(path)["loads"] == 2


def test_an_evaluations_results_beside_the_adapter_keep_the_model_loaded(server, final):
    path, _ = server
    before = status(path)["loads"]
    evaluated = runner.invoke(app, ["evaluate", "--samples", "2"])  # writes metrics-/predictions- into the run folder
    assert evaluated.exit_code == 0, evaluated.output
    assert (final / "metrics-validation.json").is_file()
    summarized = runner.invoke(app, ["summarize", str(ARTICLE)])
    assert summarized.exit_code == 0, summarized.output
    assert "model loaded for this command" not in summarized.stderr
    assert status(path)["loads"] == before


def test_a_base_only_request_after_compare_base_gets_the_base_model(server):
    path, _ = server
    compared = runner.invoke(app, ["evaluate", "--samples", "2", "--compare-base"])  # merges the adapter in
    assert compared.exit_code == 0, compared.output
    assert "served by phi2 serve" in compared.stderr
    served = runner.invoke(app, ["summarize", "--base-only", str(ARTICLE)])
    alone = runner.invoke(app, ["summarize", "--base-only", "--no-server", str(ARTICLE)])
    assert served.exit_code == alone.exit_code == 0, served.output + alone.output
    assert "served by phi2 serve" in served.stderr
    assert served.stdout == alone.stdout and served.stdout.strip()


def test_the_model_key_follows_what_loading_reads(final):
    from phi2cli.config import load_run_config
    from phi2cli.serving.server import model_key

    config, _ = load_run_config(final)
    key = model_key(config, final)
    (final / "metrics-test.json").write_text("{}")
    (final / "predictions-test.jsonl").write_text("")
    assert model_key(config, final) == key
    config_file = final / "adapter_config.json"
    later = config_file.stat().st_mtime_ns + 10**9
    os.utime(config_file, ns=(later, later))
    assert model_key(config, final) != key


def test_a_second_server_on_the_same_socket_is_refused(server):
    path, _ = server
    result = runner.invoke(app, ["serve"])
    assert result.exit_code == 1
    assert f"phi2 serve is already running (pid {os.getpid()}, socket {path})" in " ".join(result.stderr.split())


def test_the_socket_is_for_its_user_only(server):
    path, _ = server
    assert stat.S_IMODE(path.stat().st_mode) == 0o600


def test_an_idle_server_unloads_its_model(short_socket, final):
    ready = threading.Event()
    logs: list[str] = []
    options = ServeOptions(short_socket, str(final.name), keep_alive_s=0.2)
    thread = threading.Thread(target=serve, args=(options, logs.append, lambda state: ready.set()), daemon=True)
    thread.start()
    assert ready.wait(120), logs
    try:
        wait_for(lambda: status(short_socket)["model"] is None, 10)
        assert any("unloaded the model" in line for line in logs)
        result = runner.invoke(app, ["summarize", str(ARTICLE)])  # loads it again
        assert result.exit_code == 0 and "model loaded for this command" in result.stderr
    finally:
        client.request("stop", {}, path=short_socket)
        thread.join(30)


def test_without_a_server_commands_run_here_and_stop_says_so(short_socket, final):
    dead = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    dead.bind(str(short_socket))  # the socket file a killed server leaves behind: nobody listens
    dead.close()
    result = runner.invoke(app, ["summarize", str(ARTICLE)])
    assert result.exit_code == 0 and result.stdout.strip() and "served by" not in result.stderr
    assert "phi2 serve" not in result.stderr  # no server: nothing to say about one
    stopped = runner.invoke(app, ["serve", "--stop"])
    assert stopped.exit_code == 0 and "No phi2 serve is running" in stopped.stdout
    shown = runner.invoke(app, ["serve", "--status"])
    assert shown.exit_code == 1 and "no phi2 serve is running" in shown.stderr


def test_serve_in_its_own_process(short_socket, final):
    """The real thing: `phi2 serve` as a process, a served summarize in another that never imports torch,
    `--status`, then `--stop`, which removes the socket."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    server_process = subprocess.Popen([sys.executable, "-m", "phi2cli", "serve"], cwd=final.parent, env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)  # fmt: skip
    try:
        wait_for(lambda: running_status(short_socket) is not None or server_process.poll() is not None, 120)
        assert server_process.poll() is None, server_process.stdout.read()
        served = subprocess.run([sys.executable, "-X", "importtime", "-m", "phi2cli", "summarize", str(ARTICLE)],
                                cwd=final.parent, env=env, capture_output=True, text=True, timeout=120)  # fmt: skip
        assert served.returncode == 0, served.stderr
        assert f"served by phi2 serve (pid {server_process.pid}, model kept loaded)" in served.stderr
        imported = {line.split("|")[-1].strip() for line in served.stderr.splitlines() if line.startswith("import time")}
        assert "phi2cli.serving.client" in imported and "torch" not in imported
        alone = runner.invoke(app, ["summarize", "--no-server", str(ARTICLE)])
        assert served.stdout == alone.stdout and served.stdout.strip()
        shown = subprocess.run([sys.executable, "-m", "phi2cli", "serve", "--status"], cwd=final.parent, env=env,
                               capture_output=True, text=True, timeout=60)  # fmt: skip
        assert shown.returncode == 0 and f"phi2 serve pid {server_process.pid}" in shown.stdout
        assert "model loaded: " in shown.stdout and "phi2-xsum-final" in shown.stdout
        stopped = subprocess.run([sys.executable, "-m", "phi2cli", "serve", "--stop"], cwd=final.parent, env=env,
                                 capture_output=True, text=True, timeout=60)  # fmt: skip
        assert stopped.returncode == 0 and f"Stopped phi2 serve (pid {server_process.pid})" in stopped.stdout
        assert server_process.wait(30) == 0
        assert not short_socket.exists()
    finally:
        if server_process.poll() is None:
            server_process.kill()


@pytest.fixture
def slow_summaries(monkeypatch):
    """The server's summarize job, held back until the test lets it go (to overlap two requests)."""
    from phi2cli.serving import server as server_module

    release, started = threading.Event(), threading.Event()
    real = server_module.JOBS["summarize"]

    def held(cache, args, emit):
        started.set()
        assert release.wait(60)
        return real(cache, args, emit)

    monkeypatch.setitem(server_module.JOBS, "summarize", held)
    return started, release


def test_a_second_command_waits_for_the_first_and_says_so(server, slow_summaries):
    started, release = slow_summaries
    first: dict = {}
    args = {"articles": [{"source": str(ARTICLE), "text": ARTICLE.read_text()}], "adapter": "phi2-xsum-final",
            "base_only": False, "overrides": {}, "gen_batch_size": None, "stream": False}  # fmt: skip
    thread = threading.Thread(target=lambda: first.update(outcome=client.request("summarize", args)))  # not CliRunner:
    thread.start()  # it swaps sys.stdout for the whole process
    assert started.wait(60)
    timer = threading.Timer(1.0, release.set)  # the second request is queued by then
    timer.start()
    second = runner.invoke(app, ["summarize", str(ARTICLE)])
    thread.join(60)
    assert second.exit_code == 0, second.output
    assert "phi2 serve is busy (summarize); this command waits for it" in " ".join(second.stderr.split())
    assert second.stdout.strip() == first["outcome"].result["results"][0]["summary"]


def test_a_client_that_leaves_mid_request_leaves_the_server_working(server, slow_summaries):
    path, logs = server
    started, release = slow_summaries
    sock = client.connect(path)
    with sock.makefile("rwb") as stream:
        from phi2cli.serving.protocol import send

        send(stream, {"command": "summarize", "cwd": os.getcwd(), "identity": identity(),
                      "args": {"articles": [{"source": "a", "text": ARTICLE.read_text()}], "adapter": "phi2-xsum-final",
                               "base_only": False, "overrides": {}, "gen_batch_size": None, "stream": False}})  # fmt: skip
        assert started.wait(60)
    sock.close()  # Ctrl-C in the client's shell
    release.set()
    wait_for(lambda: any("the client left" in line for line in logs), 60)
    assert status(path)["busy"] is None and status(path)["model"] is not None
    result = runner.invoke(app, ["summarize", str(ARTICLE)])
    assert result.exit_code == 0 and "model kept loaded" in result.stderr
