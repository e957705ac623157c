"""The QLoRA engine: load, attach LoRA, train with the Hugging Face Trainer, keep the best adapter."""

from __future__ import annotations

import dataclasses
import os
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from phi2cli.config import Phi2Config, save_run_config
from phi2cli.errors import DeviceError, RunError, TrainingInterrupted
from phi2cli.training.plan import EnginePlan, resolve_plan

CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")
Display = Callable[[str, dict[str, Any]], None]
COMPILE_NOTE = "compiling the decoder layers (about a minute the first time, cached for later runs)"


@dataclass
class TrainResult:
    output_dir: Path
    final_dir: Path
    best_checkpoint: str | None
    best_metric: float | None
    global_step: int
    plan: EnginePlan
    metrics: dict[str, Any] = field(default_factory=dict)
    memory: dict[str, float] = field(default_factory=dict)
    throughput: dict[str, float] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)


def checkpoints(output_dir: str | Path) -> list[Path]:
    """checkpoint-N directories, oldest first."""
    root = Path(output_dir)
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if p.is_dir() and (m := CHECKPOINT_RE.match(p.name))]
    return [p for _, p in sorted(found)]


def check_output_dirs(config: Phi2Config, resume: bool, overwrite: bool) -> None:
    """Never clobber an earlier run silently: refuse unless --resume or --overwrite."""
    from phi2cli.io.files import check_writable_dir

    out, final = Path(config.train.output_dir), Path(config.train.final_dir)
    for path in (out, final):
        if path.exists() and not path.is_dir():
            raise RunError(f"{path} is a file, not a directory; choose another output path")
        check_writable_dir(path)  # before the slow part, not after it
    has_run = bool(checkpoints(out)) or (out / "trainer_state.json").exists() or (final / "adapter_config.json").exists()
    if resume:
        if not checkpoints(out):
            raise RunError(f"nothing to resume: {out} has no checkpoint-N; start without --resume")
        return
    if has_run and not overwrite:
        raise RunError(
            f"{out} already holds a run; pass --resume to continue it or --overwrite to start over "
            f"(or choose another --output-dir)"
        )
    if overwrite:
        for path in (out, final):
            shutil.rmtree(path, ignore_errors=True)


def _training_arguments(config: Phi2Config, plan: EnginePlan, precision: Any, has_eval: bool) -> Any:
    from transformers import TrainingArguments

    train = config.train
    on_gpu = precision.device == "cuda"
    eval_strategy = "steps" if has_eval else "no"
    args = TrainingArguments(
        output_dir=train.output_dir,
        per_device_train_batch_size=plan.micro_batch,
        per_device_eval_batch_size=train.eval_batch_size,
        gradient_accumulation_steps=plan.grad_accum,
        num_train_epochs=train.epochs,
        max_steps=train.max_steps,
        learning_rate=train.learning_rate,
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
        report_to=[],
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
        args._n_gpu = min(args._n_gpu, 1)
    return args


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


def _free_gib() -> float | None:
    import torch

    if not torch.cuda.is_available():
        return None
    free, _ = torch.cuda.mem_get_info()
    return free / 2**30


def dequantize_base(model: Any) -> int:
    """Replace every 4-bit linear layer by a frozen bf16 one holding the same (dequantized NF4) weights.

    The 4-bit path dequantizes each weight in every forward and backward; doing it once keeps
    the values bit for bit and leaves only the bf16 matrix products.
    """
    import bitsandbytes as bnb
    import torch

    replaced = 0
    for name, module in list(model.named_modules()):
        for child_name, child in list(module.named_children()):
            if not isinstance(child, bnb.nn.Linear4bit):
                continue
            weight = bnb.functional.dequantize_4bit(child.weight.data, child.weight.quant_state)
            dtype = child.compute_dtype or torch.bfloat16
            linear = torch.nn.Linear(child.in_features, child.out_features, bias=child.bias is not None,
                                     device=weight.device, dtype=dtype)  # fmt: skip
            linear.weight.data.copy_(weight.to(dtype))
            if child.bias is not None:
                linear.bias.data.copy_(child.bias.data.to(dtype))
            linear.requires_grad_(False)
            setattr(module, child_name, linear)
            replaced += 1
    model.is_loaded_in_4bit = False
    model.is_quantized = False
    setattr(model, "hf_quantizer", None)
    return replaced


def build_model(config: Phi2Config, plan: EnginePlan, precision: Any) -> Any:
    """Base model (4-bit NF4 by default) + LoRA, laid out as the plan says."""
    from phi2cli.kernels import attention
    from phi2cli.models.loading import attach_lora, load_base_model

    model = load_base_model(config.model, precision, for_training=True)
    if plan.dequantize_base:
        dequantize_base(model)
        for param in model.parameters():
            param.requires_grad_(False)
    head_dim = model.config.hidden_size // model.config.num_attention_heads
    if plan.packed and attention.register(head_dim):
        model.set_attn_implementation(attention.NAME)
    from transformers import set_seed

    set_seed(config.train.seed)  # LoRA's initial A matrices come from the global RNG
    model = attach_lora(model, config.lora, plan.gradient_checkpointing, lean=plan.profile == "memory-saver",
                        upcast_norms=plan.autocast)  # fmt: skip
    if plan.fused_kernels:
        from phi2cli.kernels import lora as lora_fast

        lora_fast.install(model)
        if plan.fused_qkv:
            lora_fast.install_fused_qkv(model)  # where q/k/v have plain (dequantized) base weights
        lora_fast.fuse_gelu(model)
    if plan.compile:
        compile_layers(model)
    return model


def compile_layers(model: Any) -> None:
    """torch.compile every decoder layer: one compiled graph serves all 32 (same code, dynamic length)."""
    import torch

    for module in model.modules():
        if type(module).__name__.endswith("DecoderLayer"):
            module.compile(dynamic=True)
    torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)
    torch._dynamo.config.suppress_errors = True  # a layer that cannot compile here runs eagerly instead


def train(
    config: Phi2Config,
    *,
    prepared_dir: str | Path | None = None,
    resume: bool = False,
    overwrite: bool = False,
    display: Display | None = None,
    progress: Any = None,
    callbacks: list[Any] | None = None,
    recipe: dict[str, Any] | None = None,
) -> TrainResult:
    """Fine-tune with QLoRA; return where the best adapter is.

    Args:
        config: the resolved run configuration.
        prepared_dir: a dataset from 'phi2 prepare'; None prepares one inside the output directory.
        resume: continue from the newest checkpoint (optimizer, scheduler, RNG, data order).
        overwrite: delete an earlier run in the output directories first.
        display: receives progress events ('begin', 'step', 'eval', 'end').
        progress: iterable wrapper for data preparation progress.
        callbacks: extra TrainerCallbacks.
        recipe: the size recipe's choice (recipes.RecipeChoice.to_dict()), recorded in phi2_run.json.
    Raises:
        RunError, DataError, ModelError, DeviceError, TrainingInterrupted (checkpoint saved).
    """
    import torch

    from phi2cli.data import prepare as data_mod
    from phi2cli.models.loading import load_tokenizer, memory_report, resolve_precision
    from phi2cli.training.trainer import EvaluateAtEnd, Phi2Trainer, ProgressCallback, StopOnSignal, ThroughputMeter

    from accelerate import PartialState

    from phi2cli.config import with_absolute_paths

    config = with_absolute_paths(config)

    # One process, or one of N under a distributed launcher (accelerate launch, torchrun).
    # PHI2_DDP_BACKEND picks the process-group backend (e.g. gloo where NCCL cannot run); default: accelerate's
    state = PartialState(cpu=not torch.cuda.is_available(), backend=os.environ.get("PHI2_DDP_BACKEND") or None)
    is_main = state.is_main_process
    with state.main_process_first():  # the main process checks, cleans and prepares; the others then read
        check_output_dirs(config, resume, overwrite and is_main)
    precision = resolve_precision(config.model)
    world_size = state.num_processes
    plan = resolve_plan(config, cuda=precision.device == "cuda", quantized=precision.quantization == "4bit",
                        free_gib=_free_gib(), world_size=world_size,
                        bf16=precision.compute_dtype == "bfloat16")  # fmt: skip
    notes = [n for n in (precision.note, plan.note) if n]
    tokenizer = load_tokenizer(config.model.tokenizer or config.model.model)
    out = Path(config.train.output_dir)
    with state.main_process_first():
        if prepared_dir is None:
            prepared_dir = out / "prepared"
            if is_main and not (resume and (prepared_dir / data_mod.MANIFEST_NAME).exists()):
                kwargs = {"progress": progress} if progress else {}
                notes += data_mod.prepare(config, tokenizer, prepared_dir, **kwargs).warnings
        dataset, manifest = data_mod.load_prepared(prepared_dir)
    data_mod.check_compatible(manifest, config)
    prepared_with = data_mod.data_config_of(manifest)
    if prepared_with is not None:  # the run config records the data as it was prepared
        config = dataclasses.replace(config, data=prepared_with)
    train_set, eval_set = dataset["train"], dataset["validation"] if "validation" in dataset else None

    run_facts = {"precision": precision.__dict__, "plan": plan.to_dict(), "prepared_dir": str(prepared_dir),
                 "tokenizer": config.model.tokenizer or config.model.model, "template": config.data.template,
                 "eos_token_id": tokenizer.eos_token_id, "manifest": {k: manifest[k] for k in ("source", "splits")}}  # fmt: skip
    if recipe is not None:
        run_facts["recipe"] = recipe
    if is_main:
        save_run_config(config, out, run_facts)

    try:
        model = build_model(config, plan, precision)
    except torch.cuda.OutOfMemoryError:
        raise DeviceError(out_of_memory_advice()) from None
    collator = make_collator(config, plan, tokenizer)
    args = _training_arguments(config, plan, precision, has_eval=eval_set is not None)
    stopper = StopOnSignal()
    extra = [stopper, EvaluateAtEnd(), *(callbacks or [])]
    trainer = Phi2Trainer(model=model, args=args, train_dataset=train_set, eval_dataset=eval_set,
                          data_collator=collator, processing_class=tokenizer, callbacks=extra,
                          selective_head=plan.selective_head, flat_optimizer=plan.flat_optimizer,
                          cuda_graphs=plan.cuda_graphs)  # fmt: skip
    from transformers.trainer_callback import PrinterCallback

    trainer.remove_callback(PrinterCallback)
    meter = ThroughputMeter(lambda: trainer.real_tokens_seen,
                            recordings=(lambda: len(trainer.graphed.recordings) if trainer.graphed else 0))
    trainer.add_callback(meter)
    if display is not None and is_main:
        waiting = COMPILE_NOTE if plan.compile else ""
        trainer.add_callback(ProgressCallback(display, lambda: trainer.real_tokens_seen, waiting))
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    stopper.install()
    try:
        result = trainer.train(resume_from_checkpoint=True if resume else None)
    except torch.cuda.OutOfMemoryError:
        raise DeviceError(out_of_memory_advice()) from None
    finally:
        stopper.uninstall()
    trainer_state = trainer.state
    if stopper.requested:
        saved = checkpoints(out)
        where = saved[-1] if saved else out
        raise TrainingInterrupted(
            f"stopped by {stopper.requested} at step {trainer_state.global_step}; checkpoint saved in {where}. "
            f"Resume with: phi2 train --resume {resume_hint(config)}"
        )
    final = Path(config.train.final_dir)
    memory = memory_report()
    throughput = dict(meter.result)
    if trainer.graphed is not None:
        throughput["cuda_graphs"] = trainer.graphed.summary()
    if trainer.graph_note:
        notes.append(trainer.graph_note)
    run_facts.update(throughput=throughput, memory=memory, train_metrics=dict(result.metrics))
    if is_main:
        save_final(trainer, tokenizer, config, final, run_facts)
    state.wait_for_everyone()
    return TrainResult(out, final, trainer_state.best_model_checkpoint, trainer_state.best_metric,
                       trainer_state.global_step, plan, dict(result.metrics), memory, throughput,
                       notes)  # fmt: skip


def save_final(trainer: Any, tokenizer: Any, config: Phi2Config, final: Path, facts: dict[str, Any]) -> None:
    """Write the best adapter (loaded at the end of training), tokenizer and run config atomically."""
    from phi2cli.io.files import atomic_directory

    state = trainer.state
    facts = {**facts, "best_checkpoint": state.best_model_checkpoint, "best_metric": state.best_metric,
             "global_step": state.global_step}  # fmt: skip
    with atomic_directory(final) as tmp:
        trainer.model.save_pretrained(str(tmp))
        tokenizer.save_pretrained(str(tmp))
        save_run_config(config, tmp, facts)
    save_run_config(config, config.train.output_dir, facts)


def resume_hint(config: Phi2Config) -> str:
    """The flags a user needs to repeat for --resume (output dir when not the default)."""
    from phi2cli.config import TrainConfig

    if config.train.output_dir != TrainConfig().output_dir:
        return f"--output-dir {config.train.output_dir} ..."
    return "(with the same options)"


def out_of_memory_advice() -> str:
    return ("the GPU ran out of memory; use '--profile memory-saver', '--no-cuda-graphs', a shorter "
            "'--max-length', or '--quantization 4bit'")  # fmt: skip
