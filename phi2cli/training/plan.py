"""How a run executes: the engine profile resolved against the machine.

Every profile keeps what is learned: the same examples per optimizer step, loss, LR schedule,
LoRA targets and (NF4) base weights. They differ only in how the work is laid out on the GPU.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from phi2cli.config import Phi2Config
from phi2cli.errors import ConfigError

SPEED_BASE_GIB = 6.5  # bf16 phi-2 weights (5.6), LoRA weights and 8-bit optimizer state, allocator slack
FLAT_OPTIMIZERS = ("paged_adamw_8bit", "adamw_8bit", "adamw_bnb_8bit")  # what optim.FlatAdamW8bit replaces
SPEED_GIB_PER_TOKEN = 0.0052  # activations kept for backward without checkpointing (phi-2, H200: 22 GiB
# reserved at 3,112 tokens per step, eager, the larger of eager and compiled)
GRAPH_GIB_PER_TOKEN = 0.0085  # with CUDA graphs: the recordings' private memory pool is not shared with
# eager work and holds the largest batch shapes recorded (H200: 39.3 GiB reserved, batches up to ~3,840 tokens)


@dataclass(frozen=True)
class EnginePlan:
    profile: str  # reference | memory-saver | speed
    micro_batch: int  # examples per device per forward/backward
    grad_accum: int  # micro-batches per optimizer step
    world_size: int  # data-parallel processes
    packed: bool  # padding-free rows with per-example positions
    gradient_checkpointing: bool
    dequantize_base: bool  # cache the NF4 base weights as bf16 once instead of every matmul
    selective_head: bool  # run lm_head only where a label is predicted
    optimizer: str
    compile: bool = False  # torch.compile each decoder layer
    autocast: bool = True  # bf16/fp16 autocast; False: the model computes in bf16 as stored
    fused_kernels: bool = False  # LoRA update fused into the B product, one-kernel tanh GELU (lora_fast)
    flat_optimizer: bool = False  # 8-bit AdamW over one flat buffer (optim.FlatAdamW8bit)
    cuda_graphs: bool = False  # each micro-batch's forward + backward replayed from a CUDA graph (graphs.py)
    note: str | None = None
    uncompiled_reason: str | None = None  # why a profile that compiles runs eagerly here (a short run)
    scaling: str = "strong"  # strong: the recipe's global batch split over GPUs; weak: --per-gpu-batch on each
    lr_scale: float = 1.0  # weak scaling: sqrt(global batch / the recipe's), applied to --lr
    graph_bucket: int = 128  # CUDA graphs: tokens per recorded-shape step (graph_bucket_tokens)
    eval_batch: int = 8  # examples per evaluation batch (--eval-batch-size, or EVAL_BATCH / SPEED_EVAL_BATCH)
    torch_nf4: bool = False  # 4-bit layers dequantized by torch operations (nf4.NF4Linear), for compile

    @property
    def examples_per_step(self) -> int:
        return self.micro_batch * self.grad_accum * self.world_size

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def examples_per_step(config: Phi2Config, world_size: int = 1) -> int:
    """The global batch: the recipe's per-device batch x grad-accum (8 by default), or with
    --per-gpu-batch N (weak scaling) N x the number of GPUs."""
    if config.train.per_gpu_batch:
        return config.train.per_gpu_batch * world_size
    return config.train.batch_size * config.train.grad_accum


def learning_rate_scale(config: Phi2Config, world_size: int = 1) -> float:
    """Square-root rule for a larger global batch (weak scaling): lr x sqrt(global / recipe's global).

    Adam-type optimizers keep their dynamics under the square-root rule (Malladi et al., 2022,
    "On the SDEs and Scaling Rules for Adaptive Gradient Algorithms"); the linear rule is SGD's.
    Strong scaling keeps the recipe's global batch, so its learning rate.
    """
    recipe = config.train.batch_size * config.train.grad_accum
    return (examples_per_step(config, world_size) / recipe) ** 0.5


def split_global_batch(total: int, world_size: int, micro_batch: int) -> tuple[int, int]:
    """(micro_batch, grad_accum) so that micro x accum x world == total, or a ConfigError."""
    if total % world_size:
        raise ConfigError(
            f"{total} examples per step cannot be split over {world_size} GPUs; "
            f"make --batch-size x --grad-accum a multiple of {world_size}"
        )
    per_device = total // world_size
    micro = max(1, min(micro_batch, per_device))
    while per_device % micro:
        micro -= 1
    return micro, per_device // micro


def resolve_plan(config: Phi2Config, *, cuda: bool, quantized: bool, free_gib: float | None,
                 world_size: int = 1, bf16: bool = True, shape: Any = None) -> EnginePlan:  # fmt: skip
    """Pick the engine profile: explicit --profile, else from the GPU's free memory.

    bf16: the compute dtype is bfloat16 (then the fast profiles run without autocast: weights,
    activations and layer norms in bf16, LoRA's fp32 master weights cast per use; fp16 keeps
    autocast and its loss scaling). shape: the model's families.ModelShape (None: phi-2's), which
    the memory estimates scale with.
    """
    train = config.train
    total = examples_per_step(config, world_size)
    scaling = {"scaling": "weak" if train.per_gpu_batch else "strong",
               "lr_scale": round(learning_rate_scale(config, world_size), 6)}  # fmt: skip
    profile = train.profile
    note = None
    if profile == "auto":
        need = speed_memory_gib(total // world_size, config.data.max_length, shape=shape)
        if not cuda:
            profile = "speed"
        elif free_gib is not None and free_gib < need:
            profile = "memory-saver"
            note = f"{free_gib:.1f} GiB free on the GPU (speed needs ~{need:.0f}): using the memory-saver profile"
        else:
            profile = "speed"
    eval_batch = train.eval_batch_size or (SPEED_EVAL_BATCH if profile == "speed" else EVAL_BATCH)
    optimizer = train.optimizer
    if not cuda and ("paged" in optimizer or "8bit" in optimizer):
        optimizer = "adamw_torch"  # bitsandbytes' paged 8-bit optimizers need CUDA
    if profile == "reference":
        micro, accum = split_global_batch(total, world_size, train.batch_size)
        return EnginePlan("reference", micro, accum, world_size, False, train.gradient_checkpointing,
                          False, False, optimizer, note=note, eval_batch=eval_batch, **scaling)  # fmt: skip
    micro, accum = split_global_batch(total, world_size, total)
    lean = {"autocast": not (cuda and bf16), "fused_kernels": True,
            "flat_optimizer": cuda and optimizer in FLAT_OPTIMIZERS}  # fmt: skip
    if profile == "memory-saver":
        # Compiled only with the 4-bit layers as NF4Linear: through bitsandbytes' Linear4bit the compiled
        # layers break at every matmul and ran slower than eager (measured). No CUDA graphs: gradient
        # checkpointing saves the CUDA random state for its recompute, which a capture does not allow.
        compiled = cuda and train.compile and quantized
        return EnginePlan("memory-saver", micro, accum, world_size, True, True, False, True, optimizer, note=note,
                          eval_batch=eval_batch, compile=compiled, torch_nf4=compiled, **lean, **scaling)  # fmt: skip
    steps = planned_steps(config, total)
    compiled = cuda and train.compile and steps >= train.compile_from_steps
    uncompiled = None
    if cuda and train.compile and not compiled:
        uncompiled = (f"not compiled: a {steps:,}-step run finishes sooner without (compiling pays from "
                      f"{train.compile_from_steps:,} steps; --compile compiles anyway)")  # fmt: skip
    # CUDA graphs need bf16 without a loss scaler (fp16 keeps autocast and its GradScaler, eagerly).
    graphs = cuda and bf16 and train.cuda_graphs
    graph_need = speed_memory_gib(total // world_size, config.data.max_length, graphs=True,
                                  shape=shape)  # fmt: skip
    if graphs and free_gib is not None and free_gib < graph_need:
        graphs = False
        note = note or (f"{free_gib:.1f} GiB free on the GPU (CUDA graphs need ~{graph_need:.0f}): "
                        f"training without CUDA graphs")  # fmt: skip
    bucket = graph_bucket_tokens(steps, config.data.max_length, train.graph_bucket)
    return EnginePlan("speed", micro, accum, world_size, True, False, quantized and cuda, True, optimizer,
                      compile=compiled, note=note, uncompiled_reason=uncompiled, cuda_graphs=graphs, **lean,
                      **scaling, graph_bucket=bucket,
                      eval_batch=eval_batch)  # fmt: skip


# Examples per evaluation batch when --eval-batch-size is 0. The speed profile packs them into one row
# and keeps no activations for backward, so 64 (~25k real XSUM tokens, near the 32k-token batches of
# `phi2 evaluate`'s loss) fit wherever it trains: fewer, larger forwards than 8 at a time, each of which
# waits on the CPU launching the layers (phi-2 seed job on an H200: 4.8 s per 500-row evaluation at 8,
# against 2.9 s for `phi2 evaluate`'s loss on the same rows). Measured since: SmolLM2's four evaluations
# went from 14.1 s to 3.0 s, but the phi-2 seed job's two took 9.5 s at 64 against 9.7 s at 8
# (benchmarks/results/end_to_end_before_nf4.json and end_to_end_previous.json): there the forwards are
# the cost. The other profiles keep 8: they run where memory is short.
EVAL_BATCH = 8
SPEED_EVAL_BATCH = 64

# Recording a new shape costs ~0.35 s after the first (H200: later_record_seconds_mean 0.29-0.37 s in
# benchmarks/results/end_to_end*.json and families.json), and halving the bucket does not halve the
# padding alone: it multiplies the recordings by ~1.7 (the 625-step seed job: 16 at 512 tokens, 27 at
# 256, 11 x 0.35 = 3.9 s more, against ~2.3 s of padding saved at ~128 fewer tokens of a ~3,000-token,
# 0.085 s step). So a bucket halves where steps x 0.0037 s passes the extra recordings' cost:
# b = sqrt(2.2e8 / steps) picks 512 up to ~840 steps (the seed job), 256 up to ~3,400, 128 beyond
# (a full XSUM epoch, 25,500 steps).
GRAPH_BUCKETS = (512, 256, 128)
BUCKET_COST_RATIO = 2.2e8


def graph_bucket_tokens(steps: int, max_length: int, chosen: int = 0) -> int:
    """Token granularity of recorded CUDA-graph shapes: `chosen` (--graph-bucket) when given, else
    coarse for short runs (few recordings) and fine for long ones (little padding); never above
    max_length (the pad sequence's bound) unless that is below 128."""
    if chosen:
        bucket = chosen
    else:
        best = (BUCKET_COST_RATIO / max(steps, 1)) ** 0.5
        bucket = next((b for b in GRAPH_BUCKETS if b <= best), GRAPH_BUCKETS[-1])
    while bucket > 128 and bucket > max_length:
        bucket //= 2
    return bucket


def planned_steps(config: Phi2Config, examples_per_step: int) -> int:
    """Optimizer steps the run will take: --max-steps, else epochs over the train samples."""
    if config.train.max_steps > 0:
        return config.train.max_steps
    return max(1, int(-(-config.data.samples * config.train.epochs // examples_per_step)))


def speed_memory_gib(examples_per_device: int, max_length: int, graphs: bool = False, shape: Any = None) -> float:
    """Worst-case GPU memory of the speed profile: every example at max length, no checkpointing.

    The constants were measured on phi-2; another model's bf16 weights replace phi-2's in the base,
    and the activations scale with layers x (hidden + intermediate) (families.ModelShape).
    """
    from phi2cli.models.families import PHI2_SHAPE

    shape = shape or PHI2_SHAPE
    base = SPEED_BASE_GIB - PHI2_SHAPE.weight_gib() + shape.weight_gib()
    per_token = (GRAPH_GIB_PER_TOKEN if graphs else SPEED_GIB_PER_TOKEN) * shape.activation_ratio(PHI2_SHAPE)
    return base + per_token * examples_per_device * max_length
