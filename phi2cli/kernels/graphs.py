"""The training micro-batch as a CUDA graph: forward and backward recorded once, then replayed.

With the fast engine, a phi-2 step keeps the CPU busier launching a few thousand small kernels
than it keeps the GPU running them. A CUDA graph records those launches once and replays them
with a single call. A recording has fixed shapes, so the packed collator pads every batch to a
multiple of `PAD_MULTIPLE` tokens (one trailing pad sequence, labels -100) and its label
positions to a multiple of `LABEL_MULTIPLE`. Each shape gets one recording, made the first time it
appears: a warm-up pass on a side stream, then the capture. A batch whose shape was not
recorded but is at most `REUSE_TOKENS` tokens shorter than a recorded one is padded further on
the GPU and replays that recording instead, so a run records a handful of shapes, not every one.
All recordings share one memory pool, so they hold the memory of the largest one, not the sum.

Gradients accumulate into one flat fp32 buffer. The trainable parameters' `.grad` are views of
that buffer, and the recording refers to them by address. On several GPUs the buffer is averaged
with one all-reduce after the backward. That is DDP's reduction as a single bucket: DDP's own
hooks cannot run inside a recording. DDP keeps each parameter's gradient-accumulation node
alive from its construction, and such a node runs on the stream it was made on; so a graphed run
trains on a stream of its own (`Phi2Trainer.train`): DDP is built on it and recordings are
captured on. Dropout draws fresh masks on every replay, because PyTorch registers its random
generator with the graph.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import torch

PAD_MULTIPLE = 128  # tokens: a batch is padded by 64 on average, ~3% of a 2,000-token micro-batch
LABEL_MULTIPLE = 128  # label positions: lm_head on 128 extra rows costs well under a millisecond
REUSE_TOKENS = 128  # replay a recorded shape up to this many tokens longer than the batch (more padding)
STATIC_KEYS = ("input_ids", "labels", "position_ids", "cu_seq_lens_q", "label_positions")


class GraphCaptureError(RuntimeError):
    """Recording the step failed (an operation that cannot run inside a CUDA graph)."""


def warm_up(run: Any, passes: int = 1) -> None:
    """Run `run()` on a side stream first, as CUDA graph capture wants (kernel selection, allocations)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(passes):
            run()
    torch.cuda.current_stream().wait_stream(side)


def record_graph(run: Any, pool: Any = None, stream: Any = None,
                 capture_error_mode: str = "global") -> tuple[torch.cuda.CUDAGraph, Any]:  # fmt: skip
    """Capture `run()` as a CUDA graph (nothing executes); (graph, what run returned while captured).

    The one capture routine of the project: training's graphed step and the decoder's step use it.
    """
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, pool=pool, stream=stream, capture_error_mode=capture_error_mode):
        output = run()
    return graph, output


@dataclass
class Recording:
    graph: Any  # torch.cuda.CUDAGraph
    inputs: dict[str, torch.Tensor]  # the static tensors the graph reads; each replay copies a batch in
    loss: torch.Tensor  # written by each replay


class GraphedTrainStep:
    """Forward + backward of one packed micro-batch, replayed from a CUDA graph per batch shape.

    `model` is the unwrapped model (not DDP), in training mode, on one CUDA device. The loss is
    the selective-head causal-LM loss: sum over labelled tokens / `denominator` x `scale`, the
    same value and gradient as the eager step.
    """

    def __init__(self, model: Any, warmup: int = 2, bucket: int = REUSE_TOKENS) -> None:
        self.model = model
        self.bucket = bucket  # a new shape is recorded rounded up to this many tokens; shorter batches reuse it
        self.params = [p for p in model.parameters() if p.requires_grad]
        if not self.params:
            raise ValueError("the model has no trainable parameters")
        if any(p.dtype != torch.float32 for p in self.params):
            raise ValueError("CUDA-graphed steps need fp32 trainable parameters (LoRA's master weights)")
        device = self.params[0].device
        offsets = [0]
        for p in self.params:
            offsets.append(offsets[-1] + p.numel())
        self.grads = torch.zeros(offsets[-1], dtype=torch.float32, device=device)
        self.views = [self.grads[a:b].view_as(p) for a, b, p in zip(offsets, offsets[1:], self.params)]
        self.denominator = torch.ones((), dtype=torch.float32, device=device)
        self.scale = torch.ones((), dtype=torch.float32, device=device)
        self._scale_value = 1.0
        self.pool = torch.cuda.graph_pool_handle()
        self.recordings: dict[tuple[int, ...], Recording] = {}
        self.record_seconds = 0.0
        self.record_each: list[float] = []
        self.reused = 0  # batches that replayed a longer recorded shape
        self.warmup = warmup

    @staticmethod
    def key(batch: dict[str, Any]) -> tuple[int, ...]:
        """The shape of a batch: tokens, label positions, sequences (+1), attention bound."""
        return (batch["input_ids"].shape[1], batch["label_positions"].shape[0], batch["cu_seq_lens_q"].shape[0],
                int(batch["max_length_q"]))  # fmt: skip

    def attach_grads(self) -> None:
        """Point every .grad at the flat buffer; zero it when the trainer has just cleared the grads."""
        first = self.params[0].grad
        if first is not None and first.data_ptr() == self.views[0].data_ptr():
            return
        cleared = all(p.grad is None for p in self.params)
        if cleared:  # one fill for the whole buffer, not one per parameter
            self.grads.zero_()
        for p, view in zip(self.params, self.views):
            if p.grad is not None:  # gradients accumulated elsewhere (an eager micro-batch) move into the buffer
                view.copy_(p.grad)
            elif not cleared:
                view.zero_()
            p.grad = view

    def __call__(self, batch: dict[str, Any], num_items: Any = None, scale: float = 1.0,
                 real_tokens: int | None = None) -> torch.Tensor:  # fmt: skip
        """Run one micro-batch; gradients are added to .grad. Returns the (scaled) loss.

        real_tokens (the batch's tokens before padding) lets a batch replay a longer recorded shape.
        """
        self.attach_grads()
        if num_items is None:
            num_items = (batch["labels"] != -100).sum()
        if isinstance(num_items, torch.Tensor):
            self.denominator.copy_(num_items.reshape(()), non_blocking=True)
        else:
            self.denominator.fill_(float(num_items))
        if scale != self._scale_value:
            self.scale.fill_(scale)
            self._scale_value = scale
        key = self.key(batch)
        recording = self.recordings.get(key)
        if recording is None:  # a longer recorded shape, or its bucket's, when one was recorded
            found = self._larger(key, real_tokens) or self.bucket_key(key, real_tokens)
            if found in self.recordings:
                recording = self.recordings[found]
                self._pad_into(recording.inputs, batch)
                self.reused += 1
        if recording is None:
            torch.cuda.synchronize()  # time the recording, not the queued work before it
            started = time.perf_counter()
            key, batch = self.bucketed(key, batch, real_tokens)
            recording = self.recordings[key] = self._record(batch)
            self.record_each.append(time.perf_counter() - started)
            self.record_seconds += self.record_each[-1]
        elif recording is self.recordings.get(key):
            for name, static in recording.inputs.items():
                static.copy_(batch[name], non_blocking=True)
        recording.graph.replay()
        return recording.loss

    def _larger(self, key: tuple[int, ...], real_tokens: int | None) -> tuple[int, ...] | None:
        """The smallest recorded shape this batch fits with more padding: same sequence count and
        attention bound, at most REUSE_TOKENS more tokens, the pad sequence within the bound."""
        if real_tokens is None:
            return None
        tokens, labels, sequences, longest = key
        fits = [k for k in self.recordings
                if k[2:] == (sequences, longest) and tokens < k[0] <= tokens + max(self.bucket, REUSE_TOKENS)
                and k[0] - real_tokens <= longest and k[1] >= labels]  # fmt: skip
        return min(fits) if fits else None

    def bucket_key(self, key: tuple[int, ...], real_tokens: int | None) -> tuple[int, ...]:
        """A batch's shape rounded up to its bucket (itself when the real length is unknown)."""
        tokens, labels, sequences, longest = key
        if real_tokens is None:
            return key
        width = max(tokens, -(-tokens // self.bucket) * self.bucket)
        if width - real_tokens > longest:  # the pad sequence may grow to at most the attention bound
            width = tokens
        label_step = 256 if self.bucket >= 256 else labels or 1
        return (width, max(labels, -(-labels // label_step) * label_step), sequences, longest)

    def bucketed(self, key: tuple[int, ...], batch: dict[str, Any],
                 real_tokens: int | None) -> tuple[tuple[int, ...], dict[str, Any]]:  # fmt: skip
        """The shape to record for a batch: tokens rounded up to the bucket (the pad sequence kept within
        the attention bound), label positions to a multiple of 256 with a bucket of 256 or more."""
        bucket = self.bucket_key(key, real_tokens)
        if bucket == key:
            return key, batch
        width, label_width = bucket[:2]
        static = {name: batch[name] for name in STATIC_KEYS}
        like = {"input_ids": (1, width), "labels": (1, width), "position_ids": (1, width),
                "cu_seq_lens_q": tuple(batch["cu_seq_lens_q"].shape), "label_positions": (label_width,)}  # fmt: skip
        # zeros: token id 0 in the grown pad sequence (any real id keeps it finite)
        padded = {name: torch.zeros(like[name], dtype=static[name].dtype, device=static[name].device)
                  for name in STATIC_KEYS}  # fmt: skip
        self._pad_into(padded, batch)
        return bucket, {**batch, **padded}

    @staticmethod
    def _pad_into(static: dict[str, torch.Tensor], batch: dict[str, Any]) -> None:
        """Copy a batch into a longer recording's tensors: its pad sequence grows to the end and the
        extra label positions point where the next label is -100 (as the collator's do)."""
        tokens, labels = batch["input_ids"].shape[1], batch["label_positions"].shape[0]
        width = static["input_ids"].shape[1]
        for name in ("input_ids", "position_ids", "labels"):
            static[name][:, :tokens].copy_(batch[name], non_blocking=True)
        static["labels"][:, tokens:].fill_(-100)
        static["position_ids"][:, tokens:].zero_()
        static["cu_seq_lens_q"].copy_(batch["cu_seq_lens_q"], non_blocking=True)
        static["cu_seq_lens_q"][-1:].fill_(width)
        static["label_positions"][:labels].copy_(batch["label_positions"], non_blocking=True)
        static["label_positions"][labels:].fill_(width - 2)

    def all_reduce(self) -> None:
        """Average the gradients over the data-parallel processes (one collective)."""
        torch.distributed.all_reduce(self.grads)  # a sum: gloo has no average
        self.grads.div_(torch.distributed.get_world_size())

    def _forward_backward(self, inputs: dict[str, torch.Tensor], longest: int) -> torch.Tensor:
        """The eager step's loss (kernels.loss.selective_causal_lm_loss) over the static tensors, and its backward."""
        from phi2cli.kernels.loss import selective_causal_lm_loss

        cu = inputs["cu_seq_lens_q"]
        batch = {**inputs, "cu_seq_lens_k": cu, "max_length_q": longest, "max_length_k": longest}
        loss, _ = selective_causal_lm_loss(self.model, batch, self.denominator)
        loss = loss * self.scale
        loss.backward()
        return loss.detach()

    def _record(self, batch: dict[str, Any]) -> Recording:
        longest = int(batch["max_length_q"])
        inputs = {name: batch[name].clone() for name in STATIC_KEYS}
        saved = self.grads.clone()  # the warm-up passes add gradients; they are put back after
        try:
            # the first recording also compiles (and initialises cuBLAS); later ones need one pass
            warm_up(lambda: self._forward_backward(inputs, longest), self.warmup if not self.recordings else 1)
            self.grads.copy_(saved)
            current = torch.cuda.current_stream()
            stream = None if current == torch.cuda.default_stream() else current  # capture where training runs
            graph, loss = record_graph(lambda: self._forward_backward(inputs, longest), pool=self.pool,
                                       stream=stream, capture_error_mode="thread_local")  # fmt: skip
        except torch.cuda.OutOfMemoryError:
            self.grads.copy_(saved)
            raise
        except Exception as error:  # an operation that cannot be captured; the caller decides
            self.grads.copy_(saved)
            raise GraphCaptureError(f"{type(error).__name__}: {error}") from error
        return Recording(graph, inputs, loss)

    def summary(self) -> dict[str, float]:
        """How many shapes were recorded and what it cost (the first also compiles and warms up twice)."""
        later = self.record_each[1:]
        return {"recordings": len(self.recordings), "replays_of_a_longer_shape": self.reused,
                "record_seconds": round(self.record_seconds, 2),
                "first_record_seconds": round(self.record_each[0], 2) if self.record_each else 0.0,
                "later_record_seconds_mean": round(sum(later) / len(later), 3) if later else 0.0}  # fmt: skip
