"""`evaluate` and `summarize` use cases: resolve the run, read inputs, score, write artifacts."""

from __future__ import annotations

import dataclasses
import json
import math
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Mapping, Sequence

from phi2cli.config import GenerationConfig, Phi2Config, TrainConfig, apply_overrides
from phi2cli.errors import ConfigError, DataError, RunError
from phi2cli.report.metrics import SENTENCE_SPLITTER, preload_scorer, summary_metrics

if TYPE_CHECKING:
    from phi2cli.inference.trained_model import LoadedModel
    from phi2cli.data.prompts import EncodedExample
    from phi2cli.inference.shared_forward import Scored

DEFAULT_ADAPTER = TrainConfig().final_dir
DEFAULT_SAMPLES = 500
EVAL_SPLITS = ("validation", "test")
METRICS_FILE = "metrics-{name}.json"  # name: the split, or the --file's stem; each evaluation keeps its own
PREDICTIONS_FILE = "predictions-{name}.jsonl"
METRIC_KEYS = ("eval_loss", "perplexity", "rouge1", "rouge2", "rougeL", "rougeLsum", "mean_summary_words")
SOURCE_KEYS = ("data.dataset", "data.data_dir", "data.validation_file", "data.test_file")
LOSS_REDUCTION = "token-weighted mean over every labelled token of the set (training's per-token loss)"
SHARED_TIMINGS = ("loss_seconds: one forward per article that gave both its eval loss and its summary prompt's "
                  "prefill; generation_seconds: the prompt's last tokens fed one step each, then decoding. Articles "
                  "beyond shared_forward_articles (no loss example, or a summary longer than max_new_tokens) had "
                  "their own eval-loss forward and prefill; scoring_seconds: ROUGE of the summaries")
SEPARATE_TIMINGS = ("loss_seconds: the eval-loss forward; generation_seconds: the summary prompts' prefill and "
                    "decoding; scoring_seconds: ROUGE of the summaries")
# A task tracker: (description, total) -> a function advancing that task by n.
Tracker = Callable[[str, int], Callable[[int], None]]
ModelLoader = Callable[[Phi2Config, "str | Path | None"], "LoadedModel"]


@dataclass(frozen=True)
class EvaluateOptions:
    adapter_dir: str = DEFAULT_ADAPTER
    split: str = "validation"
    samples: int = DEFAULT_SAMPLES  # articles to score (all when the split has fewer)
    data_file: str | None = None  # a JSONL/JSON/CSV/Parquet file used as the split
    output_dir: str | None = None  # where metrics-NAME.json/predictions-NAME.jsonl go; the adapter dir if None
    compare_base: bool = False
    gen_batch_size: int | None = None  # None: 256 (greedy Phi) or 128 on a GPU, the config's value on a CPU
    shared_forward: bool = True  # greedy Phi: the eval loss and the summaries' prefill from one forward
    overrides: Mapping[str, Any] = field(default_factory=dict)  # dotted config keys from flags


@dataclass
class EvaluationResult:
    metrics: dict[str, Any]
    predictions: list[dict[str, str]]
    metrics_path: Path
    predictions_path: Path
    notes: list[str] = field(default_factory=list)


def _no_tracker(description: str, total: int) -> Callable[[int], None]:
    return lambda n: None


def resolve_config(adapter_dir: str | Path, overrides: Mapping[str, Any], base_only: bool = False) -> Phi2Config:
    """The run's saved config under the flags; with base_only, defaults when there is no run.

    Raises:
        RunError/ModelError for a missing or non-adapter directory; ConfigError for bad flags.
    """
    from phi2cli.inference.trained_model import check_adapter_dir, run_config_for

    if not base_only:
        config, _ = run_config_for(check_adapter_dir(adapter_dir))
    else:
        try:
            config, _ = run_config_for(adapter_dir)
        except RunError:
            if not overrides.get("model.model"):
                raise RunError(
                    f"--base-only needs --model MODEL, or a run in {adapter_dir} to take the base model from"
                ) from None
            config = Phi2Config()
    if overrides.get("generation.mbr_samples") is None and \
            ((overrides.get("generation.num_beams") or 1) > 1 or overrides.get("generation.do_sample")):
        overrides = {**overrides, "generation.mbr_samples": 0}  # beams or sampling asked for: the run's MBR steps aside
    if any(overrides.get(key) for key in SOURCE_KEYS):  # a data source flag replaces the run's whole source
        cleared = dataclasses.replace(config.data, data_dir=None, train_file=None, validation_file=None, test_file=None)
        config = dataclasses.replace(config, data=cleared)
    return apply_overrides(config, overrides).validate()


def results_name(split: str, data_file: str | None) -> str:
    """What names an evaluation's files: the split, or the --file's stem (re-running the same one replaces them)."""
    if not data_file:
        return split
    stem = re.sub(r"[^A-Za-z0-9._-]+", "_", Path(data_file).stem).strip("._") or "file"
    return stem


def load_eval_rows(config: Phi2Config, split: str, data_file: str | None) -> Any:
    """Rows of `split` from --file, else from the run's (or the flags') data source."""
    from phi2cli.data.sources import load_split

    if split not in EVAL_SPLITS:
        raise ConfigError(f"--split must be one of {', '.join(EVAL_SPLITS)} (got '{split}')")
    data = config.data
    if data_file:
        data = dataclasses.replace(data, **{f"{split}_file": data_file})
    return load_split(data, split)


def evaluate(options: EvaluateOptions, track: Tracker = _no_tracker,
             load: ModelLoader | None = None) -> EvaluationResult:  # fmt: skip
    """Eval loss, perplexity, ROUGE and summary length of an adapter (and optionally its base).

    Args:
        options: what to evaluate and how (see EvaluateOptions).
        track: progress tracker for the loss and generation passes.
        load: what gives the model (trained_model.load_model's signature); phi2 serve passes its kept one.
    Returns:
        EvaluationResult; metrics-NAME.json and predictions-NAME.jsonl (NAME: results_name) are written
        atomically.
    Raises:
        RunError, ModelError, DataError, ConfigError, DeviceError.
    """
    from phi2cli.data.prepare import sample_rows
    from phi2cli.data.prompts import encode_documents
    from phi2cli.io.files import ensure_writable_dir, write_json_atomic, write_jsonl_atomic
    from phi2cli.inference.generate import decoder_name, default_batch_size
    from phi2cli.inference.trained_model import attach_adapter, load_model

    if options.samples < 1:
        raise ConfigError(f"--samples must be at least 1 (got {options.samples})")
    if options.split not in EVAL_SPLITS:  # before the slow part; training data is never scored
        raise ConfigError(f"--split must be one of {', '.join(EVAL_SPLITS)} (got '{options.split}')")
    started = time.perf_counter()
    config = resolve_config(options.adapter_dir, options.overrides)
    adapter = Path(options.adapter_dir)
    output_dir = Path(options.output_dir) if options.output_dir else adapter
    ensure_writable_dir(output_dir)  # fail before the slow part, not after it
    from phi2cli.io.hub import check_hub_access

    own_tokenizer = (adapter / "tokenizer_config.json").is_file() and not options.compare_base
    check_hub_access(config, tokenizer=not own_tokenizer, data=options.data_file is None)  # every missing item at once
    loaded_rows = load_eval_rows(config, options.split, options.data_file)
    rows = sample_rows(loaded_rows.rows, options.samples, config.data.seed)  # training's --val-samples order
    data_seconds = time.perf_counter() - started
    notes = []
    if options.samples > len(loaded_rows.rows):
        notes.append(f"--samples {options.samples}: the {options.split} split has {len(rows)}; using all")

    loaded = (load or load_model)(config, None if options.compare_base else adapter)
    notes += loaded.notes
    data = config.data
    document_ids = encode_documents(loaded.tokenizer, [r["document"] for r in rows])  # once, for both passes
    encoded = encode_examples(loaded, rows, document_ids)
    examples = [e for e in encoded if e is not None]
    if not examples:
        raise DataError(f"no example's summary fits the run's max_length {data.max_length}; nothing to score")
    if len(examples) < len(rows):
        notes.append(f"{len(rows) - len(examples)} example(s) left out of the loss: summary longer than max_length")
    batch_size = default_batch_size(loaded, options.gen_batch_size, config.generation)
    timings: dict[str, Any] = {"load_seconds": time.perf_counter() - started, "scoring_seconds": 0.0}
    timings["load_phases"] = {"data": data_seconds, **loaded.load_phases,
                              "tokenize": timings["load_seconds"] - data_seconds - sum(loaded.load_phases.values())}
    preload_scorer()  # ROUGE's imports overlap the GPU passes
    truncated: dict[str, int] = {}  # articles cut to fit max_length - max_new_tokens
    shared: dict[str, int] = {}  # articles whose loss and summary prefill came from one forward

    def score(label: str) -> tuple[dict[str, float], list[str]]:
        prefix = "" if label == "tuned" else "base_"
        scored = score_articles(loaded, document_ids, encoded, config.generation, batch_size,
                                options.shared_forward, track, label)  # fmt: skip
        seconds = scored.generation_seconds
        new_tokens = sum(g.new_tokens + g.sampled_tokens for g in scored.generated)  # MBR's samples are work too
        timings.update({f"{prefix}loss_seconds": scored.loss.seconds, f"{prefix}generation_seconds": seconds,
                        f"{prefix}generated_tokens": new_tokens,
                        f"{prefix}generated_tokens_per_second": new_tokens / seconds if seconds else 0.0})  # fmt: skip
        shared[label] = scored.shared_articles
        texts = [g.text for g in scored.generated]
        scoring_started = time.perf_counter()
        quality = summary_metrics(texts, [r["summary"] for r in rows])
        timings["scoring_seconds"] += time.perf_counter() - scoring_started
        truncated[label] = sum(g.truncated for g in scored.generated)
        return {"eval_loss": scored.loss.loss, "perplexity": scored.loss.perplexity, **quality}, texts

    from phi2cli.inference.generate import decoder_fallback, uses_fast_decoder

    fallback = decoder_fallback(loaded, config.generation)
    if fallback:
        notes.append(fallback)
    base = base_texts = None
    if options.compare_base:
        base, base_texts = score("base")
        attach_adapter(loaded, adapter)
    tuned, texts = score("tuned")
    timings["total_seconds"] = time.perf_counter() - started

    g = config.generation
    metrics: dict[str, Any] = {
        "model": config.model.model,
        "adapter": str(adapter),
        "split": options.split,
        "data": options.data_file or loaded_rows.source,
        "samples": len(rows),
        "loss_examples": len(examples),
        "truncated_articles": truncated["tuned"],
        "settings": {
            "max_new_tokens": g.max_new_tokens, "num_beams": g.num_beams, "length_penalty": g.length_penalty,
            "no_repeat_ngram_size": g.no_repeat_ngram_size, "min_new_tokens": g.min_new_tokens,
            "do_sample": g.do_sample, "temperature": g.temperature, "top_p": g.top_p, "gen_batch_size": batch_size,
            "mbr_samples": g.mbr_samples, "mbr_temperature": g.mbr_temperature,
            "decoding": decoder_name(loaded, g),  # what produced the summaries, in words
            "max_length": data.max_length, "loss_on": data.loss_on, "template": data.template, "seed": data.seed,
            "loss_reduction": LOSS_REDUCTION, "rouge": "F-measure x 100, Porter stemming, mean over articles",
            "rouge_sentence_splitter": SENTENCE_SPLITTER,
            "device": loaded.device, "dtype": loaded.dtype, "quantization": config.model.quantization,
            "adapter_merged": loaded.merged, "shared_forward_articles": shared["tuned"],
            "decoder": "static" if uses_fast_decoder(loaded, config.generation) else "hf",
            "timings_note": SHARED_TIMINGS if shared["tuned"] else SEPARATE_TIMINGS,
        },
        "timings": {k: round(v, 4) if isinstance(v, float) else
                    {part: round(t, 4) for part, t in v.items()} if isinstance(v, dict) else v
                    for k, v in timings.items()},  # fmt: skip
        "tuned": tuned,
    }  # fmt: skip
    if base is not None:
        metrics["settings"]["base_shared_forward_articles"] = shared["base"]
        metrics["base"] = base
        metrics["delta"] = {k: tuned[k] - base[k] for k in METRIC_KEYS}
    _check_finite(metrics)
    predictions = [{"id": r["id"], "reference": r["summary"], "prediction": t} for r, t in zip(rows, texts)]
    if base_texts is not None:
        for row, text in zip(predictions, base_texts):
            row["base_prediction"] = text
    # Predictions first: the metrics file, written last, never describes predictions from another run.
    name = results_name(options.split, options.data_file)
    predictions_path = write_jsonl_atomic(output_dir / PREDICTIONS_FILE.format(name=name), predictions)
    metrics_path = write_json_atomic(output_dir / METRICS_FILE.format(name=name), metrics)
    return EvaluationResult(metrics, predictions, metrics_path, predictions_path, notes)


def encode_examples(loaded: LoadedModel, rows: Sequence[Mapping[str, str]],
                    document_ids: Sequence[list[int]]) -> list[EncodedExample | None]:  # fmt: skip
    """Each row's loss example (prompts.encode_example; None where the summary does not fit), its
    article taken from `document_ids` instead of being tokenized again."""
    from phi2cli.data.prompts import encode_example

    data = loaded.config.data
    return [encode_example(loaded.fmt, loaded.tokenizer, r["document"], r["summary"], data.max_length, data.loss_on,
                           document_ids=ids) for r, ids in zip(rows, document_ids)]  # fmt: skip


def score_articles(loaded: LoadedModel, document_ids: Sequence[list[int]], encoded: Sequence[EncodedExample | None],
                   gen: GenerationConfig, batch_size: int, shared_forward: bool = True,
                   track: Tracker = _no_tracker, label: str = "tuned") -> Scored:  # fmt: skip
    """Eval loss and summaries of tokenized articles: one shared forward for greedy Phi models
    (phi2cli.inference.shared_forward) unless `shared_forward` is off, else the eval-loss pass and generation.

    Args:
        loaded: an inference.LoadedModel.
        document_ids: each article's token ids; encoded: its loss example or None (encode_examples).
        gen: generation settings; batch_size: articles per generation batch.
        track, label: progress tasks are named "<label>: eval loss" and "<label>: summaries".
    Returns:
        shared_forward.Scored (shared_articles is 0 when the two passes ran).
    """
    from phi2cli.inference.eval_loss import eval_loss
    from phi2cli.inference.generate import build_prompts, consensus_summaries, generate_prompts, uses_fast_decoder
    from phi2cli.inference.shared_forward import Scored, loss_and_summaries

    examples = [e for e in encoded if e is not None]
    advance_loss = track(f"{label}: eval loss", len(examples))
    advance_summaries = track(f"{label}: summaries", len(document_ids))
    if shared_forward and uses_fast_decoder(loaded, gen):
        if not gen.mbr_samples:
            return loss_and_summaries(loaded, document_ids, encoded, gen, batch_size, advance_loss, advance_summaries)
        plain = dataclasses.replace(gen, mbr_samples=0)  # the shared forward gives the greedy candidates
        scored = loss_and_summaries(loaded, document_ids, encoded, plain, batch_size, advance_loss, None)
        started = time.perf_counter()
        prompts = build_prompts(loaded, document_ids, gen.max_new_tokens)
        chosen = consensus_summaries(loaded, prompts, gen, batch_size, advance_summaries, greedy=scored.generated)
        return Scored(scored.loss, chosen, scored.generation_seconds + time.perf_counter() - started,
                      scored.shared_articles)  # fmt: skip
    loss = eval_loss(loaded, examples, advance=advance_loss)
    started = time.perf_counter()
    prompts = build_prompts(loaded, document_ids, gen.max_new_tokens)
    generated = generate_prompts(loaded, prompts, gen, batch_size, advance=advance_summaries)
    return Scored(loss, generated, time.perf_counter() - started, 0)


def _check_finite(metrics: dict[str, Any]) -> None:
    """JSON has no NaN/inf: an overflowing perplexity becomes null rather than invalid JSON."""
    for block in ("tuned", "base", "delta"):
        for key, value in metrics.get(block, {}).items():
            if isinstance(value, float) and not math.isfinite(value):
                metrics[block][key] = None


# --- summarize --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Article:
    source: str  # file path, 'file.jsonl:LINE', or '<stdin>'
    text: str


def _read_text(path: Path) -> str:
    try:
        raw = path.read_bytes()
    except OSError as err:
        raise DataError(f"cannot read {path}: {err.strerror or err}") from None
    if b"\x00" in raw:
        raise DataError(f"{path} looks binary (NUL bytes); give a UTF-8 text file with the article")
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        raise DataError(f"{path} is not UTF-8 text (byte {err.start}); convert it to UTF-8") from None
    if not text.strip():
        raise DataError(f"{path} is empty; it needs the article text")
    return text


def _read_jsonl(path: Path, document_field: str) -> list[Article]:
    from phi2cli.data.sources import read_records

    records = read_records(path)
    if not any(document_field in r for r in records):
        found = ", ".join(map(str, records[0])) or "none"
        raise DataError(f"{path}: no '{document_field}' field (found {found}); name it with --document-field")
    articles = []
    for number, record in enumerate(records, start=1):
        value = record.get(document_field)
        if not isinstance(value, str) or not value.strip():
            raise DataError(f"{path}: row {number} has no text in '{document_field}'; fill it in or remove the row")
        articles.append(Article(f"{path}:{number}", value))
    return articles


def read_articles(inputs: Sequence[str], document_field: str = "document", stdin: Any = None) -> list[Article]:
    """Articles from files, directories of .txt files, JSONL files, or '-' (stdin).

    Raises:
        DataError for a missing, empty, binary or non-UTF-8 input, or a directory without .txt files.
    """
    import sys

    articles: list[Article] = []
    for item in inputs:
        if item == "-":
            text = (stdin or sys.stdin).read()
            if not text.strip():
                raise DataError("standard input is empty; pipe the article text in")
            articles.append(Article("<stdin>", text))
            continue
        path = Path(item)
        if not path.exists():
            raise DataError(f"{path} does not exist; check the path")
        if path.is_dir():
            files = sorted(p for p in path.iterdir() if p.suffix.lower() == ".txt" and p.is_file())
            if not files:
                raise DataError(f"{path} holds no .txt files; put one article per .txt file there")
            articles += [Article(str(f), _read_text(f)) for f in files]
        elif path.suffix.lower() == ".jsonl":
            articles += _read_jsonl(path, document_field)
        else:
            articles.append(Article(str(path), _read_text(path)))
    return articles


@dataclass
class SummaryResult:
    source: str
    summary: str
    truncated: bool
    prompt_tokens: int


def summarize(articles: Sequence[Article], adapter_dir: str | Path = DEFAULT_ADAPTER, base_only: bool = False,
              overrides: Mapping[str, Any] | None = None, gen_batch_size: int | None = None,
              stream: Any = None, timings: dict[str, float] | None = None, load: ModelLoader | None = None,
              ) -> tuple[list[SummaryResult], list[str]]:  # fmt: skip
    """Summarize articles with the run's adapter (or the base model), prompted as in training.

    Args:
        articles: from read_articles.
        adapter_dir: the adapter (and run config) to use.
        base_only: use the base model alone (model from --model or the run's config).
        overrides: dotted config keys from flags (model, generation settings).
        gen_batch_size: articles per batch; None picks one for the device.
        stream: a text stream to write a single article's summary to while it is generated.
        timings: filled with load_seconds (config, model, adapter), its load_phases and generation_seconds.
        load: what gives the model (trained_model.load_model's signature); phi2 serve passes its kept one.
    Returns:
        (one SummaryResult per article in order, notes for the user)
    """
    from phi2cli.inference.generate import default_batch_size, generate
    from phi2cli.inference.trained_model import load_model

    started = time.perf_counter()
    config = resolve_config(adapter_dir, overrides or {}, base_only)
    loaded = (load or load_model)(config, None if base_only else adapter_dir)
    loaded_at = time.perf_counter()
    generated = generate(loaded, [a.text for a in articles], config.generation,
                         default_batch_size(loaded, gen_batch_size, config.generation), stream=stream)  # fmt: skip
    if timings is not None:
        timings.update(load_seconds=loaded_at - started, generation_seconds=time.perf_counter() - loaded_at,
                       load_phases=dict(loaded.load_phases))  # fmt: skip
    room = config.data.max_length - config.generation.max_new_tokens - loaded.fmt.fixed_tokens
    why = f"truncated to {room} tokens to fit max_length {config.data.max_length} minus --max-new-tokens " \
          f"{config.generation.max_new_tokens}"  # fmt: skip
    cut = [a.source for a, g in zip(articles, generated) if g.truncated]
    notes = [f"{source}: article {why}" for source in cut] if len(cut) <= 3 else \
        [f"{len(cut)} of {len(articles)} articles {why} (first: {cut[0]})"]  # fmt: skip
    results = [SummaryResult(a.source, g.text, g.truncated, g.prompt_tokens) for a, g in zip(articles, generated)]
    return results, loaded.notes + notes


def results_json(results: Sequence[SummaryResult]) -> str:
    """Machine-readable output of summarize: a JSON list of {source, summary}."""
    return json.dumps([{"source": r.source, "summary": r.summary} for r in results], ensure_ascii=False, indent=2)
