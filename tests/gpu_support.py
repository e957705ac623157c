"""Shared by the GPU tests: a random-weight model of phi-2's exact shape and a report of numbers.

PHI2_GPU_MODEL names where the 2.78 B model is saved (built there on first use); PHI2_GPU_REPORT
a file the measured numbers are appended to as JSON lines.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
REPORT = os.environ.get("PHI2_GPU_REPORT")


def record(name: str, **values) -> None:
    """Print measured numbers and append them to PHI2_GPU_REPORT when it is set."""
    print(f"\n[{name}] " + ", ".join(f"{k}={v}" for k, v in values.items()))
    if REPORT:
        with open(REPORT, "a", encoding="utf-8") as handle:
            handle.write(json.dumps({"test": name, **values}) + "\n")


def phi2_shape_model() -> Path:
    """The random-weight phi-2-shaped model directory (benchmarks/common.py builds it)."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from common import make_random_phi2

    return make_random_phi2(Path(os.environ.get("PHI2_GPU_MODEL", "/tmp/phi2-random")))
