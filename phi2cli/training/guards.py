"""Guards of a run's results: stop a diverged run before it saves anything that looks like a result, and
refuse to resume on other data than the run started with."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Callable

import torch
from transformers import TrainerCallback

from phi2cli.config import Phi2Config, load_run_config
from phi2cli.errors import ConfigError, RunError

WATCHED = ("loss", "grad_norm", "eval_loss")


class StopOnNonFiniteLoss(TrainerCallback):
    """Stops training at the first NaN/inf loss, gradient norm or eval loss; that step is not saved.

    The micro-batch count of NaN/inf losses lives on the device (Phi2Trainer._count_non_finite); it is
    read only at steps that log, evaluate or save, so the GPU is not waited for at every step; with several
    processes it is summed over them there, so that all stop at the same step. Add
    this callback last: it must see the save and evaluate requests of the callbacks before it.
    """

    def __init__(self, non_finite_losses: Callable[[], Any]) -> None:
        self.non_finite_losses = non_finite_losses
        self.stopped_at: int | None = None  # the step that diverged
        self.what = ""  # which value was not finite

    def _stop(self, state: Any, control: Any, what: str) -> None:
        if self.stopped_at is None:
            self.stopped_at, self.what = state.global_step, what
        control.should_training_stop = True
        control.should_save = False
        control.should_evaluate = False

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> Any:
        # Steps fixed by the schedule alone, the same in every process (the check below may be a collective).
        saving = bool(args.save_steps) and state.global_step % int(args.save_steps) == 0
        scheduled = control.should_log or control.should_evaluate or saving or state.global_step >= state.max_steps
        if self.stopped_at is None and not scheduled:
            return control
        count = self.non_finite_losses()
        if torch.distributed.is_available() and torch.distributed.is_initialized():  # every process stops together
            count = (count.clone() if count is not None else torch.zeros((), dtype=torch.long, device=args.device))
            torch.distributed.all_reduce(count)
        if self.stopped_at is not None or (count is not None and int(count) > 0):
            self._stop(state, control, self.what or "the training loss")
        return control

    def on_log(self, args: Any, state: Any, control: Any, logs: dict[str, Any] | None = None, **kw: Any) -> Any:
        for key in WATCHED:
            value = (logs or {}).get(key)
            if isinstance(value, (int, float)) and not math.isfinite(value):
                names = {"loss": "the training loss", "grad_norm": "the gradient norm", "eval_loss": "the eval loss"}
                self._stop(state, control, names[key])
        return control

    def on_evaluate(self, args: Any, state: Any, control: Any, metrics: dict[str, Any] | None = None,
                    **kw: Any) -> Any:  # fmt: skip
        value = (metrics or {}).get("eval_loss")
        if isinstance(value, (int, float)) and not math.isfinite(value):
            self._stop(state, control, "the eval loss")
        return control

    def on_epoch_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> Any:
        if self.stopped_at is not None:
            self._stop(state, control, self.what)
        return control


def check_same_data(output_dir: Path, prepared_dir: str | Path, identity: str | None) -> None:
    """--resume continues on the data the run started with; refuse data prepared again or another dataset."""
    try:
        _, facts = load_run_config(output_dir)
    except ConfigError:  # no readable run record: nothing to compare against
        return
    recorded = facts.get("data_fingerprint")
    if recorded and identity and recorded != identity:
        raise RunError(f"the data in {prepared_dir} is not what the run in {output_dir} was trained on (it was "
                       f"prepared again or is another dataset); resume with the run's own data, or start over "
                       f"with --overwrite")  # fmt: skip


def diverged_message(guard: Any, config: Phi2Config, saved: list[Path]) -> str:
    """What a run whose loss became NaN/inf left behind, and what to change."""
    kept = f"the last good checkpoint is {saved[-1]}" if saved else "no checkpoint was saved before it"
    return (f"training stopped at step {guard.stopped_at}: {guard.what} became NaN or infinite; {kept} and no "
            f"adapter was saved. Lower --lr (it was {config.train.learning_rate:g}) and start again with --overwrite")
