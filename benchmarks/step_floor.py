"""The least GPU time a training step of phi-2's shape can take here: its matrix products and its attention
alone, each kernel timed on its own at the step's exact shapes, every other kernel counted as free.

    python benchmarks/step_floor.py --data-dir DIR [--batches 24] [--end-to-end FILE ...]

A step of 8 real XSUM examples (phi-2's tokenizer, packed) runs per layer: the frozen q/k/v, dense,
fc1 and fc2 products forward and their input gradients backward, the LoRA products of q, k, v and
dense forward and backward (rank from LoraConfig), varlen flash attention forward and backward; and
the output head over the labelled tokens only, forward and input gradient. Layer norms, GELU,
residual adds, dropout, the loss and the optimizer are left out, as if fused away at no cost. Each
kind is timed as CUDA-graph replays of that kernel alone, so launch gaps do not count. The sum over
the layers is a lower bound on the step's GPU time with these kernels; the batches' tokens over it,
an upper bound on real tokens/s. Two data cuts: 512 tokens (the speed benchmark's, the peers') and
`phi2 train`'s default. Set against end_to_end.py's results (`--end-to-end`, best from the same loan),
it says how far the measured rates are from that bound and what the seed job would take at it.
Writes benchmarks/results/step_floor.json.
"""

from __future__ import annotations

import argparse
import itertools
import json
import random
import sys
import time
from pathlib import Path
from typing import Any, Callable, NamedTuple, Sequence

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import BF16_PEAK_TFLOPS, ROOT, TOKENIZER_DIR, default_data_dir, environment, write_json  # noqa: E402

EXAMPLES_PER_STEP = 8
UNCAPTURED: set[str] = set()  # why a call could not be captured (then timed eagerly)
SPEED_MAX_LENGTH = 512  # train_throughput.py's examples, as the peers and the reference take them


class Shape(NamedTuple):
    hidden: int
    intermediate: int
    layers: int
    heads: int
    vocab: int
    rank: int

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads


def phi2_shape() -> Shape:
    from phi2cli.config import LoraConfig

    config = json.loads((TOKENIZER_DIR / "config.json").read_text(encoding="utf-8"))
    return Shape(config["hidden_size"], config["intermediate_size"], config["num_hidden_layers"],
                 config["num_attention_heads"], config["vocab_size"], LoraConfig().r)  # fmt: skip


def step_batches(data_dir: Path, count: int, max_length: int, seed: int = 42) -> list[tuple[list[int], int]]:
    """`count` steps of 8 training rows encoded to at most `max_length` tokens, drawn as one shuffled pass:
    (lengths, labelled tokens) each."""
    from phi2cli.config import DEFAULT_TEMPLATE, DataConfig
    from phi2cli.data.prompts import IGNORE_INDEX, PromptFormat, encode_example
    from phi2cli.data.sources import normalize_rows, read_records
    from phi2cli.models.loading import load_tokenizer

    tokenizer = load_tokenizer(str(TOKENIZER_DIR))
    fmt = PromptFormat.create(DEFAULT_TEMPLATE, tokenizer)
    rows = normalize_rows(read_records(data_dir / "train.jsonl"), DataConfig(), "train").rows
    random.Random(seed).shuffle(rows)
    found: list[tuple[list[int], int]] = []
    lengths: list[int] = []
    labelled = 0
    for row in rows:
        example = encode_example(fmt, tokenizer, row["document"], row["summary"], max_length)
        if example is None:
            continue
        lengths.append(len(example.input_ids))
        labelled += sum(label != IGNORE_INDEX for label in example.labels)
        if len(lengths) == EXAMPLES_PER_STEP:
            found.append((lengths, labelled))
            lengths, labelled = [], 0
            if len(found) == count:
                break
    if len(found) < count:
        raise SystemExit(f"{data_dir}: {len(found)} steps of {EXAMPLES_PER_STEP} examples, {count} asked for")
    return found


def kernel_ms(call: Callable[[], Any], device: str, repeat: int = 10) -> float:
    """Milliseconds of work per call of `call`, after warm-up. On a GPU, `repeat` calls are captured in
    one CUDA graph and its replays are timed with CUDA events, so the host's time between launches
    does not count (a graphed training step pays none either); elsewhere, a wall clock."""
    import torch

    if device != "cuda":
        for _ in range(3):
            call()
        started = time.perf_counter()
        for _ in range(repeat):
            call()
        return (time.perf_counter() - started) / repeat * 1e3
    side = torch.cuda.Stream()  # warm-up off the default stream, as capturing asks
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            call()
    torch.cuda.current_stream().wait_stream(side)
    begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    try:
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            for _ in range(repeat):
                call()
    except RuntimeError as err:  # a kernel that cannot be captured: timed eagerly, launch gaps included
        UNCAPTURED.add(f"{type(err).__name__}: {str(err)[:200]}")
        torch.cuda.synchronize()
        begin.record()
        for _ in range(repeat):
            call()
        end.record()
        end.synchronize()
        return begin.elapsed_time(end) / repeat
    graph.replay()
    begin.record()
    for _ in range(3):
        graph.replay()
    end.record()
    end.synchronize()
    return begin.elapsed_time(end) / (3 * repeat)


def batch_floor(shape: Shape, lengths: Sequence[int], labelled: int, device: str, dtype: Any,
                timer: Callable[[Callable[[], Any]], float]) -> dict[str, float]:  # fmt: skip
    """Milliseconds of one step's matrix products and attention, by kind, summed over the layers."""
    import torch
    import torch.nn.functional as F

    from phi2cli.kernels.attention import causal_varlen

    tokens, hidden, inner, rank = sum(lengths), shape.hidden, shape.intermediate, shape.rank

    def rand(*size: int, grad: bool = False) -> torch.Tensor:
        return torch.randn(*size, device=device, dtype=dtype, requires_grad=grad)

    x, wide, qkv_out = rand(tokens, hidden), rand(tokens, inner), rand(tokens, 3 * hidden)
    w_qkv, w_dense, w_fc1, w_fc2 = rand(3 * hidden, hidden), rand(hidden, hidden), rand(inner, hidden), rand(hidden, inner)
    down_qkv, down, up, low = rand(3 * rank, hidden), rand(rank, hidden), rand(hidden, rank), rand(tokens, rank)
    frozen = {  # forward product and input gradient of each frozen projection
        "qkv": (lambda: F.linear(x, w_qkv), lambda: torch.mm(qkv_out, w_qkv)),
        "dense": (lambda: F.linear(x, w_dense), lambda: torch.mm(x, w_dense)),
        "fc1": (lambda: F.linear(x, w_fc1), lambda: torch.mm(wide, w_fc1)),
        "fc2": (lambda: F.linear(wide, w_fc2), lambda: torch.mm(x, w_fc2)),
    }
    layer = {"matmul_forward": sum(timer(forward) for forward, _ in frozen.values()),
             "matmul_backward": sum(timer(backward) for _, backward in frozen.values())}  # fmt: skip
    # LoRA on q, k, v (one shared down-projection of 3 x rank) and dense: down and up forward; backward
    # per adapter the up weight's gradient, the low-rank gradient, the down weight's gradient, the input's
    layer["lora"] = (timer(lambda: F.linear(x, down_qkv)) + timer(lambda: F.linear(x, down))
                     + 4 * timer(lambda: F.linear(low, up))
                     + 4 * (timer(lambda: torch.mm(x.t(), low)) + timer(lambda: torch.mm(x, up))
                            + timer(lambda: torch.mm(low.t(), x)) + timer(lambda: torch.mm(low, down))))  # fmt: skip
    query, key, value = (rand(tokens, shape.heads, shape.head_dim, grad=True) for _ in range(3))
    cumulative = torch.tensor([0, *itertools.accumulate(lengths)], device=device, dtype=torch.int32)
    attend = lambda: causal_varlen(query, key, value, cumulative, max(lengths), None)  # noqa: E731
    forward_ms = timer(attend)
    out_grad = rand(tokens, shape.heads, shape.head_dim)
    both_ms = timer(lambda: torch.autograd.grad(attend(), (query, key, value), out_grad))
    layer["attention_forward"], layer["attention_backward"] = forward_ms, max(both_ms - forward_ms, 0.0)
    found = {kind: ms * shape.layers for kind, ms in layer.items()}
    head, picked, logits = rand(shape.vocab, hidden), rand(labelled, hidden), rand(labelled, shape.vocab)
    found["head"] = timer(lambda: F.linear(picked, head)) + timer(lambda: torch.mm(logits, head))
    found["total"] = sum(found.values())
    return found


def plain_matmul_tflops(device: str, dtype: Any, size: int = 8192) -> float:
    """TFLOP/s of one large square product: what the MFU denominator stands for."""
    import torch

    a, b = torch.randn(size, size, device=device, dtype=dtype), torch.randn(size, size, device=device, dtype=dtype)
    ms = kernel_ms(lambda: torch.mm(a, b), device, repeat=20)
    return 2 * size**3 / (ms / 1e3) / 1e12


def bounds(speed_floor: float, seed_floor: float, end_to_end: dict[str, Any]) -> dict[str, Any]:
    """What end_to_end.json's measured rates and jobs would be at the floor rates (tokens/s of the speed
    profile's examples and of the seed job's), beside their targets."""
    found: dict[str, Any] = {}
    trl, speed = end_to_end.get("trl_plain") or {}, end_to_end.get("speed") or {}
    if trl.get("tokens_per_s") and speed.get("tokens_per_s"):
        found["speed"] = {"measured_tokens_per_s": speed["tokens_per_s"],
                          "fraction_of_floor_rate": round(speed["tokens_per_s"] / speed_floor, 3),
                          "trl_plain_tokens_per_s": trl["tokens_per_s"],
                          "floor_rate_over_trl_plain": round(speed_floor / trl["tokens_per_s"], 2),
                          "target_tokens_per_s": round(5 * trl["tokens_per_s"], 1)}  # fmt: skip
    seed = (end_to_end.get("seed_job_cold") or {}).get("timing") or {}
    reference = end_to_end.get("reference_seed_job_s")
    if seed.get("train_steps_s") and seed.get("train_steps_tokens_per_s"):
        tokens = seed["train_steps_s"] * seed["train_steps_tokens_per_s"]
        at_floor = tokens / seed_floor
        rest = end_to_end["seed_job_cold"]["wall_s"] - seed["train_steps_s"]
        found["seed_job"] = {"real_tokens": round(tokens), "measured_steps_s": seed["train_steps_s"],
                             "steps_s_at_floor": round(at_floor, 1), "measured_rest_s": round(rest, 1),
                             "wall_s_with_steps_at_floor": round(rest + at_floor, 1),
                             "target_s": round(min(60.0, reference / 45), 1) if reference else 60.0}  # fmt: skip
    return found


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-dir", type=Path, default=default_data_dir())
    parser.add_argument("--batches", type=int, default=24, help="steps of 8 examples to time")
    parser.add_argument("--end-to-end", type=Path, action="append",
                        help="end_to_end.py results to set against the floor (repeatable; default: the committed "
                             "benchmarks/results/end_to_end.json)")  # fmt: skip
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "step_floor.json")
    args = parser.parse_args(argv)
    if args.batches < 1:
        parser.error(f"--batches must be at least 1 (got {args.batches})")
    if not (args.data_dir / "train.jsonl").is_file():
        parser.error(f"no train.jsonl in {args.data_dir}: give --data-dir a folder of XSUM rows")
    for path in args.end_to_end or []:
        if not path.is_file():
            parser.error(f"--end-to-end {path}: no such file (benchmarks/end_to_end.py writes one)")

    import torch

    from phi2cli.config import DataConfig

    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    shape = phi2_shape()
    timer = lambda call: kernel_ms(call, device)  # noqa: E731
    floors: dict[str, Any] = {}
    # the speed profile's benchmark and the peers cut examples at 512 tokens; `phi2 train` at its default
    for name, max_length in (("speed", SPEED_MAX_LENGTH), ("seed_job", DataConfig().max_length)):
        batches = step_batches(args.data_dir, args.batches, max_length)
        per_batch = [batch_floor(shape, lengths, labelled, device, dtype, timer) for lengths, labelled in batches]
        tokens = sum(sum(lengths) for lengths, _ in batches)
        floors[name] = {
            "max_length": max_length, "batches": len(batches),
            "mean_tokens_per_step": round(tokens / len(batches), 1),
            "mean_labelled_per_step": round(sum(n for _, n in batches) / len(batches), 1),
            "floor_ms_per_step": {kind: round(sum(b[kind] for b in per_batch) / len(batches), 2) for kind in per_batch[0]},
            "floor_tokens_per_s": round(tokens / (sum(b["total"] for b in per_batch) / 1e3), 1),
        }  # fmt: skip
    results: dict[str, Any] = {
        "command": "python benchmarks/step_floor.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "shape": shape._asdict(), "examples_per_step": EXAMPLES_PER_STEP, "floors": floors,
        "plain_matmul_tflops": round(plain_matmul_tflops(device, dtype), 1), "mfu_denominator_tflops": BF16_PEAK_TFLOPS,
        "device": device, "timed_eagerly_because": sorted(UNCAPTURED), "environment": environment(),
    }  # fmt: skip
    results["end_to_end"] = []
    for path in args.end_to_end or [ROOT / "benchmarks" / "results" / "end_to_end.json"]:
        measured = json.loads(path.read_text(encoding="utf-8"))
        found = bounds(floors["speed"]["floor_tokens_per_s"], floors["seed_job"]["floor_tokens_per_s"], measured)
        results["end_to_end"].append({"file": str(path), **found})
    write_json(args.out, results)
    for name, floor in floors.items():
        print(f"{name} (max {floor['max_length']} tokens, {floor['mean_tokens_per_step']:,.0f} a step): "
              f"{floor['floor_tokens_per_s']:,.0f} real tokens/s at most; ms a step: "
              + ", ".join(f"{kind} {ms}" for kind, ms in floor["floor_ms_per_step"].items()))  # fmt: skip
    print(f"plain matmul {results['plain_matmul_tflops']} TFLOP/s")
    for measured in results["end_to_end"]:
        for name, bound in measured.items():
            if isinstance(bound, dict):
                print(f"{measured['file']}, {name}: " + ", ".join(f"{k} {v}" for k, v in bound.items()))


if __name__ == "__main__":
    main()
