"""A trained run at inference: base model (+ merged adapter), batched generation, eval loss.

Prompts are built exactly as in training (the run's template through PromptFormat, the article
cut by the same function). On CUDA a 4-bit base is dequantized once and the adapter merged into
the bf16 weights, so no step pays for NF4 dequantization or LoRA matmuls.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence, TextIO

from phi2cli.config import RUN_CONFIG_NAME, GenerationConfig, Phi2Config, load_run_config
from phi2cli.errors import ConfigError, DataError, DeviceError, ModelError, RunError
from phi2cli.report.metrics import first_line
from phi2cli.data.prompts import IGNORE_INDEX, EncodedExample, PromptFormat

CUDA_GEN_BATCH = 128  # default articles per generate() call on a GPU (halved on out-of-memory)
FAST_CUDA_GEN_BATCH = 256  # with the fast greedy decoder (it also caps a batch by free memory); see decode.py
LOSS_TOKENS = {"cuda": 32768, "cpu": 4096}  # tokens per packed eval-loss batch
Advance = Callable[[int], None]


@dataclass
class LoadedModel:
    """A model ready for inference and what is needed to prompt it as in training."""

    model: Any
    tokenizer: Any
    fmt: PromptFormat
    config: Phi2Config
    device: str  # "cuda" or "cpu"
    dtype: str  # weights' compute dtype
    adapter_dir: Path | None = None  # None while it is the base model
    merged: bool = False  # adapter folded into the weights
    notes: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class Generated:
    text: str  # first line of the generated continuation
    prompt_tokens: int
    new_tokens: int  # tokens generated up to and including the stop token
    truncated: bool  # the article was cut to fit max_length - max_new_tokens


@dataclass(frozen=True)
class LossResult:
    loss: float  # token-weighted mean cross-entropy over every labelled token of the set
    perplexity: float
    tokens: int  # labelled tokens scored
    examples: int
    seconds: float


def check_adapter_dir(adapter_dir: str | Path) -> Path:
    """The adapter directory, or a RunError/ModelError saying why it cannot be used."""
    path = Path(adapter_dir)
    if not path.exists():
        raise RunError(f"adapter directory {path} does not exist; train one with 'phi2 train' or pass --adapter DIR")
    if not path.is_dir():
        raise RunError(f"--adapter {path} is a file; pass the directory written by 'phi2 train'")
    if not (path / "adapter_config.json").is_file():
        from phi2cli.io.checkpoints import checkpoints

        saved = checkpoints(path)
        hint = f"it holds checkpoints: pass --adapter {saved[-1]}" if saved else \
            "train one with 'phi2 train', or pass --adapter DIR"  # fmt: skip
        raise ModelError(f"{path} holds no adapter_config.json: not a LoRA adapter directory ({hint})")
    return path


def run_config_for(adapter_dir: str | Path) -> tuple[Phi2Config, dict[str, Any]]:
    """The saved config of the run that wrote `adapter_dir` (in it, or beside a checkpoint-N)."""
    path = Path(adapter_dir)
    for folder in (path, path.parent):
        if (folder / RUN_CONFIG_NAME).is_file():
            return load_run_config(folder)
    raise RunError(
        f"{path} has no {RUN_CONFIG_NAME} (nor has its parent), so its prompt template is unknown; "
        f"pass a directory written by 'phi2 train'"
    )


def _tokenizer_source(config: Phi2Config, adapter_dir: Path | None) -> str:
    if adapter_dir is not None and (adapter_dir / "tokenizer_config.json").is_file():
        return str(adapter_dir)  # the tokenizer saved with the run is the one training used
    return config.model.tokenizer or config.model.model


def load_model(config: Phi2Config, adapter_dir: str | Path | None = None) -> LoadedModel:
    """Load the base model for inference, with the adapter merged in when one is given.

    Args:
        config: the run's config (model, template and max_length are used).
        adapter_dir: a LoRA adapter directory; None for the base model alone.
    Returns:
        LoadedModel in eval mode with the KV cache on.
    Raises:
        ModelError, RunError, DeviceError, HubUnreachableError, ConfigError.
    """
    from phi2cli.models.loading import load_base_model, load_tokenizer, resolve_precision

    from phi2cli.io.hub import check_hub_access

    adapter_path = check_adapter_dir(adapter_dir) if adapter_dir is not None else None
    hub_notes = check_hub_access(config, tokenizer=_tokenizer_source(config, adapter_path) != str(adapter_path))
    precision = resolve_precision(config.model)
    tokenizer = load_tokenizer(_tokenizer_source(config, adapter_path))
    fmt = PromptFormat.create(config.data.template, tokenizer)
    if precision.device == "cuda" and precision.quantization == "4bit":
        from phi2cli.models.dequantized import load_dequantized_base

        base = load_dequantized_base(config.model, precision, for_training=False)  # NF4 values, bf16 matmuls
    else:
        base = load_base_model(config.model, precision, for_training=False)
    notes = hub_notes + ([precision.note] if precision.note and precision.device == "cuda" else [])
    if precision.device == "cuda":
        from phi2cli.kernels.lora import fuse_gelu

        fuse_gelu(base)  # phi-2's gelu_new as one kernel (same formula)
    base.eval()
    base.requires_grad_(False)
    loaded = LoadedModel(base, tokenizer, fmt, config, precision.device, precision.compute_dtype, notes=notes)
    if adapter_path is not None:
        attach_adapter(loaded, adapter_path)
    return loaded


def attach_adapter(loaded: LoadedModel, adapter_dir: str | Path) -> LoadedModel:
    """Load a LoRA adapter onto `loaded.model` and merge it into the weights (in place)."""
    from phi2cli.models.loading import load_adapter

    path = check_adapter_dir(adapter_dir)
    model = load_adapter(loaded.model, path)
    if getattr(model, "is_loaded_in_8bit", False):  # merging into int8 weights would round them
        loaded.notes.append("8-bit base: the adapter is applied unmerged (slower)")
    else:
        model = model.merge_and_unload()
        loaded.merged = True
    model.eval()
    loaded.model, loaded.adapter_dir = model, path
    return loaded


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
              advance: Advance | None = None) -> LossResult:  # fmt: skip
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


def stop_token_ids(tokenizer: Any) -> list[int]:
    """EOS plus the tokenizer's single-token newline(s): a summary is one line (phi-2: 198, 628)."""
    ids = [int(tokenizer.eos_token_id)]
    for text in ("\n", "\n\n"):
        encoded = tokenizer(text, add_special_tokens=False)["input_ids"]
        if len(encoded) == 1 and encoded[0] not in ids:
            ids.append(int(encoded[0]))
    return ids


def encode_documents(tokenizer: Any, documents: Sequence[str]) -> list[list[int]]:
    """Token ids of each article, as prompts.encode_document gives them, in one batched call."""
    if not documents:
        return []
    return [list(ids) for ids in tokenizer(list(documents), add_special_tokens=False)["input_ids"]]


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
    """Plain greedy (no n-gram blocking, no minimum length), not streamed, PHI2_DECODER not 'hf', and a
    model the static-cache decoder supports (phi2cli.inference.decode); everything else goes through
    transformers' generate(). The length penalty only acts on beams."""
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
        return "static-cache greedy (phi2cli.inference.decode)"
    kind = "sampling" if gen.do_sample else "beam search" if gen.num_beams > 1 else "greedy"
    return f"transformers generate ({kind})"


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


def _generate_batch(loaded: LoadedModel, prompts: list[list[int]], config: Any,
                    streamer: Any) -> list[tuple[str, int]]:  # fmt: skip
    """Left-pad a batch (generation appends on the right), generate, decode each first line."""
    import torch

    width = max(len(p) for p in prompts)
    pad = loaded.tokenizer.pad_token_id
    input_ids = torch.full((len(prompts), width), pad, dtype=torch.long)
    attention_mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for row, ids in enumerate(prompts):
        input_ids[row, width - len(ids):] = torch.tensor(ids, dtype=torch.long)
        attention_mask[row, width - len(ids):] = 1
    device = loaded.model.device
    with torch.inference_mode():
        out = loaded.model.generate(input_ids=input_ids.to(device), attention_mask=attention_mask.to(device),
                                    generation_config=config, streamer=streamer)  # fmt: skip
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
