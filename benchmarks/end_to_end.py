"""What a user waits for: the real CLI timed launch to exit, beside the reference recipe and TRL in the same run.

    python benchmarks/end_to_end.py --parts ours    # seed job cold + warm, evaluate, summarize, report, SmolLM2
    python benchmarks/end_to_end.py --parts peers   # reference recipe, TRL (plain, gradient checkpointing), profiles

Parts (comma-separated, or the groups ours / peers / all): seed, evaluate, summarize, served, report, smollm2,
smollm2_compiled, reference, trl, profiles. Every part's result is merged into --out
(benchmarks/results/end_to_end.json), so two commands build one file.

- seed: `phi2 train --samples 1495 --val-samples 500 --max-steps 625` (the seed job's size) on real
  XSUM rows with a random-weight model of phi-2's shape, cold (fresh process, compile and graph
  caches pointed at an empty folder) then warm (the caches the cold run left);
- evaluate: `phi2 evaluate --samples 500` of that adapter; summarize: `phi2 summarize
  examples/article.txt`; report: `phi2 report` of the run;
- served: `phi2 serve --adapter` that adapter (time until it answers), then the same summarize
  (twice) and evaluate commands, which hand their work to it, then `phi2 serve --stop`;
- smollm2: the recipe of examples/smollm2-xsum.sh (SmolLM2-135M-Instruct, real weights from GGUF),
  whole-run wall time and its steady rate over training steps only; smollm2_compiled: the same with
  --compile;
- reference: the notebook recipe (batch 1 x grad-accum 8, gradient checkpointing, fp16,
  paged_adamw_8bit, padded to 512), its 625-step time from measured steps;
- trl: TRL's SFTTrainer with PEFT and bitsandbytes 4-bit (batch 8, dynamic padding, completion-only
  loss, max 512), without and with gradient checkpointing;
- profiles: phi2cli's speed and memory-saver profiles (real tokens/s, peak GiB).
In-process parts (reference, trl, profiles) each run in a child process of their own, so peak
memory and global state are theirs alone.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(1, str(HERE.parent))  # phi2cli from this copy
from common import (ROOT, SEED_JOB, SMOLLM2_JOB, default_data_dir, environment, installed_versions,  # noqa: E402
                    precompile_bytecode, start_server, write_json)

GROUPS = {"ours": ["seed", "evaluate", "summarize", "served", "report", "smollm2", "smollm2_compiled"],
          "peers": ["reference", "trl", "profiles"]}  # fmt: skip
GROUPS["all"] = GROUPS["ours"] + GROUPS["peers"]
PARTS = tuple(GROUPS["all"])
SEED_STEPS = 625
WARMUP_STEPS = 2
SAFE_NCCL_ENV = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1",
                 "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}  # this copy
DEFAULT_GGUF = next((p for p in (base / "shared" / "models" / "SmolLM2-135M-Instruct.Q4_1.gguf"
                                 for base in (ROOT.parent, ROOT)) if p.is_file()),
                    ROOT.parent / "shared" / "models" / "SmolLM2-135M-Instruct.Q4_1.gguf")  # fmt: skip


def parse_parts(text: str) -> list[str]:
    """'ours,trl' -> the parts in run order; unknown names are refused."""
    wanted: list[str] = []
    for name in (x.strip() for x in text.split(",") if x.strip()):
        if name not in GROUPS and name not in PARTS:
            raise SystemExit(f"--parts: unknown part {name!r}; choose from {', '.join([*GROUPS, *PARTS])}")
        wanted += GROUPS.get(name, [name])
    if not wanted:
        raise SystemExit("--parts names no part")
    return [p for p in PARTS if p in wanted]


def cache_env(cache: Path) -> dict[str, str]:
    """Compile and kernel caches in one folder (empty: a cold start; reused: warm)."""
    return {"PHI2_CACHE_DIR": str(cache), "TORCHINDUCTOR_CACHE_DIR": str(cache / "inductor"),
            "TRITON_CACHE_DIR": str(cache / "triton")}  # fmt: skip


def cli_env(env: dict[str, str] | None = None) -> dict[str, str]:
    return {**os.environ, **SAFE_NCCL_ENV, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", **(env or {})}


def cli(args: list[str], env: dict[str, str] | None = None, cwd: Path | None = None,
        timeout: float = 540) -> dict[str, Any]:  # fmt: skip
    """`python -m phi2cli ARGS` in a fresh process, timed from launch to exit."""
    full_env = cli_env(env)
    started = time.perf_counter()
    try:
        done = subprocess.run([sys.executable, "-m", "phi2cli", *args], env=full_env, cwd=cwd, capture_output=True,
                              text=True, timeout=timeout)  # fmt: skip
        rc, out = done.returncode, done.stdout + done.stderr
    except subprocess.TimeoutExpired:
        rc, out = 124, f"timed out after {timeout:.0f} s"
    result: dict[str, Any] = {"wall_s": round(time.perf_counter() - started, 2), "rc": rc}
    if rc != 0:
        result["error"] = out[-1500:]
    result["output_tail"] = out[-800:]
    return result


def run_facts(final: Path) -> dict[str, Any]:
    path = final / "phi2_run.json"
    return json.loads(path.read_text()) if path.is_file() else {}


def seed_job(work: Path, model: Path, data_dir: Path, cache: Path, label: str, steps: int) -> dict[str, Any]:
    out, final = work / "seed", work / "seed-final"
    args = ["train", "--model", str(model), "--data-dir", str(data_dir), *SEED_JOB, "--max-steps", str(steps),
            "--output-dir", str(out), "--final-dir", str(final), "--overwrite"]  # fmt: skip
    result = cli(args, env=cache_env(cache))
    facts = run_facts(final)
    result.update(label=label, timing=facts.get("timing"), plan=facts.get("plan"),
                  cuda_graphs=(facts.get("throughput") or {}).get("cuda_graphs"),
                  steady_tokens_per_s=(facts.get("throughput") or {}).get("steady_tokens_per_s"))  # fmt: skip
    return result


def part_seed(ctx: dict[str, Any]) -> dict[str, Any]:
    cache = ctx["work"] / "cache"
    shutil.rmtree(cache, ignore_errors=True)  # cold: nothing compiled or recorded before
    cache.mkdir(parents=True)
    cold = seed_job(ctx["work"], ctx["model"], ctx["data_dir"], cache, "cold", ctx["seed_steps"])
    warm = seed_job(ctx["work"], ctx["model"], ctx["data_dir"], cache, "warm", ctx["seed_steps"])
    return {"train_seed_job_s_cold": cold["wall_s"] if cold["rc"] == 0 else None,
            "train_seed_job_s_warm": warm["wall_s"] if warm["rc"] == 0 else None,
            "seed_job_cold": cold, "seed_job_warm": warm}  # fmt: skip


def part_evaluate(ctx: dict[str, Any]) -> dict[str, Any]:
    final = ctx["work"] / "seed-final"
    run = cli(["evaluate", "--adapter", str(final), "--samples", "500", "--output", str(ctx["work"] / "eval")],
              env=cache_env(ctx["work"] / "cache"))  # fmt: skip
    metrics_path = ctx["work"] / "eval" / "metrics-validation.json"
    if metrics_path.is_file() and run["rc"] == 0:
        run["timings"] = json.loads(metrics_path.read_text()).get("timings")
    return {"evaluate_500_s": run["wall_s"] if run["rc"] == 0 else None, "evaluate_500": run}


def part_summarize(ctx: dict[str, Any]) -> dict[str, Any]:
    run = cli(["summarize", str(ROOT / "examples" / "article.txt"), "--adapter", str(ctx["work"] / "seed-final")],
              env=cache_env(ctx["work"] / "cache"))  # fmt: skip
    return {"summarize_one_s": run["wall_s"] if run["rc"] == 0 else None, "summarize_one": run}


def part_served(ctx: dict[str, Any]) -> dict[str, Any]:
    """summarize and evaluate as above while `phi2 serve` holds the seed job's adapter: the server's start
    (launch until its socket answers), then each command launch to exit in a fresh process."""
    import tempfile

    folder = Path(tempfile.mkdtemp(prefix="p2s", dir="/tmp"))  # a Unix socket path must stay short
    socket_path = folder / "s.sock"
    env = {**cache_env(ctx["work"] / "cache"), "PHI2_SERVE_SOCKET": str(socket_path)}
    final = ctx["work"] / "seed-final"
    server, ready_s = start_server(str(final), cli_env(env), socket_path)
    try:
        if ready_s is None:
            server.kill()  # its output ends there, so reading it cannot wait forever
            return {"serve_ready_s": None, "served": {"error": server.communicate()[0][-1500:]}}
        article = str(ROOT / "examples" / "article.txt")
        summaries = [cli(["summarize", article, "--adapter", str(final)], env=env) for _ in range(2)]
        evaluation = cli(["evaluate", "--adapter", str(final), "--samples", "500", "--output",
                          str(ctx["work"] / "eval-served")], env=env)  # fmt: skip
        metrics_path = ctx["work"] / "eval-served" / "metrics-validation.json"
        if metrics_path.is_file() and evaluation["rc"] == 0:
            evaluation["timings"] = json.loads(metrics_path.read_text()).get("timings")
            local = ctx["work"] / "eval" / "predictions-validation.jsonl"  # the evaluate part's, run in its own process
            if local.is_file():
                evaluation["same_predictions_as_own_process"] = \
                    local.read_text() == (metrics_path.parent / local.name).read_text()  # fmt: skip
        stop = cli(["serve", "--stop"], env=env)
        server.wait(60)
    finally:
        if server.poll() is None:
            server.kill()
    runs = [*summaries, evaluation]
    served = all(r["rc"] == 0 and "served by phi2 serve" in r["output_tail"] for r in runs)
    return {"serve_ready_s": ready_s,
            "summarize_one_served_s": summaries[0]["wall_s"] if served else None,
            "evaluate_500_served_s": evaluation["wall_s"] if served else None,
            "served": {"summarize_one": summaries[0], "summarize_one_again": summaries[1], "evaluate_500": evaluation,
                       "stop": stop, "server_log": (server.stdout.read() if server.stdout else "")[-1500:]}}  # fmt: skip


def part_report(ctx: dict[str, Any]) -> dict[str, Any]:
    run = cli(["report", str(ctx["work"] / "seed")])
    return {"report_s": run["wall_s"] if run["rc"] == 0 else None, "report": run}


def part_smollm2(ctx: dict[str, Any], name: str = "smollm2", extra: tuple[str, ...] = ()) -> dict[str, Any]:
    """examples/smollm2-xsum.sh's training command, timed as a user runs it (plus `extra` flags)."""
    if not ctx["gguf"].is_file():
        return {f"{name}_train_s": None, name: {"error": f"{ctx['gguf']} not found (--gguf)"}}
    out, final = ctx["work"] / name, ctx["work"] / f"{name}-final"
    args = ["train", "--model", str(ctx["gguf"]), "--template", "chat", "--data-dir", str(ctx["data_dir"]),
            *SMOLLM2_JOB, "--output-dir", str(out), "--final-dir", str(final), "--overwrite", *extra]  # fmt: skip
    run = cli(args, env=cache_env(ctx["work"] / "cache"))
    facts = run_facts(final)
    throughput, timing = facts.get("throughput") or {}, facts.get("timing") or {}
    rate = throughput.get("steady_tokens_per_s") or timing.get("train_steps_tokens_per_s")
    run.update(timing=timing, steady_from_step=throughput.get("steady_from_step"),
               cuda_graphs=throughput.get("cuda_graphs"), global_step=facts.get("global_step"))  # fmt: skip
    run["flags"] = list(extra)
    return {f"{name}_train_s": run["wall_s"] if run["rc"] == 0 else None, f"{name}_tokens_per_s": rate,
            name: run}  # fmt: skip


def part_smollm2_compiled(ctx: dict[str, Any]) -> dict[str, Any]:
    """The same job with --compile (its 374 steps are below the small row's bound, so it runs eagerly by
    default): what compiling costs the whole job, and the compiled steps' rate. It runs after `smollm2`,
    whose converted .gguf it reuses, so only the compile cache starts empty."""
    return part_smollm2(ctx, "smollm2_compiled", ("--compile",))


# ---- in-process parts (each in a child process) ----


class TokenCounter:
    """Wraps a data collator and counts the real (attention-mask) tokens of every batch it makes."""

    def __init__(self, collate: Any) -> None:
        self.collate = collate
        self.tokens = 0

    def __call__(self, features: Any) -> Any:
        batch = self.collate(features)
        mask = batch.get("attention_mask")
        self.tokens += int(mask.sum()) if mask is not None else int(batch["input_ids"].numel())
        return batch


def timed_steps_callback(counter: TokenCounter) -> Any:
    """Times the steps after WARMUP_STEPS, the GPU waited for at both ends only."""
    from transformers import TrainerCallback

    from train_throughput import _sync

    class Timer(TrainerCallback):
        def __init__(self) -> None:
            self.steps = 0
            self.mark = (0.0, 0)
            self.result: dict[str, float] = {}

        def on_step_end(self, args, state, control, **kwargs):
            self.steps += 1
            if self.steps == WARMUP_STEPS:
                _sync()
                self.mark = (time.perf_counter(), counter.tokens)
            elif self.steps == state.max_steps:
                _sync()
                seconds = time.perf_counter() - self.mark[0]
                # the data loader fetches one batch ahead: both marks are shifted by one batch alike
                self.result = {"tokens_per_s": round((counter.tokens - self.mark[1]) / seconds, 1),
                               "seconds_per_step": round(seconds / (self.steps - WARMUP_STEPS), 4),
                               "timed_steps": self.steps - WARMUP_STEPS}  # fmt: skip

    return Timer()


def trl_dataset(model_dir: Path, data_dir: Path, count: int) -> Any:
    """Prompt/completion rows (completion-only loss is TRL's default for them), our truncation to 512."""
    import datasets

    from phi2cli.models.loading import load_tokenizer
    from train_throughput import load_examples

    tokenizer = load_tokenizer(str(model_dir))
    rows = load_examples(data_dir, tokenizer, count)
    return datasets.Dataset.from_dict({
        "prompt": [tokenizer.decode(r["input_ids"][: r["prompt_tokens"]], skip_special_tokens=True) for r in rows],
        "completion": [tokenizer.decode(r["input_ids"][r["prompt_tokens"]:], skip_special_tokens=True) for r in rows],
    }), tokenizer  # fmt: skip


def trl_config(output_dir: Path, steps: int, gradient_checkpointing: bool, cuda: bool) -> Any:
    """SFTConfig as a TRL user writes it for this job (batch 8, dynamic padding, completion-only, max 512)."""
    from trl import SFTConfig

    return SFTConfig(
        output_dir=str(output_dir), per_device_train_batch_size=8, gradient_accumulation_steps=1,
        max_length=512, completion_only_loss=True, padding_free=False, packing=False,
        gradient_checkpointing=gradient_checkpointing, bf16=cuda, use_cpu=not cuda,
        optim="paged_adamw_8bit" if cuda else "adamw_torch", learning_rate=2e-4, lr_scheduler_type="cosine",
        warmup_steps=5, max_steps=steps, logging_steps=5, save_strategy="no", report_to=[], seed=42,
        dataloader_num_workers=0,
    )  # fmt: skip


def child_trl(ctx: dict[str, Any], gradient_checkpointing: bool) -> dict[str, Any]:
    import torch
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig
    from trl import SFTTrainer

    cuda = torch.cuda.is_available()
    dataset, tokenizer = trl_dataset(ctx["model"], ctx["data_dir"], 8 * ctx["trl_steps"])
    kwargs: dict[str, Any] = {"dtype": torch.bfloat16 if cuda else torch.float32}
    if cuda:
        kwargs.update(device_map={"": 0}, quantization_config=BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.bfloat16))  # fmt: skip
    model = AutoModelForCausalLM.from_pretrained(str(ctx["model"]), **kwargs)
    lora = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.05, bias="none", task_type="CAUSAL_LM",
                      target_modules=["q_proj", "k_proj", "v_proj", "dense"])  # fmt: skip
    args = trl_config(ctx["work"] / f"trl-gc{int(gradient_checkpointing)}", ctx["trl_steps"], gradient_checkpointing,
                      cuda)  # fmt: skip
    trainer = SFTTrainer(model=model, args=args, train_dataset=dataset, processing_class=tokenizer, peft_config=lora)
    counter = TokenCounter(trainer.data_collator)
    trainer.data_collator = counter
    timer = timed_steps_callback(counter)
    trainer.add_callback(timer)
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    trainer.train()
    import trl

    result = {**timer.result, "peak_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2) if cuda else None,
              "trl": trl.__version__, "gradient_checkpointing": gradient_checkpointing,
              "completion_only_loss": trainer.args.completion_only_loss}  # fmt: skip
    return result


def child_reference(ctx: dict[str, Any]) -> dict[str, Any]:
    from common import shape_params
    from phi2cli.models.loading import load_tokenizer, memory_report
    from train_throughput import load_examples, run_reference, summarize

    tokenizer = load_tokenizer(str(ctx["model"]))
    examples = load_examples(ctx["data_dir"], tokenizer, 8 * ctx["ref_steps"])
    timer, _ = run_reference(ctx["model"], examples, ctx["ref_steps"], ctx["work"])
    params, shape = shape_params(ctx["model"])
    summary = summarize("reference", timer, memory_report(), params, shape.num_hidden_layers, shape.hidden_size)
    summary.pop("losses", None)
    return {"reference_seed_job_s": round(SEED_STEPS * summary["seconds_per_step"], 1), "reference": summary}


def child_profile(ctx: dict[str, Any], profile: str) -> dict[str, Any]:
    from common import shape_params
    from phi2cli.models.loading import load_tokenizer, memory_report
    from train_throughput import load_examples, run_engine, save_prepared, summarize

    tokenizer = load_tokenizer(str(ctx["model"]))
    examples = load_examples(ctx["data_dir"], tokenizer, 8 * ctx["steps"])
    prepared = save_prepared(examples, ctx["work"] / f"prepared-{profile}", str(ctx["model"]))
    timer, _ = run_engine(profile, ctx["model"], prepared, ctx["steps"], ctx["work"])
    params, shape = shape_params(ctx["model"])
    summary = summarize(profile, timer, memory_report(), params, shape.num_hidden_layers, shape.hidden_size)
    summary.pop("losses", None)
    return {"tokens_per_s": summary["tokens_per_s"], "peak_gib": summary["peak_gib"], "detail": summary}


CHILDREN = {
    "reference": child_reference,
    "trl_plain": lambda ctx: child_trl(ctx, False),
    "trl_gc": lambda ctx: child_trl(ctx, True),
    "speed": lambda ctx: child_profile(ctx, "speed"),
    "memory_saver": lambda ctx: child_profile(ctx, "memory-saver"),
}


def in_child(name: str, ctx: dict[str, Any], argv: list[str]) -> dict[str, Any]:
    """Run one in-process part in a fresh Python process; its JSON result, or the error it ended with."""
    out = ctx["work"] / f"child-{name}.json"
    out.unlink(missing_ok=True)
    env = {**os.environ, **SAFE_NCCL_ENV, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
           **cache_env(ctx["work"] / "cache")}  # fmt: skip
    started = time.perf_counter()
    done = subprocess.run([sys.executable, str(Path(__file__).resolve()), *argv, "--child", name,
                           "--child-out", str(out)], env=env, capture_output=True, text=True)  # fmt: skip
    if done.returncode != 0 or not out.is_file():
        return {"error": (done.stdout + done.stderr)[-1500:], "wall_s": round(time.perf_counter() - started, 1)}
    result = json.loads(out.read_text())
    result["child_wall_s"] = round(time.perf_counter() - started, 1)
    return result


def part_reference(ctx: dict[str, Any], argv: list[str]) -> dict[str, Any]:
    result = in_child("reference", ctx, argv)
    return {"reference_seed_job_s": result.pop("reference_seed_job_s", None), "reference": result.get("reference", result)}


def part_trl(ctx: dict[str, Any], argv: list[str]) -> dict[str, Any]:
    return {"trl_plain": in_child("trl_plain", ctx, argv), "trl_gc": in_child("trl_gc", ctx, argv)}


def part_profiles(ctx: dict[str, Any], argv: list[str]) -> dict[str, Any]:
    return {"speed": in_child("speed", ctx, argv), "memory_saver": in_child("memory_saver", ctx, argv)}


def ratios(results: dict[str, Any]) -> dict[str, Any]:
    """The same-run ratios the targets are stated in (None where a part is missing)."""

    def rate(key: str) -> float | None:
        value = results.get(key)
        return value.get("tokens_per_s") if isinstance(value, dict) else None

    def ratio(a: float | None, b: float | None) -> float | None:
        return round(a / b, 3) if a and b else None

    return {"seed_job_vs_reference": ratio(results.get("reference_seed_job_s"), results.get("train_seed_job_s_cold")),
            "speed_vs_trl_plain": ratio(rate("speed"), rate("trl_plain")),
            "memory_saver_vs_trl_gc": ratio(rate("memory_saver"), rate("trl_gc")),
            "memory_saver_peak_le_trl_gc": (results["memory_saver"].get("peak_gib") or 1e9)
            <= (results["trl_gc"].get("peak_gib") or 0) if "memory_saver" in results and "trl_gc" in results
            else None}  # fmt: skip


def environment_with_peers() -> dict[str, Any]:
    return {**environment(), **installed_versions("trl", "liger-kernel")}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--parts", default="all", help="ours, peers, all, or parts: " + ", ".join(PARTS))
    parser.add_argument("--data-dir", type=Path, default=default_data_dir())
    parser.add_argument("--model", type=Path, default=Path("/tmp/phi2-random"), help="made (random phi-2 shape) if absent")
    parser.add_argument("--gguf", type=Path, default=DEFAULT_GGUF, help="SmolLM2-135M-Instruct GGUF")
    parser.add_argument("--work", type=Path, default=Path("/tmp/phi2-e2e"))
    parser.add_argument("--steps", type=int, default=20, help="optimizer steps of the speed and memory-saver rates")
    parser.add_argument("--trl-steps", type=int, default=25, help="optimizer steps of each TRL run")
    parser.add_argument("--ref-steps", type=int, default=8, help="optimizer steps of the (slow) reference")
    parser.add_argument("--seed-steps", type=int, default=SEED_STEPS, help="the seed job's steps (fewer: a try-out)")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "end_to_end.json")
    parser.add_argument("--child", choices=sorted(CHILDREN), help=argparse.SUPPRESS)
    parser.add_argument("--child-out", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    ctx = {"work": args.work, "model": args.model, "data_dir": args.data_dir, "gguf": args.gguf,
           "steps": args.steps, "trl_steps": args.trl_steps, "ref_steps": args.ref_steps,
           "seed_steps": args.seed_steps}  # fmt: skip
    if args.child:
        write_json(args.child_out, CHILDREN[args.child](ctx))
        return 0
    for name, value in (("--steps", args.steps), ("--trl-steps", args.trl_steps), ("--ref-steps", args.ref_steps)):
        if value <= WARMUP_STEPS:
            raise SystemExit(f"{name} must be more than the {WARMUP_STEPS} warm-up steps (got {value})")
    parts = parse_parts(args.parts)
    args.work.mkdir(parents=True, exist_ok=True)
    from common import make_random_phi2

    make_random_phi2(args.model)
    bytecode = precompile_bytecode(args.work / "pycache")  # the CLI processes start as after `pip install`
    if bytecode["precompiled"]:
        print(f"compiled the installed packages' bytecode into {bytecode['folder']} ({bytecode['seconds']} s): "
              f"this Python writes none, and a user's pip install does", flush=True)  # fmt: skip
    child_argv = ["--data-dir", str(args.data_dir), "--model", str(args.model), "--work", str(args.work),
                  "--steps", str(args.steps), "--trl-steps", str(args.trl_steps), "--ref-steps", str(args.ref_steps)]  # fmt: skip
    results: dict[str, Any] = json.loads(args.out.read_text()) if args.out.is_file() else {}
    began = time.perf_counter()
    runners = {"seed": part_seed, "evaluate": part_evaluate, "summarize": part_summarize, "served": part_served,
               "report": part_report,
               "smollm2": part_smollm2, "smollm2_compiled": part_smollm2_compiled}  # fmt: skip
    in_children = {"reference": part_reference, "trl": part_trl, "profiles": part_profiles}
    for part in parts:
        started = time.perf_counter()
        found = runners[part](ctx) if part in runners else in_children[part](ctx, child_argv)
        results.update(found)
        shown = {k: v for k, v in found.items() if not isinstance(v, dict)}
        shown.update({k: {x: v.get(x) for x in ("tokens_per_s", "peak_gib", "error") if x in v}
                      for k, v in found.items() if isinstance(v, dict)})  # fmt: skip
        print(f"{part} ({time.perf_counter() - started:.0f} s): {json.dumps(shown)[:600]}", flush=True)
        results["ratios"] = ratios(results)
        results.setdefault("commands", {})[",".join(parts)] = "python " + " ".join([sys.argv[0], *argv])
        results["environment"] = {**environment_with_peers(), "bytecode_precompiled": bytecode}
        write_json(args.out, results)  # after every part: a run cut short keeps what it measured
    print(json.dumps({"elapsed_s": round(time.perf_counter() - began, 1), "ratios": results["ratios"]}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
