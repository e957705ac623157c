"""Loss curves of a training run: a PNG (matplotlib) and a compact terminal chart (sparklines).

matplotlib is imported inside write_loss_plot: only `--plot` pays for it.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Optional

from phi2cli.errors import ConfigError, RunError
from phi2cli.io.files import write_bytes_atomic
from phi2cli.report.summary import RunSummary, fmt_fixed, fmt_sci

BLOCKS = "▁▂▃▄▅▆▇█"


def sparkline(points: list[tuple[int, float]], steps: list[int], low: float, high: float) -> str:
    """One block character per column of `steps`; blank where a series has no point.

    Points falling on the same column are averaged; low/high fix the vertical scale so that
    several series drawn one under the other can be compared.
    """
    columns: dict[int, list[float]] = {}
    index = {step: i for i, step in enumerate(steps)}
    for step, value in points:
        columns.setdefault(index[step], []).append(value)
    chars = []
    for i in range(len(steps)):
        if i not in columns:
            chars.append(" ")
            continue
        value = sum(columns[i]) / len(columns[i])
        level = 0.5 if high == low else (value - low) / (high - low)
        chars.append(BLOCKS[min(len(BLOCKS) - 1, int(level * len(BLOCKS)))])
    return "".join(chars)


def terminal_chart(summary: RunSummary, width: int = 60) -> Optional[str]:
    """Train/eval loss (shared scale) and learning rate as sparklines over steps; None if nothing logged."""
    train = [(r.step, r.loss) for r in summary.rows]
    evals = [(e.step, e.metrics["eval_loss"]) for e in summary.evals if "eval_loss" in e.metrics]
    rates = [(r.step, r.learning_rate) for r in summary.rows if r.learning_rate is not None]
    all_steps = sorted({s for s, _ in train + evals})
    if not all_steps:
        return None
    # Map every step to one of at most `width` columns, spread over the step range.
    first, last = all_steps[0], all_steps[-1]
    columns = min(width, len(all_steps))
    column_of = {s: 0 if last == first else round((s - first) / (last - first) * (columns - 1)) for s in all_steps}
    grid = list(range(columns))

    def line(points: list[tuple[int, float]], low: float, high: float) -> str:
        return sparkline([(column_of[s], v) for s, v in points], grid, low, high)

    losses = [v for _, v in train + evals]
    low, high = min(losses), max(losses)
    out = [f"Loss over steps {first}–{last} (scale {low:.4f}–{high:.4f})"]
    if train:
        out.append(f"  train {line(train, low, high)}  {_ends(train, fmt_fixed)}")
    if evals:
        out.append(f"  eval  {line(evals, low, high)}  {_ends(evals, fmt_fixed)}")
    if len(rates) >= 2:
        lr_values = [v for _, v in rates]
        out.append(f"  lr    {line(rates, min(lr_values), max(lr_values))}  {_ends(rates, lambda v, _: fmt_sci(v))}")
    return "\n".join(out)


def _ends(points: list[tuple[int, float]], fmt) -> str:
    first, last = fmt(points[0][1], 4), fmt(points[-1][1], 4)
    return first if len(points) == 1 else f"{first} → {last}"


def write_loss_plot(summary: RunSummary, path: Path) -> Path:
    """Write training and eval loss (left axis) and learning rate (right axis) over steps.

    Args:
        summary: the run, from report.build_report.
        path: output image; the suffix picks the format (.png, .svg, .pdf; none = PNG).
    Returns:
        The path written (atomically: an interrupted write leaves no half image).
    Raises:
        ConfigError: unsupported image suffix.
        RunError: nothing logged to plot yet.
        Phi2Error: the file cannot be written.
    """
    from matplotlib.figure import Figure  # a Figure without pyplot renders with Agg, no GUI backend

    path = Path(path)
    image_format = path.suffix.lstrip(".").lower() or "png"
    fig = Figure(figsize=(8, 4.5), dpi=120)
    if image_format not in fig.canvas.get_supported_filetypes():
        raise ConfigError(f"cannot write a .{image_format} plot; use a .png, .svg or .pdf file name for --plot")
    evals = [(e.step, e.metrics["eval_loss"]) for e in summary.evals if "eval_loss" in e.metrics]
    if not summary.rows and not evals:
        raise RunError(f"nothing to plot: {summary.source} has no logged loss yet; run 'phi2 report' without --plot")

    ax = fig.add_subplot()
    handles = []
    if summary.rows:
        handles += ax.plot([r.step for r in summary.rows], [r.loss for r in summary.rows],
                           marker="o", markersize=3, color="tab:blue", label="train loss")  # fmt: skip
    if evals:
        handles += ax.plot(*zip(*evals), marker="s", color="tab:orange", label="eval loss")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.grid(alpha=0.3)
    rates = [(r.step, r.learning_rate) for r in summary.rows if r.learning_rate is not None]
    if rates:
        lr_axis = ax.twinx()
        handles += lr_axis.plot(*zip(*rates), linestyle="--", color="tab:green", label="learning rate")
        lr_axis.set_ylabel("learning rate")
        lr_axis.ticklabel_format(axis="y", style="sci", scilimits=(0, 0))
        ax.set_zorder(lr_axis.get_zorder() + 1)  # keep loss markers above the dashed lr line
        ax.patch.set_visible(False)
    ax.legend(handles=handles, loc="upper right")
    ax.set_title(f"Training run: {'/'.join(Path(summary.source).parts[-3:-1]) or summary.source}")
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format=image_format)
    return write_bytes_atomic(path, buffer.getvalue())
