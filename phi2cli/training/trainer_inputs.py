"""What the Hugging Face Trainer gets for a run: its TrainingArguments from the config and the plan
(with the --report-to backend checked), and the collator that lays out the batches."""

from __future__ import annotations

from typing import Any

from phi2cli.config import Phi2Config
from phi2cli.errors import ConfigError
from phi2cli.training.plan import EnginePlan


def training_arguments(config: Phi2Config, plan: EnginePlan, precision: Any, has_eval: bool) -> Any:
    from transformers import TrainingArguments

    train = config.train
    on_gpu = precision.device == "cuda"
    eval_strategy = "steps" if has_eval else "no"
    args = TrainingArguments(
        output_dir=train.output_dir,
        per_device_train_batch_size=plan.micro_batch,
        per_device_eval_batch_size=plan.eval_batch,
        gradient_accumulation_steps=plan.grad_accum,
        num_train_epochs=train.epochs,
        max_steps=train.max_steps,
        learning_rate=train.learning_rate * plan.lr_scale,  # 1 unless --per-gpu-batch grows the global batch
        lr_scheduler_type=train.lr_scheduler,
        warmup_steps=train.warmup_steps,
        weight_decay=train.weight_decay,
        max_grad_norm=train.max_grad_norm,
        optim=plan.optimizer,
        logging_steps=train.logging_steps,
        eval_strategy=eval_strategy,
        eval_steps=train.eval_every if has_eval else None,
        save_strategy="steps",
        save_steps=train.eval_every,
        load_best_model_at_end=has_eval,
        metric_for_best_model="eval_loss" if has_eval else None,
        greater_is_better=False if has_eval else None,
        bf16=on_gpu and precision.compute_dtype == "bfloat16" and plan.autocast,
        fp16=on_gpu and precision.compute_dtype == "float16",
        use_cpu=not on_gpu,
        gradient_checkpointing=False,  # enabled on the model itself before LoRA is attached
        remove_unused_columns=False,
        report_to=report_targets(train.report_to),
        disable_tqdm=True,
        seed=train.seed,
        data_seed=config.data.seed,
        neftune_noise_alpha=train.neftune_alpha or None,  # the Trainer's own NEFTune hook on the input embeddings
        dataloader_num_workers=0,
        ddp_find_unused_parameters=False if plan.world_size > 1 else None,
        logging_nan_inf_filter=not plan.cuda_graphs,  # its per-step NaN check waits for the GPU every step
        # pinned batches copied without waiting: the CPU prepares the next step while the GPU runs this one
        accelerator_config={"non_blocking": on_gpu and plan.packed},
        save_only_model=False,
    )
    if plan.world_size == 1:
        # One process uses one GPU: the Trainer would otherwise wrap the model in DataParallel on a
        # multi-GPU machine, which cannot split packed rows. Several GPUs go through --gpus (DDP).
        from phi2cli.compat import limit_to_one_gpu

        limit_to_one_gpu(args)
    return args


# The package each --report-to backend needs (the Trainer's own integration callbacks use them).
REPORT_PACKAGES = {"tensorboard": ("tensorboard", "tensorboardX"), "wandb": ("wandb",), "mlflow": ("mlflow",)}


def report_targets(report_to: str) -> list[str]:
    """The Trainer's report_to for --report-to.

    Raises:
        ConfigError: the backend's package is not installed.
    """
    if report_to == "none":
        return []
    import importlib.util

    packages = REPORT_PACKAGES[report_to]
    if not any(importlib.util.find_spec(name) for name in packages):
        raise ConfigError(f"--report-to {report_to} needs the '{packages[0]}' package, which is not installed; "
                          f"run 'pip install {packages[0]}' or pass --report-to none")  # fmt: skip
    return [report_to]


def make_collator(config: Phi2Config, plan: EnginePlan, tokenizer: Any) -> Any:
    """Packed rows for the fast profiles (padded to a few fixed shapes for CUDA graphs), else padded rows."""
    from phi2cli.data.collate import PackedCollator, PaddedCollator

    if not plan.packed:
        return PaddedCollator(tokenizer.pad_token_id)
    if plan.cuda_graphs:
        from phi2cli.kernels.graphs import LABEL_MULTIPLE, PAD_MULTIPLE

        max_length = config.data.max_length
        return PackedCollator(max_length, pad_multiple=min(PAD_MULTIPLE, max_length), label_multiple=LABEL_MULTIPLE)
    return PackedCollator(config.data.max_length)
