"""Chaos trials: `kill -9` a CPU `phi2 train` run at a random moment, then `--resume` until it is done.

Each trial starts a tiny run (checkpoints every step) in its own directory, kills it with SIGKILL
after a random delay counted from the process start, from the moment training starts, or from the
moment a checkpoint starts being written (0-0.3 s: inside or just after the write; trials take
these three in turn), then runs the same command with --resume until it exits 0.
A trial passes when every resume exits 0, the final adapter equals an uninterrupted run's (1e-5),
every checkpoint that was complete before the kill is still there with the same adapter bytes,
and every checkpoint-1..N is complete at the end.

    python benchmarks/chaos.py --trials 20 --out benchmarks/results/chaos.json
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
STEPS = 3


def train_args(model: Path, data: Path) -> list[str]:
    return ["train", "--model", str(model), "--data-dir", str(data), "--samples", "24", "--val-samples", "0",
            "--max-steps", str(STEPS), "--eval-every", "1", "--logging-steps", "1", "--lora-dropout", "0",
            "--max-length", "128", "--warmup-steps", "0", "--lr", "0.01"]  # fmt: skip


def start(args: list[str], cwd: Path) -> subprocess.Popen:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "COLUMNS": "300",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}  # fmt: skip
    return subprocess.Popen([sys.executable, "-m", "phi2cli", *args], cwd=cwd, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)  # fmt: skip


def training_started(pid: int) -> bool:
    """The trainer's SIGTERM handler is installed (read from /proc): training has begun."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("SigCgt:"):
                return bool(int(line.split()[1], 16) >> (signal.SIGTERM - 1) & 1)
    except OSError:
        pass
    return False


def complete_checkpoints(run: Path) -> dict[str, str]:
    """checkpoint name -> sha256 of its adapter weights, for every complete checkpoint."""
    from phi2cli.training.checkpoints import checkpoint_problem

    found = {}
    for path in sorted(run.glob("checkpoint-*")):
        if checkpoint_problem(path) is None:
            found[path.name] = hashlib.sha256((path / "adapter_model.safetensors").read_bytes()).hexdigest()
    return found


def adapter_difference(a: Path, b: Path) -> float:
    from safetensors.torch import load_file

    left, right = load_file(str(a / "adapter_model.safetensors")), load_file(str(b / "adapter_model.safetensors"))
    if left.keys() != right.keys():
        return float("inf")
    return max(float((left[k].float() - right[k].float()).abs().max()) for k in left)


def reference_run(work: Path, model: Path, data: Path) -> tuple[Path, float, float]:
    """An uninterrupted run: (its final adapter, wall seconds, seconds until training started)."""
    work.mkdir(parents=True, exist_ok=True)
    began = time.monotonic()
    process = start(train_args(model, data), work)
    started = None
    while process.poll() is None:
        if started is None and training_started(process.pid):
            started = time.monotonic() - began
        time.sleep(0.02)
    output = process.stdout.read()
    if process.returncode != 0:
        raise RuntimeError(f"the uninterrupted run failed:\n{output}")
    return work / "phi2-xsum-final", time.monotonic() - began, started or 0.0


def resume_in_subprocess(folder: Path, args: list[str]) -> tuple[int, str]:
    process = start(args, folder)
    output, _ = process.communicate()
    return process.returncode, output


def trial(index: int, rng: random.Random, work: Path, model: Path, data: Path, reference: Path,
          total_s: float, startup_s: float, resume: Any = resume_in_subprocess, only_training: bool = False,
          max_resumes: int = 4) -> dict[str, Any]:  # fmt: skip
    """One kill at a random moment and the resumes after it (`resume(folder, args)` -> (exit, output))."""
    folder = work / f"trial-{index:02d}"
    folder.mkdir(parents=True)
    args = train_args(model, data)
    # aim: from the process start, from the training start, or from the moment a checkpoint is being written
    aim = "training start" if only_training else ("process start", "training start", "checkpoint write")[index % 3]
    delay = rng.uniform(0.0, {"process start": 0.9 * total_s, "training start": 0.9 * (total_s - startup_s),
                              "checkpoint write": 0.3}[aim])  # fmt: skip
    run = folder / "phi2-xsum-finetuned"
    process = start(args, folder)
    began = time.monotonic()
    while process.poll() is None and aim == "training start" and not training_started(process.pid):
        time.sleep(0.01)
    while process.poll() is None and aim == "checkpoint write" and not any(run.glob(".checkpoint-*.partial")):
        time.sleep(0.002)
    origin = time.monotonic()
    while process.poll() is None and time.monotonic() - origin < delay:
        time.sleep(0.01)
    before = complete_checkpoints(run)
    killed = process.poll() is None
    if killed:
        process.kill()
    process.communicate()
    record: dict[str, Any] = {
        "trial": index, "kill_after_s": round(time.monotonic() - began, 2), "killed": killed,
        "delay_from": aim, "delay_s": round(delay, 3),
        "left_on_disk": sorted(p.name for p in run.iterdir()) if run.is_dir() else [],
        "final_existed": (folder / "phi2-xsum-final").exists(), "resumes": [],
    }  # fmt: skip
    for _ in range(max_resumes):
        code, output = resume(folder, [*args, "--resume"])
        record["resumes"].append({"exit": code,
                                  "notes": [line for line in output.splitlines() if "no CUDA GPU" not in line
                                            and line.startswith(("Warning", "Error", "The run"))]})  # fmt: skip
        if code == 0:
            break
    after = complete_checkpoints(run)
    final = folder / "phi2-xsum-final"
    record["difference"] = adapter_difference(final, reference) if (final / "adapter_model.safetensors").is_file() \
        else None  # fmt: skip
    record["lost"] = sorted(name for name, digest in before.items() if after.get(name) != digest)
    record["complete_at_end"] = sorted(after)
    record["passed"] = (
        record["resumes"][-1]["exit"] == 0 and all(r["exit"] == 0 for r in record["resumes"])
        and record["difference"] is not None and record["difference"] <= 1e-5 and not record["lost"]
        and record["complete_at_end"] == [f"checkpoint-{n}" for n in range(1, STEPS + 1)]
    )  # fmt: skip
    return record


def run_trials(trials: int, work: Path, model: Path, data: Path, seed: int = 0, log: Any = None, jobs: int = 1,
               **options: Any) -> dict[str, Any]:  # fmt: skip
    """The uninterrupted reference run, then `trials` trials (`jobs` at a time); `options` go to `trial`."""
    from concurrent.futures import ThreadPoolExecutor

    reference, total_s, startup_s = reference_run(work / "reference", model, data)

    def one(index: int) -> dict[str, Any]:
        rng = random.Random(seed * 1000 + index)  # each trial's own draw, whatever the order trials end in
        record = trial(index, rng, work, model, data, reference, total_s, startup_s, **options)
        if log:
            log(json.dumps(record))
        return record

    with ThreadPoolExecutor(max_workers=jobs) as pool:
        results = list(pool.map(one, range(trials)))
    return {"trials": trials, "passed": sum(r["passed"] for r in results), "steps": STEPS, "seed": seed,
            "jobs": jobs,
            "uninterrupted_s": round(total_s, 1), "startup_s": round(startup_s, 1), "tolerance": 1e-5,
            "command": "phi2 " + " ".join(train_args(Path("TINY_MODEL"), Path("DATA"))), "results": results}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--trials", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--jobs", type=int, default=1, help="trials run at the same time (each is its own run)")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "chaos.json")
    args = parser.parse_args()
    if args.trials < 1 or args.jobs < 1:
        parser.error("--trials and --jobs must be at least 1")
    import importlib.util

    work = Path(tempfile.mkdtemp(prefix="phi2-chaos-"))
    spec = importlib.util.spec_from_file_location("make_tiny_model", ROOT / "examples" / "make_tiny_model.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module.main(work / "tiny-phi")
    summary = run_trials(args.trials, work, work / "tiny-phi", ROOT / "examples" / "data" / "xsum-sample",
                         seed=args.seed, log=lambda line: print(line, flush=True), jobs=args.jobs)  # fmt: skip
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(summary, indent=2) + "\n")
    print(f"{summary['passed']}/{summary['trials']} trials passed; written to {args.out}")
    sys.exit(0 if summary["passed"] == summary["trials"] else 1)


if __name__ == "__main__":
    main()
