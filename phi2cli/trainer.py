"""The Hugging Face Trainer, specialised: selective-head loss, token counting, progress, signals."""

from __future__ import annotations

import signal
import time
from typing import Any, Callable

import torch
import torch.nn.functional as F
from transformers import Trainer, TrainerCallback

from phi2cli.collate import real_tokens, sequence_lengths
from phi2cli.prompts import IGNORE_INDEX


def selective_causal_lm_loss(model: Any, inputs: dict[str, Any], num_items: Any = None) -> tuple[torch.Tensor, int]:
    """Causal-LM loss that runs lm_head only at positions whose next token has a label.

    With the loss on the summary, that is ~6% of positions, so the 51,200-wide logits are
    never built for the article. Same value as the model's own loss (sum / label count).
    Returns (loss, number of labelled tokens in this micro-batch).
    """
    labels = inputs.pop("labels")
    if labels.shape[0] != 1:  # padded batches: select per row by flattening rows x positions
        raise ValueError("selective_causal_lm_loss expects packed (single-row) batches")
    targets = labels[0, 1:]
    cols = inputs.pop("label_positions", None)  # from PackedCollator, computed on the host
    if cols is None:
        cols = (targets != IGNORE_INDEX).nonzero(as_tuple=True)[0]
    outputs = model(**inputs, logits_to_keep=cols, use_cache=False)
    logits = outputs.logits[0].float()
    loss_sum = F.cross_entropy(logits, targets[cols], reduction="sum")
    count = int(cols.numel())
    denominator = num_items if num_items is not None else max(count, 1)
    if isinstance(denominator, torch.Tensor):
        denominator = denominator.to(loss_sum.device)
    return loss_sum / denominator, count


class Phi2Trainer(Trainer):
    """Trainer with the fast engine's loss and a count of real (non-pad) tokens seen."""

    def __init__(self, *args: Any, selective_head: bool = False, flat_optimizer: bool = False, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.selective_head = selective_head
        self.flat_optimizer = flat_optimizer
        self.real_tokens_seen = 0
        self.squared_lengths_seen = 0  # sum of L^2 over examples: the attention share of the FLOPs

    def create_optimizer(self, model: Any = None) -> Any:
        created = self.optimizer is None
        optimizer = super().create_optimizer(model)
        if created and self.flat_optimizer:
            from phi2cli.optim import flatten_bnb_adamw

            self.optimizer = optimizer = flatten_bnb_adamw(optimizer)
        return optimizer

    def training_step(self, model: Any, inputs: dict[str, Any], num_items_in_batch: Any = None) -> torch.Tensor:
        self.real_tokens_seen += real_tokens(inputs)
        self.squared_lengths_seen += sum(n * n for n in sequence_lengths(inputs))
        return super().training_step(model, inputs, num_items_in_batch)

    def compute_loss(self, model: Any, inputs: dict[str, Any], return_outputs: bool = False,
                     num_items_in_batch: Any = None) -> Any:  # fmt: skip
        if not self.selective_head:
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        loss, _ = selective_causal_lm_loss(model, dict(inputs), num_items_in_batch)
        if self.args.average_tokens_across_devices and num_items_in_batch is not None:
            loss = loss * self.accelerator.num_processes  # DDP averages gradients over processes
        return (loss, None) if return_outputs else loss

    def prediction_step(self, model: Any, inputs: dict[str, Any], prediction_loss_only: bool,
                        ignore_keys: Any = None) -> Any:  # fmt: skip
        if not self.selective_head:
            return super().prediction_step(model, inputs, prediction_loss_only, ignore_keys)
        inputs = self._prepare_inputs(inputs)
        with torch.no_grad(), self.compute_loss_context_manager():
            loss, _ = selective_causal_lm_loss(model, dict(inputs))
        return loss.detach(), None, None


class StopOnSignal(TrainerCallback):
    """Ctrl-C / SIGTERM: finish the current step, save a checkpoint, stop. A second Ctrl-C aborts."""

    def __init__(self) -> None:
        self.requested: str | None = None
        self._previous: dict[int, Any] = {}

    def install(self) -> None:
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                self._previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread (e.g. inside some test runners)
                pass

    def uninstall(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def _handle(self, signum: int, frame: Any) -> None:
        if self.requested is not None:
            raise KeyboardInterrupt
        self.requested = signal.Signals(signum).name

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> Any:
        if self.requested is not None:
            control.should_save = True
            control.should_training_stop = True
        return control


class EvaluateAtEnd(TrainerCallback):
    """Evaluate and save at the last step too, so the steps after the last eval can win 'best'."""

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> Any:
        if state.global_step >= state.max_steps and args.eval_strategy != "no":
            control.should_evaluate = True
            control.should_save = True
        return control


class ProgressCallback(TrainerCallback):
    """Feeds a display function with step, epoch, loss, learning rate, tokens/s and ETA."""

    def __init__(self, display: Callable[[str, dict[str, Any]], None], tokens: Callable[[], int],
                 waiting: str = "") -> None:  # fmt: skip
        self.display = display
        self.tokens = tokens
        self.waiting = waiting  # shown until the first step ends (e.g. while layers compile)
        self.start = 0.0
        self.start_step = 0
        self.start_tokens = 0
        self.last: dict[str, Any] = {}

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.start, self.start_step, self.start_tokens = time.perf_counter(), state.global_step, self.tokens()
        self.display("begin", {"max_steps": state.max_steps, "step": state.global_step, "waiting": self.waiting})

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        elapsed = max(time.perf_counter() - self.start, 1e-9)
        done = state.global_step - self.start_step
        eta = elapsed / done * (state.max_steps - state.global_step) if done else None
        self.display("step", {"step": state.global_step, "max_steps": state.max_steps, "epoch": state.epoch,
                              "tokens_per_s": (self.tokens() - self.start_tokens) / elapsed, "eta_s": eta,
                              **self.last})  # fmt: skip

    def on_log(self, args: Any, state: Any, control: Any, logs: dict[str, Any] | None = None, **kw: Any) -> None:
        logs = logs or {}
        if "loss" in logs:
            self.last = {"loss": logs["loss"], "learning_rate": logs.get("learning_rate"),
                         "grad_norm": logs.get("grad_norm")}  # fmt: skip
        if "eval_loss" in logs:
            self.display("eval", {"step": state.global_step, **logs})

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.display("end", {"step": state.global_step})


class ThroughputMeter(TrainerCallback):
    """Real tokens per second over all processes, after `skip` warm-up steps (compile, allocator)."""

    def __init__(self, tokens: Callable[[], int], skip: int = 2) -> None:
        self.tokens = tokens
        self.skip = skip
        self.start: tuple[float, int, int] | None = None
        self.result: dict[str, float] = {}

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if state.global_step - self._first == self.skip:
            self.start = (time.perf_counter(), self.tokens(), state.global_step)

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self._first = state.global_step

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self.start is None or state.global_step <= self.start[2]:
            return
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        seconds = time.perf_counter() - self.start[0]
        tokens = torch.tensor([float(self.tokens() - self.start[1])])
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            tokens = tokens.to(args.device)
            torch.distributed.all_reduce(tokens)
        steps = state.global_step - self.start[2]
        self.result = {"tokens_per_s": round(float(tokens.item()) / seconds, 1), "timed_steps": steps,
                       "seconds_per_step": round(seconds / steps, 4), "warmup_steps": self.skip}  # fmt: skip
