"""What importing the libraries costs before any work: the floor under `phi2 summarize` and `phi2 evaluate`.

    python benchmarks/import_floor.py --out benchmarks/results/import_floor.json

Each statement runs in a fresh `python -c` that leaves with os._exit(0) (as phi2 does once torch is
loaded, so no interpreter teardown is timed), `--repeat` times in a row; wall time from launch to exit.
Where this Python writes no bytecode, the installed packages are compiled once first, as `pip install`
leaves them (common.precompile_bytecode).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import ROOT, environment, precompile_bytecode, write_json  # noqa: E402

STATEMENTS = (
    "pass",
    "import torch",
    "import torch; torch.cuda.init(); torch.zeros(1, device='cuda')",
    "import torch, transformers.modeling_utils",
    "from phi2cli.models.loading import import_libraries; import_libraries(True, True)",
    "import phi2cli.cli.app",
)


def timed(statement: str) -> float | None:
    """Seconds from launch to exit; None where the statement fails (no CUDA device, say)."""
    started = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", f"{statement}\nimport os; os._exit(0)"], cwd=ROOT,
                          capture_output=True)  # fmt: skip
    return round(time.perf_counter() - started, 2) if done.returncode == 0 else None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=2)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "import_floor.json")
    parser.add_argument("--pycache", type=Path, default=Path("/tmp/phi2-import-floor-pycache"),
                        help="where to compile the bytecode when this Python writes none")
    options = parser.parse_args()
    bytecode = precompile_bytecode(options.pycache)
    seconds: dict[str, list[float | None]] = {statement: [] for statement in STATEMENTS}
    for _ in range(options.repeat):  # interleaved, as a user's consecutive commands would find the caches
        for statement in STATEMENTS:
            seconds[statement].append(timed(statement))
            took = seconds[statement][-1]
            print(f"{statement:80s} {'failed' if took is None else f'{took:6.2f} s'}", flush=True)
    write_json(options.out, {"command": "python benchmarks/import_floor.py " + " ".join(sys.argv[1:]),
                             "environment": environment(), "bytecode_precompiled": bytecode,
                             "seconds": seconds})  # fmt: skip


if __name__ == "__main__":
    main()
