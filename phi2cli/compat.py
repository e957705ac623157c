"""Every private internal of torch, transformers, peft, bitsandbytes and accelerate the engine uses.

Public APIs come first; where none exists the internal is reached through a function here, and
importing this module checks that each one still exists, so a library upgrade that removes one
fails at once with its name instead of slowing or breaking a run later. Imported only by modules
that import torch anyway: at import it checks the internals of every library module already loaded
(a few attribute lookups), and the rest the first time one of them is used, so that importing this
module never loads a heavy library (torch._dynamo, the Trainer, bitsandbytes) by itself.

Checked on: torch 2.11 and 2.13, transformers 5.17 and 5.24, peft 0.21, bitsandbytes 0.50,
accelerate 1.15.
"""

from __future__ import annotations

import contextlib
import sys
from typing import Any, Iterator

import torch
import transformers

CHECKED_ON = {"torch": ("2.11", "2.13"), "transformers": ("5.17", "5.24"), "peft": ("0.21",),
              "bitsandbytes": ("0.50",), "accelerate": ("1.15",)}  # fmt: skip

# owner module -> its internals used here (attribute paths)
INTERNALS: dict[str, tuple[str, ...]] = {
    "torch": ("_foreach_copy_",),  # one kernel for a list of copies (no public spelling)
    "torch._dynamo": ("config.patch",),  # compile settings, patched per call, never process-wide
    "torch._dynamo.exc": ("TorchDynamoException",),  # what a failed compile raises
    "transformers.trainer": ("Trainer._get_train_sampler",  # overridden: balanced shards under DDP
                             "Trainer._prepare_inputs"),  # the graphed step moves inputs the Trainer's way
    "transformers.training_args": ("TrainingArguments.n_gpu",),  # backed by _n_gpu: one process, one GPU
    "bitsandbytes.optim.optimizer": ("Optimizer8bit.check_overrides", "Optimizer8bit.to_gpu",
                                     "Optimizer8bit.init_state", "Optimizer8bit.update_step"),
}  # fmt: skip
_checked: set[str] = set()


def missing(owner: str) -> list[str]:
    """The internals of `owner` (a module path) that this environment lacks."""
    import importlib

    absent = []
    for attribute in INTERNALS[owner]:
        try:
            target: Any = importlib.import_module(owner)
            for part in attribute.split("."):
                target = getattr(target, part)
        except (ImportError, AttributeError):
            absent.append(f"{owner}.{attribute}")
    return absent


def _versions() -> str:
    return ", ".join(f"{name} {'/'.join(v)}" for name, v in CHECKED_ON.items())


def require(owner: str) -> None:
    """Check `owner`'s internals once; ImportError naming each one that is gone."""
    if owner in _checked:
        return
    absent = missing(owner)
    if absent:
        raise ImportError(f"phi2cli needs internals this library version lacks: {', '.join(absent)} "
                          f"(checked on {_versions()}; torch {torch.__version__}, transformers "
                          f"{transformers.__version__} installed)")  # fmt: skip
    _checked.add(owner)


for _owner in INTERNALS:
    if _owner in sys.modules:  # loaded anyway: checking costs nothing
        require(_owner)


def foreach_copy(targets: list[torch.Tensor], sources: list[torch.Tensor]) -> None:
    """targets[i].copy_(sources[i]) for all i, batched."""
    require("torch")
    torch._foreach_copy_(targets, sources)


@contextlib.contextmanager
def dynamo_settings(**settings: Any) -> Iterator[None]:
    """torch._dynamo config for the calls inside only (e.g. cache_size_limit), restored after."""
    require("torch._dynamo")
    with torch._dynamo.config.patch(**settings):
        yield


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
