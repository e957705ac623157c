"""Training throughput: the reference QLoRA recipe vs phi2cli's engine, same data, one process, one GPU.

    python benchmarks/train_throughput.py --data-dir DIR [--model DIR] [--steps 20] [--ref-steps 10]

The reference is the notebook recipe: HF Trainer + PEFT + bitsandbytes 4-bit NF4, batch 1 x
grad-accum 8, gradient checkpointing, fp16, paged_adamw_8bit, every example truncated and padded
to 512 tokens. phi2cli's 'speed' and 'memory-saver' profiles run through `phi2cli.training.engine.train` on
the same examples (real XSUM rows, phi-2's tokenizer, max 512 tokens), 8 examples per optimizer
step. Prints a table and writes benchmarks/results/train_throughput.json.
"""

from __future__ import annotations

import argparse
import gc
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import BF16_PEAK_TFLOPS, ROOT, environment, make_random_phi2, model_flops, shape_params, write_json  # noqa: E402

from transformers import TrainerCallback  # noqa: E402

MAX_LENGTH = 512
WARMUP_STEPS = 2  # excluded from timing: allocator warm-up, kernel selection
LOG_EVERY = 5  # loss logging syncs the GPU; a real run logs every 10 steps


def _sync() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


class StepTimer(TrainerCallback):
    """Wall time of the steps after warm-up (GPU synchronised at both ends only, so host and GPU
    overlap as in a real run), real tokens per step and logged losses."""

    def __init__(self, trainer_ref: list[Any]) -> None:
        self.trainer_ref = trainer_ref
        self.tokens: list[int] = []
        self.squares: list[int] = []
        self.losses: dict[int, float] = {}
        self.started = 0.0
        self.warmup_s = 0.0
        self.timed_s = 0.0
        self._mark = 0.0
        self._tok0 = 0
        self._sq0 = 0
        self._recorded0 = 0.0
        self.recording_in_window_s = 0.0  # CUDA-graph recordings (one-time, host-synchronous) inside the window

    def on_train_begin(self, args, state, control, **kwargs):
        _sync()
        self.started = time.perf_counter()

    def on_step_begin(self, args, state, control, **kwargs):
        self._tok0 = self.trainer_ref[0].real_tokens_seen
        self._sq0 = self.trainer_ref[0].squared_lengths_seen

    def on_step_end(self, args, state, control, **kwargs):
        self.tokens.append(self.trainer_ref[0].real_tokens_seen - self._tok0)
        self.squares.append(self.trainer_ref[0].squared_lengths_seen - self._sq0)
        if len(self.tokens) == WARMUP_STEPS:
            _sync()
            self._mark = time.perf_counter()
            self.warmup_s = self._mark - self.started
            self._recorded0 = self._recorded()
        elif len(self.tokens) == state.max_steps:
            _sync()
            self.timed_s = time.perf_counter() - self._mark
            self.recording_in_window_s = self._recorded() - self._recorded0

    def _recorded(self) -> float:
        graphed = getattr(self.trainer_ref[0], "graphed", None) if self.trainer_ref else None
        return graphed.record_seconds if graphed is not None else 0.0

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs and "loss" in logs:
            self.losses[state.global_step] = float(logs["loss"])


def load_examples(data_dir: Path, tokenizer: Any, count: int) -> list[dict[str, Any]]:
    from phi2cli.config import DEFAULT_TEMPLATE
    from phi2cli.data.prompts import PromptFormat, encode_example
    from phi2cli.data.sources import normalize_rows, read_records
    from phi2cli.config import DataConfig

    rows = normalize_rows(read_records(data_dir / "train.jsonl"), DataConfig(), "train").rows[:count]
    fmt = PromptFormat.create(DEFAULT_TEMPLATE, tokenizer)
    out = []
    for row in rows:
        ex = encode_example(fmt, tokenizer, row["document"], row["summary"], MAX_LENGTH)
        if ex is not None:
            out.append({"id": row["id"], "document": row["document"], "summary": row["summary"],
                        "input_ids": ex.input_ids, "labels": ex.labels, "prompt_tokens": ex.prompt_tokens,
                        "summary_tokens": ex.summary_tokens, "truncated": ex.truncated})  # fmt: skip
    return out


def save_prepared(examples: list[dict[str, Any]], target: Path, tokenizer_name: str) -> Path:
    import datasets

    from phi2cli.io.files import write_json_atomic

    columns = {k: [e[k] for e in examples] for k in examples[0]}
    datasets.DatasetDict({"train": datasets.Dataset.from_dict(columns)}).save_to_disk(str(target / "data"))
    write_json_atomic(target / "manifest.json", {"source": "benchmark", "splits": {}, "tokenizer": tokenizer_name})
    return target


def summarize(name: str, timer: StepTimer, peak: dict[str, float], params: int, layers: int,
              hidden: int) -> dict[str, Any]:  # fmt: skip
    tokens = sum(timer.tokens[WARMUP_STEPS:])
    seconds = timer.timed_s - timer.recording_in_window_s  # steady state: one-time graph recordings left out
    graphed = getattr(timer.trainer_ref[0], "graphed", None) if timer.trainer_ref else None
    graphs = graphed.summary() if graphed is not None else None
    flops = model_flops(params, tokens, sum(timer.squares[WARMUP_STEPS:]), layers, hidden)
    steps = len(timer.tokens) - WARMUP_STEPS
    return {
        "profile": name,
        "timed_steps": steps,
        "warmup_s": round(timer.warmup_s, 2),
        "tokens_per_s": round(tokens / seconds, 1),
        "examples_per_s": round(8 * steps / seconds, 2),
        "seconds_per_step": round(seconds / steps, 4),
        "peak_gib": peak.get("peak_allocated_gib"),
        "peak_reserved_gib": peak.get("peak_reserved_gib"),
        "mfu": round(flops / seconds / (BF16_PEAK_TFLOPS * 1e12), 4),
        "job_625_steps_s": round(625 * seconds / steps, 1),
        "cuda_graphs": graphs,  # recordings made in the whole run and the seconds they took
        "tokens_per_s_with_recording": round(tokens / timer.timed_s, 1),
        "losses": timer.losses,
    }


def run_reference(model_dir: Path, examples: list[dict[str, Any]], steps: int, workdir: Path) -> tuple[Any, Any]:
    """The notebook recipe, written the way such notebooks write it."""
    import datasets
    import torch
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig, TrainingArguments, set_seed

    from phi2cli.data.collate import PaddedCollator
    from phi2cli.models.loading import load_tokenizer
    from phi2cli.training.trainer import Phi2Trainer

    tokenizer = load_tokenizer(str(model_dir))
    bnb = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                             bnb_4bit_compute_dtype=torch.bfloat16)  # fmt: skip
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), quantization_config=bnb, device_map={"": 0})
    model.config.use_cache = False
    model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=True)
    set_seed(42)
    model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, lora_dropout=0.05, bias="none",
                                             target_modules=["q_proj", "k_proj", "v_proj", "dense"],
                                             task_type="CAUSAL_LM"))  # fmt: skip
    args = TrainingArguments(
        output_dir=str(workdir / "reference"), per_device_train_batch_size=1, gradient_accumulation_steps=8,
        gradient_checkpointing=True, fp16=True, optim="paged_adamw_8bit", learning_rate=2e-4,
        lr_scheduler_type="cosine", warmup_steps=50, max_steps=steps, logging_steps=LOG_EVERY, save_strategy="no",
        report_to=[], disable_tqdm=True, seed=42, data_seed=42, remove_unused_columns=False,
    )  # fmt: skip
    dataset = datasets.Dataset.from_dict({k: [e[k] for e in examples] for k in ("input_ids", "labels")})
    holder: list[Any] = []
    timer = StepTimer(holder)
    trainer = Phi2Trainer(model=model, args=args, train_dataset=dataset, callbacks=[timer],
                          data_collator=PaddedCollator(tokenizer.pad_token_id, pad_to=MAX_LENGTH))  # fmt: skip
    holder.append(trainer)
    torch.cuda.reset_peak_memory_stats()
    trainer.train()
    return timer, model


def run_engine(profile: str, model_dir: Path, prepared: Path, steps: int, workdir: Path) -> tuple[Any, Any]:
    import torch

    from phi2cli.config import Phi2Config, apply_overrides
    from phi2cli.training.engine import train

    # "<profile>-eager" runs the same profile without torch.compile, to show what compiling buys;
    # "speed-nographs" the speed profile without CUDA graphs.
    eager = profile.endswith("-eager")
    name = profile.removesuffix("-eager").removesuffix("-nographs")
    config = apply_overrides(Phi2Config(), {
        "model.model": str(model_dir), "train.profile": name, "train.compile": not eager,
        "train.compile_from_steps": 0,  # the steady rate of a run long enough for compiling to pay
        "train.cuda_graphs": not profile.endswith("-nographs"),
        "train.max_steps": steps, "train.logging_steps": LOG_EVERY,
        "train.output_dir": str(workdir / profile), "train.final_dir": str(workdir / f"{profile}-final"),
        "data.val_samples": 0, "data.max_length": MAX_LENGTH, "train.eval_every": 10_000,
    }).validate()  # fmt: skip
    holder: list[Any] = []

    class Bind(TrainerCallback):
        def on_train_begin(self, args, state, control, **kwargs):
            if torch.cuda.is_available():
                torch.cuda.reset_peak_memory_stats()

    timer = StepTimer(holder)
    original_init = __import__("phi2cli.training.trainer", fromlist=["Phi2Trainer"]).Phi2Trainer.__init__

    def capture(self, *a, **kw):  # the engine builds its own trainer: keep a handle for the timer
        original_init(self, *a, **kw)
        holder.append(self)

    from phi2cli.training import trainer as trainer_mod

    trainer_mod.Phi2Trainer.__init__ = capture
    try:
        result = train(config, prepared_dir=prepared, callbacks=[Bind(), timer])
    finally:
        trainer_mod.Phi2Trainer.__init__ = original_init
    return timer, result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", type=Path, default=ROOT / "examples" / "data" / "xsum-sample")
    parser.add_argument("--model", type=Path, default=Path("/tmp/phi2-random"))
    parser.add_argument("--steps", type=int, default=20, help="optimizer steps for phi2cli's profiles")
    parser.add_argument("--ref-steps", type=int, default=10, help="optimizer steps for the (slow) reference")
    parser.add_argument("--profiles", default="reference,speed,memory-saver")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "train_throughput.json")
    args = parser.parse_args()

    import torch

    from phi2cli.models.loading import load_tokenizer, memory_report

    make_random_phi2(args.model)
    tokenizer = load_tokenizer(str(args.model))
    steps_needed = max(args.steps, args.ref_steps)
    examples = load_examples(args.data_dir, tokenizer, 8 * steps_needed)
    if len(examples) < 8 * steps_needed:
        raise SystemExit(f"need {8 * steps_needed} examples, found {len(examples)}")
    workdir = Path(tempfile.mkdtemp(prefix="phi2-bench-"))
    prepared = save_prepared(examples, workdir / "prepared", str(args.model))
    # The Trainer's sampler draws one permutation from the data seed (42) in every profile, so
    # optimizer step k sees the same 8 examples whether they come as 8 micro-batches or one.
    params, shape = shape_params(args.model)
    results: dict[str, Any] = {}
    for profile in args.profiles.split(","):
        key = profile.replace("-", "_")
        try:
            if profile == "reference":
                timer, _ = run_reference(args.model, examples, args.ref_steps, workdir)
            else:
                timer, _ = run_engine(profile, args.model, prepared, args.steps, workdir)
        except Exception as err:  # record and go on: one failing profile must not lose the others
            import traceback

            traceback.print_exc()
            results[key] = {"profile": profile, "error": f"{type(err).__name__}: {err}"[:500]}
            continue
        results[key] = summarize(profile, timer, memory_report(), params, shape.num_hidden_layers, shape.hidden_size)
        if profile == "reference":
            results[key]["padded_tokens_per_s"] = round(8 * MAX_LENGTH * (len(timer.tokens) - WARMUP_STEPS)
                                                        / timer.timed_s, 1)  # fmt: skip
        timer.trainer_ref.clear()  # let the model go before the next profile loads its own
        del timer
        print(f"{profile}: {results[key]['tokens_per_s']:,.0f} real tok/s, peak {results[key]['peak_gib']} GiB, "
              f"first 2 steps {results[key]['warmup_s']} s, "
              f"MFU {results[key]['mfu']:.1%}", flush=True)  # fmt: skip
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    results["params_in_matmuls"] = params
    reference = results.get("reference")
    for key in list(results):
        if reference and isinstance(results[key], dict) and "tokens_per_s" in results[key]:
            value = results[key]
            value["speedup"] = round(value["tokens_per_s"] / reference["tokens_per_s"], 2)
    if reference and "losses" in results.get("speed", {}):
        common = sorted(set(reference["losses"]) & set(results["speed"]["losses"]))
        diffs = [abs(reference["losses"][s] - results["speed"]["losses"][s]) for s in common]
        results["loss_match"] = {"steps": common, "max_abs_diff": round(max(diffs), 4) if diffs else None,
                                 "note": "reference fp16 padded to 512 vs speed bf16 packed; LoRA dropout differs per path"}  # fmt: skip
    results["environment"] = environment()
    results["command"] = "python " + " ".join(sys.argv)
    results["data"] = {"source": str(args.data_dir), "examples": len(examples), "max_length": MAX_LENGTH,
                       "mean_tokens": round(sum(len(e["input_ids"]) for e in examples) / len(examples), 1)}  # fmt: skip
    write_json(args.out, results)
    print_table(results)


def print_table(results: dict[str, Any]) -> None:
    header = f"{'profile':<14}{'real tok/s':>12}{'ex/s':>8}{'peak GiB':>10}{'MFU':>8}{'625 steps':>11}{'speedup':>9}"
    print(header)
    for key, r in results.items():
        if isinstance(r, dict) and "tokens_per_s" in r:
            print(f"{key:<14}{r['tokens_per_s']:>12,.0f}{r['examples_per_s']:>8.2f}{r['peak_gib'] or 0:>10.2f}"
                  f"{r['mfu']:>8.1%}{r['job_625_steps_s']:>10.0f}s{r.get('speedup', 1):>8.1f}x")  # fmt: skip


if __name__ == "__main__":
    main()
