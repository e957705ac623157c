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
    settings = json.loads(Path("out/metrics-validation.json").read_text())["settings"]
    # the tiny run's recipe row adds 32 samples per article (MBR): they also went through generate(),
    # under the same blocking and minimum length (the loop above checked their rows too)
    assert settings["decoding"].startswith("transformers generate (greedy) + 32 samples at temperature 0.7")
    assert (settings["mbr_samples"], settings["mbr_temperature"]) == (32, 0.7)
    assert sum(len(call["new"]) for call in generate_calls) == 3 + 3 * 32


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
    (["--mbr-samples", "-1"], "--mbr-samples must be 0 (off) or positive (got -1)"),
    (["--mbr-temperature", "0"], "--mbr-temperature must be positive (got 0.0)"),
    (["--mbr-samples", "4", "--sample"], "--mbr-samples 4 chooses among sampled summaries and the greedy one: use "
                                         "it with --num-beams 1 and without --sample, or pass --mbr-samples 0"),
])  # fmt: skip
def test_bad_decoding_values_are_one_line_usage_errors(final, flags, message):
    result = runner.invoke(app, ["evaluate", "--samples", "2", *flags], env={"COLUMNS": "300"})
    assert result.exit_code == 2, result.output
    assert message in result.output and "Traceback" not in result.output


def test_mbr_keeps_one_of_the_greedy_and_sampled_candidates_and_records_it(final, monkeypatch):
    from phi2cli.inference import consensus

    greedy = runner.invoke(app, ["evaluate", "--samples", "3", "--max-new-tokens", "8", "--mbr-samples", "0",
                                 "-o", "greedy"])  # fmt: skip
    assert greedy.exit_code == 0, greedy.output
    seen: list[list[str]] = []
    real_pick = consensus.consensus_pick

    def recording(candidates):
        seen.append(list(candidates))
        return real_pick(candidates)

    monkeypatch.setattr(consensus, "consensus_pick", recording)
    result = runner.invoke(app, ["evaluate", "--samples", "3", "--max-new-tokens", "8", "--mbr-samples", "5",
                                 "--mbr-temperature", "1.5", "-o", "mbr"])  # fmt: skip
    assert result.exit_code == 0, result.output
    settings = json.loads(Path("mbr/metrics-validation.json").read_text())["settings"]
    assert (settings["mbr_samples"], settings["mbr_temperature"]) == (5, 1.5)
    assert settings["decoding"] == ("static-cache greedy (phi2cli.inference.decode) + 5 samples at temperature 1.5, "
                                    "the one agreeing most (ROUGE-L) kept (minimum Bayes risk, "
                                    "phi2cli.inference.consensus)")  # fmt: skip
    plain = [json.loads(line)["prediction"] for line in Path("greedy/predictions-validation.jsonl").open()]
    kept = [json.loads(line)["prediction"] for line in Path("mbr/predictions-validation.jsonl").open()]
    assert len(seen) == 3 and all(len(candidates) == 6 for candidates in seen)
    assert sorted(c[0] for c in seen) == sorted(plain)  # the greedy summary is the first candidate
    assert sorted(kept) == sorted(c[real_pick(c)] for c in seen)
    assert any(len(set(c)) > 1 for c in seen)  # the samples are not all the greedy summary
    tokens = [json.loads(Path(f"{d}/metrics-validation.json").read_text())["timings"]["generated_tokens"]
              for d in ("greedy", "mbr")]  # fmt: skip
    assert tokens[1] > 2 * tokens[0]  # the samples' tokens count as generated (the rate is the decoder's)


def test_beams_or_sampling_asked_for_turn_the_runs_mbr_off(final, generate_calls):
    assert json.loads((final / "phi2_run.json").read_text())["config"]["generation"]["mbr_samples"] == 32  # the tiny run's row
    result = runner.invoke(app, ["evaluate", "--samples", "2", "--num-beams", "2", "--max-new-tokens", "6"])
    assert result.exit_code == 0, result.output
    settings = json.loads((final / "metrics-validation.json").read_text())["settings"]
    assert (settings["mbr_samples"], settings["decoding"]) == (0, "transformers generate (beam search)")
    assert sum(len(call["new"]) for call in generate_calls) == 2  # one beam-search summary per article, no samples
