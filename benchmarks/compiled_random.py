"""Compiled layers' dropout: inductor's own random numbers against torch's kernels, one GPU, one run.

    python benchmarks/compiled_random.py --smol-model DIR [--data-dir DIR]

Each variant runs in a fresh process with its own empty compile cache: phi-2's compiled speed
profile (train_throughput.py --profiles speed, random weights of phi-2's shape) and SmolLM2's
374-step job of examples/smollm2-xsum.sh with --compile (--smol-model: the .gguf file or a model
folder of its shape). `inductor` clears kernels/compiled.INDUCTOR_OPTIONS (inductor draws each
element's random number itself, fused into the norm before the dropout); `torch` keeps phi2cli's
setting (fallback_random: torch's dropout kernel). Writes benchmarks/results/compiled_random.json.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import ROOT, SMOLLM2_JOB, default_data_dir, environment, patched_python, write_json  # noqa: E402
from end_to_end import cache_env, cli_env  # noqa: E402

VARIANTS = {"inductor": {}, "torch": None}  # None: phi2cli's own options


def wrapped(options: dict | None, argv: list[str]) -> list[str]:
    """A Python command line that runs `argv` (a script, or -m module) with the given inductor options."""
    patch = "" if options is None else f"import phi2cli.kernels.compiled as c; c.INDUCTOR_OPTIONS = {options!r}; "
    return patched_python(patch, argv)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smol-model", type=Path, required=True, help="SmolLM2-135M .gguf or a folder of its shape")
    parser.add_argument("--data-dir", type=Path, default=default_data_dir())
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "compiled_random.json")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="phi2-random-"))
    results: dict = {"command": "python " + " ".join(sys.argv), "environment": environment(), "variants": {}}
    for name, options in VARIANTS.items():
        env = cli_env(cache_env(work / name / "cache"))  # this copy of phi2cli, offline, empty caches
        speed_json = work / name / "speed.json"
        speed = [str(ROOT / "benchmarks" / "train_throughput.py"), "--data-dir", str(args.data_dir), "--profiles",
                 "speed", "--steps", "30", "--out", str(speed_json)]  # fmt: skip
        subprocess.run(wrapped(options, speed), env=env, check=True)
        job = ["-m", "phi2cli", "train", "--model", str(args.smol_model), "--template", "chat", "--data-dir",
               str(args.data_dir), *SMOLLM2_JOB, "--output-dir", str(work / name / "run"), "--final-dir",
               str(work / name / "final"), "--overwrite", "--compile"]  # fmt: skip
        done = subprocess.run(wrapped(options, job), env=env, capture_output=True, text=True, check=True)
        facts = json.loads((work / name / "final" / "phi2_run.json").read_text(encoding="utf-8"))
        timing = re.search(r"^Time: .*?tokens/s", done.stdout, re.M | re.S)
        steps_rate = (facts.get("timing") or {}).get("train_steps_tokens_per_s")
        speed_row = json.loads(speed_json.read_text(encoding="utf-8"))["speed"]
        results["variants"][name] = {
            "phi2_speed_compiled": {k: speed_row.get(k) for k in ("tokens_per_s", "mfu", "peak_gib", "losses")},
            "smollm2_job_compiled": {"train_steps_tokens_per_s": steps_rate,
                                     "printed": " ".join(timing.group(0).split()) if timing else None}}  # fmt: skip
        print(name, json.dumps(results["variants"][name])[:400], flush=True)
    rows = results["variants"]
    results["torch_over_inductor"] = {
        "phi2_speed": round(rows["torch"]["phi2_speed_compiled"]["tokens_per_s"]
                            / rows["inductor"]["phi2_speed_compiled"]["tokens_per_s"], 3),
        "smollm2_steps": round(rows["torch"]["smollm2_job_compiled"]["train_steps_tokens_per_s"]
                               / rows["inductor"]["smollm2_job_compiled"]["train_steps_tokens_per_s"], 3)}  # fmt: skip
    write_json(args.out, results)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
