"""Will a CPU run fit in host memory? A rough estimate made before the model is loaded.

Without it a run that cannot fit is killed by the kernel (exit 137, no message) after loading.
The estimate: weights (parameters x bytes), plus the activations one micro-batch keeps for the
backward pass (per token and layer about 17 x hidden values, as in Korthikanti et al. 2022, plus
the attention scores where eager attention stores them), plus the logits the loss builds, plus a
fixed 1 GiB for the runtime.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from phi2cli.errors import DeviceError

GIB = 2**30
RUNTIME_BYTES = 1 * GIB  # Python, torch, tokenizer, the dataset


def available_bytes() -> int | None:
    """MemAvailable from /proc/meminfo, lowered to what a cgroup memory limit leaves; None if unknown."""
    try:
        lines = Path("/proc/meminfo").read_text().splitlines()
        available = next(int(line.split()[1]) * 1024 for line in lines if line.startswith("MemAvailable:"))
    except (OSError, StopIteration, ValueError):
        return None
    for limit_file, usage_file in (("memory.max", "memory.current"),
                                   ("memory/memory.limit_in_bytes", "memory/memory.usage_in_bytes")):  # fmt: skip
        try:
            limit = int(Path("/sys/fs/cgroup", limit_file).read_text())
            usage = int(Path("/sys/fs/cgroup", usage_file).read_text())
        except (OSError, ValueError):  # "max" (no limit) or no such cgroup version
            continue
        available = min(available, max(limit - usage, 0))
    return available


def training_bytes(model_config: Any, parameters: int, dtype_bytes: int, tokens: int, longest: int,
                   labelled: int, checkpointing: bool, eager_attention: bool = False) -> int:  # fmt: skip
    """Rough peak host memory of training: weights + one micro-batch's activations + logits."""
    hidden = model_config.hidden_size
    heads = model_config.num_attention_heads
    layers = model_config.num_hidden_layers
    vocab = model_config.vocab_size
    per_layer = tokens * 17 * hidden + (2.5 * heads * tokens * longest if eager_attention else 0)
    kept_layers = 1 + (layers if not checkpointing else 0)
    activations = (per_layer * kept_layers + (tokens * hidden * layers if checkpointing else 0)) * dtype_bytes
    logits = labelled * vocab * 4 * 3  # fp32 logits, their softmax and its gradient
    return int(parameters * dtype_bytes + activations + logits + RUNTIME_BYTES)


def check_host_memory(config: Any, plan: Any, precision: Any, train_set: Any, model_config: Any = None) -> None:
    """Refuse a CPU run whose estimate exceeds the available host memory (GPU runs train on the GPU).

    model_config: the model's transformers config where the caller has read it already.

    Raises:
        DeviceError with the estimate, what is available and what to change.
    """
    if precision.device != "cpu":
        return
    available = available_bytes()
    if available is None:
        return
    from phi2cli.models.loading import parameter_count, read_model_config

    if model_config is None:
        model_config = read_model_config(config.model.model)
    if model_config is None:
        return
    dtype_bytes = {"float32": 4, "float16": 2, "bfloat16": 2}.get(precision.compute_dtype, 4)
    columns = set(getattr(train_set, "column_names", ()))
    if {"prompt_tokens", "summary_tokens"} <= columns:
        lengths = sorted((p + s, s) for p, s in zip(train_set["prompt_tokens"], train_set["summary_tokens"]))
    else:
        lengths = [(config.data.max_length, config.data.max_length)] * len(train_set)
    batch = lengths[-plan.micro_batch:]  # the micro-batch of the longest examples
    longest = batch[-1][0] if batch else 0
    tokens = sum(n for n, _ in batch) if plan.packed else longest * len(batch)
    labelled = sum(s for _, s in batch) if plan.selective_head else tokens
    need = training_bytes(model_config, parameter_count(model_config), dtype_bytes, tokens, longest, labelled,
                          plan.gradient_checkpointing, config.model.attn_implementation == "eager")  # fmt: skip
    if need > available:
        raise DeviceError(
            f"training on the CPU needs about {need / GIB:.0f} GiB of memory ({len(batch):,} examples, "
            f"{tokens:,} tokens per micro-batch) but {available / GIB:.1f} GiB is available; use a smaller "
            f"--batch-size x --grad-accum, a shorter --max-length, or a GPU"
        )
