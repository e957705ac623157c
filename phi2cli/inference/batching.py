"""The one out-of-memory back-off of the project: batches halve until they fit."""

from __future__ import annotations

from typing import Callable, Sequence


def halving_batches(order: Sequence[int], size: int, run: Callable[[Sequence[int]], None],
                    single_too_big: Callable[[], None]) -> int:  # fmt: skip
    """Run `run(chunk)` over consecutive chunks of `order`, halving the chunk on CUDA out-of-memory.

    A chunk that ran out of memory is retried at half the size; `run` must have no effect when it
    raises. Where even one item does not fit, `single_too_big()` raises, or returns to stop early.
    Returns how many items of `order` were done.
    """
    import torch

    start, size = 0, max(1, size)
    while start < len(order):
        chunk = order[start : start + size]
        try:
            run(chunk)
            failed = False
        except torch.cuda.OutOfMemoryError:
            failed = True  # handled below, once the failed batch's tensors are released with the exception
        if failed:
            if size == 1:
                single_too_big()
                return start
            torch.cuda.empty_cache()
            size //= 2
            continue
        start += len(chunk)
    return start
