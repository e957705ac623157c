"""Do `phi2 evaluate` runs handed to `phi2 serve` agree with runs in a process of their own?

    python benchmarks/served_agreement.py --out benchmarks/results/served_agreement.json

Trains a 4-step adapter on a random-weight model of phi-2's shape (real XSUM rows), then runs
`phi2 evaluate --samples 500` five times through the real CLI, each in a fresh process: twice
alone (--no-server), twice handed to a `phi2 serve` that preloaded (and warmed up) the adapter, and
once handed to a server that loaded it for that request. It writes, for every pair of runs, how
many of the 500 greedy summaries differ, and each run's eval loss: two runs alone differing as much
as a run alone and a served one means serving adds no difference of its own.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import ROOT, default_data_dir, environment, make_random_phi2, start_server, write_json  # noqa: E402

RUNS = ("alone_1", "alone_2", "served_1", "served_2", "served_loaded_for_it")


def phi2(args: list[str], env: dict[str, str], cwd: Path) -> subprocess.CompletedProcess:
    done = subprocess.run([sys.executable, "-m", "phi2cli", *args], env=env, cwd=cwd, capture_output=True, text=True,
                          timeout=900)  # fmt: skip
    if done.returncode != 0:
        raise SystemExit(f"phi2 {' '.join(args)} failed ({done.returncode}):\n{done.stderr[-2000:]}")
    return done


def started_server(adapter: str, env: dict[str, str], cwd: Path, socket_path: Path) -> subprocess.Popen:
    server, ready_s = start_server(adapter, env, socket_path, cwd)
    if ready_s is None:
        server.kill()
        raise SystemExit(f"phi2 serve did not start:\n{server.communicate()[0][-2000:]}")
    return server


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=Path("/tmp/phi2-random"), help="made (random phi-2 shape) if absent")
    parser.add_argument("--data-dir", type=Path, default=default_data_dir())
    parser.add_argument("--samples", type=int, default=500)
    parser.add_argument("--train-steps", type=int, default=4)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "served_agreement.json")
    args = parser.parse_args(argv)
    args.model, args.data_dir = args.model.absolute(), args.data_dir.absolute()  # the runs start in a folder of their own
    make_random_phi2(args.model)
    work = Path(tempfile.mkdtemp(prefix="p2a", dir="/tmp"))  # short: the socket lives here
    socket_path = work / "s.sock"
    pythonpath = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    env = {**os.environ, "PYTHONPATH": pythonpath, "HF_HUB_OFFLINE": "1", "PHI2_SERVE_SOCKET": str(socket_path)}
    phi2(["train", "--model", str(args.model), "--data-dir", str(args.data_dir), "--samples", "64", "--val-samples",
          "0", "--max-steps", str(args.train_steps), "--output-dir", "run", "--final-dir", "final"], env, work)  # fmt: skip
    evaluate = ["evaluate", "--adapter", "final", "--samples", str(args.samples), "--output"]
    walls: dict[str, float] = {}

    def timed(name: str, extra: list[str]) -> str:
        started = time.perf_counter()
        out = phi2([*evaluate, name, *extra], env, work).stderr
        walls[name] = round(time.perf_counter() - started, 2)
        return out

    for name in RUNS[:2]:
        timed(name, ["--no-server"])
    server = started_server("final", env, work, socket_path)
    try:
        served = [timed(name, []) for name in RUNS[2:4]]
    finally:
        phi2(["serve", "--stop"], env, work)
        server.wait(60)
    server = started_server(str(work / "missing"), env, work, socket_path)  # starts without a model
    try:
        served.append(timed(RUNS[4], []))
    finally:
        phi2(["serve", "--stop"], env, work)
        server.wait(60)
    if not all("served by phi2 serve" in text for text in served):
        raise SystemExit("a served run was not served")
    predictions = {name: [json.loads(line)["prediction"] for line in
                          (work / name / "predictions-validation.jsonl").read_text().splitlines()] for name in RUNS}  # fmt: skip
    metrics = {name: json.loads((work / name / "metrics-validation.json").read_text()) for name in RUNS}
    differing = {a: {b: sum(x != y for x, y in zip(predictions[a], predictions[b])) for b in RUNS} for a in RUNS}
    out: dict[str, Any] = {
        "samples": len(predictions[RUNS[0]]), "train_steps": args.train_steps,
        "differing_summaries": differing,
        "eval_loss": {name: metrics[name]["tuned"]["eval_loss"] for name in RUNS},
        "rougeL": {name: metrics[name]["tuned"]["rougeL"] for name in RUNS},
        "wall_s": walls, "environment": environment(), "command": "python " + " ".join(sys.argv),
    }  # fmt: skip
    write_json(args.out, out)
    print(json.dumps({k: out[k] for k in ("differing_summaries", "eval_loss", "wall_s")}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
