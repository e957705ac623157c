"""One engine, three decoder families: training speed, MFU, memory, fast paths and evaluate time per family,
plus the ablations that decide which hand-written pieces stay.

    python benchmarks/families.py [--rows phi2,llama,smollm2,peft_lora,...] [--steps 60] [--ablation-steps 20]
    python benchmarks/families.py --tiny            # CPU smoke run: tiny shapes, a few steps

Rows already in --out from an earlier run are kept (--fresh drops them), so the family rows and the
ablation rows can run as two commands of a few minutes each.

Rows:
  phi2      random weights of phi-2's exact shape (PhiConfig: 2.78 B parameters, partial rotary, gelu_new)
  llama     a Llama-family shape of similar size with grouped key/value heads (2.5 B: hidden 2560,
            32 query heads over 8 key/value heads, intermediate 6912, 32 layers; phi-2's tokenizer, so vocab 51200)
  smollm2   SmolLM2-135M-Instruct's real weights (the GGUF file in ../shared/models)
  ablations on the phi-2 shape (--ablation-steps each):
  peft_lora          PEFT's own LoRA forward instead of the lean one
  bnb_paged_adamw    bitsandbytes' paged_adamw_8bit as the Trainer builds it, instead of the flat 8-bit AdamW
  adamw_torch_fused  torch's fused AdamW (32-bit state) instead of the flat 8-bit AdamW
  decoder_hf         evaluate with transformers' generate() and static cache (PHI2_DECODER=hf) instead of
                     the hand-written static-cache decoder (the phi2 row's adapter, or a short one)

Each training row runs phi2cli.training.engine.train (the speed profile on a GPU) on real XSUM rows
(max 512 tokens, 8 examples per step) and reports real tokens/s, MFU (benchmarks/common.py's
model_flops over its measured bf16 peak), peak GiB, the fast paths from the run's phi2_run.json, and
the seconds `evaluate` takes for --eval-samples validation articles. Writes
benchmarks/results/families.json (--out) and prints a table.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import gc
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Iterator

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import BF16_PEAK_TFLOPS, ROOT, environment, save_random_model, write_json  # noqa: E402

FAMILY_ROWS = ("phi2", "llama", "smollm2")
ABLATION_ROWS = ("peft_lora", "bnb_paged_adamw", "adamw_torch_fused", "decoder_hf")
SHAPES = {  # full size (GPU) and --tiny (CPU smoke) shapes of the random-weight rows
    "phi2": dict(vocab_size=51200, hidden_size=2560, intermediate_size=10240, num_hidden_layers=32,
                 num_attention_heads=32, partial_rotary_factor=0.4, hidden_act="gelu_new", tie_word_embeddings=False,
                 max_position_embeddings=2048, bos_token_id=50256, eos_token_id=50256),
    "llama": dict(vocab_size=51200, hidden_size=2560, intermediate_size=6912, num_hidden_layers=32,
                  num_attention_heads=32, num_key_value_heads=8, tie_word_embeddings=False,
                  max_position_embeddings=4096, bos_token_id=50256, eos_token_id=50256),
}  # fmt: skip
# Rows measure the steady rate of a long run, so they record batch shapes at the granularity the plan
# picks for one (128 tokens beyond ~920 steps; training.plan.graph_bucket_tokens), not at the coarse
# 512 it would pick for a 40-step job. Recordings are one-time work and left out of the timed window.
GRAPH_BUCKET = 128
TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4)


def default_shared() -> Path:
    for candidate in (ROOT.parent / "shared", ROOT / "shared"):
        if candidate.is_dir():
            return candidate
    return ROOT.parent / "shared"


def make_random_model(row: str, out: Path, tiny: bool) -> Path:
    """Save a random-weight model of the row's shape with phi-2's tokenizer (bf16 on a GPU)."""
    from transformers import LlamaConfig, PhiConfig

    if (out / "config.json").is_file():
        return out
    shape = dict(SHAPES[row])
    if tiny:
        shape.update(TINY, num_key_value_heads=2) if row == "llama" else shape.update(TINY)
    config = (PhiConfig if row == "phi2" else LlamaConfig)(**shape)
    return save_random_model(config, out)


@contextlib.contextmanager
def ablation(row: str) -> Iterator[dict[str, Any]]:
    """Config overrides for the row, with the engine patched the way the ablation needs."""
    from phi2cli.kernels import lora as lora_fast
    from phi2cli.training import engine

    resolve, install = engine.resolve_plan, lora_fast.install
    overrides: dict[str, Any] = {}
    plan_changes: dict[str, Any] = {}
    if row == "peft_lora":
        lora_fast.install = lambda model: 0  # PEFT's own forward on every LoRA layer
    elif row == "bnb_paged_adamw":
        plan_changes["flat_optimizer"] = False
    elif row == "adamw_torch_fused":
        overrides["train.optimizer"] = "adamw_torch_fused"
    if plan_changes:
        engine.resolve_plan = lambda *a, **kw: dataclasses.replace(resolve(*a, **kw), **plan_changes)
    try:
        yield overrides
    finally:
        engine.resolve_plan, lora_fast.install = resolve, install


def train_row(row: str, model: Path, data_dir: Path, examples_dir: Path, steps: int, work: Path,
              overrides: dict[str, Any]) -> tuple[dict[str, Any], Path]:  # fmt: skip
    """Train `steps` optimizer steps with the real engine; (measurements, adapter directory)."""
    import torch
    from train_throughput import LOG_EVERY, MAX_LENGTH, StepTimer, summarize
    from transformers import TrainerCallback

    from phi2cli.config import Phi2Config, apply_overrides
    from phi2cli.models.loading import memory_report
    from phi2cli.training import trainer as trainer_mod
    from phi2cli.training.engine import train

    config = apply_overrides(Phi2Config(), {
        "model.model": str(model), "data.data_dir": str(data_dir), "data.val_samples": 0,
        "data.max_length": MAX_LENGTH, "train.max_steps": steps, "train.logging_steps": LOG_EVERY,
        "train.eval_every": 10_000, "train.output_dir": str(work / row), "train.final_dir": str(work / f"{row}-final"),
        "train.graph_bucket": GRAPH_BUCKET, "train.compile_from_steps": 0, **overrides,  # steady rates: compiled
    }).validate()  # fmt: skip
    holder: list[Any] = []
    timer = StepTimer(holder)
    original_init = trainer_mod.Phi2Trainer.__init__

    def keep_handle(self: Any, *args: Any, **kwargs: Any) -> None:  # the timer reads the trainer's token counts
        original_init(self, *args, **kwargs)
        holder.append(self)

    class PeakFromTrainingOn(TrainerCallback):  # loading's transient peak is not training's
        def on_train_begin(self, *args: Any, **kwargs: Any) -> None:
            if torch.cuda.is_available():
                torch.cuda.reset_peak_memory_stats()

    trainer_mod.Phi2Trainer.__init__ = keep_handle
    try:
        result = train(config, prepared_dir=examples_dir, callbacks=[PeakFromTrainingOn(), timer])
    finally:
        trainer_mod.Phi2Trainer.__init__ = original_init
    params, layers, hidden = model_size(model)
    measured = summarize(row, timer, memory_report(), params, layers, hidden)
    facts = json.loads((result.final_dir / "phi2_run.json").read_text(encoding="utf-8"))
    paths = facts.get("fast_paths", {})
    measured["fast_paths_active"] = sorted(n for n, e in paths.items() if e["status"] == "active")
    measured["fast_paths_fell_back"] = {n: e["reason"] for n, e in paths.items() if e["status"] == "fell back"}
    measured["lora_targets"] = facts["config"]["lora"]["targets"]
    measured["graph_bucket"] = facts.get("plan", {}).get("graph_bucket")
    measured["params_in_matmuls"] = params
    measured["engine_throughput"] = result.throughput  # the engine's own meter (steady-state window)
    holder.clear()
    return measured, result.final_dir


def model_size(model: Path) -> tuple[int, int, int]:
    """(parameters in matrix products, layers, hidden) counted on the meta device."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from phi2cli.models.loading import local_model

    config = AutoConfig.from_pretrained(local_model(str(model)))
    with torch.device("meta"):
        meta = AutoModelForCausalLM.from_config(config)
    total = sum(p.numel() for p in meta.parameters())
    embed = meta.get_input_embeddings().weight.numel()
    tied = meta.get_output_embeddings() is not None and meta.get_output_embeddings().weight is meta.get_input_embeddings().weight
    return total - (0 if tied else embed), config.num_hidden_layers, config.hidden_size


def evaluate_seconds(adapter: Path, samples: int, max_new_tokens: int, out: Path, decoder: str) -> dict[str, Any]:
    """Wall seconds of `evaluate` over `samples` validation articles, with the given greedy decoder."""
    from phi2cli.inference.evaluation import EvaluateOptions, evaluate

    previous = os.environ.get("PHI2_DECODER")
    os.environ["PHI2_DECODER"] = decoder
    try:
        started = time.perf_counter()
        result = evaluate(EvaluateOptions(adapter_dir=str(adapter), samples=samples, output_dir=str(out),
                                          overrides={"generation.max_new_tokens": max_new_tokens}))  # fmt: skip
        wall = time.perf_counter() - started
    finally:
        os.environ.pop("PHI2_DECODER") if previous is None else os.environ.__setitem__("PHI2_DECODER", previous)
    settings = result.metrics["settings"]
    return {"evaluate_s": round(wall, 2), "evaluate_samples": result.metrics["samples"],
            "decoder": settings.get("decoder"), "shared_forward_articles": settings.get("shared_forward_articles"),
            "evaluate_timings": result.metrics["timings"], "eval_loss": result.metrics["tuned"]["eval_loss"]}  # fmt: skip


def prepare_examples(model: Path, data_dir: Path, count: int, target: Path) -> Path:
    """Real XSUM train rows tokenized with the row's own tokenizer, saved as a prepared dataset."""
    from train_throughput import load_examples, save_prepared

    from phi2cli.models.loading import load_tokenizer

    tokenizer = load_tokenizer(str(model))
    examples = load_examples(data_dir, tokenizer, count)
    if len(examples) < count:
        raise SystemExit(f"{data_dir}: need {count} usable train rows, found {len(examples)}")
    return save_prepared(examples, target, str(model))


def release() -> None:
    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def parse_rows(text: str) -> list[str]:
    rows = [r.strip() for r in text.split(",") if r.strip()]
    unknown = sorted(set(rows) - set(FAMILY_ROWS) - set(ABLATION_ROWS))
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown row(s) {', '.join(unknown)}; "
                                         f"rows: {', '.join(FAMILY_ROWS + ABLATION_ROWS)}")  # fmt: skip
    return rows


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    shared = default_shared()
    parser.add_argument("--rows", type=parse_rows, default=list(FAMILY_ROWS + ABLATION_ROWS))
    parser.add_argument("--steps", type=int, default=60, help="optimizer steps per family row")
    parser.add_argument("--ablation-steps", type=int, default=20, help="optimizer steps per ablation row")
    parser.add_argument("--eval-samples", type=int, default=500, help="validation articles `evaluate` scores")
    parser.add_argument("--max-new-tokens", type=int, default=30)
    parser.add_argument("--data-dir", type=Path, default=shared / "data" / "xsum")
    parser.add_argument("--smollm2", type=Path, default=shared / "models" / "SmolLM2-135M-Instruct.Q4_1.gguf")
    parser.add_argument("--work", type=Path, default=None, help="models and runs go here (default: a /tmp folder)")
    parser.add_argument("--fresh", action="store_true", help="drop the rows an earlier run left in --out")
    parser.add_argument("--tiny", action="store_true", help="CPU smoke run: tiny shapes, 3 steps, 4 articles")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "families.json")
    return parser


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = build_parser().parse_args(argv)
    if args.tiny:
        args.steps, args.ablation_steps = min(args.steps, 3), min(args.ablation_steps, 3)
        args.eval_samples, args.max_new_tokens = min(args.eval_samples, 4), min(args.max_new_tokens, 8)
    if min(args.steps, args.ablation_steps) < 3:
        raise SystemExit("--steps and --ablation-steps must be at least 3 (2 warm-up steps are not timed)")
    if not (args.data_dir / "train.jsonl").is_file():
        raise SystemExit(f"no train.jsonl in {args.data_dir}; pass --data-dir")
    if "smollm2" in args.rows and not args.smollm2.is_file():
        raise SystemExit(f"SmolLM2 GGUF not found at {args.smollm2}; pass --smollm2 or leave the row out")
    work = args.work or Path(tempfile.mkdtemp(prefix="phi2-families-"))
    work.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("PHI2_CACHE_DIR", str(work / "cache"))
    results: dict[str, Any] = {"rows": {}}
    if args.out.is_file() and not args.fresh:  # rows from an earlier run (another --rows subset) are kept
        results["rows"] = json.loads(args.out.read_text(encoding="utf-8")).get("rows", {})
    adapters: dict[str, Path] = {}
    started = time.perf_counter()
    for row in args.rows:
        row_started = time.perf_counter()
        try:
            results["rows"][row] = run_row(row, args, work, adapters)
        except Exception as err:  # one failing row must not lose the others
            import traceback

            traceback.print_exc()
            results["rows"][row] = {"error": f"{type(err).__name__}: {err}"[:500]}
        results["rows"][row]["row_seconds"] = round(time.perf_counter() - row_started, 1)
        results["rows"][row]["steps"] = args.steps if row in FAMILY_ROWS else args.ablation_steps
        print(f"{row}: {brief(results['rows'][row])}", flush=True)
        release()
    results["total_seconds"] = round(time.perf_counter() - started, 1)  # of this run's rows
    results["mfu_denominator_tflops"] = BF16_PEAK_TFLOPS
    results["environment"] = environment()
    results["command"] = "python " + " ".join([sys.argv[0], *(argv if argv is not None else sys.argv[1:])])
    results["settings"] = {"steps": args.steps, "ablation_steps": args.ablation_steps, "tiny": args.tiny,
                           "graph_bucket": GRAPH_BUCKET, "eval_samples": args.eval_samples,
                           "max_new_tokens": args.max_new_tokens,
                           "data_dir": str(args.data_dir)}  # fmt: skip
    write_json(args.out, results)
    print_table(results)
    return results


def run_row(row: str, args: argparse.Namespace, work: Path, adapters: dict[str, Path]) -> dict[str, Any]:
    if row == "smollm2":
        model = args.smollm2
    else:
        shape = row if row in SHAPES else "phi2"  # the ablations run on the phi-2 shape
        model = make_random_model(shape, work / f"model-{shape}", args.tiny)
    if row == "decoder_hf":
        adapter = adapters.get("phi2")
        if adapter is None:  # no phi2 row in this run: a short adapter to evaluate
            examples = prepare_examples(model, args.data_dir, 8 * args.ablation_steps, work / "prepared-decoder")
            _, adapter = train_row("decoder_hf", model, args.data_dir, examples, args.ablation_steps, work, {})
        hf = evaluate_seconds(adapter, args.eval_samples, args.max_new_tokens, work / "eval-decoder-hf", "hf")
        static = evaluate_seconds(adapter, args.eval_samples, args.max_new_tokens, work / "eval-decoder-static",
                                  "static")  # fmt: skip
        return {"hf": hf, "static": static,
                "static_speedup": round(hf["evaluate_s"] / static["evaluate_s"], 3) if static["evaluate_s"] else None}
    steps = args.steps if row in FAMILY_ROWS else args.ablation_steps
    examples = prepare_examples(model, args.data_dir, 8 * steps, work / f"prepared-{row}")
    with ablation(row) as overrides:
        measured, adapter = train_row(row, model, args.data_dir, examples, steps, work, overrides)
    adapters[row] = adapter
    if row in FAMILY_ROWS:
        release()
        measured.update(evaluate_seconds(adapter, args.eval_samples, args.max_new_tokens, work / f"eval-{row}",
                                         "static"))  # fmt: skip
    return measured


def brief(row: dict[str, Any]) -> str:
    if "error" in row:
        return row["error"]
    if "tokens_per_s" in row:
        text = f"{row['tokens_per_s']:,.0f} real tok/s, MFU {row['mfu']:.1%}, peak {row['peak_gib']} GiB"
        return text + (f", evaluate {row['evaluate_s']} s" if "evaluate_s" in row else "")
    return f"evaluate hf {row['hf']['evaluate_s']} s vs static {row['static']['evaluate_s']} s"


def print_table(results: dict[str, Any]) -> None:
    print(f"{'row':<19}{'real tok/s':>11}{'MFU':>8}{'peak GiB':>10}{'eval s':>8}  fast paths (fell back)")
    for name, row in results["rows"].items():
        if "tokens_per_s" in row:
            fell = ", ".join(row["fast_paths_fell_back"]) or "-"
            print(f"{name:<19}{row['tokens_per_s']:>11,.0f}{row['mfu']:>8.1%}{row['peak_gib'] or 0:>10.2f}"
                  f"{row.get('evaluate_s', float('nan')):>8.1f}  {','.join(row['fast_paths_active'])} ({fell})")  # fmt: skip
        elif "hf" in row:
            print(f"{name:<19}{'':>11}{'':>8}{'':>10}{row['hf']['evaluate_s']:>8.1f}  "
                  f"static decoder: {row['static']['evaluate_s']:.1f} s ({row['static_speedup']}x)")  # fmt: skip
        else:
            print(f"{name:<19} {row.get('error', '?')}")
    print(f"total {results['total_seconds']:.0f} s")


if __name__ == "__main__":
    main()
