"""`phi2 export`: merge the adapter into its base model and save a standalone transformers model."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from phi2cli.cli.app import command, console
from phi2cli.cli.evaluate import RunModelOpt
from phi2cli.inference.evaluation import DEFAULT_ADAPTER
from phi2cli.io.export import DEFAULT_OUTPUT, EXPORT_DTYPES


def _dtype(value: str) -> str:
    if value not in EXPORT_DTYPES:
        raise typer.BadParameter(f"must be one of {', '.join(EXPORT_DTYPES)}")
    return value


@command("export")
def export_command(
    adapter: Annotated[Path, typer.Option(
        "--adapter", "-a", help="Adapter directory written by 'phi2 train'.")] = Path(DEFAULT_ADAPTER),
    output: Annotated[Path, typer.Option(
        "--output", "-o", help="Model directory to write (safetensors, tokenizer, README).")] = Path(DEFAULT_OUTPUT),
    dtype: Annotated[str, typer.Option(
        "--dtype", callback=_dtype, help="Weight dtype of the merged model: bfloat16, float16 or float32.")
    ] = "bfloat16",
    overwrite: Annotated[bool, typer.Option(
        "--overwrite", help="Replace the output directory if it is not empty.")] = False,
    model: RunModelOpt = None,
) -> None:  # fmt: skip
    """Merge the LoRA adapter into a full-precision copy of the base model and save it.

    The base is loaded unquantized (not 4-bit) so the merge is exact.

    The result loads with AutoModelForCausalLM.from_pretrained and needs no peft; prompt it with the run's template:

    phi2 summarize --base-only --model phi2-xsum-merged article.txt
    """
    from phi2cli.io.export import export_merged

    result = export_merged(adapter, output, dtype, overwrite, model)
    console.print(f"Merged [bold]{result.adapter_dir}[/bold] into {result.base_model} ({result.dtype}); "
                  f"saved to [bold]{result.output_dir}[/bold]: {', '.join(result.files)}")  # fmt: skip
