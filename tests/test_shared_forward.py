"""One forward for the eval loss and the summaries' prefill: the two passes' loss and tokens, exactly."""

from __future__ import annotations

import json

import pytest
import torch
from test_decode import segment_attention

from phi2cli.inference import decode

from phi2cli.inference import shared_forward
from phi2cli.config import GenerationConfig
from phi2cli.inference.decode import greedy_decode
from phi2cli.inference.shared_forward import decode_with_loss, loss_and_summaries, unshared_tail

MAX_LENGTH = 160  # short, so that most articles are cut
MAX_NEW_TOKENS = 12


@pytest.fixture(scope="module")
def loaded(tiny_phi_dir):
    """The tiny Phi in float32 with sharp attention, so that a wrong key, value or position changes the tokens."""
    return sharply_attending(tiny_phi_dir)


def sharply_attending(model_dir):
    """The model at `model_dir` loaded for inference, its query and key weights redrawn large."""
    from phi2cli.config import Phi2Config, apply_overrides
    from phi2cli.inference.trained_model import load_model

    overrides = {"model.model": str(model_dir), "data.max_length": MAX_LENGTH}
    loaded = load_model(apply_overrides(Phi2Config(), overrides).validate())
    torch.manual_seed(0)
    with torch.no_grad():
        for layer in loaded.model.model.layers:
            layer.self_attn.q_proj.weight.normal_(0.0, 0.4)
            layer.self_attn.k_proj.weight.normal_(0.0, 0.4)
    return loaded


def summary_of_tokens(loaded, words: list[str], count: int) -> str:
    """The first words of a summary whose ids (with the leading space and EOS) number exactly `count`."""
    for n in range(1, len(words) + 1):
        text = " ".join(words[:n])
        if len(loaded.tokenizer(loaded.fmt.summary_prefix + text, add_special_tokens=False)["input_ids"]) + 1 == count:
            return text
    raise AssertionError(f"no prefix of {words} is {count} tokens")


@pytest.fixture(scope="module")
def rows(loaded, sample_data_dir) -> list[dict]:
    """Real XSUM rows bent into every case the shared forward meets."""
    rows = [json.loads(line) for line in (sample_data_dir / "validation.jsonl").read_text().splitlines()[:11]]
    rows[0]["document"] = rows[0]["document"][:300]  # not cut at all, the full summary longer than 12 tokens
    rows[1]["document"] = rows[1]["document"][:500]  # not cut, a short summary
    for row in rows[1:6]:
        row["summary"] = " ".join(row["summary"].split()[:4])  # cut article, prompt cut shorter than the example's
    rows[6]["summary"] = rows[8]["document"]  # the summary does not fit: no example
    rows[7]["summary"] = summary_of_tokens(loaded, rows[7]["summary"].split(), MAX_NEW_TOKENS)  # both cut alike
    # rows 8-10 keep their full summaries (> 12 tokens): the prompt keeps more article than the example
    return rows


@pytest.fixture(scope="module")
def articles(loaded, rows):
    """(document ids, loss examples) of the rows."""
    from phi2cli.inference.evaluation import encode_examples
    from phi2cli.data.prompts import encode_documents

    document_ids = encode_documents(loaded.tokenizer, [r["document"] for r in rows])
    return document_ids, encode_examples(loaded, rows, document_ids)


@pytest.fixture(scope="module")
def prompts(loaded, articles):
    from phi2cli.inference.generate import build_prompts

    return build_prompts(loaded, articles[0], MAX_NEW_TOKENS)


@pytest.fixture(scope="module")
def shareable(loaded, articles, prompts) -> list[int]:
    """The rows whose prompt begins its example but for the template's end (3 tokens), checked per case."""
    _, examples = articles
    suffix = len(loaded.fmt.suffix_ids)
    tails = [None if e is None else unshared_tail(ids, e.input_ids) for (ids, _), e in zip(prompts, examples)]
    cut = [truncated for _, truncated in prompts]
    assert suffix == 3 and tails[6] is None
    assert not cut[0] and not cut[1] and tails[0] == tails[1] == 1  # the whole prompt begins the example
    assert all(cut[i] and 1 < tails[i] <= suffix for i in range(2, 6))  # the article's cut, then the suffix
    assert cut[7] and tails[7] == 1
    assert all(cut[i] and tails[i] > suffix for i in (8, 9, 10))  # summary longer than max_new_tokens: apart
    return [i for i, tail in enumerate(tails) if tail is not None and tail <= suffix]


@pytest.fixture(scope="module")
def two_passes(loaded, articles, prompts, shareable):
    """greedy_decode's tokens for the shareable rows' prompts and eval_loss over their examples."""
    from phi2cli.inference.eval_loss import eval_loss

    tokens = greedy_decode(loaded.model, [prompts[i][0] for i in shareable], MAX_NEW_TOKENS, [], batch_size=16)
    return tokens, eval_loss(loaded, [articles[1][i] for i in shareable])


@pytest.mark.parametrize("forward", ["padded", "packed"])
@pytest.mark.parametrize("batch_size", [7, 3, 2])
def test_one_forward_gives_eval_loss_and_greedy_decode_tokens(loaded, articles, prompts, shareable, two_passes,
                                                              batch_size, forward, monkeypatch):  # fmt: skip
    if forward == "packed":  # the CUDA layout (one packed row), with a CPU stand-in for the varlen kernel
        monkeypatch.setattr(decode, "_varlen_ready", lambda phi: True)
        monkeypatch.setattr(decode, "causal_varlen", segment_attention)
    monkeypatch.setitem(decode.PREFILL_TOKENS, "cpu", 300)  # 1-3 examples per forward: several per batch
    tokens, loss = two_passes
    assert len(shareable) == 7 and len({tuple(t) for t in tokens}) == 7  # seven different continuations
    shared = decode_with_loss(loaded.model, [prompts[i][0] for i in shareable], [articles[1][i] for i in shareable],
                              MAX_NEW_TOKENS, [], batch_size)  # fmt: skip
    assert shared.generated == tokens
    assert shared.labelled == loss.tokens
    assert shared.loss_sum / shared.labelled == pytest.approx(loss.loss, rel=1e-5)


def test_stop_tokens_cut_rows_as_greedy_decode_does(loaded, articles, prompts, shareable, two_passes):
    tokens, _ = two_passes
    stop_ids = [tokens[0][2], tokens[4][5]]
    shared = decode_with_loss(loaded.model, [prompts[i][0] for i in shareable], [articles[1][i] for i in shareable],
                              MAX_NEW_TOKENS, stop_ids, 4)  # fmt: skip
    reference = greedy_decode(loaded.model, [prompts[i][0] for i in shareable], MAX_NEW_TOKENS, stop_ids, 4)
    assert shared.generated == reference and len(reference[0]) <= 3 and reference[0][-1] in stop_ids


@pytest.mark.parametrize("batch_size", [11, 4])
def test_every_article_scored_as_by_the_two_passes(loaded, articles, prompts, shareable, batch_size):
    """Shared rows, rows apart (no example, a long summary) and their order: eval_loss and generate's results."""
    from phi2cli.inference.eval_loss import eval_loss
    from phi2cli.inference.generate import generate_prompts

    document_ids, examples = articles
    gen = GenerationConfig(max_new_tokens=MAX_NEW_TOKENS)
    scored = loss_and_summaries(loaded, document_ids, examples, gen, batch_size)
    loss = eval_loss(loaded, [e for e in examples if e is not None])
    assert scored.shared_articles == len(shareable)
    assert (scored.loss.tokens, scored.loss.examples) == (loss.tokens, loss.examples) == (loss.tokens, 10)
    assert scored.loss.loss == pytest.approx(loss.loss, rel=1e-5)
    assert scored.loss.perplexity == pytest.approx(loss.perplexity, rel=1e-5)
    assert scored.generated == generate_prompts(loaded, prompts, gen, batch_size)


@pytest.mark.parametrize("template", ["Summarize this article: {document}", "{document}\n\nTL;DR in one line:\n"])
def test_other_templates_share_the_forward_too(loaded, rows, template):
    """No text after the article (the prompt is all shared but its last token), and a longer template end."""
    from dataclasses import replace

    from phi2cli.inference.evaluation import encode_examples
    from phi2cli.inference.eval_loss import eval_loss
    from phi2cli.data.prompts import encode_documents
    from phi2cli.inference.generate import build_prompts, generate_prompts
    from phi2cli.data.prompts import PromptFormat

    other = replace(loaded, fmt=PromptFormat.create(template, loaded.tokenizer))
    document_ids = encode_documents(other.tokenizer, [r["document"] for r in rows])
    examples = encode_examples(other, rows, document_ids)
    gen = GenerationConfig(max_new_tokens=MAX_NEW_TOKENS)
    scored = loss_and_summaries(other, document_ids, examples, gen, 4)
    assert scored.shared_articles >= 6
    assert scored.loss.loss == pytest.approx(eval_loss(other, [e for e in examples if e is not None]).loss, rel=1e-5)
    assert scored.generated == generate_prompts(other, build_prompts(other, document_ids, MAX_NEW_TOKENS), gen, 4)


def test_out_of_memory_halves_the_batch_then_leaves_the_rest_to_the_two_passes(loaded, articles, prompts,
                                                                               monkeypatch):  # fmt: skip
    from phi2cli.inference.eval_loss import eval_loss
    from phi2cli.inference.generate import generate_prompts

    sizes = []

    def out_of_memory(model, prompts, *args, **kwargs):
        sizes.append(len(prompts))
        raise torch.cuda.OutOfMemoryError("CUDA out of memory")

    monkeypatch.setattr(shared_forward, "decode_with_loss", out_of_memory)
    document_ids, examples = articles
    gen = GenerationConfig(max_new_tokens=MAX_NEW_TOKENS)
    scored = loss_and_summaries(loaded, document_ids, examples, gen, 6)
    assert sizes == [6, 3, 1] and scored.shared_articles == 0
    assert scored.loss.loss == pytest.approx(eval_loss(loaded, [e for e in examples if e is not None]).loss, rel=1e-9)
    assert scored.generated == generate_prompts(loaded, prompts, gen, 6)


@pytest.fixture(scope="module")
def loaded_llama(tmp_path_factory):
    """A tiny Llama with grouped key/value heads (head_dim 24), float32, sharp attention."""
    from test_families import tiny_model

    return sharply_attending(tiny_model("llama", tmp_path_factory.mktemp("tiny-llama")))


@pytest.fixture(scope="module")
def llama_two_passes(loaded_llama, rows):
    """The Llama's shareable (prompt, example) pairs, greedy_decode's tokens and eval_loss over them."""
    from phi2cli.inference.evaluation import encode_examples
    from phi2cli.inference.eval_loss import eval_loss
    from phi2cli.data.prompts import encode_documents
    from phi2cli.inference.generate import build_prompts

    document_ids = encode_documents(loaded_llama.tokenizer, [r["document"] for r in rows])
    examples = encode_examples(loaded_llama, rows, document_ids)
    prompts = [ids for ids, _ in build_prompts(loaded_llama, document_ids, MAX_NEW_TOKENS)]
    shareable = [i for i, e in enumerate(examples) if e is not None and unshared_tail(prompts[i], e.input_ids) <= 3]
    assert len(shareable) >= 6
    tokens = greedy_decode(loaded_llama.model, [prompts[i] for i in shareable], MAX_NEW_TOKENS, [], batch_size=16)
    loss = eval_loss(loaded_llama, [examples[i] for i in shareable])
    return [prompts[i] for i in shareable], [examples[i] for i in shareable], tokens, loss


@pytest.mark.parametrize("forward", ["padded", "packed"])
def test_grouped_head_llama_gets_the_two_passes_loss_and_tokens_from_one_forward(loaded_llama, llama_two_passes,
                                                                                 forward, monkeypatch):  # fmt: skip
    from phi2cli.inference.generate import uses_fast_decoder

    assert uses_fast_decoder(loaded_llama, GenerationConfig(max_new_tokens=MAX_NEW_TOKENS))
    if forward == "packed":
        monkeypatch.setattr(decode, "_varlen_ready", lambda phi: True)
        monkeypatch.setattr(decode, "causal_varlen", segment_attention)
    monkeypatch.setitem(decode.PREFILL_TOKENS, "cpu", 300)  # 1-3 examples per forward: several per batch
    prompts, examples, tokens, loss = llama_two_passes
    assert len(prompts) >= 6 and len({tuple(t) for t in tokens}) == len(prompts)  # different continuations
    shared = decode_with_loss(loaded_llama.model, prompts, examples, MAX_NEW_TOKENS, [], 3)
    assert shared.generated == tokens
    assert shared.labelled == loss.tokens
    assert shared.loss_sum / shared.labelled == pytest.approx(loss.loss, rel=1e-5)


def test_unshared_tail_counts_the_prompt_tokens_after_the_common_prefix():
    assert unshared_tail([1, 2, 3, 9, 8], [1, 2, 3, 4, 5, 6]) == 2
    assert unshared_tail([1, 2, 3], [1, 2, 3, 4, 5]) == 1  # the whole prompt is shared: its last token still goes
    assert unshared_tail([7, 2, 3], [1, 2, 3]) == 3
    assert unshared_tail([5], [5, 6]) == 1


def test_a_batch_feeding_more_tokens_than_a_prompt_has_is_refused(loaded, articles, prompts, shareable):
    example = articles[1][shareable[0]]
    with pytest.raises(ValueError, match="shorter than the 3 tokens"):
        decode_with_loss(loaded.model, [[9, 9, 9], [5]], [example, example], 4, [], 2)
