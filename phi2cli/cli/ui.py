"""Terminal display helpers shared by the commands (rich progress bars, tables, warnings)."""

from __future__ import annotations

from typing import Any, Iterable, Iterator

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

console = Console()
err_console = Console(stderr=True)


def track(items: Iterable[Any], total: int, description: str) -> Iterator[Any]:
    """Iterate with a progress bar on stderr (hidden when stderr is not a terminal)."""
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
               TextColumn("eta"), TimeRemainingColumn())  # fmt: skip
    with Progress(*columns, console=err_console, transient=True) as progress:
        task = progress.add_task(description, total=total)
        for item in items:
            yield item
            progress.advance(task)


def warn(message: str) -> None:
    err_console.print(f"[yellow]Warning:[/yellow] {message}", highlight=False, soft_wrap=True)


def note(message: str) -> None:
    err_console.print(f"[dim]{message}[/dim]", highlight=False, soft_wrap=True)


def manifest_table(manifest: dict[str, Any]) -> Table:
    """Token-length statistics of a prepared dataset, one row per split and part."""
    table = Table(title=f"Prepared data ({manifest['source']}, seed {manifest['seed']}, loss on {manifest['loss_on']})")
    for name in ("split", "examples", "truncated", "part", "mean", "p50", "p95", "max"):
        table.add_column(name, justify="left" if name in ("split", "part") else "right")
    for split, stats in manifest["splits"].items():
        for index, part in enumerate(("prompt", "summary", "total")):
            tokens = stats["tokens"][part]
            head = (split, str(stats["examples"]), str(stats["truncated"])) if index == 0 else ("", "", "")
            table.add_row(*head, part, f"{tokens['mean']:.1f}", str(tokens["p50"]), str(tokens["p95"]),
                          str(tokens["max"]))  # fmt: skip
    return table


def _fmt(value: Any, spec: str, missing: str = "-") -> str:
    return missing if value is None else format(value, spec)


class TrainingDisplay:
    """Live training progress: step bar, epoch, loss, learning rate, tokens/s, ETA; eval lines as they come."""

    def __init__(self, out: Console) -> None:
        self.console = out
        self.progress = Progress(
            TextColumn("[bold]train[/bold]"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[info]}"),
            TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn(), console=out, transient=False,
        )  # fmt: skip
        self.task: Any = None
        self.shown: list[str] = []  # warnings already printed while training ran

    def __enter__(self) -> "TrainingDisplay":
        self.progress.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.progress.__exit__(*exc)

    def update(self, event: str, info: dict[str, Any]) -> None:
        if event == "begin":
            self.task = self.progress.add_task("train", total=info["max_steps"], completed=info["step"],
                                               info=info.get("waiting", ""))  # fmt: skip
        elif event == "step" and self.task is not None:
            text = (f"epoch {_fmt(info.get('epoch'), '.2f')}  loss {_fmt(info.get('loss'), '.4f')}  "
                    f"lr {_fmt(info.get('learning_rate'), '.2e')}  {info['tokens_per_s']:,.0f} tok/s")  # fmt: skip
            self.progress.update(self.task, completed=info["step"], info=text)
        elif event == "note":
            self.shown.append(info["message"])
            warn(info["message"])
        elif event == "info":  # what this run chose (e.g. the recipe by model size), not a warning
            note(info["message"])
        elif event == "eval":
            self.progress.console.print(
                f"  eval @ step {info['step']}: loss {info['eval_loss']:.4f}"
                + (f"  ({info['eval_runtime']:.1f} s)" if "eval_runtime" in info else "")
            )


def load_line(seconds: float, phases: dict[str, float]) -> str:
    """'load 8.5 s (libraries 5.1, model 2.6, adapter 0.8)': where a command's start-up went."""
    parts = ", ".join(f"{name} {t:.1f}" for name, t in phases.items())
    return f"load {seconds:.1f} s" + (f" ({parts})" if parts else "")


def note_queued(event: dict[str, Any]) -> None:
    """A served command's 'queued' event: say that it waits for the one the server is running."""
    if event["event"] == "queued":
        note(f"phi2 serve is busy ({event.get('busy')}); this command waits for it")


def served_line(server: dict[str, Any]) -> str:
    """'served by phi2 serve (pid 4242, model kept loaded)': who did the work of a command."""
    kept = "model kept loaded" if server.get("model_kept") else "model loaded for this command"
    return f"served by phi2 serve (pid {server['pid']}, {kept})"
