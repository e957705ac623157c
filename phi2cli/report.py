"""Training-run report: read a Trainer's trainer_state.json, summarise it, render it.

Imports no torch and no transformers, so `phi2 report` starts instantly.

One number format per kind, shared by every text format (table, markdown, html):
loss 4 decimals (2.3373), grad norm 3 decimals (0.616), epoch 2 decimals (0.80), learning rate
and FLOPs 3 significant digits in short scientific form (1.96e-4, 3.24e16), missing "—".
JSON carries the raw numbers instead.
"""

from __future__ import annotations

import html
import io
import json
import math
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Optional

from rich.console import Console, Group
from rich.table import Table
from rich.text import Text

from phi2cli.config import TrainConfig
from phi2cli.errors import RunError

FORMATS = ("table", "markdown", "json", "html")
STATE_FILE = "trainer_state.json"
METRICS_FILE = "metrics.json"
MISSING = "—"
_CHECKPOINT = re.compile(r"checkpoint-(\d+)$")
_TRAIN_KEYS = {"loss", "learning_rate", "grad_norm", "epoch", "step"}
_EVAL_FIXED = ("eval_loss", "eval_runtime", "eval_samples_per_second")
_EVAL_NAMES = {"eval_loss": "Eval Loss", "eval_runtime": "Runtime (s)",
               "eval_samples_per_second": "Samples/s", "eval_steps_per_second": "Steps/s"}  # fmt: skip
_METRIC_ORDER = ("eval_loss", "perplexity", "rouge1", "rouge2", "rougeL", "rougeLsum", "mean_summary_words")
_METRIC_DECIMALS = {"perplexity": 2, "mean_summary_words": 1}


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

    def to_dict(self, every: int = 1) -> dict[str, Any]:
        """Plain JSON-ready dict with raw numbers; non-finite values become null."""
        out = asdict(self)
        out["rows"] = [{**{k: v for k, v in asdict(r).items() if k != "extra"}, **r.extra}
                       for r in thin(self.rows, every)]  # fmt: skip
        out["evals"] = [{"step": e.step, "epoch": e.epoch, **e.metrics} for e in self.evals]
        return _finite(out)


@dataclass(frozen=True)
class Section:
    """One rendered table: the unit every text format is built from."""

    title: str
    headers: tuple[str, ...]
    rows: list[tuple[str, ...]]
    align: str = ""  # one of l/r per column; default right-aligns every column (numbers)
    caption: str = ""


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
    """metrics.json of `phi2 evaluate` beside the run, or None; unreadable files become notes."""
    state_dir = state_file.resolve().parent
    run_dir = state_dir.parent if _CHECKPOINT.match(state_dir.name) else state_dir
    candidates = [state_dir, state_dir.parent]
    if run_dir.name == TrainConfig().output_dir:  # the default layout keeps the final adapter beside the run
        candidates.append(run_dir.parent / TrainConfig().final_dir)
    for folder in dict.fromkeys(candidates):
        file = folder / METRICS_FILE
        if not file.is_file():
            continue
        try:
            data = json.loads(file.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError):
            return None, [f"{file} is not readable JSON; ROUGE table skipped"]
        if isinstance(data, dict) and any(isinstance(data.get(c), dict) for c in ("tuned", "base", "delta")):
            return {**data, "path": str(file)}, []
    return None, []


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
        if _num(entry.get("loss")) is not None:
            extra = {k: v for k, v in entry.items() if k not in _TRAIN_KEYS and _num(v) is not None}
            train[step] = TrainRow(step, float(entry["loss"]), _num(entry.get("learning_rate")),
                                   _num(entry.get("grad_norm")), _num(entry.get("epoch")), extra)  # fmt: skip
        metrics = {k: float(v) for k, v in entry.items() if k.startswith("eval_") and _num(v) is not None}
        if metrics:
            evals[step] = EvalRow(step, _num(entry.get("epoch")), metrics)
    rows, eval_rows = [train[s] for s in sorted(train)], [evals[s] for s in sorted(evals)]

    best = None
    checkpoint = state.get("best_model_checkpoint")
    if isinstance(checkpoint, str) and checkpoint:
        match = _CHECKPOINT.search(checkpoint.rstrip("/\\"))
        best_step = int(match.group(1)) if match else _int(state.get("best_global_step"))
        best = Best(checkpoint, _num(state.get("best_metric")), best_step)

    totals = Totals(
        global_step=_int(state.get("global_step")), max_steps=_int(state.get("max_steps")),
        epochs=_num(final.get("epoch", state.get("epoch"))), train_runtime=_num(final.get("train_runtime")),
        train_samples_per_second=_num(final.get("train_samples_per_second")),
        train_steps_per_second=_num(final.get("train_steps_per_second")), train_loss=_num(final.get("train_loss")),
        total_flos=_num(final.get("total_flos", state.get("total_flos"))),
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
    """Load a run (see load_trainer_state), summarise it and attach its metrics.json, if any."""
    state, state_file = load_trainer_state(path)
    metrics, notes = find_evaluate_metrics(state_file)
    summary = summarize_run(state, str(state_file), metrics)
    summary.notes.extend(notes)
    return summary


def thin(rows: list[TrainRow], every: int) -> list[TrainRow]:
    """Rows whose step is a multiple of `every` (every <= 1 keeps all)."""
    return rows if every <= 1 else [r for r in rows if r.step % every == 0]


def fmt_fixed(value: Optional[float], decimals: int) -> str:
    return MISSING if value is None else f"{value:.{decimals}f}"


def fmt_sci(value: Optional[float]) -> str:
    """3 significant digits, short exponent: 0.000196 -> '1.96e-4', 3.2418e16 -> '3.24e16'."""
    if value is None:
        return MISSING
    if value == 0 or not math.isfinite(value):
        return f"{value:g}"
    mantissa, exponent = f"{value:.2e}".split("e")
    return f"{mantissa}e{int(exponent)}"


def fmt_duration(seconds: float) -> str:
    minutes, secs = divmod(int(round(seconds)), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h {minutes:02d}m {secs:02d}s" if hours else f"{minutes}m {secs:02d}s"


def report_sections(summary: RunSummary, every: int = 1) -> list[Section]:
    """The report as tables of formatted strings, in display order."""
    sections = []
    if summary.rows:
        shown = thin(summary.rows, every)
        caption = "" if shown else f"no logged step is a multiple of {every}"
        rows = [(str(r.step), fmt_fixed(r.loss, 4), fmt_sci(r.learning_rate), fmt_fixed(r.grad_norm, 3),
                 fmt_fixed(r.epoch, 2)) for r in shown]  # fmt: skip
        headers = ("Step", "Training Loss", "Learning Rate", "Grad Norm", "Epoch")
        sections.append(Section("Training", headers, rows, caption=caption))
    if summary.evals:
        keys = list(_EVAL_FIXED) + [k for e in summary.evals for k in e.metrics if k not in _EVAL_FIXED]
        keys = list(dict.fromkeys(keys))
        headers = ("Step", *(_EVAL_NAMES.get(k, k.removeprefix("eval_")) for k in keys))
        rows = [(str(e.step), *(_fmt_eval(k, e.metrics.get(k)) for k in keys)) for e in summary.evals]
        sections.append(Section("Evaluation", headers, rows))
    if summary.best is not None:
        best = summary.best
        rows = [("Checkpoint", best.checkpoint), ("Best metric", fmt_fixed(best.metric, 4)),
                ("Step", MISSING if best.step is None else str(best.step))]  # fmt: skip
        sections.append(Section("Best checkpoint", ("Item", "Value"), rows, align="ll"))
    if totals := _totals_rows(summary.totals):
        sections.append(Section("Run totals", ("Item", "Value"), totals, align="ll"))
    if analysis := _analysis_rows(summary.analysis):
        sections.append(Section("Analysis", ("Measure", "Value"), analysis, align="ll"))
    if summary.evaluate_metrics:
        sections.append(_rouge_section(summary.evaluate_metrics))
    return sections


def _fmt_eval(key: str, value: Optional[float]) -> str:
    if key == "eval_loss":
        return fmt_fixed(value, 4)
    if value is None:
        return MISSING
    if key.endswith(("_runtime", "_per_second")):
        return f"{value:.0f}" if abs(value) >= 1000 else f"{value:.4g}"
    return str(int(value)) if value.is_integer() else f"{value:.4f}"  # num_tokens is a count, accuracy a fraction


def _totals_rows(t: Totals) -> list[tuple[str, str]]:
    of_max = f" of {t.max_steps}" if t.max_steps and t.max_steps > 0 else ""
    runtime = "" if t.train_runtime is None else f"{fmt_duration(t.train_runtime)} ({t.train_runtime:.1f} s)"
    rows = [("Steps", t.global_step, f"{t.global_step}{of_max}"), ("Epochs", t.epochs, fmt_fixed(t.epochs, 2)),
            ("Train runtime", t.train_runtime, runtime),
            ("Samples/s", t.train_samples_per_second, fmt_fixed(t.train_samples_per_second, 3)),
            ("Steps/s", t.train_steps_per_second, fmt_fixed(t.train_steps_per_second, 3)),
            ("Train loss (run mean)", t.train_loss, fmt_fixed(t.train_loss, 4)),
            ("Total FLOPs", t.total_flos, fmt_sci(t.total_flos))]  # fmt: skip
    return [(name, text) for name, value, text in rows if value is not None]


def _analysis_rows(a: Analysis) -> list[tuple[str, str]]:
    rows = []
    if a.loss_change is not None:
        pct = "" if a.loss_change_pct is None else f", {a.loss_change_pct:+.2f}%"
        rows.append(("Train loss change", f"{a.loss_first:.4f} → {a.loss_last:.4f} ({a.loss_change:+.4f}{pct})"))
    if a.grad_norm_min is not None:
        rows.append(("Grad norm range", f"{a.grad_norm_min:.3f} – {a.grad_norm_max:.3f}"))
    if a.lr_first is not None:
        pct = "" if a.lr_decay_pct is None else f" ({a.lr_decay_pct:.1f}% decayed)"
        rows.append(("Learning rate decay", f"{fmt_sci(a.lr_first)} → {fmt_sci(a.lr_last)}{pct}"))
    if a.train_eval_gap is not None:
        train_at = "" if a.gap_train_step == a.gap_step else f" at step {a.gap_train_step}"
        rows.append((f"Train–eval gap at step {a.gap_step}",
                     f"{a.train_eval_gap:+.4f} (eval {a.gap_eval_loss:.4f} − train {a.gap_train_loss:.4f}{train_at})"))
    return rows


def _rouge_section(data: dict[str, Any]) -> Section:
    columns = [c for c in ("tuned", "base", "delta") if isinstance(data.get(c), dict)]
    keys = [k for k in _METRIC_ORDER if any(_num(data[c].get(k)) is not None for c in columns)]
    keys += [k for c in columns for k, v in data[c].items() if k not in keys and _num(v) is not None]
    keys = list(dict.fromkeys(keys))

    def cell(column: str, key: str) -> str:
        value = _num(data[column].get(key))
        if value is None:
            return MISSING
        scores = [abs(v) for c in columns if c != "delta" and (v := _num(data[c].get(key))) is not None]
        # ROUGE of `phi2 evaluate` is F x 100 (2 decimals); a 0-1 fraction keeps 4; a loss always 4.
        decimals = _METRIC_DECIMALS.get(key, 2 if key != "eval_loss" and scores and max(scores) >= 1 else 4)
        return f"{value:{'+' if column == 'delta' else ''}.{decimals}f}"

    about = [f"{k}: {data[k]}" for k in ("model", "adapter", "split", "samples") if data.get(k) not in (None, "")]
    rows = [(k, *(cell(c, k) for c in columns)) for k in keys]
    return Section("ROUGE (phi2 evaluate)", ("Metric", *(c.title() for c in columns)), rows, "l" + "r" * len(columns),
                   " · ".join(about))


def rich_report(summary: RunSummary, every: int = 1) -> Group:
    """A rich renderable (Group of tables and notes) of the report."""
    parts: list[Any] = [Text(f"Run: {summary.source}", style="bold")]
    for section in report_sections(summary, every):
        table = Table(title=section.title, title_justify="left")
        for i, header in enumerate(section.headers):
            left = section.align[i:i + 1] == "l"
            table.add_column(header, justify="left" if left else "right", no_wrap=not left)
        for row in section.rows:
            table.add_row(*(Text(cell) for cell in row))  # Text: a path with [brackets] is not markup
        parts += [table, Text(section.caption, style="dim")] if section.caption else [table]
    parts.extend(Text(note, style="yellow") for note in summary.notes)
    return Group(*parts)


def render_report(summary: RunSummary, fmt: str = "table", every: int = 1, width: int = 120) -> str:
    """The report as text in one of FORMATS ('table' is plain text of the rich tables)."""
    if fmt == "json":
        return json.dumps({"every": every, **summary.to_dict(every)}, indent=2, allow_nan=False) + "\n"
    if fmt == "markdown":
        return _markdown(summary, every)
    if fmt == "html":
        return _html(summary, every)
    if fmt == "table":
        buffer = io.StringIO()
        Console(file=buffer, width=width, color_system=None, soft_wrap=False).print(rich_report(summary, every))
        return buffer.getvalue()
    raise ValueError(f"unknown format {fmt!r}; use one of {', '.join(FORMATS)}")


def _markdown(summary: RunSummary, every: int) -> str:
    def line(cells: tuple[str, ...]) -> str:
        return "| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |"

    out = [f"## Training report: `{summary.source}`", ""]
    for section in report_sections(summary, every):
        out += [f"### {section.title}", "", line(section.headers), "|" + "---|" * len(section.headers)]
        out += [line(row) for row in section.rows] + [""]
        out += [f"_{section.caption}_", ""] if section.caption else []
    out += [f"> {note}" for note in summary.notes]
    return "\n".join(out).rstrip() + "\n"


def _html(summary: RunSummary, every: int) -> str:
    esc = html.escape
    body = [f"<h1>Training report</h1>\n<p><code>{esc(summary.source)}</code></p>"]
    for section in report_sections(summary, every):
        head = "".join(f"<th>{esc(h)}</th>" for h in section.headers)
        rows = "".join("<tr>" + "".join(f"<td>{esc(c)}</td>" for c in row) + "</tr>\n" for row in section.rows)
        caption = f"<p class=\"caption\">{esc(section.caption)}</p>" if section.caption else ""
        body.append(f"<h2>{esc(section.title)}</h2>\n<table>\n<tr>{head}</tr>\n{rows}</table>{caption}")
    body += [f"<p class=\"note\">{esc(note)}</p>" for note in summary.notes]
    style = ("body{font-family:system-ui,sans-serif;margin:2em;color:#222}table{border-collapse:collapse;"
             "margin-bottom:1.5em}th,td{border:1px solid #ccc;padding:4px 10px;text-align:right}"
             "td:first-child,th:first-child{text-align:left}.note{color:#a60}.caption{color:#666}")  # fmt: skip
    return (f"<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n<title>phi2 report: "
            f"{esc(summary.source)}</title>\n<style>{style}</style>\n</head>\n<body>\n"
            + "\n".join(body) + "\n</body>\n</html>\n")  # fmt: skip


def _num(value: Any) -> Optional[float]:
    """A JSON number as float; bools, strings and nulls are not numbers."""
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def _int(value: Any) -> Optional[int]:
    number = _num(value)
    return int(number) if number is not None and math.isfinite(number) else None


def _finite(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_finite(v) for v in value]
    return value
