"""Does llama.cpp run the exported GGUF like transformers runs the merged model? (CPU, llama-cpp-python)

    pip install llama-cpp-python     # builds llama.cpp from source
    python benchmarks/gguf_agreement.py --data-dir ../shared/data/xsum \
        --out benchmarks/results/gguf_agreement.json

Fine-tunes SmolLM2-135M-Instruct (the real GGUF model) a few steps with the chat template on CPU,
exports the run with 'phi2 export' three ways (transformers float32, GGUF f16, GGUF q8_0), then for
three XSUM test articles feeds prompt + a 64-token greedy continuation of the transformers model to
both runtimes as the same token ids and compares next-token log-probabilities at every position:
  f16:  |log p_llama.cpp - log p_transformers| of the transformers top-10 tokens, max over positions;
  q8_0: share of the 64 continuation positions where both pick the same top-1 token.
It also checks that llama.cpp tokenizes the prompt text as transformers does, and prints llama.cpp's
greedy summaries beside 'phi2 summarize'.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
SMOLLM2 = ROOT.parent / "shared" / "models" / "SmolLM2-135M-Instruct.Q4_1.gguf"
F16_TOLERANCE = 0.05  # max |log-prob difference| of the transformers top-10 tokens
Q8_TOP1_SHARE = 0.95  # least share of continuation positions with the same top-1 token
CONTINUATION = 64
TOP_K = 10


def phi2(*args: str) -> str:
    """Run one phi2 command in a fresh process (as a user would); its stdout, or exit with its output."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "COLUMNS": "200"}
    result = subprocess.run([sys.executable, "-m", "phi2cli", *args], capture_output=True, text=True, env=env)
    if result.returncode != 0:
        sys.exit(f"phi2 {' '.join(args)} failed ({result.returncode}):\n{result.stdout}\n{result.stderr}")
    return result.stdout


def train_and_export(args: argparse.Namespace, run: Path) -> dict[str, Path]:
    final = run / "final"
    timings = {}
    if not (final / "adapter_config.json").is_file() or not args.reuse:
        start = time.perf_counter()
        phi2("train", "--model", str(args.model), "--template", "chat", "--data-dir", str(args.data_dir),
             "--samples", str(args.samples), "--val-samples", "8", "--max-length", str(args.max_length),
             "--lr", "1e-3", "--lora-targets", "all-linear", "--warmup-steps", "0", "--max-steps", str(args.steps),
             "--eval-every", str(args.steps), "--quantization", "none", "--neftune-alpha", "0",  # the recipe spelled
             "--output-dir", str(run / "finetuned"),  # out: the size table's later changes leave this run as it was
             "--final-dir", str(final), "--overwrite")  # fmt: skip
        timings["train_s"] = time.perf_counter() - start
    paths = {"final": final, "merged": run / "merged", "f16": run / "smollm2-xsum-f16.gguf",
             "q8_0": run / "smollm2-xsum-q8_0.gguf"}  # fmt: skip
    start = time.perf_counter()
    phi2("export", "--adapter", str(final), "--dtype", "float32", "--output", str(paths["merged"]), "--overwrite")
    for kind in ("f16", "q8_0"):
        phi2("export", "--adapter", str(final), "--format", "gguf", "--gguf-type", kind, "--output", str(paths[kind]),
             "--overwrite")  # fmt: skip
    timings["export_s"] = time.perf_counter() - start
    paths["timings"] = timings  # type: ignore[assignment]
    return paths


def log_softmax(rows: Any) -> Any:
    import numpy as np

    rows = np.asarray(rows, dtype=np.float64)
    shifted = rows - rows.max(axis=-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))


def llama_cpp_log_probs(llm: Any, ids: list[int]) -> Any:
    """Log-probabilities of the next token at every position, from llama.cpp, for exactly these ids."""
    import numpy as np

    llm.reset()
    llm.eval(ids)
    return log_softmax(np.array(llm.scores[: len(ids)]))


def llama_cpp_greedy(llm: Any, prompt: list[int], stop_ids: set[int], max_new_tokens: int) -> str:
    """llama.cpp's own greedy continuation, cut at the first stop token, detokenized by llama.cpp."""
    import numpy as np

    llm.reset()
    llm.eval(prompt)
    new: list[int] = []
    for _ in range(max_new_tokens):
        token = int(np.argmax(llm.scores[llm.n_tokens - 1]))
        if token in stop_ids:
            break
        new.append(token)
        llm.eval([token])
    return llm.detokenize(new).decode("utf-8", errors="replace").strip().split("\n")[0]


def compare(paths: dict[str, Path], args: argparse.Namespace) -> dict[str, Any]:
    import numpy as np
    import torch
    from llama_cpp import Llama
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from phi2cli.config import load_run_config
    from phi2cli.data.prompts import PromptFormat, encode_document, prompt_text
    from phi2cli.inference.generate import stop_token_ids

    config, _ = load_run_config(paths["final"])
    tokenizer = AutoTokenizer.from_pretrained(paths["merged"])
    model = AutoModelForCausalLM.from_pretrained(paths["merged"], dtype=torch.float32).eval()
    fmt = PromptFormat.create(config.data.template, tokenizer)
    prefix, suffix, _ = prompt_text(config.data.template, tokenizer)
    rows = [json.loads(line) for line in (Path(args.data_dir) / "test.jsonl").read_text().splitlines()[: args.prompts]]
    runtimes = {kind: Llama(model_path=str(paths[kind]), n_ctx=args.max_length + CONTINUATION, logits_all=True,
                            n_threads=args.threads, verbose=False) for kind in ("f16", "q8_0")}  # fmt: skip
    stops = set(stop_token_ids(tokenizer))
    article_files = []
    results: list[dict[str, Any]] = []
    for index, row in enumerate(rows):
        prompt, _ = fmt.encode_prompt(encode_document(tokenizer, row["document"]), args.max_length - CONTINUATION)
        with torch.no_grad():
            generated = model.generate(torch.tensor([prompt]), max_new_tokens=CONTINUATION, min_new_tokens=CONTINUATION,
                                       do_sample=False, pad_token_id=tokenizer.pad_token_id)[0].tolist()  # fmt: skip
            ids = generated[: len(prompt) + CONTINUATION]
            reference = log_softmax(model(torch.tensor([ids])).logits[0].float().numpy())
        top10 = np.argsort(-reference, axis=-1)[:, :TOP_K]
        tail = slice(len(prompt) - 1, len(ids) - 1)  # positions that predict the 64 continuation tokens
        result: dict[str, Any] = {"prompt_tokens": len(prompt), "positions": len(ids)}
        for kind, llm in runtimes.items():
            lp = llama_cpp_log_probs(llm, ids)
            gap = np.abs(np.take_along_axis(lp, top10, -1) - np.take_along_axis(reference, top10, -1))
            same_top1 = lp[tail].argmax(-1) == reference[tail].argmax(-1)
            result[kind] = {"max_top10_logprob_diff": float(gap.max()), "mean_top10_logprob_diff": float(gap.mean()),
                            "top1_same_continuation": float(same_top1.mean()),
                            "top1_same_all_positions": float((lp.argmax(-1) == reference.argmax(-1)).mean())}  # fmt: skip
        document = tokenizer.decode(encode_document(tokenizer, row["document"])[: len(prompt) - fmt.fixed_tokens])
        text = prefix + document + suffix
        result["tokenizer_same"] = runtimes["f16"].tokenize(text.encode("utf-8"), add_bos=False, special=True) == \
            tokenizer(text, add_special_tokens=False)["input_ids"]  # fmt: skip
        result["llama_cpp_f16_summary"] = llama_cpp_greedy(runtimes["f16"], prompt, stops, 60)
        result["llama_cpp_q8_0_summary"] = llama_cpp_greedy(runtimes["q8_0"], prompt, stops, 60)
        article = paths["final"].parent / f"article-{index}.txt"
        article.write_text(row["document"])
        article_files.append(str(article))
        results.append(result)
    summaries = json.loads(phi2("summarize", "--adapter", str(paths["final"]), "--json", "--max-new-tokens", "60",
                                *article_files))  # fmt: skip
    for result, summary in zip(results, summaries):
        result["phi2_summarize"] = summary["summary"]
    for llm in runtimes.values():
        llm.close()  # now, not in __del__ at interpreter exit
    return {"prompts": results, **verdict(results)}


def verdict(results: list[dict[str, Any]]) -> dict[str, Any]:
    f16_max = max(r["f16"]["max_top10_logprob_diff"] for r in results)
    q8_share = sum(r["q8_0"]["top1_same_continuation"] for r in results) / len(results)
    return {"f16_max_top10_logprob_diff": f16_max, "f16_pass": f16_max <= F16_TOLERANCE,
            "q8_0_top1_same_continuation": q8_share, "q8_0_pass": q8_share >= Q8_TOP1_SHARE}  # fmt: skip


def render(report: dict[str, Any]) -> str:
    lines = [f"llama.cpp (llama-cpp-python {report['llama_cpp_version']}) vs transformers {report['transformers']}, "
             f"SmolLM2-135M-Instruct fine-tuned {report['steps']} steps on CPU, chat template", ""]  # fmt: skip
    for i, r in enumerate(report["prompts"]):
        lines.append(f"prompt {i}: {r['prompt_tokens']} prompt tokens + {CONTINUATION} teacher-forced; "
                     f"llama.cpp tokenizes the prompt text identically: {r['tokenizer_same']}")  # fmt: skip
        for kind in ("f16", "q8_0"):
            k = r[kind]
            lines.append(f"  {kind:5} top-10 |dlogp| max {k['max_top10_logprob_diff']:.4f} mean "
                         f"{k['mean_top10_logprob_diff']:.4f}; same top-1 on continuation "
                         f"{k['top1_same_continuation']:.1%}, on all positions {k['top1_same_all_positions']:.1%}")
        lines += [f"  phi2 summarize : {r['phi2_summarize']}", f"  llama.cpp f16  : {r['llama_cpp_f16_summary']}",
                  f"  llama.cpp q8_0 : {r['llama_cpp_q8_0_summary']}"]  # fmt: skip
    lines += ["", f"f16: max top-10 log-prob difference {report['f16_max_top10_logprob_diff']:.4f} "
              f"(limit {F16_TOLERANCE}): {'PASS' if report['f16_pass'] else 'FAIL'}",
              f"q8_0: same top-1 on {report['q8_0_top1_same_continuation']:.1%} of continuation positions "
              f"(at least {Q8_TOP1_SHARE:.0%}): {'PASS' if report['q8_0_pass'] else 'FAIL'}"]  # fmt: skip
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=SMOLLM2, help="base model: the SmolLM2 GGUF")
    parser.add_argument("--data-dir", type=Path, default=ROOT.parent / "shared" / "data" / "xsum")
    parser.add_argument("--run-dir", type=Path, default=Path("runs/gguf-agreement"))
    parser.add_argument("--steps", type=int, default=6, help="fine-tuning steps (CPU)")
    parser.add_argument("--samples", type=int, default=48)
    parser.add_argument("--max-length", type=int, default=384)
    parser.add_argument("--prompts", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--reuse", action="store_true", help="keep an existing fine-tuned adapter in --run-dir")
    parser.add_argument("--out", type=Path, help="also write the numbers as JSON here")
    args = parser.parse_args(argv)
    try:
        import llama_cpp
    except ImportError:
        sys.exit("llama-cpp-python is not installed: pip install llama-cpp-python (builds llama.cpp, 10-40 min)")
    if not args.model.is_file():
        sys.exit(f"{args.model} not found: pass --model PATH.gguf")
    if not (args.data_dir / "test.jsonl").is_file():
        sys.exit(f"{args.data_dir}/test.jsonl not found: pass --data-dir")
    import transformers

    paths = train_and_export(args, args.run_dir)
    report = {"llama_cpp_version": llama_cpp.__version__, "transformers": transformers.__version__,
              "steps": args.steps, **paths.pop("timings"), **compare(paths, args)}  # type: ignore[arg-type]  # fmt: skip
    print(render(report))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=2) + "\n")
    return report


if __name__ == "__main__":
    main()
