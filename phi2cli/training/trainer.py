"""The Hugging Face Trainer, specialised: selective-head loss, token counting, progress, signals."""

from __future__ import annotations

import math
import signal
import time
from typing import Any, Callable

import torch
from transformers import Trainer, TrainerCallback

from phi2cli.compat import compute_loss_scale, require, trainer_loss_scale
from phi2cli.data.collate import model_inputs, real_tokens, sequence_lengths
from phi2cli.kernels.loss import selective_causal_lm_loss
from phi2cli.training.timing import ThroughputMeter  # noqa: F401 (the engine's meter, importable from here)

require("transformers.trainer")  # overrides _get_train_sampler, _save_checkpoint, _clip_grad_norm; calls _prepare_inputs


class BalancedShards(torch.utils.data.Sampler):
    """A shuffled order in which every optimizer step's examples are dealt out so that each
    process gets about the same number of tokens.

    Under DDP each process takes its own micro-batches from one shared order: with
    `per_device` examples per micro-batch, `grad_accum` micro-batches and `processes` processes, an
    optimizer step consumes `per_device x grad_accum x processes` consecutive examples, and
    micro-batch m of the step goes to process m % processes. The step waits for the process with
    the most tokens. Here each step's examples are the same as the base order gives (so the same
    examples are learned at the same step on any number of GPUs). They are dealt longest first to
    the process with the fewest tokens so far, with the same number of examples each, and each
    process keeps them in their original order. With one process the order is the base order.
    """

    def __init__(self, base: Any, lengths: list[int], per_device: int, grad_accum: int, processes: int) -> None:
        self.base, self.lengths = base, lengths
        self.per_device, self.grad_accum, self.processes = per_device, grad_accum, processes

    def __len__(self) -> int:
        return len(self.base)

    def set_epoch(self, epoch: int) -> None:
        if hasattr(self.base, "set_epoch"):
            self.base.set_epoch(epoch)

    def __iter__(self) -> Any:
        group = self.per_device * self.grad_accum * self.processes
        pending: list[int] = []
        for index in self.base:
            pending.append(index)
            if len(pending) == group:
                yield from self.deal(pending)
                pending = []
        yield from pending  # a last, incomplete step keeps the base order

    def deal(self, indices: list[int]) -> list[int]:
        """One step's examples laid out so that process r's micro-batches hold its balanced share."""
        if self.processes == 1:
            return list(indices)
        share = self.per_device * self.grad_accum
        shards: list[list[int]] = [[] for _ in range(self.processes)]
        load = [0] * self.processes
        for position in sorted(range(len(indices)), key=lambda i: -self.lengths[indices[i]]):
            rank = min((r for r in range(self.processes) if len(shards[r]) < share), key=lambda r: load[r])
            shards[rank].append(position)
            load[rank] += self.lengths[indices[position]]
        ordered = [[indices[i] for i in sorted(shard)] for shard in shards]
        out: list[int] = []
        for micro in range(self.grad_accum):
            for rank in range(self.processes):
                out.extend(ordered[rank][micro * self.per_device : (micro + 1) * self.per_device])
        return out


class Phi2Trainer(Trainer):
    """Trainer with the fast engine's loss and a count of real (non-pad) tokens seen."""

    def __init__(self, *args: Any, selective_head: bool = False, flat_optimizer: bool = False,
                 cuda_graphs: bool = False, graph_bucket: int = 128, **kwargs: Any) -> None:  # fmt: skip
        super().__init__(*args, **kwargs)
        self.graph_bucket = graph_bucket  # tokens: recorded shapes are rounded up to this (graphs.py)
        self.selective_head = selective_head
        self.flat_optimizer = flat_optimizer
        self.cuda_graphs = cuda_graphs and selective_head  # the recorded step is the selective-head loss
        self.graphed: Any = None  # graphs.GraphedTrainStep, made at the first step
        self.graph_note: str | None = None
        self.real_tokens_seen = 0
        self.non_finite_losses: Any = None  # a device tensor: micro-batches whose loss was NaN or inf
        self.squared_lengths_seen = 0  # sum of L^2 over examples: the attention share of the FLOPs
        # Taken once, not per step (see floating_point_ops, _clip_grad_norm, _scale_neftune)
        self._flop_parameters: int | None = None
        self._trainable: list[torch.nn.Parameter] | None = None
        self._embeddings: Any = None

    def train(self, *args: Any, **kwargs: Any) -> Any:
        """CUDA graphs: train on a stream of one's own (graphs.py says why); otherwise as usual."""
        if not (self.cuda_graphs and torch.cuda.is_available()):
            return super().train(*args, **kwargs)
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        if not any(isinstance(c, OptimizerOnDefaultStream) for c in self.callback_handler.callbacks):
            self.add_callback(OptimizerOnDefaultStream())
        try:
            with torch.cuda.stream(stream):
                return super().train(*args, **kwargs)
        finally:
            torch.cuda.current_stream().wait_stream(stream)

    def _save_checkpoint(self, model: Any, trial: Any) -> None:
        """checkpoint-N appears only when complete: written under a hidden name, then renamed in."""
        from phi2cli.training.checkpoints import staged_checkpoint

        with staged_checkpoint(self):
            super()._save_checkpoint(model, trial)

    def _get_train_sampler(self, train_dataset: Any = None) -> Any:
        """Several processes with packed batches: the shuffled order accelerate would use, each step's
        examples balanced in tokens over the processes (BalancedShards)."""
        sampler = super()._get_train_sampler(train_dataset)
        dataset = train_dataset if train_dataset is not None else self.train_dataset
        columns = getattr(dataset, "column_names", ())
        if (self.args.world_size < 2 or type(sampler) is not torch.utils.data.RandomSampler
                or not {"prompt_tokens", "summary_tokens"} <= set(columns)):  # fmt: skip
            return sampler
        from accelerate.data_loader import SeedableRandomSampler

        base = SeedableRandomSampler(data_source=dataset, data_seed=self.args.data_seed)  # what accelerate makes
        lengths = [p + s for p, s in zip(dataset["prompt_tokens"], dataset["summary_tokens"])]
        return BalancedShards(base, lengths, self.args.per_device_train_batch_size,
                              self.args.gradient_accumulation_steps, self.args.world_size)  # fmt: skip

    def create_optimizer(self, model: Any = None) -> Any:
        created = self.optimizer is None
        optimizer = super().create_optimizer(model)
        if created and self.flat_optimizer:
            from phi2cli.kernels.optim import flatten_bnb_adamw

            self.optimizer = optimizer = flatten_bnb_adamw(optimizer)
        return optimizer

    def training_step(self, model: Any, inputs: dict[str, Any], num_items_in_batch: Any = None) -> torch.Tensor:
        tokens = real_tokens(inputs)
        self.real_tokens_seen += tokens
        self.squared_lengths_seen += sum(n * n for n in sequence_lengths(inputs))
        if self.neftune_noise_alpha and "example_lengths" in inputs:
            self._scale_neftune(len(inputs["example_lengths"]))
        inputs = model_inputs(inputs)
        if self.cuda_graphs:
            loss = self._graphed_step(model, inputs, num_items_in_batch, tokens)
            if loss is not None:
                return self._count_non_finite(loss)
        return self._count_non_finite(super().training_step(model, inputs, num_items_in_batch))

    def _count_non_finite(self, loss: torch.Tensor) -> torch.Tensor:
        """Counts NaN/inf micro-batch losses on the device: no wait for the GPU (guards.StopOnNonFiniteLoss reads it)."""
        bad = (~torch.isfinite(loss.detach())).sum()
        self.non_finite_losses = bad if self.non_finite_losses is None else self.non_finite_losses + bad
        return loss

    def _scale_neftune(self, examples: int) -> None:
        """NEFTune's noise is alpha / sqrt(row length x width): a packed row holds several examples, so
        alpha x sqrt(examples) gives each example the noise of a row of the mean example length."""
        if self._embeddings is None:  # unwrapping walks every module: once, not every step
            self._embeddings = self.accelerator.unwrap_model(self.model).get_input_embeddings()
        self._embeddings.neftune_noise_alpha = self.neftune_noise_alpha * math.sqrt(max(examples, 1))

    # The Trainer's own per-step bookkeeping walks the whole module tree several times a step: counting
    # parameters for its FLOP estimate, listing them for clipping, switching every module to training
    # mode. For SmolLM2-135M with LoRA on every linear layer (2,499 modules) that is 3.2 + 2.5 + 4.1 ms
    # a step on a 2-core CPU, while its whole step runs ~50 ms on an H200. The methods below do the same
    # work on what was gathered once (benchmarks/results/host_overhead.json has the before/after steps).

    def floating_point_ops(self, inputs: dict[str, Any]) -> int:
        """The Trainer's estimate, 6 x input tokens x non-embedding parameters, with the count taken once."""
        if self._flop_parameters is None:
            count = getattr(self.model, "num_parameters", None)
            self._flop_parameters = int(count(exclude_embeddings=True)) if callable(count) else 0
        main_input = getattr(self.model, "main_input_name", "input_ids")
        if main_input not in inputs or not self._flop_parameters:
            return 0
        return 6 * inputs[main_input].numel() * self._flop_parameters

    def _training_mode(self, model: Any) -> None:
        """model.train() where it is not in training mode already (after an evaluation)."""
        if not model.training:
            model.train()

    def _clip_grad_norm(self, model: Any) -> Any:
        """The Trainer's clipping (accelerate's clip_grad_norm_, unscaling fp16 gradients first) over the
        trainable parameters, listed at the first step; sharded setups keep the Trainer's own path."""
        from accelerate.utils import DistributedType

        if self.accelerator.distributed_type not in (DistributedType.NO, DistributedType.MULTI_GPU):
            return super()._clip_grad_norm(model)
        if self._trainable is None:
            self._trainable = [p for p in model.parameters() if p.requires_grad]
        return self.accelerator.clip_grad_norm_(self._trainable, self.args.max_grad_norm)

    def _graphed_step(self, model: Any, inputs: dict[str, Any], num_items_in_batch: Any,
                      tokens: int) -> torch.Tensor | None:  # fmt: skip
        """The micro-batch replayed from a CUDA graph; None when graphs are off from here on (eager)."""
        from phi2cli.kernels.graphs import GraphCaptureError, GraphedTrainStep

        self._training_mode(model)
        inputs = self._prepare_inputs(inputs)
        if self.graphed is None:
            self.graphed = GraphedTrainStep(self.accelerator.unwrap_model(model), bucket=self.graph_bucket)
        try:
            scale = trainer_loss_scale(self, num_items_in_batch)  # what the eager step gets from the Trainer
            loss = self.graphed(inputs, num_items_in_batch, scale, tokens)
        except GraphCaptureError as error:
            if self.accelerator.num_processes > 1:  # the other processes reduce gradients the graphed way
                from phi2cli.errors import RunError

                raise RunError(f"could not record the training step as a CUDA graph ({error}); "
                               f"run again with --no-cuda-graphs") from None  # fmt: skip
            self.cuda_graphs = False
            self.graph_note = f"CUDA graphs off (recording failed: {str(error)[:200]}); training continued eagerly"
            return None
        if self.accelerator.num_processes > 1 and self.accelerator.sync_gradients:
            self.graphed.all_reduce()
        return loss

    def compute_loss(self, model: Any, inputs: dict[str, Any], return_outputs: bool = False,
                     num_items_in_batch: Any = None) -> Any:  # fmt: skip
        if not self.selective_head:
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        loss, _ = selective_causal_lm_loss(model, dict(inputs), num_items_in_batch)
        scale = compute_loss_scale(self, num_items_in_batch)  # the Trainer's own compute_loss would apply it
        if scale != 1:
            loss = loss * scale
        return (loss, None) if return_outputs else loss

    def prediction_step(self, model: Any, inputs: dict[str, Any], prediction_loss_only: bool,
                        ignore_keys: Any = None) -> Any:  # fmt: skip
        inputs = model_inputs(inputs)
        if not self.selective_head:
            return super().prediction_step(model, inputs, prediction_loss_only, ignore_keys)
        inputs = self._prepare_inputs(inputs)
        with torch.no_grad(), self.compute_loss_context_manager():
            loss, _ = selective_causal_lm_loss(model, dict(inputs))
        return loss.detach(), None, None


class OptimizerOnDefaultStream(TrainerCallback):
    """Runs the optimizer step on the CUDA default stream when training runs on another one.

    bitsandbytes launches its 8-bit optimizer kernels on the default stream whatever the current
    stream is; on another stream they could read gradients that are not written yet. The step is
    ordered after the training stream's work and the training stream after the step, on the GPU.
    """

    def __init__(self) -> None:
        self.training_stream: Any = None

    def on_pre_optimizer_step(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        current, default = torch.cuda.current_stream(), torch.cuda.default_stream()
        if current != default:
            self.training_stream = current
            default.wait_stream(current)
            torch.cuda.set_stream(default)

    def on_optimizer_step(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self.training_stream is not None:
            self.training_stream.wait_stream(torch.cuda.default_stream())
            torch.cuda.set_stream(self.training_stream)
            self.training_stream = None


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


class ContinueLogWindow(TrainerCallback):
    """On resume, the first logged loss averages the same steps as in an uninterrupted run."""

    def __init__(self, trainer: Any, checkpoint: Any) -> None:
        self.trainer, self.checkpoint = trainer, checkpoint

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        from phi2cli.training.checkpoints import restore_log_window

        restore_log_window(self.trainer, self.checkpoint)


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
            self.on_step_end(args, state, control)  # the Trainer logs after step end: show this step's values now
        if "eval_loss" in logs:
            self.display("eval", {"step": state.global_step, **logs})

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.display("end", {"step": state.global_step})


#END
