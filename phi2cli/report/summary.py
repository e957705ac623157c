"""Training-run report: read a Trainer's trainer_state.json and summarise it.

Imports no torch and no transformers, so `phi2 report` starts instantly. Rendering (number
formats, table/markdown/json/html) lives in phi2cli.report.render; render_report, rich_report
and the formatters are re-exported here so callers import the whole report from one place.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Optional

from phi2cli.config import RUN_CONFIG_NAME, TrainConfig
from phi2cli.errors import RunError
from phi2cli.io.checkpoints import CHECKPOINT_RE
from phi2cli.report.render import as_number, thin
from phi2cli.report.render import fmt_fixed, fmt_sci, render_report, rich_report  # noqa: F401 (re-exported)

STATE_FILE = "trainer_state.json"
METRICS_GLOB = "metrics*.json"  # metrics-SPLIT.json / metrics-STEM.json of `phi2 evaluate` (metrics.json before)
_CHECKPOINT = CHECKPOINT_RE
_TRAIN_KEYS = {"loss", "learning_rate", "grad_norm", "epoch", "step"}


@dataclass(frozen=True)
class TrainRow:
    step: int
    loss: float
    learning_rate: Optional[float]
    grad_norm: Optional[float]
    epoch: Optional[float]
    extra: dict[str, float] = field(default_factory=dict)  # what TRL adds: mean_token_accuracy, num_tokens, ...


@dataclass(frozen=True)
class EvalRow:
    step: int
    epoch: Optional[float]
    metrics: dict[str, float]  # every numeric eval_* value of the entry, eval_loss included


@dataclass(frozen=True)
class Best:
    checkpoint: str
    metric: Optional[float]
    step: Optional[int]


@dataclass(frozen=True)
class Totals:
    global_step: Optional[int] = None
    max_steps: Optional[int] = None
    epochs: Optional[float] = None
    train_runtime: Optional[float] = None
    train_samples_per_second: Optional[float] = None
    train_steps_per_second: Optional[float] = None
    train_loss: Optional[float] = None  # the Trainer's mean loss over the whole run
    total_flos: Optional[float] = None


@dataclass(frozen=True)
class Analysis:
    loss_first: Optional[float] = None
    loss_last: Optional[float] = None
    loss_change: Optional[float] = None
    loss_change_pct: Optional[float] = None
    grad_norm_min: Optional[float] = None
    grad_norm_max: Optional[float] = None
    lr_first: Optional[float] = None
    lr_last: Optional[float] = None
    lr_decay_pct: Optional[float] = None
    gap_step: Optional[int] = None
    gap_eval_loss: Optional[float] = None
    gap_train_loss: Optional[float] = None
    gap_train_step: Optional[int] = None
    train_eval_gap: Optional[float] = None  # eval loss minus train loss; > 0 means over-fitting


@dataclass
class RunSummary:
    source: str
    rows: list[TrainRow]
    evals: list[EvalRow]
    best: Optional[Best]
    totals: Totals
    analysis: Analysis
    evaluate_metrics: Optional[dict[str, Any]] = None  # metrics.json written by `phi2 evaluate`
    notes: list[str] = field(default_factory=list)
    run: Optional[dict[str, Any]] = None  # machine, profile, memory, speed from the run's phi2_run.json

    def to_dict(self, every: Optional[int] = None) -> dict[str, Any]:
        """Plain JSON-ready dict with raw numbers; non-finite values become null.

        Every logged row unless `every` picks multiples of it (machines read the whole history).
        """
        out = asdict(self)
        out["rows"] = [{**{k: v for k, v in asdict(r).items() if k != "extra"}, **r.extra}
                       for r in (self.rows if every is None else thin(self.rows, every))]  # fmt: skip
        out["evals"] = [{"step": e.step, "epoch": e.epoch, **e.metrics} for e in self.evals]
        return _finite(out)


def load_trainer_state(path: Optional[Path] = None) -> tuple[dict[str, Any], Path]:
    """Read the trainer state of a run.

    Args:
        path: run directory, checkpoint directory or trainer_state.json; None = ./phi2-xsum-finetuned.
    Returns:
        (state dict, path of the file read). A directory gives its top-level trainer_state.json,
        unless a checkpoint-N newer than it exists (a resumed run), else its newest checkpoint's.
    Raises:
        RunError: missing path, no state file, empty file, not JSON, or no log_history.
    """
    if path is None:
        path = Path(TrainConfig().output_dir)
        if not path.exists():
            raise RunError(f"no run found at ./{path}; train one with 'phi2 train', or pass a run directory, "
                           "a checkpoint directory or a trainer_state.json: phi2 report PATH")  # fmt: skip
    path = Path(path)
    if not path.exists():
        raise RunError(f"{path} does not exist; pass a run directory, a checkpoint directory or a {STATE_FILE} file")
    if path.is_file():
        return _read_state(path), path
    top, newest = path / STATE_FILE, _newest_checkpoint(path)
    if top.is_file():
        state = _read_state(top)
        if newest is None or newest[0] <= (_int(state.get("global_step")) or 0):
            return state, top
    if newest is not None:
        return _read_state(newest[1]), newest[1]
    raise RunError(f"no {STATE_FILE} in {path} or its checkpoint-N folders; pass a run directory written by "
                   f"'phi2 train', a checkpoint directory or a {STATE_FILE} file")  # fmt: skip


def _newest_checkpoint(run_dir: Path) -> Optional[tuple[int, Path]]:
    found = [(int(m.group(1)), d / STATE_FILE) for d in run_dir.iterdir()
             if (m := _CHECKPOINT.match(d.name)) and (d / STATE_FILE).is_file()]  # fmt: skip
    return max(found) if found else None


def _read_state(file: Path) -> dict[str, Any]:
    try:
        text = file.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        reason = getattr(err, "strerror", None) or str(err)
        raise RunError(f"cannot read {file}: {reason}; pass a readable {STATE_FILE}") from None
    if not text.strip():
        raise RunError(f"{file} is empty (was the run stopped while saving?); pass an earlier checkpoint directory")
    try:
        state = json.loads(text)
    except json.JSONDecodeError as err:
        raise RunError(f"{file} is not valid JSON ({err.msg}, line {err.lineno}); "
                       f"pass a {STATE_FILE} written by the Hugging Face Trainer") from None  # fmt: skip
    if not isinstance(state, dict) or not isinstance(state.get("log_history"), list):
        raise RunError(f"{file} has no 'log_history' list, so it is not a Trainer state file; "
                       f"pass a run or checkpoint directory, or its {STATE_FILE}")  # fmt: skip
    return state


def find_evaluate_metrics(state_file: Path) -> tuple[Optional[dict[str, Any]], list[str]]:
    """The newest metrics file of `phi2 evaluate` beside the run, or None; the others and unreadable ones
    become notes."""
    state_dir = state_file.resolve().parent
    run_dir = state_dir.parent if _CHECKPOINT.match(state_dir.name) else state_dir
    candidates = [state_dir, state_dir.parent]
    if run_dir.name == TrainConfig().output_dir:  # the default layout keeps the final adapter beside the run
        candidates.append(run_dir.parent / TrainConfig().final_dir)
    for folder in dict.fromkeys(candidates):
        files = sorted((f for f in folder.glob(METRICS_GLOB) if f.is_file()), key=_modified, reverse=True)
        if not files:
            continue
        newest, others = files[0], [f.name for f in files[1:]]
        also = [f"also in {folder}: {', '.join(others)} (this report shows the newest, {newest.name})"] if others else []
        try:
            data = json.loads(newest.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError):
            return None, [f"{newest} is not readable JSON; ROUGE table skipped", *also]
        if isinstance(data, dict) and any(isinstance(data.get(c), dict) for c in ("tuned", "base", "delta")):
            return {**data, "path": str(newest)}, also
    return None, []


def _modified(file: Path) -> float:
    try:
        return file.stat().st_mtime
    except OSError:
        return 0.0


def find_run_facts(state_file: Path) -> tuple[Optional[dict[str, Any]], list[str]]:
    """The Run section's facts from phi2_run.json of the run the state belongs to, or None."""
    state_dir = state_file.resolve().parent
    run_dir = state_dir.parent if _CHECKPOINT.match(state_dir.name) else state_dir
    file = run_dir / RUN_CONFIG_NAME
    if not file.is_file():
        return None, []
    try:
        body = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None, [f"{file} is not readable JSON; Run section skipped"]
    return (run_facts(body) or None) if isinstance(body, dict) else None, []


def run_facts(body: dict[str, Any]) -> dict[str, Any]:
    """What a reader wants of a run's phi2_run.json: machine, profile, memory, speed, wall-time split.

    Only keys present in the file (older runs, or a run still going, lack some); the wall-time split
    ('timing') is kept as written, numbers only.
    """

    def part(name: str) -> dict[str, Any]:
        value = body.get(name)
        return value if isinstance(value, dict) else {}

    precision, plan, memory, throughput = part("precision"), part("plan"), part("memory"), part("throughput")
    timing = _numbers(part("timing"))
    facts = {"gpu": body.get("gpu") if isinstance(body.get("gpu"), str) else None,
             "device": precision.get("device"), "processes": _int(plan.get("world_size")),
             "profile": plan.get("profile"), "quantization": precision.get("quantization"),
             "compute_dtype": precision.get("compute_dtype"),
             "peak_allocated_gib": as_number(memory.get("peak_allocated_gib")),
             "peak_reserved_gib": as_number(memory.get("peak_reserved_gib")),
             "tokens_per_s": as_number(throughput.get("tokens_per_s")),
             "steady_tokens_per_s": as_number(throughput.get("steady_tokens_per_s")), "timing": timing}  # fmt: skip
    return {k: v for k, v in facts.items() if v not in (None, "", {})}


def summarize_run(state: dict[str, Any], source: str = "", evaluate_metrics: Optional[dict] = None) -> RunSummary:
    """Training rows, eval rows, best checkpoint, totals and analysis of a trainer state.

    Resumed runs log some steps twice: the last entry per step wins; rows are sorted by step.
    """
    train: dict[int, TrainRow] = {}
    evals: dict[int, EvalRow] = {}
    final: dict[str, Any] = {}
    for entry in state.get("log_history") or []:
        if not isinstance(entry, dict):
            continue
        if "train_runtime" in entry:
            final = entry  # the summary the Trainer logs when train() returns
            continue
        step = _int(entry.get("step"))
        if step is None:
            continue
        if as_number(entry.get("loss")) is not None:
            extra = {k: v for k, v in entry.items() if k not in _TRAIN_KEYS and as_number(v) is not None}
            train[step] = TrainRow(step, float(entry["loss"]), as_number(entry.get("learning_rate")),
                                   as_number(entry.get("grad_norm")), as_number(entry.get("epoch")), extra)  # fmt: skip
        metrics = {k: float(v) for k, v in entry.items() if k.startswith("eval_") and as_number(v) is not None}
        if metrics:
            evals[step] = EvalRow(step, as_number(entry.get("epoch")), metrics)
    rows, eval_rows = [train[s] for s in sorted(train)], [evals[s] for s in sorted(evals)]

    best = None
    checkpoint = state.get("best_model_checkpoint")
    if isinstance(checkpoint, str) and checkpoint:
        match = _CHECKPOINT.search(checkpoint.rstrip("/\\"))
        best_step = int(match.group(1)) if match else _int(state.get("best_global_step"))
        best = Best(checkpoint, as_number(state.get("best_metric")), best_step)

    totals = Totals(
        global_step=_int(state.get("global_step")), max_steps=_int(state.get("max_steps")),
        epochs=as_number(final.get("epoch", state.get("epoch"))), train_runtime=as_number(final.get("train_runtime")),
        train_samples_per_second=as_number(final.get("train_samples_per_second")),
        train_steps_per_second=as_number(final.get("train_steps_per_second")),
        train_loss=as_number(final.get("train_loss")),
        total_flos=as_number(final.get("total_flos", state.get("total_flos"))),
    )  # fmt: skip
    notes = []
    if not rows and not eval_rows:
        every = _int(state.get("logging_steps"))
        when = f" (the Trainer logs every {every} steps)" if every else ""
        notes.append(f"log_history is empty: nothing logged yet{when}")
    elif not rows:
        notes.append("no training loss logged: this history holds evaluation entries only")
    elif not eval_rows:
        notes.append("no evaluation logged: this run did not evaluate")
    return RunSummary(source, rows, eval_rows, best, totals, analyze(rows, eval_rows, best), evaluate_metrics, notes)


def analyze(rows: list[TrainRow], evals: list[EvalRow], best: Optional[Best]) -> Analysis:
    """Loss change first→last, grad-norm range, learning-rate decay, train–eval gap at the best step."""
    out: dict[str, Any] = {}
    if len(rows) >= 2:
        first, last = rows[0].loss, rows[-1].loss
        out.update(loss_first=first, loss_last=last, loss_change=last - first,
                   loss_change_pct=(last - first) / first * 100 if first else None)  # fmt: skip
    norms = [r.grad_norm for r in rows if r.grad_norm is not None and math.isfinite(r.grad_norm)]
    if norms:
        out.update(grad_norm_min=min(norms), grad_norm_max=max(norms))
    rates = [r.learning_rate for r in rows if r.learning_rate is not None]
    if len(rates) >= 2:
        out.update(lr_first=rates[0], lr_last=rates[-1],
                   lr_decay_pct=(rates[0] - rates[-1]) / rates[0] * 100 if rates[0] else None)  # fmt: skip
    with_loss = [e for e in evals if "eval_loss" in e.metrics]
    if best is not None and best.step is not None:
        at_best = [e for e in with_loss if e.step == best.step]
    else:  # no best checkpoint recorded: the lowest eval loss stands in for it
        at_best = sorted(with_loss, key=lambda e: e.metrics["eval_loss"])[:1]
    before = [r for r in rows if at_best and r.step <= at_best[0].step]
    if at_best and before:
        eval_loss, train_row = at_best[0].metrics["eval_loss"], before[-1]
        out.update(gap_step=at_best[0].step, gap_eval_loss=eval_loss, gap_train_loss=train_row.loss,
                   gap_train_step=train_row.step, train_eval_gap=eval_loss - train_row.loss)  # fmt: skip
    return Analysis(**out)


def build_report(path: Optional[Path] = None) -> RunSummary:
    """Load a run (see load_trainer_state), summarise it, attach its newest evaluation metrics and phi2_run.json facts."""
    state, state_file = load_trainer_state(path)
    metrics, notes = find_evaluate_metrics(state_file)
    summary = summarize_run(state, str(state_file), metrics)
    summary.run, run_notes = find_run_facts(state_file)
    summary.notes.extend(notes + run_notes)
    return summary


def _numbers(values: dict[str, Any]) -> dict[str, Any]:
    """The numbers of a dict, nested dicts kept (their numbers only); text and lists dropped."""
    out: dict[str, Any] = {}
    for key, value in values.items():
        if isinstance(value, dict):
            if inner := _numbers(value):
                out[key] = inner
        elif as_number(value) is not None:
            out[key] = value
    return out


def _int(value: Any) -> Optional[int]:
    number = as_number(value)
    return int(number) if number is not None and math.isfinite(number) else None


def _finite(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_finite(v) for v in value]
    return value
