"""Host time per training step: the Trainer's own per-step bookkeeping against phi2cli's, in the jobs users run.

    python benchmarks/host_overhead.py --out benchmarks/results/host_overhead.json

Each job runs as `phi2 train` (the real CLI, in a fresh process) twice: as phi2cli trains, and with
Phi2Trainer's bookkeeping put back to the Trainer's own (its FLOP count, the parameter list it
clips, the switch to training mode, NEFTune's embedding lookup, each done every step). Nothing else
differs, so the gap in the run's own training-step rate is that bookkeeping. A third, shorter run
of phi2cli's variant measures one window of steady steps: wall time per step (no profiler) and the
GPU's kernel time per step (torch.profiler over 5 steps), i.e. how much of a step the GPU works.

Jobs (random weights of the real shapes, real XSUM rows): `smollm2`, the recipe of
examples/smollm2-xsum.sh on SmolLM2-135M's shape (vocabulary 51,200 for phi-2's tokenizer), and
`seed`, phi-2's seed job cut to --steps steps.
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
from common import (ROOT, SEED_JOB, SMOLLM2_JOB, default_data_dir, environment, make_random_phi2,  # noqa: E402
                    save_random_model, write_json)

SMOLLM2_SHAPE = dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                     num_key_value_heads=3, vocab_size=51200, tie_word_embeddings=True, rope_theta=100000.0,
                     max_position_embeddings=8192, rms_norm_eps=1e-5)  # fmt: skip
WINDOW = {"smollm2": 150, "seed": 150}  # the measured window ends at this step (shapes recorded by then)


def job_args(job: str, model: Path, data_dir: Path, steps: int, work: Path) -> list[str]:
    flags = SMOLLM2_JOB if job == "smollm2" else [*SEED_JOB, "--max-steps", str(steps)]
    return ["train", "--model", str(model), "--data-dir", str(data_dir), *flags, "--overwrite",
            "--output-dir", str(work / "run"), "--final-dir", str(work / "final")]  # fmt: skip


def trainer_bookkeeping() -> None:
    """Put Phi2Trainer's per-step bookkeeping back to the Trainer's own."""
    from transformers import Trainer

    from phi2cli.training.trainer import Phi2Trainer

    Phi2Trainer.floating_point_ops = Trainer.floating_point_ops
    Phi2Trainer._clip_grad_norm = Trainer._clip_grad_norm
    Phi2Trainer._training_mode = lambda self, model: model.train()
    unwrapped_once = Phi2Trainer._scale_neftune

    def unwrap_every_step(self: Any, examples: int) -> None:
        self._embeddings = None
        unwrapped_once(self, examples)

    Phi2Trainer._scale_neftune = unwrap_every_step


def window_callback(end: int, out: dict[str, Any]) -> Any:
    """Wall time of the 20 steps before `end - 5` (synchronised at both ends), then GPU kernel time of 5 steps."""
    import torch
    from torch.autograd import DeviceType
    from transformers import TrainerCallback

    class Window(TrainerCallback):
        def __init__(self) -> None:
            self.profiler: Any = None
            self.started = 0.0

        def on_step_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            step = state.global_step
            if step in (end - 25, end - 5):
                torch.cuda.synchronize()
                now = time.perf_counter()
                if step == end - 5:
                    out["wall_ms_per_step"] = round((now - self.started) / 20 * 1e3, 2)
                    activities = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
                    self.profiler = torch.profiler.profile(activities=activities)
                    self.profiler.__enter__()
                    self.started = time.perf_counter()
                else:
                    self.started = now
            if step == end and self.profiler is not None:
                torch.cuda.synchronize()
                out["profiled_wall_ms_per_step"] = round((time.perf_counter() - self.started) / 5 * 1e3, 2)
                self.profiler.__exit__(None, None, None)
                kernels = sum(e.self_device_time_total for e in self.profiler.key_averages()
                              if e.device_type == DeviceType.CUDA)  # fmt: skip
                out["gpu_kernel_ms_per_step"] = round(kernels / 1e3 / 5, 2)
                self.profiler = None

    return Window()


def child(options: argparse.Namespace) -> None:
    import phi2cli.training.engine as engine
    from phi2cli.cli.app import app

    if options.variant == "trainer":
        trainer_bookkeeping()
    window: dict[str, Any] = {}
    if options.window:
        original = engine.train

        def with_window(config: Any, **kwargs: Any) -> Any:
            kwargs["callbacks"] = [*(kwargs.get("callbacks") or []), window_callback(options.window, window)]
            return original(config, **kwargs)

        engine.train = with_window
    work = Path(options.work)
    started = time.perf_counter()
    try:
        steps = options.window + 2 if options.window else options.steps  # the window's last step must begin
        app(job_args(options.job, Path(options.model), Path(options.data_dir), steps, work),
            standalone_mode=False)  # fmt: skip
    except SystemExit:
        pass
    run = json.loads((work / "final" / "phi2_run.json").read_text())
    result = {"wall_s": round(time.perf_counter() - started, 2), "timing": run["timing"],
              "global_step": run["global_step"], "cuda_graphs": run["throughput"].get("cuda_graphs"),
              "plan": {k: run["plan"].get(k) for k in ("profile", "compile", "cuda_graphs", "packed")}, **window}  # fmt: skip
    Path(options.result).write_text(json.dumps(result), encoding="utf-8")
    sys.stdout.flush()
    os._exit(0)


def run_child(job: str, variant: str, model: Path, data_dir: Path, steps: int, window: int = 0) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="phi2-host-") as work:
        result = Path(work) / "result.json"
        command = [sys.executable, __file__, "--child", "--job", job, "--variant", variant, "--model", str(model),
                   "--data-dir", str(data_dir), "--steps", str(steps), "--window", str(window), "--work", work,
                   "--result", str(result)]  # fmt: skip
        done = subprocess.run(command, capture_output=True, text=True, cwd=ROOT)
        if not result.is_file():
            return {"rc": done.returncode, "output_tail": (done.stdout + done.stderr)[-3000:]}
        return json.loads(result.read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", default="smollm2,seed")
    parser.add_argument("--steps", type=int, default=300, help="steps of the phi-2 seed job (625 in full)")
    parser.add_argument("--data-dir", type=Path, default=default_data_dir())
    parser.add_argument("--phi2", type=Path, default=Path("/tmp/phi2-random"))
    parser.add_argument("--smollm2", type=Path, default=Path("/tmp/smollm2-shape-random"))
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "host_overhead.json")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    for hidden in ("--job", "--variant", "--model", "--work", "--result"):
        parser.add_argument(hidden, help=argparse.SUPPRESS)
    parser.add_argument("--window", type=int, default=0, help=argparse.SUPPRESS)
    options = parser.parse_args()
    if options.child:
        return child(options)

    from transformers import LlamaConfig

    results: dict[str, Any] = {"command": "python benchmarks/host_overhead.py " + " ".join(sys.argv[1:]),
                               "environment": environment(), "jobs": {}}  # fmt: skip
    for job in options.jobs.split(","):
        if job == "smollm2":
            model = options.smollm2
            if not (model / "config.json").is_file():
                save_random_model(LlamaConfig(**SMOLLM2_SHAPE), model)
        else:
            model = make_random_phi2(options.phi2)
        runs: dict[str, Any] = {}
        for variant in ("phi2cli", "trainer"):
            runs[variant] = run_child(job, variant, model, options.data_dir, options.steps)
            timing = runs[variant].get("timing", {})
            print(f"{job} {variant}: train steps {timing.get('train_steps_s')} s, "
                  f"{timing.get('train_steps_tokens_per_s')} tokens/s, wall {runs[variant].get('wall_s')} s", flush=True)
        runs["window"] = run_child(job, "phi2cli", model, options.data_dir, options.steps, WINDOW[job])
        window = runs["window"]
        print(f"{job} window: {window.get('wall_ms_per_step')} ms per step, GPU kernels "
              f"{window.get('gpu_kernel_ms_per_step')} ms per step", flush=True)
        ours, theirs = (runs[v].get("timing", {}).get("train_steps_tokens_per_s") for v in ("phi2cli", "trainer"))
        if ours and theirs:
            runs["speedup"] = round(ours / theirs, 3)
        if window.get("wall_ms_per_step") and window.get("gpu_kernel_ms_per_step"):
            runs["gpu_busy_share"] = round(window["gpu_kernel_ms_per_step"] / window["wall_ms_per_step"], 3)
        results["jobs"][job] = runs
        write_json(options.out, results)
    print(f"wrote {options.out}")


if __name__ == "__main__":
    main()
