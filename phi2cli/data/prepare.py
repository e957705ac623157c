"""`prepare`: sample XSUM, format prompts, tokenize, save with a manifest of length statistics."""

from __future__ import annotations

import json
import math
import random
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

from phi2cli import __version__
from phi2cli.config import DataConfig, Phi2Config, _section_dict, resolve_local_path
from phi2cli.errors import ConfigError, DataError, RunError
from phi2cli.io.files import atomic_directory, check_writable_dir, write_json_atomic
from phi2cli.data.prompts import PromptFormat, encode_documents, encode_example
from phi2cli.data.sources import describe_source, load_split, uses_local_files

MANIFEST_NAME = "manifest.json"
TRAIN_SPLITS = ("train", "validation")

Progress = Callable[[Iterable[Any], int, str], Iterable[Any]]


def _no_progress(items: Iterable[Any], total: int, description: str) -> Iterable[Any]:
    return items


@dataclass
class PreparedData:
    """A tokenized dataset on disk and its manifest."""

    path: Path
    manifest: dict[str, Any]
    warnings: list[str] = field(default_factory=list)


def sample_rows(rows: Sequence[dict[str, str]], count: int, seed: int) -> list[dict[str, str]]:
    """`count` rows picked deterministically by `seed` (all rows, in seeded order, if fewer)."""
    order = list(range(len(rows)))
    random.Random(seed).shuffle(order)
    return [rows[i] for i in order[: min(count, len(rows))]]


def length_stats(values: Sequence[int]) -> dict[str, float]:
    """mean, p50, p95 and max of token counts (nearest-rank percentiles)."""
    if not values:
        return {"mean": 0.0, "p50": 0, "p95": 0, "max": 0}
    ordered = sorted(values)

    def rank(p: float) -> int:
        return ordered[max(0, math.ceil(p / 100 * len(ordered)) - 1)]

    return {"mean": round(sum(ordered) / len(ordered), 1), "p50": rank(50), "p95": rank(95), "max": ordered[-1]}


def tokenize_rows(
    rows: Sequence[dict[str, str]],
    fmt: PromptFormat,
    tokenizer: Any,
    max_length: int,
    loss_on: str,
    progress: Progress = _no_progress,
    description: str = "tokenizing",
) -> tuple[dict[str, list[Any]], dict[str, Any]]:
    """Encode rows into columns; returns (columns, split statistics)."""
    columns: dict[str, list[Any]] = {k: [] for k in ("id", "document", "summary", "input_ids", "labels",
                                                      "prompt_tokens", "summary_tokens", "truncated")}  # fmt: skip
    too_long = 0
    articles = encode_documents(tokenizer, [row["document"] for row in rows])  # one batch: every core at once
    for row, document_ids in progress(list(zip(rows, articles)), len(rows), description):
        encoded = encode_example(fmt, tokenizer, row["document"], row["summary"], max_length, loss_on, document_ids)
        if encoded is None:
            too_long += 1
            continue
        for key in ("id", "document", "summary"):
            columns[key].append(row[key])
        columns["input_ids"].append(encoded.input_ids)
        columns["labels"].append(encoded.labels)
        columns["prompt_tokens"].append(encoded.prompt_tokens)
        columns["summary_tokens"].append(encoded.summary_tokens)
        columns["truncated"].append(encoded.truncated)
    stats = {
        "examples": len(columns["id"]),
        "truncated": sum(columns["truncated"]),
        "dropped_summary_too_long": too_long,
        "tokens": {
            "prompt": length_stats(columns["prompt_tokens"]),
            "summary": length_stats(columns["summary_tokens"]),
            "total": length_stats([len(ids) for ids in columns["input_ids"]]),
        },
    }
    return columns, stats


def prepare(
    config: Phi2Config,
    tokenizer: Any,
    output_dir: str | Path | None = None,
    progress: Progress = _no_progress,
    overwrite: bool = False,
) -> PreparedData:
    """Load, sample, format, tokenize and save the train and validation splits.

    Args:
        config: the run configuration (its `data` section drives everything here).
        tokenizer: the model's tokenizer (see modeling.load_tokenizer).
        output_dir: where to save; defaults to config.data.prepared_dir.
        progress: wraps iterables to show progress (the CLI passes a rich progress bar).
        overwrite: replace what `output_dir` holds; without it a non-empty directory is refused.
    Returns:
        PreparedData with the directory, its manifest and any warnings for the user.
    Raises:
        DataError / HubUnreachableError / ConfigError with a message that says what to do; RunError
        when `output_dir` is not empty and `overwrite` is off.
    """
    from phi2cli.config import with_absolute_paths

    config = with_absolute_paths(config)  # the manifest must point at the data from any directory
    data = config.data
    fmt = PromptFormat.create(data.template, tokenizer)
    if fmt.fixed_tokens + 2 > data.max_length:
        raise ConfigError(
            f"--max-length {data.max_length} is shorter than the prompt template ({fmt.fixed_tokens} tokens) "
            f"plus a summary; raise --max-length"
        )
    target = Path(output_dir or data.prepared_dir)
    check_writable_dir(target)  # before the slow part, not after it
    if not overwrite and target.is_dir() and any(target.iterdir()):
        what = "a prepared dataset" if (target / MANIFEST_NAME).is_file() else "files"
        raise RunError(f"{target} already holds {what}; pass --overwrite to replace it (a run trained on it then "
                       f"refuses --resume), or choose another --output")  # fmt: skip
    wanted = {"train": data.samples, "validation": data.val_samples}
    warnings: list[str] = []
    splits: dict[str, dict[str, list[Any]]] = {}
    split_stats: dict[str, dict[str, Any]] = {}
    for split in TRAIN_SPLITS:
        if wanted[split] == 0:
            continue
        loaded = load_split(data, split, required=split == "train")
        if loaded is None:
            warnings.append(f"no {split} split found: training will run without evaluation")
            continue
        if wanted[split] > len(loaded.rows):
            flag = "--samples" if split == "train" else "--val-samples"
            warnings.append(
                f"{flag} {wanted[split]} asks for more {split} examples than there are ({len(loaded.rows)}): using all"
            )
        if loaded.dropped_empty:
            warnings.append(f"{split}: dropped {loaded.dropped_empty} example(s) with an empty document or summary")
        picked = sample_rows(loaded.rows, wanted[split], data.seed)
        columns, stats = tokenize_rows(picked, fmt, tokenizer, data.max_length, data.loss_on, progress,
                                       f"tokenizing {split}")  # fmt: skip
        if stats["dropped_summary_too_long"]:
            warnings.append(
                f"{split}: dropped {stats['dropped_summary_too_long']} example(s) whose summary alone "
                f"exceeds --max-length {data.max_length}"
            )
        if not columns["id"]:
            raise DataError(f"{split}: no example fits --max-length {data.max_length}; raise it")
        stats = {"source": loaded.source, "available": len(loaded.rows), "dropped_empty": loaded.dropped_empty,
                 "sampled": len(picked), **stats}  # fmt: skip
        splits[split], split_stats[split] = columns, stats

    manifest = {
        "phi2cli_version": __version__,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "source": describe_source(data),
        "dataset": data.data_dir if uses_local_files(data) else data.dataset,
        "seed": data.seed,
        "template": data.template,
        "tokenizer": resolve_local_path(config.model.tokenizer or config.model.model),
        "eos_token_id": fmt.eos_id,
        "loss_on": data.loss_on,
        "max_length": data.max_length,
        "data_config": _section_dict(data),  # lets 'phi2 train --prepared' record where the data came from
        "splits": split_stats,
        "fingerprint": fingerprint(splits),  # what 'phi2 train --resume' checks the data against
    }
    _save(splits, manifest, target)
    return PreparedData(target, manifest, warnings)


def fingerprint(splits: dict[str, dict[str, list[Any]]]) -> str:
    """SHA-256 of every split's examples (ids, tokens, labels): the same data gives the same value."""
    import hashlib

    digest = hashlib.sha256()
    for name in sorted(splits):
        digest.update(name.encode())
        digest.update(json.dumps(splits[name], sort_keys=True, separators=(",", ":")).encode())
    return digest.hexdigest()


def data_identity(manifest: dict[str, Any]) -> str | None:
    """What identifies a prepared dataset's content: its fingerprint (older manifests: when it was made)."""
    return manifest.get("fingerprint") or manifest.get("created")


def _save(splits: dict[str, dict[str, list[Any]]], manifest: dict[str, Any], target: Path) -> None:
    import datasets

    datasets.disable_progress_bars()  # our own progress display covers the slow part

    with atomic_directory(target) as tmp:
        dataset = datasets.DatasetDict({name: datasets.Dataset.from_dict(cols) for name, cols in splits.items()})
        dataset.save_to_disk(str(tmp))  # the directory itself loads with datasets.load_from_disk
        write_json_atomic(tmp / MANIFEST_NAME, manifest)  # last: its presence marks a complete dataset


def load_prepared(path: str | Path) -> tuple[Any, dict[str, Any]]:
    """Load a prepared dataset and its manifest; refuse an incomplete one.

    Reads the current layout (the DatasetDict saved in the directory itself, beside manifest.json)
    and the older one (the DatasetDict in its data/ folder).

    Returns:
        (datasets.DatasetDict, manifest dict)
    Raises:
        DataError if the directory is missing, incomplete or corrupt.
    """
    path = Path(path)
    if not path.exists():
        raise DataError(f"prepared dataset {path} does not exist; create it with 'phi2 prepare'")
    if not path.is_dir():
        raise DataError(f"{path} is a file; --prepared expects the directory written by 'phi2 prepare'")
    manifest_path = path / MANIFEST_NAME
    saved = path if (path / "dataset_dict.json").is_file() else path / "data"  # data/: the older layout
    if not manifest_path.is_file() or not saved.is_dir():
        raise DataError(f"{path} is not a complete prepared dataset (no {MANIFEST_NAME}); run 'phi2 prepare' again")
    try:
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise DataError(f"{manifest_path} is corrupt; run 'phi2 prepare' again") from None
    import datasets

    try:
        dataset = datasets.load_from_disk(str(saved))
    except Exception as err:
        raise DataError(f"{path} could not be loaded ({type(err).__name__}); run 'phi2 prepare' again") from None
    return dataset, manifest


def check_compatible(manifest: dict[str, Any], config: Phi2Config) -> None:
    """A prepared dataset must have been tokenized for the model being trained."""
    from phi2cli.config import resolve_local_path

    tokenizer = config.model.tokenizer or config.model.model
    if manifest.get("tokenizer") is not None and resolve_local_path(manifest["tokenizer"]) != resolve_local_path(tokenizer):
        raise ConfigError(
            f"the prepared dataset was tokenized with {manifest['tokenizer']}, but the model is {tokenizer}; "
            f"run 'phi2 prepare --model {tokenizer}' or pass the matching --model"
        )


def data_config_of(manifest: dict[str, Any]) -> DataConfig | None:
    """The data settings a prepared dataset was made with (None for older manifests)."""
    saved = manifest.get("data_config")
    if not isinstance(saved, dict):
        return None
    known = {k: v for k, v in saved.items() if k in DataConfig.__dataclass_fields__}
    return DataConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in known.items()})
