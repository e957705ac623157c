"""torch.compile for the decoder layers, with a loud, recorded fallback to eager.

One compiled graph serves every layer (same code, dynamic sequence length). Compile settings are
scoped to the compiled calls (no process-wide torch._dynamo configuration); a compile error turns
compilation off for every layer, which then run eagerly, and is recorded with its reason.

Random numbers (LoRA's dropout) come from torch's own kernels, not from the compiled code
(inductor's `fallback_random`). Inductor fuses dropout into the norm before it, but draws each
element's number from a Philox round of its own, and that made the fused kernels compute-bound.
Torch's dropout kernel uses every number a round gives. Measured in one run on an H200
(torch 2.11): SmolLM2-135M's 374-step job with --compile trained at 154,195 real tokens/s against
142,497 with inductor's random numbers (+8.2%); phi-2's compiled speed profile 37,404 against
36,536 (+2.4%). Gradient checkpointing needs it besides: its recompute replays the forward from
the generator state it saved, which only torch's kernels read in the same order (compile_layers).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable

COMPILE_SETTINGS = {"cache_size_limit": 64}  # every layer instance may add an entry for the shared code
INDUCTOR_OPTIONS = {"fallback_random": True}  # dropout through torch's kernels: faster here (module docstring)


class CompileState:
    """Shared by the layers of one model: once one fails to compile, all run eagerly."""

    def __init__(self, on_failure: Callable[[BaseException], None]) -> None:
        self.failed = False
        self.on_failure = on_failure

    def fail(self, error: BaseException) -> None:
        if not self.failed:
            self.failed = True
            self.on_failure(error)


class GuardedForward:
    """A layer's forward that runs compiled until compiling fails, then eagerly."""

    def __init__(self, eager: Callable[..., Any], state: CompileState) -> None:
        import torch

        self.eager, self.state = eager, state
        self.compiled = torch.compile(eager, dynamic=True, options=INDUCTOR_OPTIONS)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if not self.state.failed:
            from phi2cli.compat import compile_error_types, dynamo_settings

            try:
                with dynamo_settings(**COMPILE_SETTINGS):
                    return self.compiled(*args, **kwargs)
            except compile_error_types() as error:
                self.state.fail(error)
        return self.eager(*args, **kwargs)


def use_compile_cache() -> Path:
    """Keep compiled kernels in the user's cache directory (PHI2_CACHE_DIR, else $XDG_CACHE_HOME or
    ~/.cache, /phi2cli), so they survive reboots and /tmp cleaning; TORCHINDUCTOR_CACHE_DIR and
    TRITON_CACHE_DIR, when set, win."""
    from phi2cli.io.files import cache_root

    root = cache_root()
    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(root / "inductor"))  # read at each compile, not import
    os.environ.setdefault("TRITON_CACHE_DIR", str(root / "triton"))
    return root


def compile_layers(model: Any, layer_classes: tuple[str, ...], on_failure: Callable[[BaseException], None]) -> int:
    """Compile every decoder layer whose class is in `layer_classes`; returns how many.

    Random numbers (dropout) come from torch's eager kernels, drawn from the generator in the compiled
    graph's order: under gradient checkpointing, the recompute (the same graph, from the generator state
    checkpointing restored) draws the forward's masks again. On the CPU the masks are also the eager
    layer's (tests/test_nf4_layers.py); on a GPU the compiled order may differ.
    """
    import torch

    use_compile_cache()
    # The layers of one model share compiled code. Another model compiled before in this process (a
    # memory-saver run's NF4 layers, say) left guards and code for the same functions that failed on
    # these layers ("KeyError: 'codes'" while recording a speed-profile step), so it is forgotten first.
    torch.compiler.reset()
    state = CompileState(on_failure)
    count = 0
    for module in model.modules():
        if type(module).__name__ in layer_classes:
            module.forward = GuardedForward(module.forward, state)
            count += 1
    return count


def describe(error: BaseException) -> str:
    """The first line of a compile error, short enough for one line."""
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0][:200] if text else ''}".rstrip(": ")
