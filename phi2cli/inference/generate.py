"""Summaries from a loaded model: prompts built as in training (the article cut to fit), batched
generation, the choice of decoder.

Plain greedy decoding of a supported model goes through the static-cache decoder
(phi2cli.inference.decode); everything else through transformers' generate(). With --mbr-samples,
each article's greedy summary and its samples (same decoders) go to phi2cli.inference.consensus,
which keeps one.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Callable, Sequence, TextIO

from phi2cli.config import GenerationConfig
from phi2cli.data.prompts import encode_documents
from phi2cli.errors import ConfigError, DeviceError
from phi2cli.inference.trained_model import LoadedModel
from phi2cli.report.metrics import first_line

CUDA_GEN_BATCH = 128  # default articles per generate() call on a GPU (halved on out-of-memory)
FAST_CUDA_GEN_BATCH = 256  # with the fast greedy decoder (it also caps a batch by free memory); see decode.py
Advance = Callable[[int], None]


@dataclass(frozen=True)
class Generated:
    text: str  # first line of the generated continuation
    prompt_tokens: int
    new_tokens: int  # tokens generated up to and including the stop token
    truncated: bool  # the article was cut to fit max_length - max_new_tokens
    sampled_tokens: int = 0  # with --mbr-samples: the tokens of its samples (new_tokens: the kept summary's)


def stop_token_ids(tokenizer: Any) -> list[int]:
    """EOS plus the tokenizer's single-token newline(s): a summary is one line (phi-2: 198, 628)."""
    ids = [int(tokenizer.eos_token_id)]
    for text in ("\n", "\n\n"):
        encoded = tokenizer(text, add_special_tokens=False)["input_ids"]
        if len(encoded) == 1 and encoded[0] not in ids:
            ids.append(int(encoded[0]))
    return ids


def build_prompts(loaded: LoadedModel, document_ids: Sequence[Sequence[int]],
                  max_new_tokens: int) -> list[tuple[list[int], bool]]:  # fmt: skip
    """Prompt ids per tokenized article, the article cut to fit the run's max_length minus max_new_tokens."""
    room = loaded.config.data.max_length - max_new_tokens
    if room - loaded.fmt.fixed_tokens < 1:
        raise ConfigError(
            f"--max-new-tokens {max_new_tokens} leaves no room for the article within the run's "
            f"max_length {loaded.config.data.max_length} (the prompt alone is {loaded.fmt.fixed_tokens} tokens)"
        )
    return [loaded.fmt.encode_prompt(list(ids), room) for ids in document_ids]


def default_batch_size(loaded: LoadedModel, requested: int | None, gen: GenerationConfig | None = None) -> int:
    """--gen-batch-size if given, else large on a GPU (larger with the fast decoder) and the config's on a CPU."""
    if requested:
        return requested
    if loaded.device != "cuda":
        return loaded.config.generation.batch_size
    if gen is not None and uses_fast_decoder(loaded, gen):
        return FAST_CUDA_GEN_BATCH
    beams = gen.num_beams if gen is not None else 1
    return max(1, CUDA_GEN_BATCH // beams)  # each article holds num_beams sequences in the KV cache


DECODER_ENV = "PHI2_DECODER"  # static: the hand-written static-cache decoder where it applies; hf: generate()
DECODERS = ("static", "hf")


def decoder_choice() -> str:
    """PHI2_DECODER (default static): which greedy decoder to use where both can run."""
    import os

    choice = os.environ.get(DECODER_ENV, "").strip().lower() or "static"
    if choice not in DECODERS:
        raise ConfigError(f"{DECODER_ENV}={choice!r}: use one of {', '.join(DECODERS)}")
    return choice


def uses_fast_decoder(loaded: LoadedModel, gen: GenerationConfig, streaming: bool = False) -> bool:
    """Plain greedy (no n-gram blocking, no minimum length; with or without --mbr-samples, whose samples
    it also draws), not streamed, PHI2_DECODER not 'hf', and a model the static-cache decoder supports
    (phi2cli.inference.decode); everything else goes through transformers' generate(). The length
    penalty only acts on beams."""
    if (gen.do_sample or gen.num_beams != 1 or streaming or gen.no_repeat_ngram_size or gen.min_new_tokens
            or decoder_choice() == "hf"):
        return False
    from phi2cli.inference.decode import supports

    return supports(loaded.model, longest=loaded.config.data.max_length)  # prompts are cut to leave room for the new tokens


def decoder_fallback(loaded: LoadedModel, gen: GenerationConfig) -> str | None:
    """Why greedy decoding of this model cannot use the static-cache decoder (None where it does or
    where the user chose generate())."""
    if gen.do_sample or gen.num_beams != 1 or gen.no_repeat_ngram_size or gen.min_new_tokens \
            or decoder_choice() == "hf" or uses_fast_decoder(loaded, gen):
        return None
    model_type = getattr(getattr(loaded.model, "config", None), "model_type", None)
    return (f"the static-cache decoder drives plain (unquantized) phi, llama/mistral and qwen2 models without a "
            f"dynamic rotary scaling or a sliding window shorter than max_length (this is '{model_type}'): "
            f"summaries come from transformers' generate(), and evaluate's eval loss and prefill run as two passes")


def decoder_name(loaded: LoadedModel, gen: GenerationConfig) -> str:
    """Which decoder produces the summaries, as recorded in metrics.json."""
    if uses_fast_decoder(loaded, gen):
        name = "static-cache greedy (phi2cli.inference.decode)"
    else:
        kind = "sampling" if gen.do_sample else "beam search" if gen.num_beams > 1 else "greedy"
        name = f"transformers generate ({kind})"
    if gen.mbr_samples:
        name += (f" + {gen.mbr_samples} samples at temperature {gen.mbr_temperature:g}, the one agreeing most "
                 f"(ROUGE-L) kept (minimum Bayes risk, phi2cli.inference.consensus)")
    return name


def generate(loaded: LoadedModel, documents: Sequence[str], gen: GenerationConfig, batch_size: int,
             advance: Advance | None = None, stream: TextIO | None = None) -> list[Generated]:  # fmt: skip
    """Summarize each article: see generate_prompts (the articles are tokenized and cut to fit first)."""
    prompts = build_prompts(loaded, encode_documents(loaded.tokenizer, documents), gen.max_new_tokens)
    return generate_prompts(loaded, prompts, gen, batch_size, advance, stream)


def generate_prompts(loaded: LoadedModel, prompts: Sequence[tuple[list[int], bool]], gen: GenerationConfig,
                     batch_size: int, advance: Advance | None = None,
                     stream: TextIO | None = None) -> list[Generated]:  # fmt: skip
    """Summarize each prompt: batched, longest first; results in input order.

    Plain greedy decoding of a supported Phi model goes through phi2cli.inference.decode (one prefill,
    a static KV cache, a CUDA-graphed step); beam search, sampling, n-gram blocking, a minimum
    length, streaming and other models through Hugging Face generate() on left-padded batches.
    With gen.mbr_samples, see consensus_summaries.

    Args:
        loaded: from load_model.
        prompts: (prompt ids, article truncated) per article, from build_prompts.
        gen: decoding settings (max_new_tokens, num_beams, length_penalty, no_repeat_ngram_size,
            min_new_tokens, do_sample, temperature, top_p).
        batch_size: articles per batch; halved on CUDA out-of-memory.
        advance: called with the number of articles done after each batch.
        stream: write the text of a single article here as it is generated (greedy/sampling only).
    Returns:
        one Generated per prompt, same order.
    """
    import torch

    if gen.mbr_samples:
        chosen = consensus_summaries(loaded, prompts, gen, batch_size, advance)
        if stream is not None and len(chosen) == 1:  # nothing to show until the samples are in
            stream.write(chosen[0].text + "\n")
            stream.flush()
        return chosen
    order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i][0]))  # longest first: OOM shows early
    results: list[Generated | None] = [None] * len(prompts)
    config = _generation_config(loaded, gen)
    if gen.do_sample:
        torch.manual_seed(loaded.config.data.seed)
    streamer = None
    if stream is not None and len(prompts) == 1 and gen.num_beams == 1:
        from phi2cli.inference.streaming import FirstLineStreamer

        streamer = FirstLineStreamer(loaded.tokenizer, stream)
    fast = uses_fast_decoder(loaded, gen, streaming=streamer is not None)

    def run(chunk: Sequence[int]) -> None:
        batch = [prompts[i][0] for i in chunk]
        outputs = _decode_batch(loaded, batch, gen) if fast else _generate_batch(loaded, batch, config, streamer)
        for index, (text, new_tokens) in zip(chunk, outputs):
            ids, truncated = prompts[index]
            results[index] = Generated(text, len(ids), new_tokens, truncated)
        if advance:
            advance(len(chunk))

    def single_too_big() -> None:
        raise DeviceError("the GPU ran out of memory generating one summary; lower --max-new-tokens")

    from phi2cli.inference.batching import halving_batches

    halving_batches(order, batch_size, run, single_too_big)
    return [r for r in results if r is not None]


def consensus_summaries(loaded: LoadedModel, prompts: Sequence[tuple[list[int], bool]], gen: GenerationConfig,
                        batch_size: int, advance: Advance | None = None,
                        greedy: Sequence[Generated] | None = None) -> list[Generated]:  # fmt: skip
    """Minimum-Bayes-risk summaries: each article's greedy summary (`greedy`, or decoded here) and
    gen.mbr_samples samples at gen.mbr_temperature, of which consensus.consensus_pick keeps one.

    The samples come from the static-cache decoder where greedy decoding does (prefilled once per
    article, batch_size articles at a time as free memory allows), else from generate() with each
    prompt repeated (batch_size sequences at a time). Either way sample c of an article depends only
    on the run's seed, the article and c (phi2cli.inference.sampling), so an article gets the same
    summary alone or in a batch. Generated.new_tokens is the kept summary's.
    """
    from phi2cli.inference.consensus import consensus_pick

    plain = dataclasses.replace(gen, mbr_samples=0)
    if greedy is None:
        greedy = generate_prompts(loaded, prompts, plain, batch_size)
    copies, seed = gen.mbr_samples, loaded.config.data.seed
    if uses_fast_decoder(loaded, plain):
        from phi2cli.inference.decode import sample_decode

        rows = sample_decode(loaded.model, [p[0] for p in prompts], copies, gen.mbr_temperature, gen.max_new_tokens,
                             stop_token_ids(loaded.tokenizer), batch_size, advance=advance, seed=seed)  # fmt: skip
        samples = [first_lines(loaded, article_rows) for article_rows in rows]
    else:
        samples = _samples_from_generate(loaded, [p[0] for p in prompts], plain, copies, gen.mbr_temperature,
                                         max(1, batch_size // copies), advance, seed)  # fmt: skip
    chosen = []
    for first, drawn_texts in zip(greedy, samples):
        candidates = [(first.text, first.new_tokens), *drawn_texts]
        text, new_tokens = candidates[consensus_pick([c[0] for c in candidates])]
        chosen.append(dataclasses.replace(first, text=text, new_tokens=new_tokens,
                                          sampled_tokens=sum(n for _, n in drawn_texts)))  # fmt: skip
    return chosen


def _samples_from_generate(loaded: LoadedModel, prompts: Sequence[list[int]], plain: GenerationConfig, copies: int,
                           temperature: float, articles_per_batch: int, advance: Advance | None,
                           seed: int) -> list[list[tuple[str, int]]]:  # fmt: skip
    """`copies` (text, new tokens) samples per prompt from generate(), drawn as the static-cache
    decoder draws them (sampling.UniformRowsProcessor after the settings' own processors)."""
    from phi2cli.inference.batching import halving_batches
    from phi2cli.inference.sampling import uniform_rows

    config = _generation_config(loaded, plain)
    order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
    results: list[list[tuple[str, int]]] = [[] for _ in prompts]

    def run(chunk: Sequence[int]) -> None:
        batch = [prompts[i] for i in chunk]
        uniforms = uniform_rows(batch, copies, plain.max_new_tokens, seed)
        rows = _generate_batch(loaded, [p for p in batch for _ in range(copies)], config, None,
                               sampling=(uniforms, temperature))  # fmt: skip
        for position, index in enumerate(chunk):
            results[index] = rows[position * copies : (position + 1) * copies]
        if advance:
            advance(len(chunk))

    def single_too_big() -> None:
        raise DeviceError(f"the GPU ran out of memory sampling {copies} summaries of one article; "
                          f"lower --mbr-samples or --max-new-tokens")  # fmt: skip

    halving_batches(order, articles_per_batch, run, single_too_big)
    return results


def _generation_config(loaded: LoadedModel, gen: GenerationConfig) -> Any:
    from transformers import GenerationConfig as HFGenerationConfig

    kwargs = generate_kwargs(gen)
    if loaded.device == "cuda" and gen.num_beams == 1:
        kwargs["cache_implementation"] = "static"  # transformers' own static KV cache (it compiles the step)
    return HFGenerationConfig(**kwargs, eos_token_id=stop_token_ids(loaded.tokenizer),
                              pad_token_id=loaded.tokenizer.pad_token_id, use_cache=True)  # fmt: skip


def generate_kwargs(gen: GenerationConfig) -> dict[str, Any]:
    """Our decoding settings as transformers' GenerationConfig arguments (only those that act)."""
    kwargs: dict[str, Any] = {"max_new_tokens": gen.max_new_tokens, "num_beams": gen.num_beams,
                              "do_sample": gen.do_sample}  # fmt: skip
    if gen.do_sample:
        kwargs.update(temperature=gen.temperature, top_p=gen.top_p)
    if gen.num_beams > 1:
        kwargs.update(length_penalty=gen.length_penalty, early_stopping=True)  # stop once num_beams are done
    if gen.no_repeat_ngram_size:
        kwargs["no_repeat_ngram_size"] = gen.no_repeat_ngram_size
    if gen.min_new_tokens:
        kwargs["min_new_tokens"] = gen.min_new_tokens  # the stop tokens (EOS, newline) are held back until then
    return kwargs


def _generate_batch(loaded: LoadedModel, prompts: list[list[int]], config: Any, streamer: Any,
                    sampling: tuple[Any, float] | None = None) -> list[tuple[str, int]]:  # fmt: skip
    """Left-pad a batch (generation appends on the right), generate, decode each first line.
    `sampling`: (uniforms [rows, max_new_tokens], temperature) to draw each row's tokens with
    (sampling.UniformRowsProcessor; `config` is then greedy)."""
    import torch

    width = max(len(p) for p in prompts)
    pad = loaded.tokenizer.pad_token_id
    input_ids = torch.full((len(prompts), width), pad, dtype=torch.long)
    attention_mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for row, ids in enumerate(prompts):
        input_ids[row, width - len(ids):] = torch.tensor(ids, dtype=torch.long)
        attention_mask[row, width - len(ids):] = 1
    device = loaded.model.device
    processors = []
    if sampling is not None:
        from transformers import LogitsProcessorList

        from phi2cli.inference.sampling import UniformRowsProcessor

        processors = LogitsProcessorList([UniformRowsProcessor(sampling[0].to(device), width, sampling[1])])
    with torch.inference_mode():
        out = loaded.model.generate(input_ids=input_ids.to(device), attention_mask=attention_mask.to(device),
                                    generation_config=config, streamer=streamer,
                                    logits_processor=processors or None)  # fmt: skip
    from phi2cli.inference.decode import cut_at_stop

    return first_lines(loaded, [cut_at_stop(row, config.eos_token_id) for row in out[:, width:].tolist()])


def _decode_batch(loaded: LoadedModel, prompts: list[list[int]], gen: GenerationConfig) -> list[tuple[str, int]]:
    """Greedy summaries through the static-cache decoder (it splits the batch further to fit memory)."""
    from phi2cli.inference.decode import greedy_decode

    rows = greedy_decode(loaded.model, prompts, gen.max_new_tokens, stop_token_ids(loaded.tokenizer), len(prompts))
    return first_lines(loaded, rows)


def first_lines(loaded: LoadedModel, rows: list[list[int]]) -> list[tuple[str, int]]:
    """(first line of the decoded text, new tokens) per row of generated ids cut at their stop token."""
    return [(first_line(loaded.tokenizer.decode(row, skip_special_tokens=True)), len(row)) for row in rows]
