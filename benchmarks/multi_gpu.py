"""The same training job on 1 and on 2 GPUs (`phi2 train --gpus 2`, DDP via accelerate).

    python benchmarks/multi_gpu.py --data-dir DIR [--model DIR] [--steps 120] [--batches 8,32]

Random-weight model of phi-2's exact shape, real XSUM rows (max 512 tokens), speed profile
(compiled layers, CUDA graphs). Measures real tokens/s for a global batch of 8 (the default;
--batches adds others): `tokens_per_s` is the steady rate after the last new CUDA-graph
recording on any GPU, `tokens_per_s_wall` the rate after 2 warm-up steps including recordings.
Compares the loss curves (every dropout off: LoRA's and phi-2's residual dropout, so both runs do
the same math up to reduction order and bf16 rounding), the set of files each run writes, and
that `phi2 report` renders the 2-GPU run. Writes benchmarks/results/multi_gpu.json.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import ROOT, environment, make_random_phi2, write_json  # noqa: E402

WORK = Path("/tmp/phi2-multi")


def phi2(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}
    return subprocess.run([sys.executable, "-m", "phi2cli", *args], env=env, capture_output=True, text=True)


def files_of(run: Path) -> list[str]:
    return sorted(str(p.relative_to(run)) for p in run.rglob("*") if p.is_file() and "prepared" not in p.parts)


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


def run_job(name: str, gpus: int, batch: int, steps: int, model: Path, prepared: Path) -> dict[str, Any]:
    out, final = WORK / name, WORK / f"{name}-final"
    args = ["train", "--prepared", str(prepared), "--model", str(model), "--profile", "speed",
            "--batch-size", str(batch), "--grad-accum", "1", "--max-steps", str(steps), "--logging-steps", "5",
            "--eval-every", str(steps), "--lora-dropout", "0", "--warmup-steps", "5",
            "--output-dir", str(out), "--final-dir", str(final), "--overwrite"]  # fmt: skip
    if gpus > 1:
        args += ["--gpus", str(gpus)]
    done = phi2(*args)
    if done.returncode != 0:
        return {"error": (done.stdout + done.stderr)[-1500:]}
    run = json.loads((final / "phi2_run.json").read_text())
    state = json.loads((out / f"checkpoint-{steps}" / "trainer_state.json").read_text())
    losses = {e["step"]: e["loss"] for e in state["log_history"] if "loss" in e}
    evals = {e["step"]: e["eval_loss"] for e in state["log_history"] if "eval_loss" in e}
    throughput = dict(run["throughput"])
    throughput["tokens_per_s_wall"] = throughput["tokens_per_s"]
    if "steady_tokens_per_s" in throughput:
        throughput["tokens_per_s"] = throughput["steady_tokens_per_s"]
    return {"gpus": gpus, "examples_per_step": batch, "steps": steps, **throughput, "memory": run["memory"],
            "plan": run["plan"], "losses": losses, "eval_losses": evals, "files": files_of(out) + files_of(final),
            "train_runtime_s": run["train_metrics"].get("train_runtime")}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=Path("/tmp/phi2-random"))
    parser.add_argument("--data-dir", type=Path, default=ROOT / "examples" / "data" / "xsum-sample")
    parser.add_argument("--steps", type=int, default=120)
    parser.add_argument("--batches", default="8", help="global batches to run on 1 and 2 GPUs (8 first)")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "multi_gpu.json")
    args = parser.parse_args()

    model = without_dropout(make_random_phi2(args.model))
    prepared = WORK / "prepared"
    done = phi2("prepare", "--data-dir", str(args.data_dir), "--model", str(model), "--samples", "1495",
                "--val-samples", "64", "--max-length", "512", "--output", str(prepared))  # fmt: skip
    if done.returncode != 0:
        raise SystemExit(done.stdout + done.stderr)
    results: dict[str, Any] = {}
    batches = [int(b) for b in args.batches.split(",")]
    for batch in batches:
        steps = args.steps if batch == 8 else max(10, args.steps * 8 // batch)
        for gpus in (1, 2):
            key = f"gpus_{gpus}" if batch == 8 else f"batch{batch}_gpus_{gpus}"
            results[key] = run_job(key, gpus, batch, steps, model, prepared)
            print(key, {k: v for k, v in results[key].items() if k not in ("losses", "files", "eval_losses")},
                  flush=True)  # fmt: skip
    one, two = results["gpus_1"], results["gpus_2"]
    if "tokens_per_s" in one and "tokens_per_s" in two:
        results["scaling"] = round(two["tokens_per_s"] / one["tokens_per_s"], 3)
        results["scaling_wall"] = round(two["tokens_per_s_wall"] / one["tokens_per_s_wall"], 3)
        common = sorted(set(one["losses"]) & set(two["losses"]))
        diffs = [abs(one["losses"][s] - two["losses"][s]) for s in common]
        results["loss_max_abs_diff"] = round(max(diffs), 5)
        results["eval_loss_abs_diff"] = {s: round(abs(one["eval_losses"][s] - two["eval_losses"][s]), 5)
                                         for s in one["eval_losses"] if s in two["eval_losses"]}  # fmt: skip
        results["same_files"] = one["files"] == two["files"]
        results["files_only_1gpu"] = sorted(set(one["files"]) - set(two["files"]))
        results["files_only_2gpu"] = sorted(set(two["files"]) - set(one["files"]))
        report = phi2("report", str(WORK / "gpus_2"), "--format", "markdown")
        results["report_rc"] = report.returncode
        results["report_excerpt"] = report.stdout[:600]
    for batch in batches[1:]:
        b1, b2 = results.get(f"batch{batch}_gpus_1", {}), results.get(f"batch{batch}_gpus_2", {})
        if "tokens_per_s" in b1 and "tokens_per_s" in b2:
            results[f"batch{batch}_scaling"] = round(b2["tokens_per_s"] / b1["tokens_per_s"], 3)
    results["environment"] = environment()
    results["command"] = "python " + " ".join(sys.argv)
    write_json(args.out, results)
    print({k: v for k, v in results.items() if k.endswith("scaling") or k.startswith(("loss", "same", "report_rc"))})


if __name__ == "__main__":
    main()
