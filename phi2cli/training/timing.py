"""Where a training run's time goes: the throughput meter's phases and the run's wall-time split."""

from __future__ import annotations

import time
from typing import Any, Callable

import torch
from transformers import TrainerCallback

from phi2cli.training.plan import EnginePlan


class ThroughputMeter(TrainerCallback):
    """Real tokens per second over all processes, timed over training steps only.

    A clock runs through the training loop and puts every interval in one phase: evaluation
    (from the step that asked for it to `on_evaluate`), saving (to `on_save`, and from the last
    save to the end: restoring the best checkpoint) or training (everything else: steps, data,
    logging). Before an evaluation, a save or the last step the GPU is waited for, so queued
    training work is not billed to evaluation. Rates use the training clock only.

    `tokens_per_s` counts from the end of `skip` warm-up steps (compile, allocator) on.
    `recordings` (CUDA graphs recorded so far in this process) adds a steady-state figure: the
    rate between the last log after which no process recorded a new graph and the end. Logs are
    points where every process has waited for its GPU (the logged loss is read back).
    """

    def __init__(self, tokens: Callable[[], int], skip: int = 2, recordings: Callable[[], int] | None = None) -> None:
        self.tokens = tokens
        self.skip = skip
        self.recordings = recordings
        self.start: tuple[float, int, int] | None = None  # training clock, tokens, step after warm-up
        self.marks: list[tuple[float, int, int, int]] = []  # training clock, tokens, step, recordings at each log
        self.phases = {"train": 0.0, "evaluation": 0.0, "save": 0.0}
        self.first_step_seconds = 0.0
        self.result: dict[str, float] = {}
        self._first = 0
        self._stamp = 0.0
        self._pending = "train"  # the phase the running interval belongs to
        self._train_at_begin = 0.0

    def _close(self, phase: str | None = None) -> float:
        """Add the time since the last event to `phase` (default: the pending one); the training clock."""
        now = time.perf_counter()
        self.phases[phase or self._pending] += now - self._stamp
        self._stamp = now
        return self.phases["train"]

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self._first = state.global_step
        self._stamp = time.perf_counter()
        self._pending = "train"
        self._train_at_begin = self.phases["train"]

    def on_step_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self._close("train")  # data loading and logging since the last event belong to training
        self._pending = "train"

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        first = state.global_step - self._first == 1
        evaluate, save = bool(getattr(control, "should_evaluate", False)), bool(getattr(control, "should_save", False))
        last = state.global_step >= (getattr(state, "max_steps", 0) or 0) > 0
        if (first or evaluate or save or last) and torch.cuda.is_available():
            torch.cuda.synchronize()  # the step's queued GPU work is training's, not evaluation's
        clock = self._close("train")
        if first:  # includes compiling the layers or recording the first CUDA graph
            self.first_step_seconds = clock - self._train_at_begin
        if state.global_step - self._first == self.skip:
            self.start = (clock, self.tokens(), state.global_step)
        self._pending = "evaluation" if evaluate else "save" if save else "train"

    def on_log(self, args: Any, state: Any, control: Any, logs: dict[str, Any] | None = None, **kw: Any) -> None:
        if logs and "loss" in logs:  # the loss log comes before any evaluation or save of this step
            clock = self._close("train")
            if self.recordings is not None:
                self.marks.append((clock, self.tokens(), state.global_step, self.recordings()))

    def on_evaluate(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self._close("evaluation")
        self._pending = "save"  # a save follows an evaluation, if any; else the next step re-labels it

    def on_save(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self._close("save")
        self._pending = "save"  # until the next step: at the end, restoring the best checkpoint

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        clock = self._close()
        self.result = {"train_steps_seconds": round(self.phases["train"], 3),
                       "evaluation_seconds": round(self.phases["evaluation"], 3),
                       "save_seconds": round(self.phases["save"], 3),
                       "first_step_seconds": round(self.first_step_seconds, 3)}  # fmt: skip
        counts = [float(self.tokens())]
        counts.append(float(self.tokens() - self.start[1]) if self.start is not None else 0.0)
        counts += [float(self.tokens() - tokens) for _, tokens, _, _ in self.marks]
        counts += [float(recorded) for *_, recorded in self.marks]
        counts.append(float(self.recordings() if self.recordings is not None else 0))
        totals = torch.tensor(counts, dtype=torch.float64)
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            totals = totals.to(args.device)
            torch.distributed.all_reduce(totals)
            totals = totals.cpu()
        self.result["real_tokens"] = int(totals[0])
        if self.start is None or state.global_step <= self.start[2]:
            return
        seconds = max(clock - self.start[0], 1e-9)
        steps = state.global_step - self.start[2]
        self.result.update(tokens_per_s=round(float(totals[1]) / seconds, 1), timed_steps=steps,
                           seconds_per_step=round(seconds / steps, 4), warmup_steps=self.skip)  # fmt: skip
        marks = len(self.marks)
        recorded = totals[2 + marks:].tolist()
        for index in range(marks):
            mark_clock, _, mark_step, _ = self.marks[index]
            if recorded[index] == recorded[-1] and state.global_step - mark_step >= 5:  # no new graph since then
                window = max(clock - mark_clock, 1e-9)
                self.result.update(steady_tokens_per_s=round(float(totals[2 + index]) / window, 1),
                                   steady_from_step=mark_step,
                                   steady_seconds_per_step=round(window / (state.global_step - mark_step), 4))  # fmt: skip
                break


def time_split(throughput: dict[str, Any], plan: EnginePlan, load_seconds: float,
               data_seconds: float) -> dict[str, float]:  # fmt: skip
    """Where the training loop's time went, from the meter's phases (seconds; the final save added later).

    compile_record: recording CUDA graphs (the first also compiles), else the first step of
    compiled layers. train_steps: the rest of the training clock; the rate is over it alone.
    """
    graphs = throughput.get("cuda_graphs") or {}
    train_clock = float(throughput.get("train_steps_seconds", 0.0))
    if graphs:
        compile_record = float(graphs.get("record_seconds", 0.0))
    else:
        compile_record = float(throughput.get("first_step_seconds", 0.0)) if plan.compile else 0.0
    compile_record = min(compile_record, train_clock)
    steps_seconds = train_clock - compile_record
    timing = {"load_s": round(load_seconds, 2), "data_s": round(data_seconds, 2),
              "compile_record_s": round(compile_record, 2), "train_steps_s": round(steps_seconds, 2),
              "evaluation_s": round(float(throughput.get("evaluation_seconds", 0.0)), 2),
              "save_s": round(float(throughput.get("save_seconds", 0.0)), 2)}  # fmt: skip
    tokens = throughput.get("real_tokens")
    if tokens and steps_seconds > 0:
        timing["train_steps_tokens_per_s"] = round(tokens / steps_seconds, 1)
    return timing


def finish_timing(timing: dict[str, float], started: float, final_save_started: float) -> None:
    """Add the final save and the whole wall time; 'other' is what no phase claims (setup, trainer creation)."""
    now = time.perf_counter()
    timing["save_s"] = round(timing["save_s"] + now - final_save_started, 2)
    timing["wall_s"] = round(now - started, 2)
    phases = ("load_s", "data_s", "compile_record_s", "train_steps_s", "evaluation_s", "save_s")
    timing["other_s"] = round(max(timing["wall_s"] - sum(timing[k] for k in phases), 0.0), 2)
