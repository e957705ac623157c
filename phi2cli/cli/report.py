"""`phi2 report`: tables, analysis and loss curves of a training run, from its trainer_state.json."""

from __future__ import annotations

from enum import Enum
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.text import Text

from phi2cli.cli.app import command, console, err_console
from phi2cli.io.files import write_text_atomic
from phi2cli.report.plots import terminal_chart, write_loss_plot
from phi2cli.report.summary import build_report, render_report, rich_report


class ReportFormat(str, Enum):
    table = "table"
    markdown = "markdown"
    json = "json"
    html = "html"


@command("report")
def report_command(
    path: Annotated[
        Optional[Path],
        typer.Argument(help="Run directory, checkpoint-N directory or trainer_state.json "
                       "(default: ./phi2-xsum-finetuned).", show_default=False, metavar="PATH"),  # fmt: skip
    ] = None,
    output_format: Annotated[
        ReportFormat, typer.Option("--format", "-f", help="table (terminal), markdown, json (raw numbers) or html.")
    ] = ReportFormat.table,
    every: Annotated[
        Optional[int],
        typer.Option("--every", min=1, show_default=False, metavar="N",
                     help="Show the training steps that are multiples of N (default: about ten evenly spaced "
                     "rows, first and last included; json: all). The analysis always uses every row."),  # fmt: skip
    ] = None,
    plot: Annotated[
        Optional[Path],
        typer.Option("--plot", help="Write train/eval loss and learning rate over steps to this image (.png).",
                     show_default=False),  # fmt: skip
    ] = None,
    chart: Annotated[
        bool, typer.Option("--chart/--no-chart", help="Print a small loss chart below the table (table format only).")
    ] = True,
    output: Annotated[
        Optional[Path],
        typer.Option("--output", "-o", help="Write the report to this file instead of the terminal.",
                     show_default=False),  # fmt: skip
    ] = None,
) -> None:
    """Report a training run: loss table, evaluations, best checkpoint, run facts, totals and analysis.

    Reads PATH or ./phi2-xsum-finetuned (top-level trainer_state.json, else the newest checkpoint-N).

    Adds a Run section (GPU, profile, peak memory, tokens/s, wall-time split) from the run's
    phi2_run.json, and the ROUGE table of 'phi2 evaluate' when its metrics files sit beside the run
    (the newest; the others are named).

    Example: phi2 report --every 100 --format markdown --plot loss.png
    """
    summary = build_report(path)
    if output_format is ReportFormat.table and output is None:
        console.print(rich_report(summary, every))
        text = terminal_chart(summary) if chart and plot is None else None
        if text:
            console.print(Text(text))
    else:
        report = render_report(summary, output_format.value, every)
        if output is None:
            typer.echo(report, nl=False)
        else:
            write_text_atomic(output, report)
            err_console.print(Text(f"Wrote {output}"))
    if plot is not None:
        write_loss_plot(summary, plot)
        err_console.print(Text(f"Wrote {plot}"))
