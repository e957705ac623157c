"""Data-parallel scaling measured through `phi2 train --gpus N` itself (DDP via accelerate).

    python benchmarks/multi_gpu.py --gpus 1,2 [--data-dir DIR] [--model DIR] [--strong-steps 120]
                                   [--weak-steps 60] [--per-gpu 8] [--budget-s 520]

Random-weight model of phi-2's exact shape with every dropout off (LoRA's and phi-2's residual
dropout, so runs on different GPU counts do the same math up to reduction order and bf16
rounding), real XSUM rows (max 512 tokens), speed profile. Each run is `python -m phi2cli train`
in a subprocess, timed from launch to exit, for each GPU count of --gpus (counts the machine
lacks are skipped):

- strong scaling: the recipe's global batch of 8 split over the GPUs; the loss curves of 1 and N
  GPUs are compared at every logged step (`loss_max_abs_diff`);
- weak scaling: `--per-gpu-batch 8` (global 8 x N, learning rate x sqrt(N)).

`tokens_per_s` is the run's own steady rate over training steps only (phi2_run.json: after the
last new CUDA-graph recording, evaluation and saving left out; else its training-steps rate),
`wall_s` the whole run. `scaling` is N GPUs' rate over one's; `scaling_wall` the same for the
whole run (real tokens / wall time). The N-GPU run's files are compared with the 1-GPU run's
(per-rank RNG states aside) and `phi2 report` must render it. `full_xsum_epoch_estimate_s`: the
204,045 XSUM training articles at the weak-scaling rate and the mean tokens per example.
Writes benchmarks/results/multi_gpu.json (1 and 2 GPUs) and, when 4 is in --gpus,
benchmarks/results/multi_gpu_4.json. NVLink multicast stays off in every launch.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import ROOT, default_data_dir, environment, write_json  # noqa: E402

XSUM_TRAIN_ARTICLES = 204_045
SAFE_NCCL_ENV = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}


def phi2(*args: str, timeout: float | None = None) -> tuple[subprocess.CompletedProcess, float]:
    """Run the CLI in a fresh process; returns it and its wall time, launch to exit."""
    env = {**os.environ, **SAFE_NCCL_ENV, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}  # this copy
    started = time.perf_counter()
    try:
        done = subprocess.run([sys.executable, "-m", "phi2cli", *args], env=env, capture_output=True, text=True,
                              timeout=timeout)  # fmt: skip
    except subprocess.TimeoutExpired as expired:
        out = (expired.stdout or b"").decode(errors="replace") if isinstance(expired.stdout, bytes) else expired.stdout
        done = subprocess.CompletedProcess(expired.cmd, 124, out or "", f"timed out after {timeout:.0f} s")
    return done, time.perf_counter() - started


def files_of(run: Path) -> list[str]:
    return sorted(str(p.relative_to(run)) for p in run.rglob("*") if p.is_file() and "prepared" not in p.parts)


def normalised_files(files: list[str]) -> list[str]:
    """The N-process run's files with the per-rank RNG states folded into the 1-process name."""
    renamed = [re.sub(r"rng_state_0\.pth$", "rng_state.pth", f) for f in files]
    return sorted(f for f in renamed if not re.search(r"rng_state_\d+\.pth$", f))


def without_dropout(model: Path) -> Path:
    """The same weights with phi-2's residual dropout (0.1) off, so two runs can be compared step by step."""
    target = model.parent / f"{model.name}-nodropout"
    target.mkdir(exist_ok=True)
    for item in model.iterdir():
        link = target / item.name
        if item.name != "config.json" and not link.exists():
            link.symlink_to(item.resolve())
    config = json.loads((model / "config.json").read_text())
    config.update(resid_pdrop=0.0, embd_pdrop=0.0, attention_dropout=0.0)
    (target / "config.json").write_text(json.dumps(config, indent=2))
    return target


def train_args(mode: str, gpus: int, steps: int, per_gpu: int, model: Path, prepared: Path,
               out: Path, final: Path, profile: str) -> list[str]:  # fmt: skip
    """The `phi2 train` command line of one run (what a user types, plus fixed output places)."""
    args = ["train", "--prepared", str(prepared), "--model", str(model), "--profile", profile,
            "--max-steps", str(steps), "--logging-steps", "5", "--eval-every", str(steps), "--lora-dropout", "0",
            "--warmup-steps", "5", "--output-dir", str(out), "--final-dir", str(final), "--overwrite",
            "--compile"]  # the steady rates of runs long enough for compiling to pay  # fmt: skip
    if mode == "weak":
        args += ["--per-gpu-batch", str(per_gpu)]
    if gpus > 1:
        args += ["--gpus", str(gpus)]
    return args


def read_run(out: Path, final: Path, steps: int) -> dict[str, Any]:
    """Rates, timing, plan and logged losses of a finished run, from the files it wrote."""
    run = json.loads((final / "phi2_run.json").read_text())
    checkpoint = out / f"checkpoint-{steps}" / "trainer_state.json"
    history = json.loads(checkpoint.read_text())["log_history"] if checkpoint.is_file() else []
    throughput, timing = run.get("throughput", {}), run.get("timing", {})
    steady = throughput.get("steady_tokens_per_s")
    rate = steady if steady is not None else timing.get("train_steps_tokens_per_s")
    return {"tokens_per_s": rate, "rate_window": "steady" if steady is not None else "train_steps",
            "train_steps_tokens_per_s": timing.get("train_steps_tokens_per_s"), "timing": timing,
            "steady_from_step": throughput.get("steady_from_step"), "real_tokens": throughput.get("real_tokens"),
            "cuda_graphs": throughput.get("cuda_graphs"), "memory": run.get("memory"), "plan": run.get("plan"),
            "losses": {e["step"]: e["loss"] for e in history if "loss" in e},
            "eval_losses": {e["step"]: e["eval_loss"] for e in history if "eval_loss" in e},
            "files": files_of(out) + [f"final/{f}" for f in files_of(final)]}  # fmt: skip


def run_job(work: Path, mode: str, gpus: int, steps: int, per_gpu: int, model: Path, prepared: Path,
            profile: str, timeout: float) -> dict[str, Any]:  # fmt: skip
    name = f"{mode}-gpus{gpus}"
    out, final = work / name, work / f"{name}-final"
    done, wall = phi2(*train_args(mode, gpus, steps, per_gpu, model, prepared, out, final, profile), timeout=timeout)
    if done.returncode != 0:
        return {"error": (done.stdout + done.stderr)[-1500:], "wall_s": round(wall, 1)}
    result = read_run(out, final, steps)
    result.update(gpus=gpus, steps=steps, wall_s=round(wall, 1), output_dir=str(out))
    if result.get("real_tokens"):
        result["tokens_per_s_wall"] = round(result["real_tokens"] / wall, 1)
    return result


def compare(mode: str, runs: dict[int, dict[str, Any]]) -> dict[str, Any]:
    """Scaling of every GPU count against one GPU, loss agreement (strong) and output files."""
    section: dict[str, Any] = {f"gpus_{n}": {k: v for k, v in r.items() if k != "files"} for n, r in runs.items()}
    one = runs.get(1, {})
    for n, run in runs.items():
        if n == 1 or "tokens_per_s" not in run or "tokens_per_s" not in one:
            continue
        suffix = "" if n == 2 else f"_{n}"
        section[f"scaling{suffix}"] = round(run["tokens_per_s"] / one["tokens_per_s"], 3)
        if "tokens_per_s_wall" in run and "tokens_per_s_wall" in one:
            section[f"scaling_wall{suffix}"] = round(run["tokens_per_s_wall"] / one["tokens_per_s_wall"], 3)
        section[f"wall_ratio{suffix}"] = round(one["wall_s"] / run["wall_s"], 3)  # whole runs, launch to exit
        if mode == "strong":
            common = sorted(set(one["losses"]) & set(run["losses"]))
            diffs = [abs(one["losses"][s] - run["losses"][s]) for s in common]
            section[f"loss_max_abs_diff{suffix}"] = round(max(diffs), 5) if diffs else None
            section[f"loss_steps_compared{suffix}"] = len(common)
            section[f"eval_loss_abs_diff{suffix}"] = {s: round(abs(one["eval_losses"][s] - run["eval_losses"][s]), 5)
                                                      for s in one["eval_losses"] if s in run["eval_losses"]}  # fmt: skip
        extra = sorted(set(normalised_files(run["files"])) - set(one["files"]))
        missing = sorted(set(one["files"]) - set(normalised_files(run["files"])))
        section[f"same_files{suffix}"] = not extra and not missing
        if extra or missing:
            section[f"files_only_gpus_{n}{suffix}"], section[f"files_only_gpus_1{suffix}"] = extra, missing
    return section


def check_report(run: dict[str, Any]) -> dict[str, Any]:
    """`phi2 report` renders the multi-GPU run's output directory."""
    if "output_dir" not in run:
        return {"report_rc": None}
    done, _ = phi2("report", run["output_dir"], "--format", "markdown", timeout=120)
    return {"report_rc": done.returncode, "report_excerpt": (done.stdout or done.stderr)[:600]}


def merged(path: Path, results: dict[str, Any], modes: list[str]) -> dict[str, Any]:
    """A run of some modes (--modes weak) keeps the other mode's section of an earlier run's file."""
    earlier = json.loads(path.read_text()) if path.is_file() else {}
    kept = {m: earlier[m] for m in ("strong", "weak") if m not in modes and m in earlier}
    if kept and "full_xsum_epoch_estimate_s" in earlier and "weak" not in modes:
        kept["full_xsum_epoch_estimate_s"] = earlier["full_xsum_epoch_estimate_s"]
    return {**results, **kept}


def gpu_counts(text: str, available: int) -> tuple[list[int], list[int]]:
    """--gpus '1,2,4' -> (counts to run, counts skipped because the machine has fewer GPUs)."""
    try:
        counts = sorted({int(x) for x in text.split(",") if x.strip()})
    except ValueError:
        raise SystemExit(f"--gpus takes a comma-separated list of GPU counts, like 1,2,4 (got {text!r})") from None
    if not counts or counts[0] < 1:
        raise SystemExit(f"--gpus counts must be 1 or more (got {text!r})")
    if 1 not in counts:
        counts.insert(0, 1)  # every scaling figure is against one GPU
    return [n for n in counts if n <= available], [n for n in counts if n > available]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gpus", default="1,2", help="GPU counts to run, comma-separated (1 is always run)")
    parser.add_argument("--model", type=Path, default=Path("/tmp/phi2-random"))
    parser.add_argument("--data-dir", type=Path, default=default_data_dir())
    parser.add_argument("--strong-steps", type=int, default=120, help="steps of the global-batch-8 runs")
    parser.add_argument("--weak-steps", type=int, default=60, help="steps of the --per-gpu-batch runs")
    parser.add_argument("--per-gpu", type=int, default=8, help="examples per GPU in weak scaling")
    parser.add_argument("--profile", default="speed")
    parser.add_argument("--modes", default="strong,weak")
    parser.add_argument("--budget-s", type=float, default=520.0, help="stop starting runs after this many seconds")
    parser.add_argument("--work", type=Path, default=Path("/tmp/phi2-multi"))
    parser.add_argument("--out-dir", type=Path, default=ROOT / "benchmarks" / "results")
    parser.add_argument("--available-gpus", type=int, default=None, help=argparse.SUPPRESS)  # tests on the CPU
    args = parser.parse_args(argv)
    began = time.perf_counter()

    import torch

    from common import make_random_phi2

    available = args.available_gpus if args.available_gpus is not None else torch.cuda.device_count()
    counts, skipped = gpu_counts(args.gpus, max(available, 1))
    modes = [m for m in args.modes.split(",") if m]
    if set(modes) - {"strong", "weak"}:
        raise SystemExit(f"--modes takes strong and/or weak (got {args.modes!r})")
    model = without_dropout(make_random_phi2(args.model))
    prepared = args.work / "prepared"
    shutil.rmtree(prepared, ignore_errors=True)  # prepared afresh for this model and data
    done, _ = phi2("prepare", "--data-dir", str(args.data_dir), "--model", str(model), "--samples", "1495",
                   "--val-samples", "64", "--max-length", "512", "--output", str(prepared))  # fmt: skip
    if done.returncode != 0:
        raise SystemExit(done.stdout + done.stderr)
    manifest = json.loads((prepared / "manifest.json").read_text())
    mean_tokens = manifest["splits"]["train"]["tokens"]["total"]["mean"]

    results: dict[str, Any] = {}
    for mode in modes:
        steps = args.strong_steps if mode == "strong" else args.weak_steps
        runs: dict[int, dict[str, Any]] = {}
        for gpus in counts:
            left = args.budget_s - (time.perf_counter() - began)
            if left < 30:
                runs[gpus] = {"skipped": f"time budget of {args.budget_s:.0f} s spent"}
                continue
            runs[gpus] = run_job(args.work, mode, gpus, steps, args.per_gpu, model, prepared, args.profile, left)
            shown = {k: runs[gpus].get(k) for k in ("tokens_per_s", "wall_s", "steady_from_step", "error")}
            print(mode, gpus, shown, flush=True)
        results[mode] = compare(mode, runs)
        largest = max(runs)
        if largest > 1:
            results[mode].update(check_report(runs[largest]))
    weak = results.get("weak", {})
    results["full_xsum_epoch_estimate_s"] = {
        f"gpus_{n}": round(XSUM_TRAIN_ARTICLES * mean_tokens / weak[f"gpus_{n}"]["tokens_per_s"])
        for n in counts if (weak.get(f"gpus_{n}") or {}).get("tokens_per_s")
    }  # fmt: skip
    results["full_xsum_epoch_basis"] = (f"{XSUM_TRAIN_ARTICLES:,} articles x {mean_tokens} real tokens (mean of "
                                        f"the prepared rows, max 512) / weak-scaling rate ({args.per_gpu} per GPU)")  # fmt: skip
    results["skipped_gpu_counts"] = skipped
    results["settings"] = {"strong_steps": args.strong_steps, "weak_steps": args.weak_steps,
                           "per_gpu": args.per_gpu, "profile": args.profile, "mean_tokens_per_example": mean_tokens,
                           "lr_rule": "weak: learning rate x sqrt(global batch / 8)"}  # fmt: skip
    results["environment"] = environment()
    results["command"] = "python " + " ".join(sys.argv)
    results["elapsed_s"] = round(time.perf_counter() - began, 1)
    two = {k: v for k, v in results.items()}
    for mode in modes:  # multi_gpu.json: one and two GPUs
        two[mode] = {k: v for k, v in results[mode].items()
                     if not re.search(r"_(?:[3-9]|\d\d+)$", k) and not re.match(r"gpus_(?:[3-9]|\d\d+)", k)}  # fmt: skip
    if 2 in counts or 4 not in counts:
        write_json(args.out_dir / "multi_gpu.json", merged(args.out_dir / "multi_gpu.json", two, modes))
    if 4 in counts:
        write_json(args.out_dir / "multi_gpu_4.json", merged(args.out_dir / "multi_gpu_4.json", results, modes))
    summary = {m: {k: v for k, v in results[m].items() if k.startswith(("scaling", "loss_max", "same_files",
                                                                          "report_rc", "wall_ratio"))}
               for m in modes}  # fmt: skip
    print(json.dumps({**summary, "full_xsum_epoch_estimate_s": results["full_xsum_epoch_estimate_s"],
                      "skipped_gpu_counts": skipped, "elapsed_s": results["elapsed_s"]}, indent=1))  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
