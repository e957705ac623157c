"""`phi2 prepare`: get XSUM, sample, format prompts, tokenize, save, report length statistics."""

from __future__ import annotations

from typing import Annotated, Optional

import typer

from phi2cli.cli.app import (
    ConfigOpt, DataDirOpt, DatasetOpt, DocFieldOpt, IdFieldOpt, LossOnOpt, MaxLengthOpt, ModelOpt, SamplesOpt,
    SeedOpt, SumFieldOpt, TemplateOpt, TestFileOpt, TokenizerOpt, TrainFileOpt, ValFileOpt, ValSamplesOpt, command,
    console, data_overrides, load_config, opt,
)  # fmt: skip


@command("prepare")
def prepare_command(
    config: ConfigOpt = None,
    dataset: DatasetOpt = None,
    data_dir: DataDirOpt = None,
    train_file: TrainFileOpt = None,
    validation_file: ValFileOpt = None,
    test_file: TestFileOpt = None,
    document_field: DocFieldOpt = None,
    summary_field: SumFieldOpt = None,
    id_field: IdFieldOpt = None,
    samples: SamplesOpt = None,
    val_samples: ValSamplesOpt = None,
    seed: SeedOpt = None,
    template: TemplateOpt = None,
    max_length: MaxLengthOpt = None,
    loss_on: LossOnOpt = None,
    model: ModelOpt = None,
    tokenizer: TokenizerOpt = None,
    output: Annotated[Optional[str], opt("data.prepared_dir", "--output", "-o")] = None,
    overwrite: Annotated[bool, typer.Option(
        "--overwrite", help="Replace a prepared dataset already in --output.")] = False,
) -> None:
    """Sample XSUM, format prompts, tokenize and save a dataset ready for training.

    Data comes from the hub (--dataset, default EdinburghNLP/xsum) or local files (--data-dir with train/validation files, or --train-file/--validation-file) in JSONL, JSON, CSV or Parquet.

    Writes a 'save_to_disk' dataset plus manifest.json with token-length statistics.
    """  # noqa: E501 (one line per paragraph: --help keeps line breaks)
    from phi2cli.data import prepare as data_mod
    from phi2cli.io.hub import check_hub_access
    from phi2cli.models.loading import load_tokenizer
    from phi2cli.cli.ui import manifest_table, track, warn

    overrides = data_overrides(
        dataset=dataset, data_dir=data_dir, train_file=train_file, validation_file=validation_file,
        test_file=test_file, document_field=document_field, summary_field=summary_field, id_field=id_field,
        samples=samples, val_samples=val_samples, seed=seed, template=template, max_length=max_length,
        loss_on=loss_on, model=model, tokenizer=tokenizer,
    )  # fmt: skip
    overrides["data.prepared_dir"] = output
    cfg = load_config(config, overrides)
    for message in check_hub_access(cfg, model=False, data=True):
        warn(message)
    tok = load_tokenizer(cfg.model.tokenizer or cfg.model.model)
    prepared = data_mod.prepare(cfg, tok, progress=track, overwrite=overwrite)
    for message in prepared.warnings:
        warn(message)
    console.print(manifest_table(prepared.manifest))
    truncated = {s: v["truncated"] for s, v in prepared.manifest["splits"].items()}
    console.print(
        f"Truncated articles (to fit --max-length {cfg.data.max_length}): "
        + ", ".join(f"{s} {n}" for s, n in truncated.items())
    )
    console.print(f"Saved to [bold]{prepared.path}[/bold] (manifest: {prepared.path / data_mod.MANIFEST_NAME})")
    raise typer.Exit(0)
