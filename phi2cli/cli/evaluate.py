"""`phi2 evaluate`: eval loss, perplexity and ROUGE of an adapter, optionally beside its base model."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Callable, Optional

import typer
from rich.table import Table

from phi2cli.cli.app import (
    DataDirOpt, DocFieldOpt, GenBatchOpt, IdFieldOpt, LengthPenaltyOpt, MaxNewTokensOpt, MbrSamplesOpt,
    MbrTemperatureOpt, MinNewTokensOpt, NoRepeatNgramOpt, NumBeamsOpt, SampleOpt, SeedOpt, ServerOpt, SumFieldOpt,
    TemperatureOpt, TestFileOpt, TopPOpt, ValFileOpt, command, console, data_overrides,
)  # fmt: skip
from phi2cli.inference.evaluation import DEFAULT_ADAPTER, DEFAULT_SAMPLES, METRIC_KEYS
from phi2cli.serving.client import Outcome

RunModelOpt = Annotated[Optional[str], typer.Option(
    "--model", "-m", help="Base model (hub id or path) instead of the one the run was trained on.", show_default=False)]
_DECIMALS = {"eval_loss": 4, "perplexity": 2, "mean_summary_words": 1}


def _cell(value: Any, key: str, signed: bool = False) -> str:
    if value is None:
        return "-"
    return f"{value:{'+' if signed else ''}.{_DECIMALS.get(key, 2)}f}"


def metrics_table(metrics: dict[str, Any]) -> Table:
    """Tuned (and base, delta) metrics, one row per metric."""
    columns = [c for c in ("tuned", "base", "delta") if isinstance(metrics.get(c), dict)]
    table = Table(title=f"phi2 evaluate: {metrics['split']} ({metrics['samples']} articles)")
    table.add_column("metric")
    for column in columns:
        table.add_column({"tuned": "tuned", "base": "base", "delta": "delta (tuned - base)"}[column], justify="right")
    for key in METRIC_KEYS:
        table.add_row(key, *(_cell(metrics[c].get(key), key, c == "delta") for c in columns))
    return table


def _tracker(progress: Any) -> Callable[[str, int], Callable[[int], None]]:
    def start(description: str, total: int) -> Callable[[int], None]:
        task = progress.add_task(description, total=total)
        return lambda n: progress.advance(task, n)

    return start


@command("evaluate")
def evaluate_command(
    adapter: Annotated[Path, typer.Option(
        "--adapter", "-a", help="Adapter directory written by 'phi2 train'.")] = Path(DEFAULT_ADAPTER),
    split: Annotated[str, typer.Option(
        "--split", help="Split to evaluate: validation or test.")] = "validation",
    samples: Annotated[int, typer.Option(
        "--samples", "-n", help="Articles to evaluate, a seeded sample (all when the split has fewer).")
    ] = DEFAULT_SAMPLES,
    data_file: Annotated[Optional[Path], typer.Option(
        "--file", help="Evaluate this JSONL/JSON/CSV/Parquet file (document/summary columns) instead.",
        show_default=False)] = None,
    compare_base: Annotated[bool, typer.Option(
        "--compare-base", help="Also score the base model (no adapter, same prompts) and show the differences.")
    ] = False,
    output: Annotated[Optional[Path], typer.Option(
        "--output", "-o", help="Where the metrics and predictions files go (default: the adapter directory).",
        show_default=False)] = None,
    model: RunModelOpt = None,
    dataset: Annotated[Optional[str], typer.Option(
        "--dataset", help="Hub dataset to evaluate on instead of the run's data.", show_default=False)] = None,
    data_dir: DataDirOpt = None,
    validation_file: ValFileOpt = None,
    test_file: TestFileOpt = None,
    document_field: DocFieldOpt = None,
    summary_field: SumFieldOpt = None,
    id_field: IdFieldOpt = None,
    seed: SeedOpt = None,
    max_new_tokens: MaxNewTokensOpt = None,
    num_beams: NumBeamsOpt = None,
    length_penalty: LengthPenaltyOpt = None,
    no_repeat_ngram_size: NoRepeatNgramOpt = None,
    min_new_tokens: MinNewTokensOpt = None,
    do_sample: SampleOpt = None,
    temperature: TemperatureOpt = None,
    top_p: TopPOpt = None,
    mbr_samples: MbrSamplesOpt = None,
    mbr_temperature: MbrTemperatureOpt = None,
    gen_batch_size: GenBatchOpt = None,
    server: ServerOpt = True,
) -> None:  # fmt: skip
    """Score an adapter: eval loss, perplexity, ROUGE-1/2/L/Lsum and summary length.

    Data comes from the run's saved source unless --file or a data flag is given.

    The loss is training's (same prompts, truncation and masking), averaged over every summary token.

    Each article gets a summary (the run's decoding settings unless flags change them; first line) scored with ROUGE (F x 100, stemmed).

    Writes metrics-SPLIT.json and predictions-SPLIT.jsonl (with --file: metrics-STEM.json...) to the adapter directory (or --output); each split or file keeps its own, a re-run replaces its own.

    With 'phi2 serve' running, the work goes to it (no libraries to import, no model to read) unless --no-server.
    """  # noqa: E501 (one line per paragraph: --help keeps line breaks)
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from phi2cli.inference.evaluation import EvaluateOptions, evaluate
    from phi2cli.cli.ui import err_console, load_line, note, served_line, warn

    overrides = data_overrides(
        model=model, dataset=dataset, data_dir=data_dir, validation_file=validation_file, test_file=test_file,
        document_field=document_field, summary_field=summary_field, id_field=id_field, seed=seed,
        max_new_tokens=max_new_tokens, num_beams=num_beams, do_sample=do_sample, temperature=temperature,
        top_p=top_p, gen_batch_size=gen_batch_size, length_penalty=length_penalty,
        no_repeat_ngram_size=no_repeat_ngram_size, min_new_tokens=min_new_tokens,
        mbr_samples=mbr_samples, mbr_temperature=mbr_temperature,
    )  # fmt: skip
    options = EvaluateOptions(
        adapter_dir=str(adapter), split=split, samples=samples, data_file=str(data_file) if data_file else None,
        output_dir=str(output) if output else None, compare_base=compare_base, gen_batch_size=gen_batch_size,
        overrides=overrides,
    )  # fmt: skip
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, console=err_console, transient=True) as progress:
        served = _served(options, progress) if server else Outcome(None)
        if served.result is not None:
            answer = served.result
            notes, metrics = answer["notes"], answer["metrics"]
            paths = answer["metrics_path"], answer["predictions_path"]
        else:
            if served.note:
                warn(served.note)
            result = evaluate(options, _tracker(progress))
            notes, metrics, paths = result.notes, result.metrics, (result.metrics_path, result.predictions_path)
    for message in notes:
        warn(message)
    console.print(metrics_table(metrics))
    timings = metrics["timings"]
    note(f"{load_line(timings['load_seconds'], timings['load_phases'])}, loss {timings['loss_seconds']:.1f} s, "
         f"generation {timings['generation_seconds']:.1f} s ({timings['generated_tokens_per_second']:.0f} tokens/s), "
         f"ROUGE {timings['scoring_seconds']:.1f} s, total {timings['total_seconds']:.1f} s"
         + (f"; {served_line(served.result['server'])}" if served.result else ""))  # fmt: skip
    console.print(f"Wrote [bold]{paths[0]}[/bold] and [bold]{paths[1]}[/bold]")


def _served(options: Any, progress: Any) -> Outcome:
    """evaluate's result from a running `phi2 serve`, its progress shown here (None result: there is none)."""
    import dataclasses

    from phi2cli.cli.ui import note_queued
    from phi2cli.serving.client import request

    tasks: dict[int, Any] = {}

    def listen(event: dict[str, Any]) -> None:
        if event["event"] == "task":
            tasks[event["id"]] = progress.add_task(event["description"], total=event["total"])
        elif event["event"] == "advance":
            progress.advance(tasks[event["id"]], event["n"])
        note_queued(event)

    return request("evaluate", {"options": dataclasses.asdict(options)}, listen)
