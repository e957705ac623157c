"""The Typer app, the error boundary and the option types shared by several commands."""

from __future__ import annotations

import functools
import os
import sys
import traceback
from pathlib import Path
from typing import Annotated, Any, Callable, Optional

import typer
from rich.console import Console

from phi2cli import __version__
from phi2cli.config import Phi2Config, build_config, field_default, field_help
from phi2cli.errors import Phi2Error

app = typer.Typer(
    name="phi2",
    help="Fine-tune microsoft/phi-2 for news summarization (XSUM) with QLoRA, then evaluate, "
    "summarize and report.\n\nTypical use: phi2 train --samples 5000; phi2 summarize article.txt; phi2 report",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
    rich_markup_mode=None,  # plain help: option names are never cut at 80 columns, flags show no <bool>
)

console = Console()
err_console = Console(stderr=True)
_DEBUG_ENV = "PHI2_DEBUG"


def _version(value: bool) -> None:
    if value:
        console.print(f"phi2cli {__version__}")
        raise typer.Exit()


@app.callback()
def root(
    debug: Annotated[bool, typer.Option("--debug", help="Show full Python tracebacks on errors.")] = False,
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version and exit.")
    ] = False,
) -> None:
    """Fine-tune phi-2 for XSUM summarization with QLoRA."""
    import logging

    # Library chatter (bitsandbytes' CPU kernel notice, peft hints) is not for our users.
    for name in ("bitsandbytes", "peft", "accelerate"):
        logging.getLogger(name).setLevel(logging.ERROR)
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    if debug:
        os.environ[_DEBUG_ENV] = "1"


def fail(message: str, exit_code: int = 1) -> typer.Exit:
    """Print one red line and return the Exit to raise."""
    from rich.markup import escape

    err_console.print(f"[bold red]Error:[/bold red] {escape(message)}", highlight=False, soft_wrap=True)
    return typer.Exit(exit_code)


def command(*args: Any, **kwargs: Any) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Register a command whose Phi2Errors become one red line and an exit code."""

    def decorate(fn: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(fn)
        def wrapper(*a: Any, **kw: Any) -> Any:
            debug = os.environ.get(_DEBUG_ENV) == "1"
            try:
                return fn(*a, **kw)
            except (typer.Exit, typer.Abort, typer.BadParameter):
                raise
            except Phi2Error as err:
                if debug:
                    traceback.print_exc()
                raise fail(str(err), err.exit_code) from None
            except KeyboardInterrupt:
                raise fail("interrupted", 130) from None
            except Exception as err:  # an unexpected bug: still one line unless --debug
                from phi2cli.io.files import disk_full

                if disk_full(err) and not debug:  # a writer we do not wrap ourselves found the disk full
                    where = getattr(err, "filename", None) or "the output"
                    raise fail(f"disk full while writing {where}; free space and run the command again") from None
                if debug:
                    traceback.print_exc()
                    raise fail(f"{type(err).__name__}: {err}") from None
                first = str(err).splitlines()[0] if str(err) else ""
                raise fail(f"{type(err).__name__}: {first} (run with 'phi2 --debug ...' for the traceback)") from None

        return app.command(*args, **kwargs)(wrapper)

    return decorate


def opt(dotted: str, *flags: str, **kwargs: Any) -> Any:
    """A typer.Option whose help is the config field's one-line reason."""
    default = field_default(dotted)
    shown = repr(",".join(default) if isinstance(default, tuple) else default)
    if isinstance(default, bool) and "/" in flags[0]:  # a --x/--no-x switch: name the one that is on
        shown = flags[0].split("/")[0 if default else 1]
    suffix = f" [default: {shown}]" if default is not None and "\n" not in shown else ""
    return typer.Option(*flags, help=field_help(dotted) + suffix, show_default=False, **kwargs)


# Options that several commands take, declared once.
ConfigOpt = Annotated[
    Optional[Path],
    typer.Option("--config", "-c", help="YAML or TOML config file; flags override it.", show_default=False),
]
ModelOpt = Annotated[Optional[str], opt("model.model", "--model", "-m")]
TokenizerOpt = Annotated[Optional[str], opt("model.tokenizer", "--tokenizer")]
QuantOpt = Annotated[Optional[str], opt("model.quantization", "--quantization", "-q")]
DtypeOpt = Annotated[Optional[str], opt("model.compute_dtype", "--compute-dtype")]
TemplateOpt = Annotated[Optional[str], opt("data.template", "--template")]
MaxLengthOpt = Annotated[Optional[int], opt("data.max_length", "--max-length")]
DatasetOpt = Annotated[Optional[str], opt("data.dataset", "--dataset")]
DataDirOpt = Annotated[Optional[str], opt("data.data_dir", "--data-dir")]
TrainFileOpt = Annotated[Optional[str], opt("data.train_file", "--train-file")]
ValFileOpt = Annotated[Optional[str], opt("data.validation_file", "--validation-file")]
TestFileOpt = Annotated[Optional[str], opt("data.test_file", "--test-file")]
DocFieldOpt = Annotated[Optional[str], opt("data.document_field", "--document-field")]
SumFieldOpt = Annotated[Optional[str], opt("data.summary_field", "--summary-field")]
IdFieldOpt = Annotated[Optional[str], opt("data.id_field", "--id-field")]
SamplesOpt = Annotated[Optional[int], opt("data.samples", "--samples", "-n")]
ValSamplesOpt = Annotated[Optional[int], opt("data.val_samples", "--val-samples")]
SeedOpt = Annotated[Optional[int], opt("data.seed", "--seed")]
LossOnOpt = Annotated[Optional[str], opt("data.loss_on", "--loss-on")]
MaxNewTokensOpt = Annotated[Optional[int], opt("generation.max_new_tokens", "--max-new-tokens")]
NumBeamsOpt = Annotated[Optional[int], opt("generation.num_beams", "--num-beams")]
LengthPenaltyOpt = Annotated[Optional[float], opt("generation.length_penalty", "--length-penalty")]
NoRepeatNgramOpt = Annotated[Optional[int], opt("generation.no_repeat_ngram_size", "--no-repeat-ngram-size")]
MinNewTokensOpt = Annotated[Optional[int], opt("generation.min_new_tokens", "--min-new-tokens")]
SampleOpt = Annotated[Optional[bool], opt("generation.do_sample", "--sample/--greedy")]
TemperatureOpt = Annotated[Optional[float], opt("generation.temperature", "--temperature")]
TopPOpt = Annotated[Optional[float], opt("generation.top_p", "--top-p")]
MbrSamplesOpt = Annotated[Optional[int], opt("generation.mbr_samples", "--mbr-samples")]
MbrTemperatureOpt = Annotated[Optional[float], opt("generation.mbr_temperature", "--mbr-temperature")]
GenBatchOpt = Annotated[Optional[int], opt("generation.batch_size", "--gen-batch-size")]
ServerOpt = Annotated[bool, typer.Option(
    "--server/--no-server", help="Hand the work to a running 'phi2 serve' (libraries and model already loaded) "
    "when there is one for this user and environment; --no-server always runs it here.")]  # fmt: skip


def data_overrides(**values: Any) -> dict[str, Any]:
    """Map the shared data option names to dotted config keys."""
    names = {
        "dataset": "data.dataset", "data_dir": "data.data_dir", "train_file": "data.train_file",
        "validation_file": "data.validation_file", "test_file": "data.test_file",
        "document_field": "data.document_field", "summary_field": "data.summary_field",
        "id_field": "data.id_field", "samples": "data.samples", "val_samples": "data.val_samples",
        "seed": "data.seed", "template": "data.template", "max_length": "data.max_length",
        "loss_on": "data.loss_on", "model": "model.model", "tokenizer": "model.tokenizer",
        "quantization": "model.quantization", "compute_dtype": "model.compute_dtype",
        "max_new_tokens": "generation.max_new_tokens", "num_beams": "generation.num_beams",
        "do_sample": "generation.do_sample", "temperature": "generation.temperature",
        "top_p": "generation.top_p", "gen_batch_size": "generation.batch_size",
        "length_penalty": "generation.length_penalty", "no_repeat_ngram_size": "generation.no_repeat_ngram_size",
        "min_new_tokens": "generation.min_new_tokens", "mbr_samples": "generation.mbr_samples",
        "mbr_temperature": "generation.mbr_temperature",
    }  # fmt: skip
    return {names[k]: v for k, v in values.items()}


def load_config(config_file: Optional[Path], overrides: dict[str, Any]) -> Phi2Config:
    """Defaults <- config file <- flags, validated (ConfigError -> exit code 2)."""
    return build_config(config_file, overrides)


def main() -> None:
    """Console entry point of `phi2`."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        app()
    except SystemExit as done:
        leave(done.code)
    leave(0)


def leave(code: Any) -> None:
    """Exit with `code` (SystemExit's: None, a number or a message); skip interpreter teardown once torch is in.

    Everything a command writes is closed by the time it returns, so what teardown would still do is
    free modules and CUDA memory: 1.4 s after importing torch, transformers and peft on a 2-core CPU,
    1.5-2.5 s after `phi2 summarize` or `evaluate` on the H200 machine (measured from the last output
    line to the process's exit). Without torch loaded (help, config, report) Python exits as usual.
    """
    if code is None:
        code = 0
    elif not isinstance(code, int):  # SystemExit("message"): Python prints it and exits with 1
        print(code, file=sys.stderr)
        code = 1
    if "torch" not in sys.modules:
        raise SystemExit(code)
    import logging

    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # a closed pipe or stream: nothing more can reach it
            pass
    os._exit(code)
