"""Training's eval loss over a set of examples, with the loaded model: packed rows, the selective head."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any, Callable, Sequence

from phi2cli.data.prompts import IGNORE_INDEX, EncodedExample
from phi2cli.errors import DataError, DeviceError
from phi2cli.inference.trained_model import LoadedModel

LOSS_TOKENS = {"cuda": 32768, "cpu": 4096}  # tokens per packed eval-loss batch


@dataclass(frozen=True)
class LossResult:
    loss: float  # token-weighted mean cross-entropy over every labelled token of the set
    perplexity: float
    tokens: int  # labelled tokens scored
    examples: int
    seconds: float


def _sync(device: str) -> None:
    if device == "cuda":
        import torch

        torch.cuda.synchronize()


def _pack(features: Sequence[EncodedExample], budget: int) -> list[list[EncodedExample]]:
    """Batches of at most `budget` tokens (one example minimum), examples sorted by length."""
    from phi2cli.data.collate import token_groups

    ordered = sorted(features, key=lambda f: len(f.input_ids))
    return [[ordered[i] for i in group] for group in token_groups([len(f.input_ids) for f in ordered], budget)]


def eval_loss(loaded: LoadedModel, examples: Sequence[EncodedExample], tokens_per_batch: int | None = None,
              advance: Callable[[int], None] | None = None) -> LossResult:  # fmt: skip
    """Training's eval loss over `examples`: packed rows through selective_causal_lm_loss.

    The mean is token-weighted over the whole set (sum of every labelled token's loss / their
    count), so it does not depend on how examples are batched. The Trainer's eval_loss averages
    per-batch means instead; the two agree up to how unequal the batches' token counts are.
    Only two scalars are kept per batch, never the logits.
    """
    import torch

    from phi2cli.kernels import attention
    from phi2cli.data.collate import PackedCollator
    from phi2cli.kernels.loss import selective_causal_lm_loss

    model, device = loaded.model, loaded.device
    varlen = device == "cuda" and varlen_ready(model.config)
    budget = tokens_per_batch or (LOSS_TOKENS["cuda"] if varlen else LOSS_TOKENS["cpu"])
    collate = PackedCollator()
    total, count = 0.0, 0
    _sync(device)
    start = time.perf_counter()
    if varlen:  # the same packed-attention kernel as training's speed profile
        model.set_attn_implementation(attention.NAME)
    try:
        with torch.inference_mode():
            for batch_examples in _pack(examples, budget):
                features = [{"input_ids": e.input_ids, "labels": e.labels} for e in batch_examples]
                batch = {k: v.to(model.device) if isinstance(v, torch.Tensor) else v
                         for k, v in collate(features).items()}  # fmt: skip
                loss_sum, labelled = selective_causal_lm_loss(model, batch, num_items=1)
                total += float(loss_sum)
                count += labelled
                if advance:
                    advance(len(batch_examples))
    except torch.cuda.OutOfMemoryError:
        raise DeviceError("the GPU ran out of memory computing the eval loss; use a shorter --max-length") from None
    finally:
        if varlen:
            model.set_attn_implementation(loaded.config.model.attn_implementation)
    _sync(device)
    return loss_result(total, count, len(examples), time.perf_counter() - start)


def varlen_ready(config: Any) -> bool:
    """Register the packed varlen kernel for this model's attention shape; False where it cannot run it."""
    from phi2cli.kernels import attention
    from phi2cli.models.families import attention_shape, family_of, varlen_refusal

    if family_of(getattr(config, "model_type", None)) is None:
        return False
    shape = attention_shape(config)
    return varlen_refusal(shape) is None and attention.register(shape.head_dim, shape.heads, shape.kv_heads,
                                                                 shape.sliding_window)  # fmt: skip


def loss_result(loss_sum: float, labelled: int, examples: int, seconds: float) -> LossResult:
    """The token-weighted mean loss and its perplexity; DataError when no token was labelled."""
    if not labelled:
        raise DataError("no labelled tokens to score; every example's summary was cut away")
    loss = loss_sum / labelled
    perplexity = math.exp(loss) if loss < 700 else math.inf  # exp overflows a float past ~709
    return LossResult(loss, perplexity, labelled, examples, seconds)


def labelled_tokens(example: EncodedExample) -> int:
    """Tokens whose loss counts (the first label is never predicted)."""
    return sum(1 for label in example.labels[1:] if label != IGNORE_INDEX)
