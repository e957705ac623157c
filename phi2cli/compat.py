"""Every private internal of torch, transformers, peft, bitsandbytes, accelerate, huggingface_hub and
datasets the engine uses, and the one Trainer rule it has to repeat.

Public APIs come first; where none exists the internal is reached through a function here, and
importing this module checks that each one still exists, so a library upgrade that removes one
fails at once with its name instead of slowing or breaking a run later. Importing this module loads
no library by itself (`phi2 report` and the hub checks import it without torch): at import it
checks the internals of every library module already loaded (a few attribute lookups), and the rest
the first time one of them is used.

Checked on: torch 2.11, 2.13 and 2.14, transformers 5.17 and 5.24, peft 0.21, bitsandbytes 0.50,
accelerate 1.15, huggingface_hub 1.33 and 2.4, datasets 4.0 and 5.2, gguf 0.19.
"""

from __future__ import annotations

import contextlib
import functools
import sys
from typing import TYPE_CHECKING, Any, Iterator

if TYPE_CHECKING:
    import torch

CHECKED_ON = {"torch": ("2.11", "2.13", "2.14"), "transformers": ("5.17", "5.24"), "peft": ("0.21",),
              "bitsandbytes": ("0.50",), "accelerate": ("1.15",), "huggingface_hub": ("1.33", "2.4"),
              "datasets": ("4.0", "5.2"), "gguf": ("0.19",)}  # fmt: skip

# owner module -> its internals used here: attribute paths, or "self.x" for an attribute its classes
# set on their instances (found in the module's source: it exists only on a live object)
INTERNALS: dict[str, tuple[str, ...]] = {
    "torch": ("_foreach_copy_",),  # one kernel for a list of copies (no public spelling)
    "torch._dynamo": ("config.patch",),  # compile settings, patched per call, never process-wide
    "torch._dynamo.exc": ("TorchDynamoException",),  # what a failed compile raises
    "transformers.trainer": ("Trainer._get_train_sampler",  # overridden: balanced shards under DDP
                             "Trainer._prepare_inputs",  # the graphed step moves inputs the Trainer's way
                             "Trainer._save_checkpoint",  # overridden: checkpoint-N appears only when complete
                             "Trainer._clip_grad_norm",  # overridden: the trainable parameters listed once
                             "self._tr_loss",  # the loss summed since the last log, carried over a resume
                             "self._globalstep_last_logged"),  # where that log window starts
    "transformers.training_args": ("TrainingArguments.n_gpu",),  # backed by _n_gpu: one process, one GPU
    "bitsandbytes.optim.optimizer": ("Optimizer8bit.check_overrides", "Optimizer8bit.to_gpu",
                                     "Optimizer8bit.init_state", "Optimizer8bit.update_step",
                                     "self.initialized"),  # FlatAdamW8bit drives the step pieces itself
    "huggingface_hub.constants": ("HF_HUB_OFFLINE",),  # read from the environment once, at import
    "datasets.config": ("HF_HUB_OFFLINE",),  # datasets' copy of it, also read at import
    "gguf": ("GGUFReader", "get_tensor_name_map"),  # transformers looks both up per call: cached per conversion
}  # fmt: skip
_checked: set[str] = set()


def missing(owner: str) -> list[str]:
    """The internals of `owner` (a module path) that this environment lacks."""
    import importlib

    absent = []
    for attribute in INTERNALS[owner]:
        try:
            target: Any = importlib.import_module(owner)
            if attribute.startswith("self."):
                if attribute not in _source(target):
                    raise AttributeError(attribute)
                continue
            for part in attribute.split("."):
                target = getattr(target, part)
        except (ImportError, AttributeError):
            absent.append(f"{owner}.{attribute}")
    return absent


def _source(module: Any) -> str:
    """The text of a module's file ("" where it has none)."""
    import inspect

    try:
        return inspect.getsource(module)
    except (OSError, TypeError):
        return ""


def _versions() -> str:
    return ", ".join(f"{name} {'/'.join(v)}" for name, v in CHECKED_ON.items())


def _installed() -> str:
    from importlib.metadata import PackageNotFoundError, version

    found = []
    for name in CHECKED_ON:
        with contextlib.suppress(PackageNotFoundError):
            found.append(f"{name} {version(name)}")
    return ", ".join(found)


def require(owner: str) -> None:
    """Check `owner`'s internals once; ImportError naming each one that is gone."""
    if owner in _checked:
        return
    absent = missing(owner)
    if absent:
        raise ImportError(f"phi2cli needs internals this library version lacks: {', '.join(absent)} "
                          f"(checked on {_versions()}; installed: {_installed()})")  # fmt: skip
    _checked.add(owner)


for _owner in INTERNALS:
    if _owner in sys.modules:  # loaded anyway: checking is a few lookups
        require(_owner)


def foreach_copy(targets: list[torch.Tensor], sources: list[torch.Tensor]) -> None:
    """targets[i].copy_(sources[i]) for all i, batched."""
    import torch

    require("torch")
    torch._foreach_copy_(targets, sources)


@contextlib.contextmanager
def dynamo_settings(**settings: Any) -> Iterator[None]:
    """torch._dynamo config for the calls inside only (e.g. cache_size_limit), restored after."""
    import torch._dynamo

    require("torch._dynamo")
    with torch._dynamo.config.patch(**settings):
        yield


def import_quantization_libraries(peft: bool, bitsandbytes: bool) -> None:
    """Import peft and/or bitsandbytes (peft imports the latter itself) under compile_on_first_call.

    bitsandbytes 0.50 wraps its default-backend kernels in torch.compile at import, and that call
    imports TorchInductor, for kernels a CUDA run never calls. Measured (2-core CPU, torch 2.14):
    importing peft + bitsandbytes after transformers took 1.07 s, 0.43 s this way.
    """
    import importlib

    with compile_on_first_call():
        for name, wanted in (("peft", peft), ("bitsandbytes", bitsandbytes)):
            if wanted:
                importlib.import_module(name)


@contextlib.contextmanager
def compile_on_first_call() -> Iterator[None]:
    """Inside: torch.compile(f, **options) returns a function that compiles on its first call, which is
    when torch.compile's own result does its work too; only importing the compiler waits for that call."""
    import torch

    eager_compile = torch.compile

    def deferred(model: Any = None, **options: Any) -> Any:
        if model is None:  # used as @torch.compile(**options)
            return lambda function: deferred(function, **options)
        compiled: list[Any] = []

        def call(*args: Any, **kwargs: Any) -> Any:
            if not compiled:
                compiled.append(eager_compile(model, **options))
            return compiled[0](*args, **kwargs)

        return functools.wraps(model)(call)

    torch.compile = deferred
    try:
        yield
    finally:
        torch.compile = eager_compile


def compile_error_types() -> tuple[type[BaseException], ...]:
    """What torch.compile raises when it cannot compile (not a runtime error of the model)."""
    require("torch._dynamo.exc")
    import torch._dynamo.exc as dynamo_exc

    found: list[type[BaseException]] = [dynamo_exc.TorchDynamoException]
    inductor = sys.modules.get("torch._inductor.exc")
    if inductor is None:
        with contextlib.suppress(ImportError):
            import torch._inductor.exc as inductor
    error = getattr(inductor, "InductorError", None)
    if isinstance(error, type):
        found.append(error)
    return tuple(found)


def limit_to_one_gpu(args: Any) -> None:
    """A single process uses one GPU: the Trainer otherwise wraps the model in DataParallel."""
    require("transformers.training_args")
    if args.n_gpu > 1:  # reading n_gpu sets _n_gpu up, which it then reports
        args._n_gpu = 1


def bnb_step_parts_present(optimizer: Any) -> bool:
    """bitsandbytes' per-parameter step pieces (FlatAdamW8bit drives them without a GPU sync)."""
    return not missing("bitsandbytes.optim.optimizer") and \
        all(hasattr(optimizer, attribute.split(".")[-1]) for attribute in INTERNALS["bitsandbytes.optim.optimizer"])


def switch_hub_offline() -> None:
    """huggingface_hub's (and a loaded datasets') offline flag on for this process: both read
    HF_HUB_OFFLINE once at import and have no public switch, and transformers asks the hub's."""
    require("huggingface_hub.constants")
    from huggingface_hub import constants

    constants.HF_HUB_OFFLINE = True
    loaded = sys.modules.get("datasets.config")
    if loaded is not None:  # a later import reads the environment variable instead
        require("datasets.config")
        loaded.HF_HUB_OFFLINE = True


def log_window(trainer: Any) -> tuple[Any, int] | None:
    """(loss summed since the last log, the step it was logged at) of a training Trainer; None before train()."""
    require("transformers.trainer")
    loss_sum = getattr(trainer, "_tr_loss", None)  # set by train(), absent before
    last_logged = getattr(trainer, "_globalstep_last_logged", None)
    return None if loss_sum is None or last_logged is None else (loss_sum, int(last_logged))


def continue_log_window(trainer: Any, loss_sum: float, last_logged: int) -> None:
    """Add `loss_sum` to the Trainer's running log window and start the window at `last_logged`."""
    require("transformers.trainer")
    trainer._tr_loss += loss_sum
    trainer._globalstep_last_logged = last_logged


# The Trainer applies a micro-batch's loss scaling in two places and exposes neither as a value:
# compute_loss (x processes when tokens are averaged across devices) and training_step (/ grad-accum
# unless the loss was normalised by num_items_in_batch). The CUDA-graph step records forward and
# backward together, bypassing both, so it has to apply the same factor itself; the rules below are
# the Trainer's (5.17-5.24), and tests/test_compat.py pins them against its training_step.


def compute_loss_scale(trainer: Any, num_items_in_batch: Any) -> int:
    """What the Trainer's compute_loss multiplies a loss normalised by num_items_in_batch by."""
    if (trainer.args.average_tokens_across_devices and num_items_in_batch is not None
            and (trainer.model_accepts_loss_kwargs or trainer.compute_loss_func is not None)):  # fmt: skip
        return trainer.accelerator.num_processes  # DDP then averages gradients over the processes
    return 1


def trainer_loss_scale(trainer: Any, num_items_in_batch: Any) -> float:
    """What compute_loss and training_step together multiply a micro-batch's loss by."""
    scaled_for_accumulation = getattr(trainer, "loss_is_scaled_for_ga", None)  # newer Trainers; not in 5.17
    if scaled_for_accumulation is None:
        scaled_for_accumulation = (trainer.model_accepts_loss_kwargs and num_items_in_batch is not None) \
            or trainer.compute_loss_func is not None  # fmt: skip
    scale = 1.0 if scaled_for_accumulation else 1.0 / trainer.current_gradient_accumulation_steps
    return scale * compute_loss_scale(trainer, num_items_in_batch)


# Reading a .gguf model with transformers (5.17-5.24) parses the whole file three times (config,
# tokenizer, weights: its 49k-entry vocabulary is read one numpy view per field part) and rebuilds
# gguf's tensor-name table once per module (397 times for SmolLM2-135M). Both are looked up on the
# gguf package at call time, so within one conversion they are served from a cache: SmolLM2's model
# and tokenizer load in 7.3 s instead of 17.1 s on a 2-core CPU, bit for bit the same
# (tests/test_gguf_export.py compares both ways).


@contextlib.contextmanager
def gguf_parsed_once() -> Iterator[None]:
    """gguf.GGUFReader and gguf.get_tensor_name_map memoised for the calls inside, restored after."""
    require("gguf")
    import functools

    import gguf

    reader, name_map = gguf.GGUFReader, gguf.get_tensor_name_map
    readers: dict[tuple[str, str], Any] = {}

    def cached_reader(path: Any, mode: str = "r") -> Any:
        key = (str(path), mode)
        if key not in readers:
            readers[key] = reader(path, mode)
        return readers[key]

    gguf.GGUFReader, gguf.get_tensor_name_map = cached_reader, functools.lru_cache(maxsize=None)(name_map)
    try:
        yield
    finally:
        gguf.GGUFReader, gguf.get_tensor_name_map = reader, name_map
