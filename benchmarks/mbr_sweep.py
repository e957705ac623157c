"""Greedy against minimum-Bayes-risk picks among sampled summaries, on the validation rows.

Loads a trained adapter, decodes the first 500 validation articles greedily, then draws 32 samples
per article at each (temperature, top-p) setting and scores the pick of each candidate pool: 4, 8,
16 or 32 samples, with or without the greedy summary, utility ROUGE-L ("L") or ROUGE-1 + 2 + L
("12L"), scored pair by pair with rouge-score itself. This is how the small recipe row's decoding
(`--mbr-samples 32`, `--mbr-temperature 0.7`) was chosen; the test rows are never read.

    python benchmarks/mbr_sweep.py ADAPTER_DIR OUT.json [SPLIT]

The samples here come from `--sample` decoding (transformers' generate(), torch's generator);
`phi2 evaluate --mbr-samples` draws its own with per-article uniforms (phi2cli.inference.sampling)
and picks with phi2cli.inference.consensus: the same distribution, other draws.
Environment: MBR_N (samples drawn, default 32), MBR_ROWS (articles, default 500).
"""

from __future__ import annotations

import json
import os
import sys
import time
from multiprocessing import Pool

from rouge_score import rouge_scorer

from phi2cli.config import GenerationConfig
from phi2cli.inference.evaluation import load_eval_rows, resolve_config
from phi2cli.inference.generate import build_prompts, encode_documents, generate_prompts
from phi2cli.inference.trained_model import load_model
from phi2cli.report.metrics import sentence_lines, summary_metrics

SCORER = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"], use_stemmer=True)
SETTINGS = ((0.7, 1.0), (1.0, 1.0), (1.0, 0.9))  # (temperature, top-p)
UTILITIES = {"L": lambda v: v[2], "12L": lambda v: v[0] + v[1] + v[2]}


def matrix(candidates: list[str]) -> list[list[list[float]]]:
    """[i][j] -> (ROUGE-1, ROUGE-2, ROUGE-L) F of candidates i and j."""
    lines = [sentence_lines(c) for c in candidates]
    n = len(lines)
    table = [[[0.0] * 3 for _ in range(n)] for _ in range(n)]
    for i in range(n):
        for j in range(i + 1, n):
            s = SCORER.score(lines[i], lines[j])
            table[i][j] = table[j][i] = [s["rouge1"].fmeasure, s["rouge2"].fmeasure, s["rougeL"].fmeasure]
    return table


def pick(table: list[list[list[float]]], pool: list[int], utility) -> int:
    best, best_value = pool[0], -1.0
    for i in pool:
        value = sum(utility(table[i][j]) for j in pool if j != i)
        if value > best_value:
            best, best_value = i, value
    return best


def main(adapter: str, out: str, split: str = "validation") -> dict:
    samples = int(os.environ.get("MBR_N", 32))
    started = time.time()
    config = resolve_config(adapter, {})
    rows = load_eval_rows(config, split, None).rows[: int(os.environ.get("MBR_ROWS", 500))]
    loaded = load_model(config, adapter)
    references = [r["summary"] for r in rows]
    prompts = build_prompts(loaded, encode_documents(loaded.tokenizer, [r["document"] for r in rows]), 60)
    print("loaded", round(time.time() - started, 1), flush=True)
    results: dict = {}
    started = time.time()
    greedy = [g.text for g in generate_prompts(loaded, prompts, GenerationConfig(), 256)]
    results["greedy"] = {**summary_metrics(greedy, references), "seconds": time.time() - started}
    print("greedy", results["greedy"], flush=True)
    for temperature, top_p in SETTINGS:
        started = time.time()
        repeated = [p for p in prompts for _ in range(samples)]
        drawn = [g.text for g in generate_prompts(loaded, repeated, GenerationConfig(do_sample=True, temperature=temperature,
                                                                                      top_p=top_p), 1024)]  # fmt: skip
        generation_seconds = time.time() - started
        pools = [[greedy[a]] + drawn[a * samples : (a + 1) * samples] for a in range(len(rows))]
        started = time.time()
        with Pool(max(1, (os.cpu_count() or 2) - 1)) as workers:
            tables = workers.map(matrix, pools, chunksize=4)
        key = f"T{temperature}_p{top_p}"
        results[key] = {"generation_seconds": generation_seconds, f"mbr_seconds_n{samples}": time.time() - started,
                        "single_sample": summary_metrics([p[1] for p in pools], references)}  # fmt: skip
        for k in [k for k in (4, 8, 16, 32) if k <= samples]:
            for with_greedy in (False, True):
                pool = ([0] if with_greedy else []) + list(range(1, k + 1))
                for name, utility in UTILITIES.items():
                    chosen = [pools[a][pick(tables[a], pool, utility)] for a in range(len(rows))]
                    results[key][f"mbr{k}{'+greedy' if with_greedy else ''}_{name}"] = summary_metrics(chosen, references)
        print(key, json.dumps({n: round(v["rougeL"], 2) for n, v in results[key].items() if isinstance(v, dict)}),
              flush=True)  # fmt: skip
        with open(out, "w") as f:
            json.dump(results, f, indent=1)
    return results


if __name__ == "__main__":
    main(*sys.argv[1:])
