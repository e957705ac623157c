"""`phi2 summarize`: one-sentence summaries of articles with the fine-tuned adapter."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated, Any, List, Optional

import typer
from rich.markup import escape

from phi2cli.cli.app import (
    GenBatchOpt, LengthPenaltyOpt, MaxNewTokensOpt, MbrSamplesOpt, MbrTemperatureOpt, MinNewTokensOpt,
    NoRepeatNgramOpt, NumBeamsOpt, SampleOpt, ServerOpt, TemperatureOpt, TopPOpt, command, console,
    data_overrides,
)  # fmt: skip
from phi2cli.cli.evaluate import RunModelOpt
from phi2cli.errors import ConfigError
from phi2cli.inference.evaluation import DEFAULT_ADAPTER, Article, SummaryResult
from phi2cli.serving.client import Outcome


@command("summarize")
def summarize_command(
    inputs: Annotated[List[str], typer.Argument(
        help="Article .txt files, directories of .txt files, JSONL files, or '-' for standard input.",
        metavar="ARTICLES", show_default=False)],
    adapter: Annotated[Optional[Path], typer.Option(
        "--adapter", "-a", help=f"Adapter directory written by 'phi2 train' (default: {DEFAULT_ADAPTER}).",
        show_default=False)] = None,
    base_only: Annotated[bool, typer.Option(
        "--base-only", help="Use the base model without the adapter (from --model or the run's config).")] = False,
    document_field: Annotated[str, typer.Option(
        "--document-field", help="JSONL field that holds the article text.")] = "document",
    as_json: Annotated[bool, typer.Option(
        "--json", help="Print a JSON list of {source, summary} instead of text.")] = False,
    model: RunModelOpt = None,
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
    """Summarize news articles in one sentence, prompted exactly as in training.

    Uses the latest run's adapter (phi2-xsum-final/) unless --adapter or --base-only is given.

    A single article is streamed to the terminal as it is generated.

    Articles longer than the run's max length (minus --max-new-tokens) are truncated, with a note on stderr.

    With 'phi2 serve' running, the work goes to it (no libraries to import, no model to read) unless --no-server.

    Examples: phi2 summarize article.txt; cat article.txt | phi2 summarize -; phi2 summarize --json docs/
    """
    from phi2cli.inference.evaluation import read_articles, results_json, summarize
    from phi2cli.cli.ui import load_line, note, served_line, warn

    if base_only and adapter is not None:
        raise ConfigError(f"--base-only runs the model without an adapter, but --adapter {adapter} was given; "
                          f"drop one of them (the base model comes from --model or the run's config)")  # fmt: skip
    adapter = adapter or Path(DEFAULT_ADAPTER)
    overrides = data_overrides(model=model, max_new_tokens=max_new_tokens, num_beams=num_beams,
                               do_sample=do_sample, temperature=temperature, top_p=top_p,
                               gen_batch_size=gen_batch_size, length_penalty=length_penalty,
                               no_repeat_ngram_size=no_repeat_ngram_size, min_new_tokens=min_new_tokens,
                               mbr_samples=mbr_samples, mbr_temperature=mbr_temperature)  # fmt: skip
    articles = read_articles(inputs, document_field)
    stream = sys.stdout if len(articles) == 1 and not as_json and sys.stdout.isatty() else None
    timings: dict[str, Any] = {}
    served = _served(articles, adapter, base_only, overrides, gen_batch_size, stream) if server else Outcome(None)
    if served.result is not None:
        answer = served.result
        results = [SummaryResult(**r) for r in answer["results"]]
        notes, timings = answer["notes"], answer["timings"]
    else:
        if served.note:
            warn(served.note)
        results, notes = summarize(articles, adapter, base_only, overrides, gen_batch_size, stream=stream,
                                   timings=timings)  # fmt: skip
    for message in notes:
        note(message)
    note(f"{load_line(timings['load_seconds'], timings['load_phases'])}, "
         f"generation {timings['generation_seconds']:.1f} s"
         + (f"; {served_line(served.result['server'])}" if served.result else ""))  # fmt: skip
    if as_json:
        typer.echo(results_json(results))
    elif len(results) == 1:
        if stream is None:
            typer.echo(results[0].summary)
    else:
        for result in results:
            console.print(f"[bold]{escape(result.source)}[/bold]", highlight=False)
            typer.echo(result.summary)


def _served(articles: List[Article], adapter: Path, base_only: bool, overrides: dict[str, Any],
            gen_batch_size: Optional[int], stream: Any) -> Outcome:  # fmt: skip
    """The summaries from a running `phi2 serve` (its outcome says None when there is none to ask)."""
    from phi2cli.cli.ui import note_queued
    from phi2cli.serving.client import request

    def listen(event: dict[str, Any]) -> None:
        if event["event"] == "text" and stream is not None:
            stream.write(event["text"])
            stream.flush()
        note_queued(event)

    args = {"articles": [{"source": a.source, "text": a.text} for a in articles], "adapter": str(adapter),
            "base_only": base_only, "overrides": overrides, "gen_batch_size": gen_batch_size,
            "stream": stream is not None}  # fmt: skip
    return request("summarize", args, listen)
