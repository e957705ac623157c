"""Checkpoints that are trusted only when complete: staged under a hidden name, renamed in, checked on resume."""

from __future__ import annotations

import json
import os
import shutil
import zipfile
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from phi2cli.io.files import fsync_dir, fsync_tree

ADAPTER_WEIGHTS = ("adapter_model.safetensors", "adapter_model.bin")
TORCH_FILES = ("optimizer.pt", "scheduler.pt")
STATE_NAME = "trainer_state.json"
LOG_WINDOW_NAME = "log_window.json"  # the loss summed since the last log, so a resumed run logs the same values
STAGING_SUFFIX = ".partial"


@dataclass(frozen=True)
class ResumePoint:
    checkpoint: Path  # the newest complete checkpoint-N
    step: int
    planned_steps: int  # max_steps the run that wrote it was heading for
    best_checkpoint: Path | None
    skipped: tuple[str, ...]  # one note per newer checkpoint that was incomplete


def checkpoint_problem(path: Path) -> str | None:
    """What makes checkpoint-N unusable for a resume (None when complete).

    Adapter weights, optimizer, scheduler, RNG state and trainer state must all be there and whole:
    torch files are zip archives (a truncated one has no central directory), safetensors carry
    their length in a header, the trainer state must parse and name the same step.
    """
    weights = next((path / n for n in ADAPTER_WEIGHTS if (path / n).is_file()), None)
    if weights is None:
        return "no adapter weights"
    if weights.suffix == ".safetensors" and not _whole_safetensors(weights):
        return f"{weights.name} is truncated"
    rng = sorted(path.glob("rng_state*.pth"))
    if not rng:
        return "no rng_state.pth"
    for torch_file in [*(path / n for n in TORCH_FILES), *rng]:
        if not torch_file.is_file():
            return f"no {torch_file.name}"
        if not zipfile.is_zipfile(torch_file):
            return f"{torch_file.name} is truncated"
    try:
        state = json.loads((path / STATE_NAME).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return f"no readable {STATE_NAME}"
    if f"checkpoint-{state.get('global_step')}" != path.name:
        return f"{STATE_NAME} is for step {state.get('global_step')}"
    return None


def _whole_safetensors(path: Path) -> bool:
    try:
        with open(path, "rb") as handle:
            header_length = int.from_bytes(handle.read(8), "little")
            header = json.loads(handle.read(header_length))
    except (OSError, ValueError):
        return False
    end = max((t["data_offsets"][1] for k, t in header.items() if k != "__metadata__"), default=0)
    return path.stat().st_size >= 8 + header_length + end


def resume_point(output_dir: Path, checkpoint_dirs: list[Path]) -> ResumePoint | None:
    """The newest complete checkpoint (newer incomplete ones noted), or None when there is none."""
    skipped = []
    for path in reversed(checkpoint_dirs):
        problem = checkpoint_problem(path)
        if problem is not None:
            skipped.append(f"{path.name} is incomplete ({problem})")
            continue
        state = json.loads((path / STATE_NAME).read_text(encoding="utf-8"))
        best = state.get("best_model_checkpoint")
        best_path = output_dir / Path(best).name if best else None
        if best_path is not None and checkpoint_problem(best_path) is not None:
            best_path = None
        return ResumePoint(path, int(state["global_step"]), int(state.get("max_steps") or 0), best_path,
                           tuple(skipped))  # fmt: skip
    return None


def remove_staged(output_dir: Path) -> list[str]:
    """Remove checkpoints a killed run left half written (only while this run holds the lock)."""
    removed = []
    if output_dir.is_dir():
        for path in sorted(output_dir.glob(f".checkpoint-*{STAGING_SUFFIX}")):
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path.name)
    return removed


@contextmanager
def staged_checkpoint(trainer: Any) -> Iterator[None]:
    """Make the Trainer write checkpoint-N into a hidden staging directory, then publish it whole.

    Inside, the Trainer's output_dir is the staging directory; afterwards the files are fsynced and
    the directory is renamed to output_dir/checkpoint-N (replacing a stale one of the same step).
    All processes of a distributed run write their RNG states into the same staging directory.
    """
    run_dir = Path(trainer.args.output_dir)
    name = f"checkpoint-{trainer.state.global_step}"
    staging = run_dir / f".{name}{STAGING_SUFFIX}"
    staging.mkdir(parents=True, exist_ok=True)
    trainer.args.output_dir = str(staging)
    try:
        yield
    finally:
        trainer.args.output_dir = str(run_dir)
    written, final = staging / name, run_dir / name
    if trainer.state.best_model_checkpoint == os.path.join(str(staging), name):  # the Trainer looked in staging
        trainer.state.best_model_checkpoint = str(final)
        if trainer.args.should_save:
            trainer.state.save_to_json(str(written / STATE_NAME))
    _save_log_window(trainer, written)
    trainer.accelerator.wait_for_everyone()  # every process's files are in
    if trainer.args.should_save:
        fsync_tree(written)
        if final.exists():  # a stale one a killed run left, re-made now from the same step
            shutil.rmtree(final)
        os.replace(written, final)
        shutil.rmtree(staging, ignore_errors=True)
        fsync_dir(run_dir)
    trainer.accelerator.wait_for_everyone()


def _save_log_window(trainer: Any, directory: Path) -> None:
    """The Trainer's loss sum since its last log (an internal it resets per train() call), every
    process's in one file (the checkpoint holds the same files on any number of GPUs)."""
    from phi2cli import compat

    window = compat.log_window(trainer)
    if window is None:
        return
    loss_sum, last_logged = window
    sums = trainer.accelerator.gather(loss_sum.detach().float().reshape(1))  # a collective: every process calls it
    if trainer.args.should_save:
        values = [float(v) for v in sums.cpu()]
        body = {"loss_sum": values[0], "loss_sums": values, "last_logged_step": int(last_logged)}
        (directory / LOG_WINDOW_NAME).write_text(json.dumps(body) + "\n", encoding="utf-8")


def restore_log_window(trainer: Any, checkpoint: str | Path) -> bool:
    """Continue the logging window where the checkpoint cut it, so the next logged loss averages the
    same steps as in an uninterrupted run. Returns False where the checkpoint has no window (or one
    written by another number of processes)."""
    from phi2cli import compat

    path = Path(checkpoint) / LOG_WINDOW_NAME
    if not path.is_file() or compat.log_window(trainer) is None:
        return False
    body = json.loads(path.read_text(encoding="utf-8"))
    sums = body.get("loss_sums", [body["loss_sum"]])
    if body["last_logged_step"] > trainer.state.global_step or len(sums) != trainer.args.world_size:
        return False
    compat.continue_log_window(trainer, sums[trainer.args.process_index], body["last_logged_step"])
    return True


def publish_final_from(point: ResumePoint, final: Path, write_extra: Any) -> Path:
    """The final adapter of a run whose training had ended before it was saved: the best (else the
    last) checkpoint's adapter files, plus what `write_extra(directory)` adds (tokenizer, run config)."""
    from phi2cli.io.files import atomic_directory

    source = point.best_checkpoint or point.checkpoint
    with atomic_directory(final) as tmp:
        for name in (*ADAPTER_WEIGHTS, "adapter_config.json", "README.md"):
            if (source / name).is_file():
                shutil.copy2(source / name, tmp / name)
        write_extra(tmp)
    return source


def resume_point_problems(out: Path) -> str:
    """Why the newest (up to three) checkpoints cannot be resumed from, in one line."""
    from phi2cli.io.checkpoints import checkpoints

    return "; ".join(f"{p.name}: {checkpoint_problem(p)}" for p in checkpoints(out)[-3:])


def finished_run(config: Any, plan: Any, point: ResumePoint, tokenizer: Any, notes: list[str],
                 is_main: bool) -> Any:  # fmt: skip
    """--resume of a run whose training had reached its steps: change nothing when its final adapter
    is saved, else save it from the best (or last) checkpoint, as the run would have at its end."""
    from phi2cli.config import RUN_CONFIG_NAME, save_run_config
    from phi2cli.training.result import TrainResult

    final = Path(config.train.final_dir)
    saved = {}
    if (final / "adapter_config.json").is_file() and (final / RUN_CONFIG_NAME).is_file():
        saved = json.loads((final / RUN_CONFIG_NAME).read_text(encoding="utf-8"))
    best = str(point.best_checkpoint) if point.best_checkpoint else None
    if saved.get("global_step") == point.step:
        return TrainResult(Path(config.train.output_dir), final, saved.get("best_checkpoint"),
                           saved.get("best_metric"), point.step, plan, notes=notes, already_finished=True)  # fmt: skip
    state = json.loads((point.checkpoint / "trainer_state.json").read_text(encoding="utf-8"))
    facts = {"plan": plan.to_dict(), "best_checkpoint": best, "best_metric": state.get("best_metric"),
             "global_step": point.step, "saved_from_checkpoint": str(point.best_checkpoint or point.checkpoint)}  # fmt: skip
    if is_main:
        def write_extra(directory: Path) -> None:
            tokenizer.save_pretrained(str(directory))
            save_run_config(config, directory, facts)

        publish_final_from(point, final, write_extra)
        save_run_config(config, config.train.output_dir, facts)
    notes.append(f"training had ended at step {point.step}; saved the final adapter from "
                 f"{(point.best_checkpoint or point.checkpoint).name}")  # fmt: skip
    return TrainResult(Path(config.train.output_dir), final, best, state.get("best_metric"), point.step, plan,
                       notes=notes)  # fmt: skip
