"""`phi2 train`: QLoRA fine-tuning with the reference recipe as defaults."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Optional

import typer

from phi2cli.cli.app import (
    ConfigOpt, DataDirOpt, DatasetOpt, DocFieldOpt, DtypeOpt, IdFieldOpt, LossOnOpt, MaxLengthOpt, ModelOpt,
    QuantOpt, SamplesOpt, SeedOpt, SumFieldOpt, TemplateOpt, TestFileOpt, TokenizerOpt, TrainFileOpt, ValFileOpt,
    ValSamplesOpt, command, console, data_overrides, opt,
)  # fmt: skip
from phi2cli.config import Phi2Config, apply_overrides, build_config, given_keys, load_run_config
from phi2cli.models.recipes import RecipeChoice, apply_recipe


@command("train")
def train_command(
    config: ConfigOpt = None,
    samples: SamplesOpt = None,
    val_samples: ValSamplesOpt = None,
    prepared: Annotated[Optional[Path], typer.Option(
        "--prepared", help="Use a dataset from 'phi2 prepare' instead of preparing one.", show_default=False)] = None,
    model: ModelOpt = None,
    tokenizer: TokenizerOpt = None,
    quantization: QuantOpt = None,
    compute_dtype: DtypeOpt = None,
    dataset: DatasetOpt = None,
    data_dir: DataDirOpt = None,
    train_file: TrainFileOpt = None,
    validation_file: ValFileOpt = None,
    test_file: TestFileOpt = None,
    document_field: DocFieldOpt = None,
    summary_field: SumFieldOpt = None,
    id_field: IdFieldOpt = None,
    seed: SeedOpt = None,
    template: TemplateOpt = None,
    max_length: MaxLengthOpt = None,
    loss_on: LossOnOpt = None,
    lora_r: Annotated[Optional[int], opt("lora.r", "--lora-r")] = None,
    lora_alpha: Annotated[Optional[int], opt("lora.alpha", "--lora-alpha")] = None,
    lora_dropout: Annotated[Optional[float], opt("lora.dropout", "--lora-dropout")] = None,
    lora_targets: Annotated[Optional[str], opt("lora.targets", "--lora-targets")] = None,
    learning_rate: Annotated[Optional[float], opt("train.learning_rate", "--lr", "--learning-rate")] = None,
    lr_scheduler: Annotated[Optional[str], opt("train.lr_scheduler", "--lr-scheduler")] = None,
    warmup_steps: Annotated[Optional[int], opt("train.warmup_steps", "--warmup-steps")] = None,
    batch_size: Annotated[Optional[int], opt("train.batch_size", "--batch-size")] = None,
    grad_accum: Annotated[Optional[int], opt("train.grad_accum", "--grad-accum")] = None,
    per_gpu_batch: Annotated[Optional[int], opt("train.per_gpu_batch", "--per-gpu-batch")] = None,
    epochs: Annotated[Optional[float], opt("train.epochs", "--epochs")] = None,
    max_steps: Annotated[Optional[int], opt("train.max_steps", "--max-steps")] = None,
    eval_every: Annotated[Optional[int], opt("train.eval_every", "--eval-every")] = None,
    logging_steps: Annotated[Optional[int], opt("train.logging_steps", "--logging-steps")] = None,
    eval_batch_size: Annotated[Optional[int], opt("train.eval_batch_size", "--eval-batch-size")] = None,
    optimizer: Annotated[Optional[str], opt("train.optimizer", "--optimizer")] = None,
    gradient_checkpointing: Annotated[Optional[bool], opt(
        "train.gradient_checkpointing", "--gradient-checkpointing/--no-gradient-checkpointing")] = None,
    profile: Annotated[Optional[str], opt("train.profile", "--profile")] = None,
    compile_layers: Annotated[Optional[bool], opt("train.compile", "--compile/--no-compile")] = None,
    compile_from_steps: Annotated[Optional[int], opt("train.compile_from_steps", "--compile-from-steps")] = None,
    cuda_graphs: Annotated[Optional[bool], opt("train.cuda_graphs", "--cuda-graphs/--no-cuda-graphs")] = None,
    graph_bucket: Annotated[Optional[int], opt("train.graph_bucket", "--graph-bucket")] = None,
    train_seed: Annotated[Optional[int], opt("train.seed", "--train-seed")] = None,
    report_to: Annotated[Optional[str], opt("train.report_to", "--report-to")] = None,
    neftune_alpha: Annotated[Optional[float], opt("train.neftune_alpha", "--neftune-alpha")] = None,
    output_dir: Annotated[Optional[str], opt("train.output_dir", "--output-dir", "-o")] = None,
    final_dir: Annotated[Optional[str], opt("train.final_dir", "--final-dir")] = None,
    resume: Annotated[bool, typer.Option("--resume", help="Continue the run in --output-dir from its newest checkpoint.")] = False,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Delete an earlier run in the output directories first.")] = False,
    gpus: Annotated[int, typer.Option("--gpus", help="Data-parallel GPUs (DDP via accelerate); the global batch stays 8 examples per step unless --per-gpu-batch.")] = 1,
) -> None:  # fmt: skip
    """Fine-tune the model on XSUM with QLoRA (4-bit NF4 base + LoRA adapters).

    Prepares the data implicitly (same as 'phi2 prepare') unless --prepared is given.

    Checkpoints go to --output-dir (checkpoint-N), the best adapter to --final-dir. Ctrl-C saves a checkpoint; continue with --resume.
    """  # noqa: E501 (one line per paragraph: --help keeps line breaks)
    from phi2cli.training.engine import train
    from phi2cli.cli.ui import TrainingDisplay, note, track, warn

    if gpus > 1:
        from phi2cli.training.launch import launched, run_distributed

        if not launched():
            import sys

            raise typer.Exit(run_distributed(gpus, sys.argv[1:]))

    overrides: dict[str, Any] = data_overrides(
        dataset=dataset, data_dir=data_dir, train_file=train_file, validation_file=validation_file,
        test_file=test_file, document_field=document_field, summary_field=summary_field, id_field=id_field,
        samples=samples, val_samples=val_samples, seed=seed, template=template, max_length=max_length,
        loss_on=loss_on, model=model, tokenizer=tokenizer, quantization=quantization, compute_dtype=compute_dtype,
    )  # fmt: skip
    overrides.update({
        "lora.r": lora_r, "lora.alpha": lora_alpha, "lora.dropout": lora_dropout, "lora.targets": lora_targets,
        "train.learning_rate": learning_rate, "train.lr_scheduler": lr_scheduler, "train.warmup_steps": warmup_steps,
        "train.batch_size": batch_size, "train.grad_accum": grad_accum, "train.per_gpu_batch": per_gpu_batch,
        "train.epochs": epochs,
        "train.max_steps": max_steps, "train.eval_every": eval_every, "train.logging_steps": logging_steps,
        "train.eval_batch_size": eval_batch_size, "train.optimizer": optimizer,
        "train.gradient_checkpointing": gradient_checkpointing, "train.profile": profile, "train.compile": compile_layers,
        "train.compile_from_steps": compile_from_steps,
        "train.cuda_graphs": cuda_graphs, "train.graph_bucket": graph_bucket, "train.seed": train_seed,
        "train.report_to": report_to,
        "train.neftune_alpha": neftune_alpha,
        "train.output_dir": output_dir, "train.final_dir": final_dir,
    })  # fmt: skip
    cfg, recipe = resolve_train_config(config, overrides, resume)
    import os
    from contextlib import nullcontext

    display = TrainingDisplay(console)
    main_process = os.environ.get("LOCAL_RANK", "0") == "0"
    with display if main_process else nullcontext():
        result = train(cfg, prepared_dir=prepared, resume=resume, overwrite=overwrite,
                       display=display.update if main_process else None, progress=track,
                       recipe=recipe.to_dict() if recipe else None)  # fmt: skip
    if not main_process:
        return
    for message in result.notes:
        if message not in display.shown:
            warn(message)
    if result.already_finished:
        console.print(f"The run in {result.output_dir} had already finished at step {result.global_step} (adapter in "
                      f"{result.final_dir}); nothing changed. A larger --max-steps with --resume trains further.")  # fmt: skip
        return
    plan = result.plan
    uncompiled = f"; {plan.uncompiled_reason}" if plan.uncompiled_reason else ""
    note(f"engine profile: {plan.profile} ({plan.micro_batch} x {plan.grad_accum} x {plan.world_size} GPU(s) = "
         f"{plan.examples_per_step} examples per step){uncompiled}")  # fmt: skip
    if result.plan.scaling == "weak":
        note(f"weak scaling: learning rate x {result.plan.lr_scale:.3f} (square root of the global batch's growth)")
    if result.best_checkpoint:
        console.print(f"Best checkpoint: [bold]{result.best_checkpoint}[/bold] (eval loss {result.best_metric:.4f})")
    if result.timing:
        console.print(timing_line(result.timing))
    for line in throughput_lines(result.throughput):
        console.print(line)
    if result.memory:
        console.print(f"Peak GPU memory: {result.memory['peak_allocated_gib']:.2f} GiB allocated, "
                      f"{result.memory['peak_reserved_gib']:.2f} GiB reserved")  # fmt: skip
    console.print(f"Adapter saved to [bold]{result.final_dir}[/bold] after {result.global_step} steps. "
                  f"Next: phi2 evaluate, phi2 summarize ARTICLE.txt, phi2 report")  # fmt: skip


def timing_line(timing: dict[str, Any]) -> str:
    """Where the wall time went, and the rate over training steps alone (no evaluation, saving or recording)."""
    parts = [("load", "load_s"), ("data", "data_s"), ("compile/record", "compile_record_s"),
             ("train steps", "train_steps_s"), ("evaluation", "evaluation_s"), ("save", "save_s"), ("other", "other_s")]  # fmt: skip
    split = ", ".join(f"{label} {timing[key]:.1f}" for label, key in parts if key in timing)
    line = f"Time: {timing.get('wall_s', 0.0):.1f} s ({split})"
    if "train_steps_tokens_per_s" in timing:
        line += f"; training steps alone: {timing['train_steps_tokens_per_s']:,.0f} real tokens/s"
    return line


def throughput_lines(throughput: dict[str, Any]) -> list[str]:
    """How fast the run went: after warm-up, and in the steady state once no new CUDA graph was recorded."""
    lines = []
    if "tokens_per_s" in throughput:
        lines.append(f"Throughput: {throughput['tokens_per_s']:,.0f} real tokens/s "
                     f"({throughput['seconds_per_step']:.3f} s per step after warm-up)")  # fmt: skip
    if "steady_tokens_per_s" in throughput:
        lines.append(f"Steady state: {throughput['steady_tokens_per_s']:,.0f} real tokens/s from step "
                     f"{throughput['steady_from_step']} on ({throughput['steady_seconds_per_step']:.3f} s per step)")  # fmt: skip
    graphs = throughput.get("cuda_graphs")
    if graphs:
        lines.append(f"CUDA graphs: {graphs['recordings']} batch shapes recorded in {graphs['record_seconds']:.1f} s "
                     f"(the first includes any compiling), {graphs['replays_of_a_longer_shape']} batches replayed a "
                     f"longer shape")  # fmt: skip
    return lines


def resolve_train_config(config_file: Optional[Path], overrides: dict[str, Any],
                         resume: bool) -> tuple[Phi2Config, Any]:  # fmt: skip
    """Flags over the config file over the model size's recipe over defaults (the recipe choice is
    returned too); on --resume, flags over the run's saved config (and its recorded recipe)."""
    if resume and config_file is None:
        out = overrides.get("train.output_dir") or Phi2Config().train.output_dir
        if (Path(out) / "phi2_run.json").is_file():
            saved, facts = load_run_config(out)
            recorded = RecipeChoice.from_dict(facts["recipe"]) if isinstance(facts.get("recipe"), dict) else None
            return apply_overrides(saved, overrides).validate(), recorded
    return apply_recipe(build_config(config_file, overrides), given_keys(config_file, overrides))
