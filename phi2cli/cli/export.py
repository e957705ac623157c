"""`phi2 export`: merge the adapter into its base model and save a standalone transformers model or GGUF file."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from phi2cli.cli.app import command, console
from phi2cli.cli.evaluate import RunModelOpt
from phi2cli.inference.evaluation import DEFAULT_ADAPTER
from phi2cli.io.export import DEFAULT_OUTPUT, EXPORT_DTYPES, EXPORT_FORMATS
from phi2cli.io.gguf_export import GGUF_TYPES


def _choice(allowed: tuple[str, ...]):  # noqa: ANN202
    def check(value: str) -> str:
        if value not in allowed:
            raise typer.BadParameter(f"must be one of {', '.join(allowed)}")
        return value

    return check


_dtype = _choice(EXPORT_DTYPES)


@command("export")
def export_command(
    adapter: Annotated[Path, typer.Option(
        "--adapter", "-a", help="Adapter directory written by 'phi2 train'.")] = Path(DEFAULT_ADAPTER),
    output: Annotated[Optional[Path], typer.Option(
        "--output", "-o", help=f"Model directory to write (safetensors, tokenizer, README), {DEFAULT_OUTPUT} by default; with "
        f"--format gguf the .gguf file, {DEFAULT_OUTPUT}-GGUF_TYPE.gguf by default.", show_default=False)] = None,
    export_format: Annotated[str, typer.Option(
        "--format", callback=_choice(EXPORT_FORMATS),
        help="hf: a transformers directory; gguf: one .gguf file for llama.cpp/Ollama plus a .Modelfile beside it.")
    ] = "hf",
    gguf_type: Annotated[str, typer.Option(
        "--gguf-type", callback=_choice(GGUF_TYPES), help="GGUF matrix type: q8_0 or f16 (vectors stay f32).")
    ] = "q8_0",
    dtype: Annotated[str, typer.Option(
        "--dtype", callback=_dtype, help="Weight dtype of the merged model (hf format): bfloat16, float16 or float32.")
    ] = "bfloat16",
    overwrite: Annotated[bool, typer.Option(
        "--overwrite", help="Replace the output directory (or .gguf and .Modelfile) if it exists.")] = False,
    model: RunModelOpt = None,
) -> None:  # fmt: skip
    """Merge the LoRA adapter into a full-precision copy of the base model and save it.

    The base is loaded unquantized (not 4-bit) so the merge is exact.

    The result loads with AutoModelForCausalLM.from_pretrained and needs no peft; prompt it with the run's template:

    phi2 summarize --base-only --model phi2-xsum-merged article.txt

    With --format gguf (phi-2, Llama-family and Qwen2 models) it writes one .gguf file and an Ollama Modelfile:

    llama-cli -m phi2-xsum-merged-q8_0.gguf; ollama create phi2-xsum -f phi2-xsum-merged-q8_0.Modelfile
    """
    from phi2cli.io.export import export_gguf, export_merged

    if export_format == "gguf":
        gguf = export_gguf(adapter, output, gguf_type, overwrite, model)
        console.print(f"Merged [bold]{gguf.adapter_dir}[/bold] into {gguf.base_model}; wrote [bold]{gguf.gguf_path}"
                      f"[/bold] ({gguf.architecture}, {gguf.gguf_type}, {gguf.tensors} tensors) and {gguf.modelfile}")
        return
    result = export_merged(adapter, output if output is not None else Path(DEFAULT_OUTPUT), dtype, overwrite, model)
    console.print(f"Merged [bold]{result.adapter_dir}[/bold] into {result.base_model} ({result.dtype}); "
                  f"saved to [bold]{result.output_dir}[/bold]: {', '.join(result.files)}")  # fmt: skip
