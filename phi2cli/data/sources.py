"""Reading XSUM-style examples from the hub or from local JSONL/JSON/CSV/Parquet files.

Every problem a user can cause (bad path, bad line, missing column, wrong encoding, hub
offline) becomes a DataError/HubUnreachableError with a message that says what to do.
"""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

from phi2cli.config import DataConfig
from phi2cli.errors import ConfigError, DataError, HubUnreachableError
from phi2cli.data.prompts import check_text

SPLITS = ("train", "validation", "test")
SPLIT_ALIASES = {"train": ("train",), "validation": ("validation", "valid", "val", "dev"), "test": ("test",)}
FORMATS = (".jsonl", ".json", ".csv", ".parquet")


@dataclass
class SplitRows:
    """Usable rows of one split and what was dropped on the way."""

    rows: list[dict[str, str]]  # each: id, document, summary
    source: str
    dropped_empty: int = 0


def describe_source(cfg: DataConfig) -> str:
    if cfg.train_file or cfg.validation_file or cfg.test_file or cfg.data_dir:
        return f"local files ({cfg.data_dir or 'per-split files'})"
    return f"hub dataset {cfg.dataset}"


def uses_local_files(cfg: DataConfig) -> bool:
    return bool(cfg.data_dir or cfg.train_file or cfg.validation_file or cfg.test_file)


def load_split(cfg: DataConfig, split: str, required: bool = True) -> SplitRows | None:
    """Load one split from local files (if any are configured) or from the hub."""
    if uses_local_files(cfg):
        path = local_split_path(cfg, split)
        if path is None:
            if required:
                where = cfg.data_dir or "the given files"
                raise DataError(
                    f"no {split} file in {where}: expected {split}.jsonl/.json/.csv/.parquet "
                    f"or --{split}-file FILE"
                )
            return None
        records = read_records(path)
        return normalize_rows(records, cfg, str(path))
    return _load_hub_split(cfg, split, required)


def local_split_path(cfg: DataConfig, split: str) -> Path | None:
    explicit = {"train": cfg.train_file, "validation": cfg.validation_file, "test": cfg.test_file}[split]
    if explicit:
        return _check_file(Path(explicit))
    if not cfg.data_dir:
        return None
    data_dir = Path(cfg.data_dir)
    if not data_dir.exists():
        raise DataError(f"--data-dir {data_dir} does not exist; point it at a folder with train/validation files")
    if not data_dir.is_dir():
        raise DataError(f"--data-dir {data_dir} is a file, not a directory; use --train-file for a single file")
    for name in SPLIT_ALIASES[split]:
        for ext in FORMATS:
            candidate = data_dir / f"{name}{ext}"
            if candidate.is_file():
                return _check_file(candidate)
    return None


def _check_file(path: Path) -> Path:
    if not path.exists():
        raise DataError(f"{path} does not exist; check the path")
    if path.is_dir():
        raise DataError(f"{path} is a directory, not a file; use --data-dir for a folder of split files")
    if path.suffix.lower() not in FORMATS:
        raise DataError(f"{path}: unsupported file type '{path.suffix}'; use one of {', '.join(FORMATS)}")
    if path.stat().st_size == 0:
        raise DataError(f"{path} is empty; it needs one example per row")
    return path


def read_records(path: Path) -> list[dict[str, Any]]:
    """Read raw records from a .jsonl, .json, .csv or .parquet file."""
    suffix = path.suffix.lower()
    if suffix == ".parquet":
        return _read_parquet(path)
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise DataError(f"{path} is not UTF-8 text (byte {err.start}); convert it to UTF-8") from None
    if "\x00" in text:
        raise DataError(f"{path} looks binary (NUL bytes), not {suffix[1:].upper()} text")
    if suffix == ".jsonl":
        return _parse_jsonl(text, path)
    if suffix == ".json":
        return _parse_json(text, path)
    return _parse_csv(text, path)


def _parse_jsonl(text: str, path: Path) -> list[dict[str, Any]]:
    records = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise DataError(f"{path}:{number}: not valid JSON ({err.msg}); fix or remove that line") from None
        if not isinstance(record, dict):
            raise DataError(f"{path}:{number}: expected a JSON object per line, got {type(record).__name__}")
        records.append(record)
    if not records:
        raise DataError(f"{path} has no examples")
    return records


def _parse_json(text: str, path: Path) -> list[dict[str, Any]]:
    try:
        data = json.loads(text)
    except json.JSONDecodeError as err:
        raise DataError(f"{path}:{err.lineno}: not valid JSON ({err.msg})") from None
    if isinstance(data, dict):  # {"data": [...]} or {"rows": [...]} or a column dict
        lists = [v for v in data.values() if isinstance(v, list)]
        if len(lists) == 1 and all(isinstance(r, dict) for r in lists[0]):
            data = lists[0]
        elif lists and all(isinstance(v, list) for v in data.values()):
            keys = list(data)
            data = [dict(zip(keys, values)) for values in zip(*data.values())]
    if not isinstance(data, list) or not all(isinstance(r, dict) for r in data):
        raise DataError(f"{path}: expected a list of objects (or JSON Lines in a .jsonl file)")
    if not data:
        raise DataError(f"{path} has no examples")
    return data


def _parse_csv(text: str, path: Path) -> list[dict[str, Any]]:
    csv.field_size_limit(1 << 30)
    try:
        reader = csv.DictReader(text.splitlines(keepends=True))
        records = [dict(row) for row in reader]
    except csv.Error as err:
        raise DataError(f"{path}:{reader.line_num}: bad CSV ({err})") from None
    if not records:
        raise DataError(f"{path} has a header but no examples")
    return records


def _read_parquet(path: Path) -> list[dict[str, Any]]:
    try:
        import pyarrow.parquet as pq

        return pq.read_table(path).to_pylist()
    except Exception as err:
        raise DataError(f"{path} is not a readable Parquet file ({type(err).__name__})") from None


def normalize_rows(records: Iterable[dict[str, Any]], cfg: DataConfig, source: str) -> SplitRows:
    """Map configured columns to id/document/summary; drop (and count) empty ones."""
    records = list(records)
    columns = list(records[0].keys()) if records else []
    missing = [c for c in (cfg.document_field, cfg.summary_field) if c not in columns]
    if missing:
        raise DataError(
            f"{source}: missing column(s) {', '.join(missing)}; found {', '.join(map(str, columns)) or 'none'}. "
            f"Name them with --document-field/--summary-field"
        )
    rows, dropped = [], 0
    for index, record in enumerate(records):
        try:
            document = check_text(record.get(cfg.document_field))
            summary = check_text(record.get(cfg.summary_field))
        except DataError as err:
            raise DataError(f"{source}: row {index + 1}: {err}") from None
        if document is None or summary is None:
            dropped += 1
            continue
        example_id = record.get(cfg.id_field)
        rows.append({"id": str(example_id) if example_id is not None else str(index), "document": document,
                     "summary": summary})  # fmt: skip
    if not rows:
        raise DataError(
            f"{source}: every example has an empty '{cfg.document_field}' or '{cfg.summary_field}', nothing is "
            f"left; fill them in or name the right columns with --document-field/--summary-field"
        )
    return SplitRows(rows, source, dropped)


def _load_hub_split(cfg: DataConfig, split: str, required: bool) -> SplitRows | None:
    """The real hub path: datasets.load_dataset(cfg.dataset, split=split)."""
    try:
        import datasets
    except ImportError:
        raise DataError("the 'datasets' package is needed for hub data: pip install datasets") from None
    try:
        loaded = datasets.load_dataset(cfg.dataset, split=split)
    except ValueError as err:
        if "split" in str(err).lower() and not required:
            return None
        raise _hub_error(cfg.dataset, err) from None
    except Exception as err:  # ConnectionError, OfflineModeIsEnabled, HfHubHTTPError, ...
        raise _hub_error(cfg.dataset, err) from None
    return normalize_rows(loaded, cfg, f"{cfg.dataset}[{split}]")


def _hub_error(dataset: str, err: Exception) -> HubUnreachableError:
    reason = str(err).splitlines()[0][:160] if str(err) else type(err).__name__
    return HubUnreachableError(
        f"could not load '{dataset}' from the Hugging Face hub ({reason}). "
        f"Offline? Use local files: --data-dir DIR with train.jsonl and validation.jsonl"
    )


def check_columns_config(cfg: DataConfig) -> None:
    if cfg.document_field == cfg.summary_field:
        raise ConfigError("--document-field and --summary-field must name different columns")
