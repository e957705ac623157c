"""`phi2 evaluate`'s eval loss and greedy summaries of the same articles from one forward.

An article's loss example (prompt + summary + EOS) and its summary prompt begin with the same
tokens: the template's prefix and the article, which the prompt cuts at most a little shorter
(it keeps room for max_new_tokens, the example room for the summary). So the eval-loss forward
over the examples also writes those shared tokens' keys and values into the static cache of
phi2cli.inference.decode; the prompt's last few tokens (the template's end) are then fed through the
decoding step as known tokens, and greedy decoding goes on from there. The loss is training's:
the examples go through PackedCollator and selective_causal_lm_loss, with the cache-filling
forward standing in for the model. Articles whose prompt does not begin its example (no example,
or a summary longer than max_new_tokens moved the article's cut) take the two ordinary passes.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any, Callable, Sequence

import torch

from phi2cli.config import GenerationConfig
from phi2cli.inference.decode import PREFILL_TOKENS, StaticDecoder, cache_batches, cut_at_stop, prefill_groups
from phi2cli.inference.decoder_modules import DecoderModules
from phi2cli.inference.eval_loss import LossResult
from phi2cli.inference.generate import Generated
from phi2cli.inference.trained_model import LoadedModel
from phi2cli.data.prompts import EncodedExample


@dataclass(frozen=True)
class SharedDecode:
    generated: list[list[int]]  # new token ids per prompt, up to and including the first stop token
    loss_sum: float  # cross-entropy summed over every labelled token of the examples
    labelled: int  # how many tokens that is
    forward_seconds: float  # spent in the shared forward (the rest: forced prompt tokens and decoding)


@dataclass(frozen=True)
class Scored:
    loss: LossResult  # seconds: the shared forward (+ the eval-loss pass of articles that could not share it)
    generated: list[Generated]  # one per article, in input order
    generation_seconds: float  # forced prompt tokens and decoding (+ the other articles' own generation)
    shared_articles: int  # articles whose loss and prompt prefill came from the one forward


def unshared_tail(prompt: Sequence[int], input_ids: Sequence[int]) -> int:
    """Prompt tokens after its longest common prefix with `input_ids`; at least 1 (the last prompt
    token is always fed to the step, which predicts the first new token from it)."""
    common = next((i for i, (a, b) in enumerate(zip(prompt, input_ids)) if a != b), min(len(prompt), len(input_ids)))
    return len(prompt) - min(common, len(prompt) - 1)


def decode_with_loss(model: Any, prompts: Sequence[Sequence[int]], examples: Sequence[EncodedExample],
                     max_new_tokens: int, stop_ids: Sequence[int], batch_size: int,
                     cuda_graph: bool = True) -> SharedDecode:  # fmt: skip
    """Greedy continuations of `prompts` whose prefill is the eval-loss forward of `examples`.

    Each batch's forward over its examples caches the first len(prompt) - n tokens of every row,
    n being the batch's longest unshared_tail; the rows' last n prompt tokens are then fed one
    step each (rows with a shorter tail feed more of their own prompt), and decoding goes on.

    Args:
        model: a causal LM for which decode.supports(model) is True, in eval mode.
        prompts: token ids per prompt; all but the last few must begin its example's input_ids.
        examples: one loss example per prompt (prompts.encode_example).
        max_new_tokens, stop_ids, batch_size, cuda_graph: as for decode.greedy_decode.
    Returns:
        SharedDecode.
    Raises:
        ValueError where a batch's longest unshared tail is longer than one of its prompts;
        torch.cuda.OutOfMemoryError when even one row's cache does not fit.
    """
    phi = DecoderModules(model)
    tails = [unshared_tail(p, e.input_ids) for p, e in zip(prompts, examples)]
    generated: list[list[int]] = [[] for _ in prompts]
    loss_sum, labelled, forward_seconds = 0.0, 0, 0.0
    with torch.inference_mode():
        for chunk, cache_len in cache_batches(phi, prompts, max_new_tokens, batch_size):
            forced = max(tails[i] for i in chunk)  # one count for the batch: the step feeds every row at once
            if any(len(prompts[i]) < forced for i in chunk):
                raise ValueError(f"a prompt is shorter than the {forced} tokens its batch feeds step by step")
            cached = [len(prompts[i]) - forced for i in chunk]
            decoder = StaticDecoder(phi, len(chunk), cache_len, max(len(examples[i].input_ids) for i in chunk))
            started = time.perf_counter()
            batch_sum, batch_labelled = _score(decoder, [examples[i] for i in chunk], cached)
            forward_seconds += time.perf_counter() - started  # _score read the loss back: the forward is done
            loss_sum, labelled = loss_sum + batch_sum, labelled + batch_labelled
            decoder.positions.copy_(torch.tensor(cached, dtype=torch.long))
            tails_ids = [prompts[i][c:] for i, c in zip(chunk, cached)]
            decoder.force(torch.tensor(tails_ids, dtype=torch.long, device=phi.device), cuda_graph)
            for index, row in zip(chunk, decoder.decode(max_new_tokens, cuda_graph, stop_ids)):
                generated[index] = cut_at_stop(row, stop_ids)
            del decoder  # its cache goes before the next batch is sized to free memory
    return SharedDecode(generated, loss_sum, labelled, forward_seconds)


class _CachingForward:
    """Stands in for the model in selective_causal_lm_loss: the decoder's forward over the packed
    batch, which also leaves each example's first `cached` tokens in the decoder's cache."""

    def __init__(self, decoder: StaticDecoder, first_row: int, cached: Sequence[int]) -> None:
        self.decoder, self.first_row, self.cached = decoder, first_row, cached

    def __call__(self, input_ids: torch.Tensor, cu_seq_lens_q: torch.Tensor, logits_to_keep: torch.Tensor,
                 **packing: Any) -> SimpleNamespace:  # fmt: skip
        bounds = cu_seq_lens_q.tolist()
        lengths = [end - begin for begin, end in zip(bounds, bounds[1:])]
        hidden = self.decoder.forward(input_ids[0], lengths, self.first_row, self.cached, logits_to_keep)
        phi = self.decoder.phi
        return SimpleNamespace(logits=phi.lm_head(phi.final_norm(hidden)).unsqueeze(0))  # [1, picks, vocab]


def _score(decoder: StaticDecoder, examples: Sequence[EncodedExample], cached: Sequence[int]) -> tuple[float, int]:
    """Training's loss sum and labelled-token count over `examples` (cache rows 0, 1, ...), caching
    the first cached[i] tokens of example i on the way."""
    from phi2cli.data.collate import PackedCollator
    from phi2cli.kernels.loss import selective_causal_lm_loss

    device, collate = decoder.phi.device, PackedCollator()
    total, count = 0.0, 0
    budget = PREFILL_TOKENS[device.type]
    for start, group in prefill_groups([e.input_ids for e in examples], budget, decoder.packed):
        batch = collate([{"input_ids": e.input_ids, "labels": e.labels} for e in examples[start : start + len(group)]])
        for key in ("input_ids", "labels", "label_positions"):
            batch[key] = batch[key].to(device)
        forward = _CachingForward(decoder, start, cached[start : start + len(group)])
        loss_sum, labelled = selective_causal_lm_loss(forward, batch, num_items=1)
        total += float(loss_sum)
        count += labelled
    return total, count


def loss_and_summaries(loaded: LoadedModel, document_ids: Sequence[list[int]],
                       examples: Sequence[EncodedExample | None], gen: GenerationConfig, batch_size: int,
                       advance_loss: Callable[[int], None] | None = None,
                       advance_summaries: Callable[[int], None] | None = None) -> Scored:  # fmt: skip
    """Eval loss of the examples and greedy summaries of the articles, from one forward where they share it.

    Args:
        loaded: a LoadedModel for which inference.uses_fast_decoder(loaded, gen) is True.
        document_ids: each article's token ids (inference.encode_documents).
        examples: each article's loss example; None where its summary does not fit.
        gen: greedy settings (max_new_tokens).
        batch_size: articles per batch; halved on CUDA out-of-memory, and where even one does not fit,
            the rest take the two ordinary passes.
        advance_loss, advance_summaries: called with the number of examples/articles done.
    Returns:
        Scored; its loss equals inference.eval_loss over the non-None examples, its summaries
        inference.generate's, up to floating-point rounding.
    Raises:
        ConfigError, DataError, DeviceError as inference.eval_loss and inference.generate.
    """
    from phi2cli.inference.eval_loss import eval_loss, loss_result
    from phi2cli.inference.generate import build_prompts, first_lines, generate_prompts, stop_token_ids

    started = time.perf_counter()
    prompts = build_prompts(loaded, document_ids, gen.max_new_tokens)
    most_forced = max(1, len(loaded.fmt.suffix_ids))  # fed one step each at most: the template's end
    shared = [i for i, (example, (ids, _)) in enumerate(zip(examples, prompts)) if example is not None
              and len(ids) >= most_forced and unshared_tail(ids, example.input_ids) <= most_forced]  # fmt: skip
    order = sorted(shared, key=lambda i: -len(prompts[i][0]))  # longest first: an out-of-memory shows early
    results: list[Generated | None] = [None] * len(prompts)
    stop_ids = stop_token_ids(loaded.tokenizer)
    totals = {"loss_sum": 0.0, "labelled": 0, "loss_seconds": 0.0}

    def run(chunk: Sequence[int]) -> None:
        done = decode_with_loss(loaded.model, [prompts[i][0] for i in chunk], [examples[i] for i in chunk],
                                gen.max_new_tokens, stop_ids, len(chunk))  # fmt: skip
        totals["loss_sum"] += done.loss_sum
        totals["labelled"] += done.labelled
        totals["loss_seconds"] += done.forward_seconds
        for index, (text, new_tokens) in zip(chunk, first_lines(loaded, done.generated)):
            ids, truncated = prompts[index]
            results[index] = Generated(text, len(ids), new_tokens, truncated)
        if advance_loss:
            advance_loss(len(chunk))
        if advance_summaries:
            advance_summaries(len(chunk))

    from phi2cli.inference.batching import halving_batches

    # where even one article does not fit, the rest go through the two passes, which need less memory at once
    start = halving_batches(order, batch_size, run, lambda: None)
    loss_sum, labelled, loss_seconds = totals["loss_sum"], totals["labelled"], totals["loss_seconds"]
    shared_articles = start  # the rest take the two passes: no example, a long summary, or no memory
    rest = sorted(set(range(len(prompts))) - set(order[:start]))
    rest_examples = [examples[i] for i in rest if examples[i] is not None]
    if rest_examples:
        own = eval_loss(loaded, rest_examples, advance=advance_loss)
        loss_sum += own.loss * own.tokens
        labelled += own.tokens
        loss_seconds += own.seconds
    if rest:
        for index, generated in zip(rest, generate_prompts(loaded, [prompts[i] for i in rest], gen, batch_size,
                                                           advance=advance_summaries)):  # fmt: skip
            results[index] = generated
    loss = loss_result(loss_sum, labelled, sum(e is not None for e in examples), loss_seconds)
    generation_seconds = time.perf_counter() - started - loss_seconds
    return Scored(loss, [r for r in results if r is not None], generation_seconds, shared_articles)
