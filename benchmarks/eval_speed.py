"""`phi2 evaluate` speed on phi-2's shape: 500 validation articles, loss + ~30-token summaries + ROUGE.

    python benchmarks/eval_speed.py --data-dir DIR [--model DIR] [--samples 500] [--max-new-tokens 30]
        [--num-beams 4 --length-penalty 1.0 --no-repeat-ngram-size 3 --out benchmarks/results/eval_speed_beams.json]

Trains a 4-step adapter on a random-weight model of phi-2's exact shape (so the weights merge
like a real run's), then times the evaluation the CLI runs. Writes benchmarks/results/eval_speed.json.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

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
    for attempt in range(2):  # the second run shows the steady state (kernels and allocator warm)
        started = time.perf_counter()
        result = evaluate(EvaluateOptions(adapter_dir=str(work / "final"), samples=args.samples,
                                          overrides=decoding))  # fmt: skip
        wall = time.perf_counter() - started
        runs.append({"wall_s": round(wall, 2), **result.metrics["timings"]})
        print(f"run {attempt + 1}: {wall:.1f} s wall; timings {result.metrics['timings']}", flush=True)
    metrics = result.metrics
    words = metrics["tuned"].get("mean_summary_words")
    out = {"samples": metrics["samples"], "max_new_tokens": args.max_new_tokens, "runs": runs,
           "mean_summary_words": words, "settings": metrics["settings"], "environment": environment(),
           "target_s": 8.0 if args.num_beams == 1 else 60.0, "command": "python " + " ".join(sys.argv)}  # fmt: skip
    write_json(args.out, out)


if __name__ == "__main__":
    main()
