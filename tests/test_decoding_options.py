"""Decoding options of `evaluate` and `summarize`: they reach transformers' generate, act, and are recorded."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from phi2cli.cli import app

runner = CliRunner()
BEAMS = ["--num-beams", "3", "--length-penalty", "0.6", "--no-repeat-ngram-size", "2", "--min-new-tokens", "5",
         "--max-new-tokens", "8"]  # fmt: skip


@pytest.fixture
def generate_calls(monkeypatch):
    """Every call of transformers' generate: its GenerationConfig and the new token ids it returned."""
    from transformers.generation.utils import GenerationMixin

    calls: list[dict] = []
    original = GenerationMixin.generate

    def recording(self, *args, **kwargs):
        out = original(self, *args, **kwargs)
        width = kwargs["input_ids"].shape[1]
        calls.append({"config": kwargs["generation_config"], "new": out[:, width:].tolist()})
        return out

    monkeypatch.setattr(GenerationMixin, "generate", recording)
    return calls


def test_evaluate_passes_beam_options_to_generate_and_records_them(final, generate_calls):
    result = runner.invoke(app, ["evaluate", "--samples", "2", "--gen-batch-size", "1", *BEAMS])
    assert result.exit_code == 0, result.output
    assert len(generate_calls) == 2  # one call per batch of --gen-batch-size articles
    config = generate_calls[0]["config"]
    assert (config.num_beams, config.length_penalty, config.no_repeat_ngram_size, config.min_new_tokens,
            config.max_new_tokens, config.do_sample) == (3, 0.6, 2, 5, 8, False)  # fmt: skip
    settings = json.loads((final / "metrics-validation.json").read_text())["settings"]
    assert (settings["num_beams"], settings["length_penalty"], settings["no_repeat_ngram_size"],
            settings["min_new_tokens"], settings["max_new_tokens"]) == (3, 0.6, 2, 5, 8)  # fmt: skip
    assert settings["decoding"] == "transformers generate (beam search)"


def test_plain_greedy_keeps_the_fast_decoder_and_records_the_defaults(final, generate_calls):
    result = runner.invoke(app, ["evaluate", "--samples", "3", "--max-new-tokens", "6"])
    assert result.exit_code == 0, result.output
    assert generate_calls == []  # the static-cache decoder, not generate()
    settings = json.loads((final / "metrics-validation.json").read_text())["settings"]
    assert settings["decoding"].startswith("static-cache greedy")
    assert (settings["num_beams"], settings["length_penalty"], settings["no_repeat_ngram_size"],
            settings["min_new_tokens"]) == (1, 1.0, 0, 0)  # fmt: skip


def test_ngram_blocking_and_minimum_length_act_on_the_generated_tokens(final, generate_calls):
    result = runner.invoke(app, ["evaluate", "--samples", "3", "--no-repeat-ngram-size", "2", "--min-new-tokens",
                                 "6", "--max-new-tokens", "10", "-o", "out"])  # fmt: skip
    assert result.exit_code == 0, result.output
    assert generate_calls and generate_calls[0]["config"].num_beams == 1  # greedy, through generate()
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(final))
    stops = {tokenizer.eos_token_id, *tokenizer("\n", add_special_tokens=False)["input_ids"]}
    for call in generate_calls:
        for row in call["new"]:
            first_stop = next((i for i, t in enumerate(row) if t in stops), len(row))
            assert first_stop >= 6, row  # no EOS or newline before the sixth new token
            text = row[:first_stop]
            bigrams = list(zip(text, text[1:]))
            assert len(bigrams) == len(set(bigrams)), row
    assert json.loads(Path("out/metrics-validation.json").read_text())["settings"]["decoding"] == "transformers generate (greedy)"


def test_summarize_passes_the_options_to_generate(final, generate_calls, sample_data_dir):
    rows = [json.loads(line) for line in (sample_data_dir / "test.jsonl").read_text().splitlines()]
    Path("a.txt").write_text(rows[0]["document"])
    result = runner.invoke(app, ["summarize", "a.txt", "--json", *BEAMS])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)[0]["source"] == "a.txt"
    config = generate_calls[0]["config"]
    assert (config.num_beams, config.length_penalty, config.no_repeat_ngram_size, config.min_new_tokens) == \
        (3, 0.6, 2, 5)  # fmt: skip


@pytest.mark.parametrize(("flags", "message"), [
    (["--min-new-tokens", "20", "--max-new-tokens", "10"],
     "--min-new-tokens must be between 0 and --max-new-tokens 10 (got 20)"),
    (["--no-repeat-ngram-size", "-1"], "--no-repeat-ngram-size must be 0 or more (got -1)"),
    (["--length-penalty", "nan"], "--length-penalty must be a finite number (got nan)"),
])  # fmt: skip
def test_bad_decoding_values_are_one_line_usage_errors(final, flags, message):
    result = runner.invoke(app, ["evaluate", "--samples", "2", *flags], env={"COLUMNS": "300"})
    assert result.exit_code == 2, result.output
    assert message in result.output and "Traceback" not in result.output
