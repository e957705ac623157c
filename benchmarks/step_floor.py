"""The least GPU time a training step of phi-2's shape can take here: its matrix products and its attention
alone, each kernel timed on its own at the step's exact shapes, every other kernel counted as free.

    python benchmarks/step_floor.py --data-dir DIR [--batches 24] [--sustain 15] [--end-to-end FILE ...]

A step of 8 real XSUM examples (phi-2's tokenizer, packed) runs per layer: the frozen q/k/v, dense,
fc1 and fc2 products forward and their input gradients backward, the LoRA products of q, k, v and
dense forward and backward (rank from LoraConfig), varlen flash attention forward and backward; and
the output head over the labelled tokens only, forward and input gradient. Layer norms, GELU,
residual adds, dropout, the loss and the optimizer are left out, as if fused away at no cost. Each
kind is timed as CUDA-graph replays of that kernel alone, so launch gaps do not count. The sum over
the layers is a lower bound on the step's GPU time with these kernels; the batches' tokens over it,
an upper bound on real tokens/s. Those kernels, timed alone in short bursts, run at the card's top
clock; a run keeps the card busy, and a busy card lowers its clock at its power limit. So one typical
step's floor calls are also captured whole and replayed back to back for `--sustain` seconds, and
the floor scaled by how much slower the last second's replays are is the sustained floor. Two data cuts: 512 tokens (the speed benchmark's, the peers') and
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
    from phi2cli.kernels.graphs import record_graph, warm_up

    warm_up(call, passes=3)  # off the default stream, as capturing asks
    begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    try:
        graph, _ = record_graph(lambda: [call() for _ in range(repeat)])
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


class FloorCall(NamedTuple):
    kind: str  # the floor's column it is counted in
    call: Callable[[], Any]
    per_step: int  # how many times a step runs it


def floor_calls(shape: Shape, lengths: Sequence[int], labelled: int, device: str, dtype: Any) -> list[FloorCall]:
    """Every product and attention call a step of these examples cannot do without, at its shapes, with
    how often the step runs it (attention's "backward" is a forward with its gradients)."""
    import torch
    import torch.nn.functional as F

    from phi2cli.kernels.attention import causal_varlen

    tokens, hidden, inner, rank, layers = sum(lengths), shape.hidden, shape.intermediate, shape.rank, shape.layers

    def rand(*size: int, grad: bool = False) -> torch.Tensor:
        return torch.randn(*size, device=device, dtype=dtype, requires_grad=grad)

    x, wide, qkv_out = rand(tokens, hidden), rand(tokens, inner), rand(tokens, 3 * hidden)
    w_qkv, w_dense, w_fc1, w_fc2 = rand(3 * hidden, hidden), rand(hidden, hidden), rand(inner, hidden), rand(hidden, inner)
    down_qkv, down, up, low = rand(3 * rank, hidden), rand(rank, hidden), rand(hidden, rank), rand(tokens, rank)
    calls = [  # forward product of each frozen projection (q/k/v fused, dense, fc1, fc2), then its input gradient
        FloorCall("matmul_forward", lambda: F.linear(x, w_qkv), layers),
        FloorCall("matmul_forward", lambda: F.linear(x, w_dense), layers),
        FloorCall("matmul_forward", lambda: F.linear(x, w_fc1), layers),
        FloorCall("matmul_forward", lambda: F.linear(wide, w_fc2), layers),
        FloorCall("matmul_backward", lambda: torch.mm(qkv_out, w_qkv), layers),
        FloorCall("matmul_backward", lambda: torch.mm(x, w_dense), layers),
        FloorCall("matmul_backward", lambda: torch.mm(wide, w_fc1), layers),
        FloorCall("matmul_backward", lambda: torch.mm(x, w_fc2), layers),
        # LoRA on q, k, v (one shared down-projection of 3 x rank) and dense: down and up forward; backward
        # per adapter the up weight's gradient, the low-rank gradient, the down weight's gradient, the input's
        FloorCall("lora", lambda: F.linear(x, down_qkv), layers),
        FloorCall("lora", lambda: F.linear(x, down), layers),
        FloorCall("lora", lambda: F.linear(low, up), 4 * layers),
        FloorCall("lora", lambda: torch.mm(x.t(), low), 4 * layers),
        FloorCall("lora", lambda: torch.mm(x, up), 4 * layers),
        FloorCall("lora", lambda: torch.mm(low.t(), x), 4 * layers),
        FloorCall("lora", lambda: torch.mm(low, down), 4 * layers),
    ]  # fmt: skip
    query, key, value = (rand(tokens, shape.heads, shape.head_dim, grad=True) for _ in range(3))
    cumulative = torch.tensor([0, *itertools.accumulate(lengths)], device=device, dtype=torch.int32)
    attend = lambda: causal_varlen(query, key, value, cumulative, max(lengths), None)  # noqa: E731
    out_grad = rand(tokens, shape.heads, shape.head_dim)
    calls += [FloorCall("attention_forward", attend, layers),
              FloorCall("attention_backward", lambda: torch.autograd.grad(attend(), (query, key, value), out_grad),
                        layers)]  # fmt: skip
    head, picked, logits = rand(shape.vocab, hidden), rand(labelled, hidden), rand(labelled, shape.vocab)
    return calls + [FloorCall("head", lambda: F.linear(picked, head), 1), FloorCall("head", lambda: torch.mm(logits, head), 1)]


def batch_floor(shape: Shape, lengths: Sequence[int], labelled: int, device: str, dtype: Any,
                timer: Callable[[Callable[[], Any]], float]) -> dict[str, float]:  # fmt: skip
    """Milliseconds of one step's matrix products and attention, by kind, summed over the layers."""
    found: dict[str, float] = {}
    for kind, call, per_step in floor_calls(shape, lengths, labelled, device, dtype):
        found[kind] = found.get(kind, 0.0) + timer(call) * per_step
    # the backward call runs the forward too: its own time is the difference
    found["attention_backward"] = max(found["attention_backward"] - found["attention_forward"], 0.0)
    found["total"] = sum(found.values())
    return found


def whole_step(calls: Sequence[FloorCall], layers: int) -> Callable[[], None]:
    """One step's floor calls in a step's order and number (attention's forward runs inside its backward
    call, so it is not run again)."""
    per_layer = [(call, per_step // layers) for kind, call, per_step in calls if kind not in ("head", "attention_forward")]
    once = [call for kind, call, _ in calls if kind == "head"]

    def step() -> None:
        for _ in range(layers):
            for call, times in per_layer:
                for _ in range(times):
                    call()
        for call in once:
            call()

    return step


def sustained(step: Callable[[], None], device: str, seconds: float) -> dict[str, Any] | None:
    """`step` captured once in a CUDA graph and replayed back to back for `seconds`, as a run's steps follow
    each other: ms of each 1-second window's replays, and the card's clock and power sampled under that
    load. A card held busy reaches its power limit and lowers its clock; kernels timed alone in short
    bursts do not. None off a GPU (no graph, no clock)."""
    if device != "cuda":
        return None
    import subprocess
    import threading

    import torch

    from phi2cli.kernels.graphs import record_graph, warm_up

    warm_up(step)
    graph, _ = record_graph(step)
    torch.cuda.synchronize()
    samples: list[str] = []
    done = threading.Event()

    def sample_clocks() -> None:
        query = ["nvidia-smi", "--query-gpu=clocks.sm,clocks.max.sm,power.draw,power.limit,temperature.gpu",
                 "--format=csv,noheader"]  # fmt: skip
        while not done.wait(1.0):
            try:
                samples.append(subprocess.run(query, capture_output=True, text=True, timeout=10).stdout.strip())
            except (OSError, subprocess.SubprocessError) as err:
                samples.append(f"nvidia-smi: {err}")
                return

    sampler = threading.Thread(target=sample_clocks, daemon=True)
    sampler.start()
    replays: list[tuple[float, Any, Any]] = []  # (host time launched, start event, end event)
    started = time.perf_counter()
    while time.perf_counter() - started < seconds:
        begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        begin.record()
        graph.replay()
        end.record()
        replays.append((time.perf_counter() - started, begin, end))
        if len(replays) % 8 == 0:  # keep the queue short, so a window's replays are the ones launched in it
            end.synchronize()
    torch.cuda.synchronize()
    done.set()
    sampler.join()
    windows: dict[int, list[float]] = {}
    for at, begin, end in replays:
        windows.setdefault(int(at), []).append(begin.elapsed_time(end))
    by_second = [round(sum(ms) / len(ms), 2) for _, ms in sorted(windows.items())]
    return {"seconds": seconds, "replays": len(replays), "first_ms": round(replays[0][1].elapsed_time(replays[0][2]), 2),
            "ms_by_second": by_second, "last_second_ms": by_second[-1], "clocks": samples}  # fmt: skip


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


def measure(args: argparse.Namespace, command: str) -> dict[str, Any]:
    """Both cuts' floors (and their sustained floors) on this machine, with the environment."""
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
        floor = floors[name] = {
            "max_length": max_length, "batches": len(batches),
            "mean_tokens_per_step": round(tokens / len(batches), 1),
            "mean_labelled_per_step": round(sum(n for _, n in batches) / len(batches), 1),
            "floor_ms_per_step": {kind: round(sum(b[kind] for b in per_batch) / len(batches), 2) for kind in per_batch[0]},
            "floor_tokens_per_s": round(tokens / (sum(b["total"] for b in per_batch) / 1e3), 1),
        }  # fmt: skip
        if args.sustain > 0:  # the batch nearest the mean, its floor calls replayed as a run's steps
            typical = min(range(len(batches)), key=lambda i: abs(sum(batches[i][0]) - tokens / len(batches)))
            lengths, labelled = batches[typical]
            load = sustained(whole_step(floor_calls(shape, lengths, labelled, device, dtype), shape.layers),
                             device, args.sustain)  # fmt: skip
            if load:
                alone = per_batch[typical]["total"]
                load.update(tokens=sum(lengths), floor_ms=round(alone, 2),
                            slowdown=round(load["last_second_ms"] / alone, 3))  # fmt: skip
                floor["sustained_load"] = load
                floor["sustained_floor_tokens_per_s"] = round(floor["floor_tokens_per_s"] / load["slowdown"], 1)
    return {"command": command, "shape": shape._asdict(), "examples_per_step": EXAMPLES_PER_STEP, "floors": floors,
            "plain_matmul_tflops": round(plain_matmul_tflops(device, dtype), 1),
            "mfu_denominator_tflops": BF16_PEAK_TFLOPS, "device": device,
            "timed_eagerly_because": sorted(UNCAPTURED), "environment": environment()}  # fmt: skip


def set_against(floors: dict[str, Any], paths: Sequence[Path]) -> list[dict[str, Any]]:
    """bounds() of each end_to_end.py result file at the floor, and at the sustained floor where measured."""
    found = []
    for path in paths:
        measured = json.loads(path.read_text(encoding="utf-8"))
        at = bounds(floors["speed"]["floor_tokens_per_s"], floors["seed_job"]["floor_tokens_per_s"], measured)
        if all("sustained_floor_tokens_per_s" in floor for floor in floors.values()):
            at["at_sustained_floor"] = bounds(floors["speed"]["sustained_floor_tokens_per_s"],
                                              floors["seed_job"]["sustained_floor_tokens_per_s"], measured)  # fmt: skip
        found.append({"file": str(path), **at})
    return found


def print_results(results: dict[str, Any]) -> None:
    for name, floor in results["floors"].items():
        print(f"{name} (max {floor['max_length']} tokens, {floor['mean_tokens_per_step']:,.0f} a step): "
              f"{floor['floor_tokens_per_s']:,.0f} real tokens/s at most; ms a step: "
              + ", ".join(f"{kind} {ms}" for kind, ms in floor["floor_ms_per_step"].items()))  # fmt: skip
        if "sustained_load" in floor:
            load = floor["sustained_load"]
            print(f"  sustained: the floor's calls for one {load['tokens']:,}-token step take {load['floor_ms']} ms "
                  f"timed alone, {load['first_ms']} ms in the first replay, {load['last_second_ms']} ms after "
                  f"{load['seconds']:g} s back to back ({load['slowdown']}x): "
                  f"{floor['sustained_floor_tokens_per_s']:,.0f} real tokens/s at most; last clock sample "
                  f"{(load['clocks'] or ['none'])[-1]}")  # fmt: skip
    print(f"plain matmul {results['plain_matmul_tflops']} TFLOP/s")
    for measured in results["end_to_end"]:
        for prefix, group in (("", measured), ("sustained ", measured.get("at_sustained_floor", {}))):
            for name, values in group.items():
                if name != "at_sustained_floor" and isinstance(values, dict):
                    print(f"{measured['file']}, {prefix}{name}: " + ", ".join(f"{k} {v}" for k, v in values.items()))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-dir", type=Path, default=default_data_dir())
    parser.add_argument("--batches", type=int, default=24, help="steps of 8 examples to time")
    parser.add_argument("--end-to-end", type=Path, action="append",
                        help="end_to_end.py results to set against the floor (repeatable; default: the committed "
                             "benchmarks/results/end_to_end.json)")  # fmt: skip
    parser.add_argument("--sustain", type=float, default=15.0,
                        help="seconds to replay one typical step's floor calls back to back per cut, for the "
                             "floor under a run's sustained load (0: skip)")  # fmt: skip
    parser.add_argument("--floors-from", type=Path,
                        help="a step_floor.json whose floors to reuse, timing nothing: set them against "
                             "--end-to-end files measured after it")  # fmt: skip
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "step_floor.json")
    args = parser.parse_args(argv)
    if args.sustain < 0:
        parser.error(f"--sustain must be 0 or more seconds (got {args.sustain:g})")
    if args.batches < 1:
        parser.error(f"--batches must be at least 1 (got {args.batches})")
    if args.floors_from is None and not (args.data_dir / "train.jsonl").is_file():
        parser.error(f"no train.jsonl in {args.data_dir}: give --data-dir a folder of XSUM rows")
    for path in args.end_to_end or []:
        if not path.is_file():
            parser.error(f"--end-to-end {path}: no such file (benchmarks/end_to_end.py writes one)")
    command = "python benchmarks/step_floor.py " + " ".join(sys.argv[1:] if argv is None else argv)
    if args.floors_from is not None:
        try:
            results = json.loads(args.floors_from.read_text(encoding="utf-8"))
        except (OSError, ValueError) as err:
            parser.error(f"--floors-from {args.floors_from}: not a step_floor.py result ({type(err).__name__}: {err})")
        floors = results.get("floors") if isinstance(results, dict) else None
        if not isinstance(floors, dict) or not {"speed", "seed_job"} <= floors.keys():
            parser.error(f"--floors-from {args.floors_from}: not a step_floor.py result (no floors of both cuts)")
        results["set_against_by"] = command
    else:
        results = measure(args, command)
    results["end_to_end"] = set_against(results["floors"],
                                        args.end_to_end or [ROOT / "benchmarks" / "results" / "end_to_end.json"])
    write_json(args.out, results)
    print_results(results)


if __name__ == "__main__":
    main()
