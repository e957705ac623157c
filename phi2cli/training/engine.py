"""The QLoRA engine: load, attach LoRA, train with the Hugging Face Trainer, keep the best adapter."""

from __future__ import annotations

import dataclasses
import errno
import os
import shutil
from pathlib import Path
from typing import Any, Callable

from phi2cli.config import Phi2Config, save_run_config
from phi2cli.errors import ConfigError, DeviceError, RunError, TrainingInterrupted
from phi2cli.io.checkpoints import checkpoints  # noqa: F401 (re-exported)
from phi2cli.training.build import (build_model, family_plan, record_trainer_paths,
                                    with_adapted_targets)
from phi2cli.training.checkpoints import ResumePoint, finished_run, resume_point_problems
from phi2cli.training.plan import resolve_plan
from phi2cli.training.result import TrainResult
from phi2cli.training.trainer_inputs import make_collator, report_targets, training_arguments

Display = Callable[[str, dict[str, Any]], None]
COMPILE_NOTE = "compiling the decoder layers (about a minute the first time, cached for later runs)"


def check_output_dirs(config: Phi2Config, resume: bool, overwrite: bool,
                      is_main: bool = True) -> ResumePoint | None:  # fmt: skip
    """Never clobber an earlier run silently: refuse unless --resume or --overwrite.

    On --resume, returns the newest complete checkpoint (after undoing what a killed run left half
    done: a staged checkpoint, a half-replaced final directory).
    """
    from phi2cli.io.files import check_writable_dir, recover_directory
    from phi2cli.io.lock import LOCK_NAME
    from phi2cli.training.checkpoints import remove_staged, resume_point

    out, final = Path(config.train.output_dir), Path(config.train.final_dir)
    for path in (out, final):
        if path.exists() and not path.is_dir():
            raise RunError(f"{path} is a file, not a directory; choose another output path")
        check_writable_dir(path)  # before the slow part, not after it
    has_run = bool(checkpoints(out)) or (out / "trainer_state.json").exists() or (final / "adapter_config.json").exists()
    if resume:
        if is_main:  # only the main process cleans up; the others read the result
            remove_staged(out)
            recover_directory(final)
        if not checkpoints(out):
            if out.is_dir() and not (final / "adapter_config.json").exists():
                return None  # a run that stopped before its first checkpoint starts again from step 0
            raise RunError(f"nothing to resume: {out} has no checkpoint-N; start without --resume")
        point = resume_point(out, checkpoints(out))
        if point is None:
            raise RunError(f"nothing to resume: no checkpoint in {out} is complete "
                           f"({resume_point_problems(out)}); start again with --overwrite")  # fmt: skip
        return point
    if has_run and not overwrite:
        raise RunError(
            f"{out} already holds a run; pass --resume to continue it or --overwrite to start over "
            f"(or choose another --output-dir)"
        )
    if overwrite:
        shutil.rmtree(final, ignore_errors=True)
        for path in out.iterdir() if out.is_dir() else ():
            if path.name != LOCK_NAME:  # this run's lock stays while the run goes on
                shutil.rmtree(path) if path.is_dir() and not path.is_symlink() else path.unlink()
    return None


def _free_gib() -> float | None:
    import torch

    if not torch.cuda.is_available():
        return None
    free, _ = torch.cuda.mem_get_info()
    return free / 2**30


def train(config: Phi2Config, **kwargs: Any) -> TrainResult:
    """Fine-tune with QLoRA; return where the best adapter is (one run per output directory).

    Takes the same keyword arguments as `train_locked`. Raises: RunError when another process
    trains into the same output directory, and whatever `train_locked` raises.
    """
    from phi2cli.io.files import check_writable_dir
    from phi2cli.io.lock import RunLock

    if kwargs.get("resume") and kwargs.get("overwrite"):  # --overwrite would delete what --resume continues
        raise ConfigError("--resume continues the run in the output directory and --overwrite deletes it; "
                          "pass only one of them")  # fmt: skip
    if os.environ.get("RANK", os.environ.get("LOCAL_RANK", "0")) != "0":  # the main process locks for all
        return train_locked(config, **kwargs)
    check_writable_dir(config.train.output_dir)
    lock = RunLock(config.train.output_dir)
    taken_over = lock.acquire()
    fresh = None
    if kwargs.get("resume") and lock.made_directory:  # killed before it wrote anything, or never started
        fresh = f"nothing to resume in {config.train.output_dir} yet: training starts from step 0"
    try:
        result = train_locked(config, **kwargs)
    finally:
        lock.release()
    result.notes[:0] = [note for note in (taken_over, fresh) if note]
    return result


def train_locked(
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
        display: receives progress events ('note', 'info', 'begin', 'step', 'eval', 'end').
        progress: iterable wrapper for data preparation progress.
        callbacks: extra TrainerCallbacks.
        recipe: the size recipe's choice (recipes.RecipeChoice.to_dict()), recorded in phi2_run.json.
    Raises:
        RunError (also when the loss became NaN/inf), ConfigError, DataError, ModelError, DeviceError,
        TrainingInterrupted (checkpoint saved).
    """
    import time

    from phi2cli.data.prepare import MANIFEST_NAME
    from phi2cli.io.hub import check_hub_access

    reuse_prepared = prepared_dir is not None or \
        (resume and (Path(config.train.output_dir) / "prepared" / MANIFEST_NAME).exists())  # fmt: skip
    hub_notes = check_hub_access(config, data=not reuse_prepared)  # before the heavy imports: seconds, not retries
    import torch

    started = time.perf_counter()  # wall time from here; importing the libraries counts as loading
    from phi2cli.data import prepare as data_mod
    from phi2cli.models.loading import load_tokenizer, memory_report, read_model_config, resolve_precision
    from phi2cli.training.trainer import (
        ContinueLogWindow, EvaluateAtEnd, Phi2Trainer, ProgressCallback, StopOnSignal, ThroughputMeter,
    )  # fmt: skip
    from phi2cli.training.timing import finish_timing, time_split

    from accelerate import PartialState

    from phi2cli.config import with_absolute_paths

    imported = time.perf_counter()
    config = with_absolute_paths(config)

    # One process, or one of N under a distributed launcher (accelerate launch, torchrun).
    # PHI2_DDP_BACKEND picks the process-group backend (e.g. gloo where NCCL cannot run); default: accelerate's
    state = PartialState(cpu=not torch.cuda.is_available(), backend=os.environ.get("PHI2_DDP_BACKEND") or None)
    is_main = state.is_main_process
    report_targets(config.train.report_to)  # a missing logging backend fails before anything is loaded or deleted
    with state.main_process_first():  # the main process checks, cleans and prepares; the others then read
        point = check_output_dirs(config, resume, overwrite and is_main, is_main)
    precision = resolve_precision(config.model)
    world_size = state.num_processes
    from phi2cli.models.families import model_shape

    model_config = read_model_config(config.model.model)
    plan = resolve_plan(config, cuda=precision.device == "cuda", quantized=precision.quantization == "4bit",
                        free_gib=_free_gib(), world_size=world_size, bf16=precision.compute_dtype == "bfloat16",
                        shape=model_shape(model_config))  # fmt: skip
    plan, family_note = family_plan(plan, getattr(model_config, "model_type", None))
    notes = [n for n in (precision.note, plan.note, family_note, *hub_notes) if n]
    if point is not None:
        notes += [f"{skipped}: resuming from {point.checkpoint.name}" for skipped in point.skipped]
    elif resume:
        notes.append("the run had stopped before its first checkpoint: it starts again from step 0")
    clock = time.perf_counter()
    tokenizer = load_tokenizer(config.model.tokenizer or config.model.model)
    load_seconds = time.perf_counter() - clock + imported - started
    clock = time.perf_counter()
    out = Path(config.train.output_dir)
    target_steps = config.train.max_steps if config.train.max_steps > 0 else point.planned_steps if point else 0
    if point is not None and point.step >= target_steps:  # resuming would train past the end
        return finished_run(config, plan, point, tokenizer, notes, is_main)
    with state.main_process_first():
        if prepared_dir is None:
            prepared_dir = out / "prepared"
            if is_main and not (resume and (prepared_dir / data_mod.MANIFEST_NAME).exists()):
                kwargs = {"progress": progress} if progress else {}
                notes += data_mod.prepare(config, tokenizer, prepared_dir, overwrite=True, **kwargs).warnings
        dataset, manifest = data_mod.load_prepared(prepared_dir)
    data_mod.check_compatible(manifest, config)
    if resume:
        from phi2cli.training.guards import check_same_data

        check_same_data(out, prepared_dir, data_mod.data_identity(manifest))
    prepared_with = data_mod.data_config_of(manifest)
    if prepared_with is not None:  # the run config records the data as it was prepared
        config = dataclasses.replace(config, data=prepared_with)
    train_set, eval_set = dataset["train"], dataset["validation"] if "validation" in dataset else None
    data_seconds = time.perf_counter() - clock
    if display is not None and is_main:  # warnings about this run belong before it, not after it
        for message in notes:
            display("note", {"message": message})

    run_facts = {"precision": precision.__dict__, "plan": plan.to_dict(), "prepared_dir": str(prepared_dir),
                 "data_fingerprint": data_mod.data_identity(manifest),
                 "tokenizer": config.model.tokenizer or config.model.model, "template": config.data.template,
                 "eos_token_id": tokenizer.eos_token_id, "manifest": {k: manifest[k] for k in ("source", "splits")}}  # fmt: skip
    if precision.device == "cuda":
        run_facts["gpu"] = torch.cuda.get_device_name()  # the Run section of 'phi2 report'
    if recipe is not None:
        run_facts["recipe"] = recipe
    if is_main:
        save_run_config(config, out, run_facts)

    from phi2cli.training.host_memory import check_host_memory

    check_host_memory(config, plan, precision, train_set, model_config)
    if recipe is not None and display is not None and is_main:  # once the checks passed: this run will train
        from phi2cli.models.recipes import RecipeChoice

        display("info", {"message": RecipeChoice.from_dict(recipe).line()})

    clock = time.perf_counter()
    from phi2cli.kernels.fast_paths import FastPaths

    paths = FastPaths()
    try:
        model = build_model(config, plan, precision, paths)
    except torch.cuda.OutOfMemoryError:
        raise DeviceError(out_of_memory_advice()) from None
    load_seconds += time.perf_counter() - clock
    config = with_adapted_targets(config, model)
    collator = make_collator(config, plan, tokenizer)
    args = training_arguments(config, plan, precision, has_eval=eval_set is not None)
    stopper = StopOnSignal()
    extra = [stopper, EvaluateAtEnd(), *(callbacks or [])]
    trainer = Phi2Trainer(model=model, args=args, train_dataset=train_set, eval_dataset=eval_set,
                          data_collator=collator, processing_class=tokenizer, callbacks=extra,
                          selective_head=plan.selective_head, flat_optimizer=plan.flat_optimizer,
                          cuda_graphs=plan.cuda_graphs, graph_bucket=plan.graph_bucket)  # fmt: skip
    from transformers.trainer_callback import PrinterCallback

    trainer.remove_callback(PrinterCallback)
    from phi2cli.training.guards import StopOnNonFiniteLoss, diverged_message

    guard = StopOnNonFiniteLoss(lambda: trainer.non_finite_losses)
    trainer.add_callback(guard)  # after EvaluateAtEnd: it takes back that callback's save of a diverged step
    meter = ThroughputMeter(lambda: trainer.real_tokens_seen,
                            recordings=(lambda: len(trainer.graphed.recordings) if trainer.graphed else 0))
    trainer.add_callback(meter)
    if point is not None:
        trainer.add_callback(ContinueLogWindow(trainer, point.checkpoint))
    if display is not None and is_main:
        waiting = COMPILE_NOTE if plan.compile else ""
        trainer.add_callback(ProgressCallback(display, lambda: trainer.real_tokens_seen, waiting))
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    stopper.install()
    try:
        result = trainer.train(resume_from_checkpoint=str(point.checkpoint) if point is not None else None)
    except torch.cuda.OutOfMemoryError:
        raise DeviceError(out_of_memory_advice()) from None
    except Exception as err:  # a checkpoint save that finds the disk full or the directory read-only
        from phi2cli.io.files import disk_full, storage_error

        if disk_full(err) or getattr(err, "errno", None) in (errno.EACCES, errno.EPERM, errno.EROFS):
            raise storage_error(err, out) from None
        raise
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
    if guard.stopped_at is not None:
        raise RunError(diverged_message(guard, config, checkpoints(out)))
    final = Path(config.train.final_dir)
    memory = memory_report()
    throughput = dict(meter.result)
    if trainer.graphed is not None:
        throughput["cuda_graphs"] = trainer.graphed.summary()
    timing = time_split(throughput, plan, load_seconds, data_seconds)
    record_trainer_paths(paths, plan, trainer)
    notes += paths.fallback_notes()
    run_facts.update(throughput=throughput, memory=memory, train_metrics=dict(result.metrics),
                     fast_paths=paths.to_dict(), timing=timing)  # fmt: skip
    clock = time.perf_counter()
    if is_main:
        save_final(trainer, tokenizer, config, final, run_facts, timing=timing, started=started, clock=clock)
    state.wait_for_everyone()  # the other processes wait here once, while the main one writes the adapter
    if not is_main:
        finish_timing(timing, started, clock)
    return TrainResult(out, final, trainer_state.best_model_checkpoint, trainer_state.best_metric,
                       trainer_state.global_step, plan, dict(result.metrics), memory, throughput,
                       notes, timing)  # fmt: skip


def save_final(trainer: Any, tokenizer: Any, config: Phi2Config, final: Path, facts: dict[str, Any],
               timing: dict[str, float] | None = None, started: float = 0.0, clock: float = 0.0) -> None:  # fmt: skip
    """Write the best adapter (loaded at the end of training), tokenizer and run config atomically.

    timing (optional): the run's time split, completed with this save and the wall time before it is recorded.
    """
    from phi2cli.io.files import atomic_directory
    from phi2cli.training.timing import finish_timing

    state = trainer.state
    facts = {**facts, "best_checkpoint": state.best_model_checkpoint, "best_metric": state.best_metric,
             "global_step": state.global_step}  # fmt: skip
    with atomic_directory(final) as tmp:
        trainer.model.save_pretrained(str(tmp))
        tokenizer.save_pretrained(str(tmp))
        if timing is not None:  # the run config written last holds the whole run's time
            finish_timing(timing, started, clock)
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
