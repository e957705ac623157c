"""Stop a run that has diverged before it saves anything that looks like a result."""

from __future__ import annotations

import math
from typing import Any, Callable

from transformers import TrainerCallback

WATCHED = ("loss", "grad_norm", "eval_loss")


class StopOnNonFiniteLoss(TrainerCallback):
    """Stops training at the first NaN/inf loss, gradient norm or eval loss; that step is not saved.

    The micro-batch count of NaN/inf losses lives on the device (Phi2Trainer._count_non_finite); it is
    read only at steps that log, evaluate or save, so the GPU is not waited for at every step. Add
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
        last_step = state.global_step >= state.max_steps
        if self.stopped_at is None and not (control.should_log or control.should_save or control.should_evaluate
                                            or control.should_training_stop or last_step):  # fmt: skip
            return control
        count = self.non_finite_losses()
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
