"""The decoding step's masked attention with and without cuDNN: first-call and warm cost per kernel, and
fresh `phi2 evaluate` / `phi2 summarize` processes each way.

    python benchmarks/decode_attention.py --adapter RUN_FINAL_DIR

cuDNN builds an execution plan the first time it meets a call; the other kernels need none. Each CLI
variant runs in a fresh process, the variants interleaved; "with cuDNN" sets
phi2cli.kernels.attention.DECODE_BACKENDS to () (torch's own choice) before the command runs.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import ROOT, environment, patched_python, precompile_bytecode, write_json  # noqa: E402

SHAPES = {"phi2": (32, 32, 80), "smollm2": (9, 3, 64)}  # heads, kv heads, head dim
ROW_COUNTS, CACHE = (1, 8, 32, 256), 600
WITH_CUDNN = "import phi2cli.kernels.attention as a; a.DECODE_BACKENDS = (); "


def kernel_times(heads: int, kv_heads: int, dim: int) -> dict[str, Any]:
    """Per row count: ms of the first call at a new shape and of a warm call, torch's choice against
    DECODE_BACKENDS, and how far their outputs differ on the same inputs."""
    import torch
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from phi2cli.kernels.attention import DECODE_BACKENDS

    found: dict[str, Any] = {}
    for rows in ROW_COUNTS:  # a new shape each: the first call of each variant meets it cold
        query = torch.randn(rows, heads, 1, dim, device="cuda", dtype=torch.bfloat16)
        keys = torch.randn(rows, kv_heads, CACHE, dim, device="cuda", dtype=torch.bfloat16)
        values = torch.randn(rows, kv_heads, CACHE, dim, device="cuda", dtype=torch.bfloat16)
        mask = torch.zeros(rows, 1, 1, CACHE, device="cuda", dtype=torch.bfloat16)
        mask[:, :, :, -20:] = -torch.inf  # the cache's unwritten end

        def attend(backends: tuple[str, ...]) -> Any:  # (): torch's own choice
            chosen = sdpa_kernel([getattr(SDPBackend, name) for name in backends]) if backends else nullcontext()
            with chosen:
                return F.scaled_dot_product_attention(query, keys, values, attn_mask=mask, enable_gqa=heads != kv_heads)

        row: dict[str, Any] = {}
        outputs = []
        for label, backends in (("with_cudnn", ()), ("without_cudnn", DECODE_BACKENDS)):
            torch.cuda.synchronize()
            started = time.perf_counter()
            outputs.append(attend(backends).float())
            torch.cuda.synchronize()
            first = (time.perf_counter() - started) * 1e3
            for _ in range(5):
                attend(backends)
            torch.cuda.synchronize()
            started = time.perf_counter()
            for _ in range(50):
                attend(backends)
            torch.cuda.synchronize()
            row[label] = {"first_ms": round(first, 2), "warm_ms": round((time.perf_counter() - started) / 50 * 1e3, 4)}
        row["max_abs_difference"] = float((outputs[0] - outputs[1]).abs().max())
        found[str(rows)] = row
    return found


def cli_runs(adapter: Path, repeat: int) -> dict[str, Any]:
    article = str(ROOT / "examples" / "article.txt")
    commands = {"summarize": ["summarize", article, "--adapter", str(adapter)],
                "evaluate": ["evaluate", "--adapter", str(adapter), "--samples", "500", "--output",
                             "/tmp/phi2-decode-attention-eval"]}  # fmt: skip
    found: dict[str, Any] = {}
    for _ in range(repeat):
        for name, args in commands.items():
            for label, patch in (("without_cudnn", ""), ("with_cudnn", WITH_CUDNN)):
                started = time.perf_counter()
                done = subprocess.run(patched_python(patch, ["-m", "phi2cli", *args]), cwd=ROOT, capture_output=True,
                                      text=True)  # fmt: skip
                wall = round(time.perf_counter() - started, 2)
                timing = [line for line in (done.stdout + done.stderr).splitlines() if line.startswith("load ")]
                found.setdefault(name, {}).setdefault(label, []).append(
                    {"wall_s": wall, "rc": done.returncode, "timing": timing[-1] if timing else None})
                print(name, label, wall, timing[-1] if timing else done.stderr[-300:], flush=True)
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--adapter", type=Path, help="a trained run's adapter: also time the CLI each way")
    parser.add_argument("--repeat", type=int, default=1)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "decode_attention.json")
    options = parser.parse_args()
    result: dict[str, Any] = {"command": "python benchmarks/decode_attention.py " + " ".join(sys.argv[1:]),
                              "rows": ROW_COUNTS, "cache": CACHE}  # fmt: skip
    for name, shape in SHAPES.items():
        result[name] = kernel_times(*shape)
        print(name, result[name], flush=True)
    if options.adapter:
        result["bytecode_precompiled"] = precompile_bytecode(Path("/tmp/phi2-decode-attention-pycache"))
        result["cli"] = cli_runs(options.adapter, options.repeat)
    result["environment"] = environment()
    write_json(options.out, result)


if __name__ == "__main__":
    main()
