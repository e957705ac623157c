"""Greedy summaries per decoder family: the hand-written static-cache decoder against transformers'
generate() with its static cache (PHI2_DECODER=hf), on random-weight models of the real shapes.

    python benchmarks/decoder_families.py [--rows phi2,llama,qwen2] [--samples 100] [--max-new-tokens 30]
    python benchmarks/decoder_families.py --tiny      # CPU smoke run: tiny shapes, 4 articles

The hand-written decoder stays only where it is at least 15% faster (KEEP_IF_FASTER). Each row loads the
model unquantized in bf16 (what `evaluate` decodes with once the adapter is merged), summarizes the
same real XSUM validation articles (cut to --max-length, as `evaluate` cuts them) with each decoder,
twice each: the first call pays compilation and CUDA graph capture, the second is the steady time.
Also reports how many summaries the two decoders agree on (bf16: a near-tie can flip a token).
Writes benchmarks/results/decoder_families.json (--out) and prints a table.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import ROOT, environment, save_random_model, write_json  # noqa: E402
from families import SHAPES, TINY, default_shared  # noqa: E402

ROWS = ("phi2", "llama", "qwen2")  # qwen2: the llama shape as Qwen2 (q/k/v bias), same grouped heads
KEEP_IF_FASTER = 0.15  # the hand-written decoder must beat generate() by this share of its time


def make_model(row: str, out: Path, tiny: bool) -> Path:
    """Save a random-weight model of the row's shape with phi-2's tokenizer (bf16 on a GPU)."""
    from transformers import LlamaConfig, PhiConfig, Qwen2Config

    if (out / "config.json").is_file():
        return out
    shape = dict(SHAPES["phi2" if row == "phi2" else "llama"])
    if tiny:
        shape.update(TINY) if row == "phi2" else shape.update(TINY, num_key_value_heads=2)
    config = {"phi2": PhiConfig, "llama": LlamaConfig, "qwen2": Qwen2Config}[row](**shape)
    return save_random_model(config, out)


def summarize_seconds(loaded: Any, documents: list[str], max_new_tokens: int, batch_size: int | None,
                      decoder: str) -> tuple[list[float], list[str], str]:  # fmt: skip
    """Wall seconds of two generate() calls over the documents with the given decoder, the second call's
    summaries and the decoder name recorded in metrics.json."""
    import torch

    from phi2cli.config import GenerationConfig
    from phi2cli.inference.generate import decoder_name, default_batch_size, generate

    previous = os.environ.get("PHI2_DECODER")
    os.environ["PHI2_DECODER"] = decoder
    try:
        gen = GenerationConfig(max_new_tokens=max_new_tokens)
        batch = default_batch_size(loaded, batch_size, gen)
        seconds, texts = [], []
        for _ in range(2):
            started = time.perf_counter()
            texts = [g.text for g in generate(loaded, documents, gen, batch)]
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            seconds.append(round(time.perf_counter() - started, 2))
        return seconds, texts, decoder_name(loaded, gen)
    finally:
        os.environ.pop("PHI2_DECODER") if previous is None else os.environ.__setitem__("PHI2_DECODER", previous)


def run_row(row: str, args: argparse.Namespace, work: Path, documents: list[str]) -> dict[str, Any]:
    import torch

    from phi2cli.config import Phi2Config, apply_overrides
    from phi2cli.inference.decode import supports
    from phi2cli.inference.trained_model import load_model

    model_dir = make_model(row, work / f"model-{row}", args.tiny)
    overrides = {"model.model": str(model_dir), "model.quantization": "none", "data.max_length": args.max_length}
    loaded = load_model(apply_overrides(Phi2Config(), overrides).validate())
    if not supports(loaded.model, longest=args.max_length):
        raise RuntimeError(f"the static-cache decoder does not drive the {row} model as loaded")
    static, static_texts, name = summarize_seconds(loaded, documents, args.max_new_tokens, args.batch_size, "static")
    hf, hf_texts, hf_name = summarize_seconds(loaded, documents, args.max_new_tokens, args.batch_size, "hf")
    del loaded
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    saving = 1 - static[1] / hf[1] if hf[1] else 0.0
    return {"static_s": static, "hf_s": hf, "static_decoder": name, "hf_decoder": hf_name,
            "steady_saving": round(saving, 3), "keep_static": saving >= KEEP_IF_FASTER,
            "same_summaries": sum(a == b for a, b in zip(static_texts, hf_texts)), "articles": len(documents)}  # fmt: skip


def build_parser() -> argparse.ArgumentParser:
    shared = default_shared()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", default=",".join(ROWS), help=f"comma-separated, of {', '.join(ROWS)}")
    parser.add_argument("--samples", type=int, default=100, help="validation articles summarized per call")
    parser.add_argument("--max-new-tokens", type=int, default=30)
    parser.add_argument("--max-length", type=int, default=512, help="articles are cut as a run of this max_length")
    parser.add_argument("--batch-size", type=int, default=None, help="articles per batch (default: as evaluate)")
    parser.add_argument("--data-dir", type=Path, default=shared / "data" / "xsum")
    parser.add_argument("--work", type=Path, default=None, help="models go here (default: a /tmp folder)")
    parser.add_argument("--tiny", action="store_true", help="CPU smoke run: tiny shapes, 4 articles, 8 tokens")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "decoder_families.json")
    return parser


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = build_parser().parse_args(argv)
    rows = [r.strip() for r in args.rows.split(",") if r.strip()]
    unknown = [r for r in rows if r not in ROWS]
    if unknown or not rows:
        raise SystemExit(f"--rows: unknown row(s) {', '.join(unknown) or '(none)'}; use {', '.join(ROWS)}")
    if args.tiny:
        args.samples, args.max_new_tokens = min(args.samples, 4), min(args.max_new_tokens, 8)
    validation = args.data_dir / "validation.jsonl"
    if not validation.is_file():
        raise SystemExit(f"no validation.jsonl in {args.data_dir}; pass --data-dir")
    lines = validation.read_text(encoding="utf-8").splitlines()[: args.samples]
    documents = [json.loads(line)["document"] for line in lines]
    work = args.work or Path(tempfile.mkdtemp(prefix="phi2-decoders-"))
    work.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("PHI2_CACHE_DIR", str(work / "cache"))
    results: dict[str, Any] = {"rows": {}}
    for row in rows:
        try:
            results["rows"][row] = run_row(row, args, work, documents)
        except Exception as err:  # one failing row must not lose the others
            import traceback

            traceback.print_exc()
            results["rows"][row] = {"error": f"{type(err).__name__}: {err}"[:500]}
        print(f"{row}: {results['rows'][row]}", flush=True)
    results["environment"] = environment()
    results["command"] = "python " + " ".join([sys.argv[0], *(argv if argv is not None else sys.argv[1:])])
    results["settings"] = {"samples": len(documents), "max_new_tokens": args.max_new_tokens,
                           "max_length": args.max_length, "tiny": args.tiny, "keep_if_faster": KEEP_IF_FASTER}  # fmt: skip
    write_json(args.out, results)
    print(f"{'row':8} {'static s (cold, steady)':>24} {'generate() s':>16} {'saving':>7} {'keep':>5} {'same':>6}")
    for row, r in results["rows"].items():
        if "error" in r:
            print(f"{row:8} {r['error']}")
            continue
        print(f"{row:8} {str(r['static_s']):>24} {str(r['hf_s']):>16} {r['steady_saving']:>7.0%} "
              f"{str(r['keep_static']):>5} {r['same_summaries']:>3}/{r['articles']}")  # fmt: skip
    return results


if __name__ == "__main__":
    main()
