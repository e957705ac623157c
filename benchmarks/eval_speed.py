"""`phi2 evaluate` speed on phi-2's shape: 500 validation articles, loss + ~30-token summaries + ROUGE.

    python benchmarks/eval_speed.py --data-dir DIR [--model DIR] [--samples 500] [--max-new-tokens 30]
        [--num-beams 4 --length-penalty 1.0 --no-repeat-ngram-size 3 --out benchmarks/results/eval_speed_beams.json]
        [--phases]

Trains a 4-step adapter on a random-weight model of phi-2's exact shape (so the weights merge
like a real run's), then times the evaluation the CLI runs. Writes benchmarks/results/eval_speed.json.
--phases splits the static-cache decoder's time per run (cache allocation, the cache-filling
forward, eager warm-up steps, CUDA-graph captures, stop checks, the other steps), waiting for the
GPU around each phase, which the plain timings do not.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import ROOT, environment, make_random_phi2, write_json  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=Path("/tmp/phi2-random"))
    parser.add_argument("--data-dir", type=Path, default=ROOT / "examples" / "data" / "xsum-sample")
    parser.add_argument("--samples", type=int, default=500)
    parser.add_argument("--max-new-tokens", type=int, default=30)
    parser.add_argument("--num-beams", type=int, default=1)
    parser.add_argument("--length-penalty", type=float, default=1.0)
    parser.add_argument("--no-repeat-ngram-size", type=int, default=0)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "eval_speed.json")
    parser.add_argument("--phases", action="store_true", help="split the decoder's time into its phases")
    args = parser.parse_args()

    from phi2cli.config import Phi2Config, apply_overrides
    from phi2cli.training.engine import train
    from phi2cli.inference.evaluation import EvaluateOptions, evaluate

    make_random_phi2(args.model)
    work = Path(tempfile.mkdtemp(prefix="phi2-eval-"))
    config = apply_overrides(Phi2Config(), {
        "model.model": str(args.model), "data.data_dir": str(args.data_dir), "data.samples": 32,
        "data.val_samples": 0, "train.max_steps": 4, "train.output_dir": str(work / "run"),
        "train.final_dir": str(work / "final"), "train.eval_every": 1000, "train.compile": False,
    }).validate()  # fmt: skip
    train(config)
    decoding = {"generation.max_new_tokens": args.max_new_tokens, "generation.num_beams": args.num_beams,
                "generation.length_penalty": args.length_penalty,
                "generation.no_repeat_ngram_size": args.no_repeat_ngram_size}  # fmt: skip
    runs = []
    phases: dict[str, list[float]] = instrument_decoder() if args.phases else {}
    for attempt in range(2):  # the second run shows the steady state (kernels and allocator warm)
        phases.clear()
        started = time.perf_counter()
        result = evaluate(EvaluateOptions(adapter_dir=str(work / "final"), samples=args.samples,
                                          overrides=decoding))  # fmt: skip
        wall = time.perf_counter() - started
        runs.append({"wall_s": round(wall, 2), **result.metrics["timings"]})
        if args.phases:
            runs[-1]["decoder_phases"] = phase_split(phases)
        print(f"run {attempt + 1}: {wall:.1f} s wall; timings {runs[-1]}", flush=True)
    metrics = result.metrics
    words = metrics["tuned"].get("mean_summary_words")
    out = {"samples": metrics["samples"], "max_new_tokens": args.max_new_tokens, "runs": runs,
           "mean_summary_words": words, "settings": metrics["settings"], "environment": environment(),
           "target_s": 8.0 if args.num_beams == 1 else 60.0, "command": "python " + " ".join(sys.argv)}  # fmt: skip
    write_json(args.out, out)


def instrument_decoder() -> dict[str, list[float]]:
    """Time StaticDecoder's phases (waiting for the GPU before and after each); name -> [seconds, calls]."""
    import torch

    from phi2cli.inference import decode
    from phi2cli.kernels import graphs

    phases: dict[str, list[float]] = {}

    def sync() -> None:
        if torch.cuda.is_available():
            torch.cuda.synchronize()

    def timed(name: str, function: Any) -> Any:
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            sync()
            started = time.perf_counter()
            try:
                return function(*args, **kwargs)
            finally:
                sync()
                entry = phases.setdefault(name, [0.0, 0])
                entry[0] += time.perf_counter() - started
                entry[1] += 1

        return wrapper

    decoder = decode.StaticDecoder
    decoder.__init__ = timed("cache_allocation", decoder.__init__)
    decoder.forward = timed("cache_filling_forward", decoder.forward)
    decoder.force = timed("forced_prompt_tokens", decoder.force)
    decoder.decode = timed("decoding", decoder.decode)
    decoder.capture = timed("graph_capture", decoder.capture)
    graphs.warm_up = timed("eager_warm_up", graphs.warm_up)  # advance() imports it at each call
    decode.all_stopped = timed("stop_checks", decode.all_stopped)
    return phases


def phase_split(phases: dict[str, list[float]]) -> dict[str, Any]:
    """Seconds and calls per phase; forced tokens and decoding also hold the warm-ups, captures and
    stop checks, so `other_steps_s` is what their graph replays (or eager steps) took."""
    split = {name: {"s": round(seconds, 3), "calls": int(calls)} for name, (seconds, calls) in phases.items()}
    nested = sum(phases.get(name, [0.0])[0] for name in ("eager_warm_up", "graph_capture", "stop_checks"))
    stepping = sum(phases.get(name, [0.0])[0] for name in ("forced_prompt_tokens", "decoding"))
    split["other_steps_s"] = round(stepping - nested, 3)
    return split


if __name__ == "__main__":
    main()
