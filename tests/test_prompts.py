"""Prompt formatting, label masking and article-only truncation with phi-2's real tokenizer."""

from __future__ import annotations

import pytest

from phi2cli.config import DEFAULT_TEMPLATE
from phi2cli.data.prompts import IGNORE_INDEX, PromptFormat, encode_example


@pytest.fixture(scope="module")
def tokenizer(phi2_tokenizer_dir):
    from phi2cli.models.loading import load_tokenizer

    return load_tokenizer(str(phi2_tokenizer_dir))


def test_phi2_tokenizer_gets_eos_as_pad(tokenizer):
    assert tokenizer.eos_token_id == 50256
    assert tokenizer.pad_token_id == 50256


def test_labels_mask_the_prompt_and_keep_the_eos(tokenizer):
    fmt = PromptFormat.create(DEFAULT_TEMPLATE, tokenizer)
    ex = encode_example(fmt, tokenizer, "The cat sat on the mat.", "A cat sat down.", 1024)
    prompt = "Instruct: Summarize the following news article in one sentence.\nThe cat sat on the mat.\nOutput:"
    prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    summary_ids = tokenizer(" A cat sat down.", add_special_tokens=False)["input_ids"] + [50256]
    assert ex.input_ids == prompt_ids + summary_ids
    assert ex.labels == [IGNORE_INDEX] * len(prompt_ids) + summary_ids
    assert ex.labels[-1] == tokenizer.eos_token_id
    assert tokenizer.decode([t for t in ex.labels if t != IGNORE_INDEX]) == " A cat sat down.<|endoftext|>"
    assert (ex.prompt_tokens, ex.summary_tokens, ex.truncated) == (len(prompt_ids), len(summary_ids), False)


def test_loss_on_all_keeps_every_label(tokenizer):
    fmt = PromptFormat.create(DEFAULT_TEMPLATE, tokenizer)
    ex = encode_example(fmt, tokenizer, "The cat sat on the mat.", "A cat sat down.", 1024, loss_on="all")
    assert ex.labels == ex.input_ids


def test_truncation_cuts_the_article_never_the_summary(tokenizer):
    fmt = PromptFormat.create(DEFAULT_TEMPLATE, tokenizer)
    document = " ".join(f"word{i}" for i in range(500))
    summary = "The summary must survive in full."
    ex = encode_example(fmt, tokenizer, document, summary, 64)
    summary_ids = tokenizer(" " + summary, add_special_tokens=False)["input_ids"] + [50256]
    assert len(ex.input_ids) == 64
    assert ex.truncated
    assert ex.input_ids[-len(summary_ids):] == summary_ids
    assert ex.input_ids[: len(fmt.prefix_ids)] == list(fmt.prefix_ids)
    # the suffix ("\nOutput:") is kept right before the summary
    assert ex.input_ids[-len(summary_ids) - len(fmt.suffix_ids): -len(summary_ids)] == list(fmt.suffix_ids)


def test_summary_too_long_for_max_length_is_dropped(tokenizer):
    fmt = PromptFormat.create(DEFAULT_TEMPLATE, tokenizer)
    assert encode_example(fmt, tokenizer, "doc", "word " * 100, 40) is None


def test_template_without_document_placeholder_is_rejected(tokenizer):
    from phi2cli.errors import ConfigError

    with pytest.raises(ConfigError, match=r"\{document\}"):
        PromptFormat.create("Summarize this:", tokenizer)


def test_custom_template_is_used(tokenizer):
    fmt = PromptFormat.create("Article: {document}\nTL;DR:", tokenizer)
    ex = encode_example(fmt, tokenizer, "Rain fell.", "It rained.", 1024)
    assert tokenizer.decode(ex.input_ids) == "Article: Rain fell.\nTL;DR: It rained.<|endoftext|>"
