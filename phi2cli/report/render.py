"""Rendering of a run summary: number formats, sections, and the table/markdown/json/html text.

Imports no torch and no transformers, so `phi2 report` starts instantly. The summary itself is
loaded and computed in phi2cli.report.summary, which re-exports render_report.

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
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Optional

from rich.console import Console, Group
from rich.table import Table
from rich.text import Text

if TYPE_CHECKING:  # annotations only: phi2cli.report.summary imports this module
    from phi2cli.report.summary import Analysis, RunSummary, Totals, TrainRow

FORMATS = ("table", "markdown", "json", "html")
MISSING = "—"
_EVAL_FIXED = ("eval_loss", "eval_runtime", "eval_samples_per_second")
_EVAL_NAMES = {"eval_loss": "Eval Loss", "eval_runtime": "Runtime (s)",
               "eval_samples_per_second": "Samples/s", "eval_steps_per_second": "Steps/s"}  # fmt: skip
_METRIC_ORDER = ("eval_loss", "perplexity", "rouge1", "rouge2", "rougeL", "rougeLsum", "mean_summary_words")
_METRIC_DECIMALS = {"perplexity": 2, "mean_summary_words": 1}
DEFAULT_ROWS = 10  # rows the training table shows without --every: enough to see the curve, short enough to read


@dataclass(frozen=True)
class Section:
    """One rendered table: the unit every text format is built from."""

    title: str
    headers: tuple[str, ...]
    rows: list[tuple[str, ...]]
    align: str = ""  # one of l/r per column; default right-aligns every column (numbers)
    caption: str = ""


def as_number(value: Any) -> Optional[float]:
    """A JSON number as float; bools, strings and nulls are not numbers."""
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def thin(rows: list[TrainRow], every: int) -> list[TrainRow]:
    """Rows whose step is a multiple of `every` (every <= 1 keeps all)."""
    return rows if every <= 1 else [r for r in rows if r.step % every == 0]


def pick_rows(rows: list[TrainRow], every: Optional[int] = None) -> list[TrainRow]:
    """Rows to show: multiples of `every` if given, else about DEFAULT_ROWS evenly spaced ones.

    The even pick takes every k-th logged row (at most DEFAULT_ROWS of them) from the first, plus the last.
    """
    if every is not None:
        return thin(rows, every)
    if len(rows) <= DEFAULT_ROWS:
        return rows
    stride = math.ceil((len(rows) - 1) / (DEFAULT_ROWS - 1))
    return [rows[i] for i in sorted({*range(0, len(rows), stride), len(rows) - 1})]


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


def report_sections(summary: RunSummary, every: Optional[int] = None) -> list[Section]:
    """The report as tables of formatted strings, in display order (`every`: see pick_rows)."""
    sections = []
    if summary.rows:
        shown = pick_rows(summary.rows, every)
        caption = "" if shown else f"no logged step is a multiple of {every}"
        if shown and every is None and len(shown) < len(summary.rows):
            caption = f"{len(shown)} of {len(summary.rows)} logged steps, evenly spaced; --every N shows multiples of N"
        rows = [(str(r.step), fmt_fixed(r.loss, 4), fmt_sci(r.learning_rate), fmt_fixed(r.grad_norm, 3),
                 fmt_fixed(r.epoch, 2)) for r in shown]  # fmt: skip
        headers = ("Step", "Training Loss", "Learning Rate", "Grad Norm", "Epoch")
        sections.append(Section("Training", headers, rows, caption=caption))
    if summary.evals:
        found = {k for e in summary.evals for k in e.metrics}  # a column nobody logged is left out, not dashed
        keys = [k for k in _EVAL_FIXED if k in found] + [k for e in summary.evals for k in e.metrics]
        keys = list(dict.fromkeys(keys))
        headers = ("Step", *(_EVAL_NAMES.get(k, k.removeprefix("eval_")) for k in keys))
        rows = [(str(e.step), *(_fmt_eval(k, e.metrics.get(k)) for k in keys)) for e in summary.evals]
        sections.append(Section("Evaluation", headers, rows))
    if summary.best is not None:
        best = summary.best
        rows = [("Checkpoint", best.checkpoint), ("Best metric", fmt_fixed(best.metric, 4)),
                ("Step", MISSING if best.step is None else str(best.step))]  # fmt: skip
        sections.append(Section("Best checkpoint", ("Item", "Value"), rows, align="ll"))
    if summary.run:
        sections.append(Section("Run", ("Item", "Value"), _run_rows(summary.run), align="ll"))
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


def _run_rows(run: dict[str, Any]) -> list[tuple[str, str]]:
    """Machine, profile, precision, peak memory, tokens/s and wall-time split, each only when recorded."""
    rows = []
    processes = run.get("processes")
    times = f" × {processes}" if processes and processes > 1 else ""
    if run.get("gpu") or run.get("device"):
        rows.append(("GPU" if run.get("gpu") else "Device", f"{run.get('gpu') or run['device']}{times}"))
    if run.get("profile"):
        rows.append(("Profile", str(run["profile"])))
    precision = [str(run[k]) for k in ("quantization", "compute_dtype") if run.get(k)]
    if precision:
        rows.append(("Precision", ", ".join(precision)))
    if run.get("peak_allocated_gib") is not None:
        reserved = run.get("peak_reserved_gib")
        rows.append(("Peak GPU memory", f"{run['peak_allocated_gib']:.2f} GiB"
                     + ("" if reserved is None else f" ({reserved:.2f} GiB reserved)")))  # fmt: skip
    if run.get("tokens_per_s") is not None:
        steady = run.get("steady_tokens_per_s")
        steady_text = "" if steady is None else f" (steady {steady:,.0f})"
        rows.append(("Tokens/s", f"{run['tokens_per_s']:,.0f}{steady_text}"))
    for key, value in _flat(run.get("timing") or {}):
        seconds = key.endswith(("_s", "seconds"))
        name = key.removesuffix("_seconds").removesuffix("_s").replace("_", " ")
        rows.append((f"Time: {name}", fmt_duration(value) + f" ({value:.1f} s)" if seconds else f"{value:g}"))
    return rows


def _flat(values: dict[str, Any], prefix: str = "") -> list[tuple[str, float]]:
    """(dotted key, number) pairs of a nested dict of numbers, in its order."""
    pairs: list[tuple[str, float]] = []
    for key, value in values.items():
        if isinstance(value, dict):
            pairs += _flat(value, f"{prefix}{key} / ")
        else:
            pairs.append((f"{prefix}{key}", float(value)))
    return pairs


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


def _decoding(settings: dict[str, Any]) -> str:
    """How the scored summaries were decoded, in a few words ("" where the metrics do not say)."""
    samples, beams = as_number(settings.get("mbr_samples")), as_number(settings.get("num_beams"))
    if samples:
        temperature = as_number(settings.get("mbr_temperature"))
        at = f" at temperature {temperature:g}" if temperature is not None else ""
        return f"greedy + {samples:g} samples{at}, minimum-Bayes-risk pick"
    if settings.get("do_sample"):
        return "sampling"
    if beams is not None:
        return f"beam search ({beams:g} beams)" if beams > 1 else "greedy"
    return ""


def _rouge_section(data: dict[str, Any]) -> Section:
    columns = [c for c in ("tuned", "base", "delta") if isinstance(data.get(c), dict)]
    keys = [k for k in _METRIC_ORDER if any(as_number(data[c].get(k)) is not None for c in columns)]
    keys += [k for c in columns for k, v in data[c].items() if k not in keys and as_number(v) is not None]
    keys = list(dict.fromkeys(keys))
    settings = data.get("settings") if isinstance(data.get("settings"), dict) else {}
    percent = "x 100" in str(settings.get("rouge", ""))  # phi2 evaluate says its scale; all-zero scores keep it

    def cell(column: str, key: str) -> str:
        value = as_number(data[column].get(key))
        if value is None:
            return MISSING
        scores = [abs(v) for c in columns if c != "delta" and (v := as_number(data[c].get(key))) is not None]
        # ROUGE of `phi2 evaluate` is F x 100 (2 decimals); a 0-1 fraction keeps 4; a loss always 4.
        on_100 = (scores and max(scores) >= 1) or (percent and key.startswith("rouge"))
        decimals = _METRIC_DECIMALS.get(key, 2 if key != "eval_loss" and on_100 else 4)
        return f"{value:{'+' if column == 'delta' else ''}.{decimals}f}"

    about = [f"{k}: {data[k]}" for k in ("model", "adapter", "split", "samples") if data.get(k) not in (None, "")]
    decoding = _decoding(settings)
    if decoding:
        about.append(f"decoding: {decoding}")
    rows = [(k, *(cell(c, k) for c in columns)) for k in keys]
    return Section("ROUGE (phi2 evaluate)", ("Metric", *(c.title() for c in columns)), rows, "l" + "r" * len(columns),
                   " · ".join(about))


def rich_report(summary: RunSummary, every: Optional[int] = None) -> Group:
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


def render_report(summary: RunSummary, fmt: str = "table", every: Optional[int] = None, width: int = 120) -> str:
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


def _markdown(summary: RunSummary, every: Optional[int]) -> str:
    def line(cells: tuple[str, ...]) -> str:
        return "| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |"

    out = [f"## Training report: `{summary.source}`", ""]
    for section in report_sections(summary, every):
        out += [f"### {section.title}", "", line(section.headers), "|" + "---|" * len(section.headers)]
        out += [line(row) for row in section.rows] + [""]
        out += [f"_{section.caption}_", ""] if section.caption else []
    out += [f"> {note}" for note in summary.notes]
    return "\n".join(out).rstrip() + "\n"


def _html(summary: RunSummary, every: Optional[int]) -> str:
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

