"""`phi2 evaluate`: the documented metrics-SPLIT.json/predictions-SPLIT.jsonl, training's eval loss, --compare-base."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from typer.testing import CliRunner

from phi2cli.cli import app
from phi2cli.report.metrics import rouge

runner = CliRunner()
WIDE = {"COLUMNS": "200"}
METRIC_KEYS = {"eval_loss", "perplexity", "rouge1", "rouge2", "rougeL", "rougeLsum", "mean_summary_words"}


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def split_ids(data_dir: Path, split: str) -> list[str]:
    return [row["id"] for row in read_jsonl(data_dir / f"{split}.jsonl")]


def test_evaluate_writes_the_documented_metrics_and_predictions(final, sample_data_dir):
    result = runner.invoke(app, ["evaluate", "--samples", "5"], env=WIDE)
    assert result.exit_code == 0, result.output
    metrics = json.loads((final / "metrics-validation.json").read_text())
    assert {"model", "adapter", "split", "samples", "settings", "timings", "tuned"} <= set(metrics)
    assert "base" not in metrics and "delta" not in metrics
    assert metrics["split"] == "validation" and metrics["samples"] == 5 and metrics["adapter"] == "phi2-xsum-final"
    assert set(metrics["tuned"]) == METRIC_KEYS
    assert all(math.isfinite(v) for v in metrics["tuned"].values())
    assert metrics["tuned"]["perplexity"] == pytest.approx(math.exp(metrics["tuned"]["eval_loss"]))
    settings = metrics["settings"]
    assert (settings["max_new_tokens"], settings["num_beams"], settings["do_sample"]) == (60, 1, False)
    assert settings["max_length"] == 256 and settings["adapter_merged"] is True
    assert settings["rouge_sentence_splitter"] == "phi2cli.report.metrics.regex_sentences"
    assert {"loss_seconds", "generation_seconds", "total_seconds"} <= set(metrics["timings"])

    predictions = read_jsonl(final / "predictions-validation.jsonl")
    assert len(predictions) == 5
    assert all(set(p) == {"id", "reference", "prediction"} for p in predictions)
    assert all("\n" not in p["prediction"] for p in predictions)
    references = {r["id"]: r["summary"] for r in read_jsonl(sample_data_dir / "validation.jsonl")}
    assert all(references[p["id"]] == p["reference"] for p in predictions)
    assert len({p["id"] for p in predictions}) == 5
    rescored = rouge([p["prediction"] for p in predictions], [p["reference"] for p in predictions])
    assert metrics["tuned"]["rougeLsum"] == pytest.approx(rescored["rougeLsum"])  # the recorded splitter's score
    for key in ("rouge1", "rougeLsum", "perplexity"):
        assert key in result.stdout
    assert "metrics-validation.json" in result.stdout


def test_eval_loss_is_trainings_eval_loss_on_the_same_examples(final):
    # --samples 8 with the run's seed picks training's 8 validation examples
    result = runner.invoke(app, ["evaluate", "--samples", "8", "--max-new-tokens", "2", "-o", "out"])
    assert result.exit_code == 0, result.output
    training_eval_loss = json.loads((final / "phi2_run.json").read_text())["best_metric"]
    metrics = json.loads(Path("out/metrics-validation.json").read_text())
    assert metrics["tuned"]["eval_loss"] == pytest.approx(training_eval_loss, rel=1e-4)
    assert not list(final.glob("metrics*.json"))


def test_packed_eval_loss_equals_the_per_example_token_weighted_loss(final, sample_data_dir):
    import torch

    from phi2cli.inference.evaluation import resolve_config
    from phi2cli.inference.eval_loss import eval_loss, labelled_tokens
    from phi2cli.inference.trained_model import load_model
    from phi2cli.data.prompts import encode_example

    config = resolve_config(final, {})
    loaded = load_model(config, final)
    rows = read_jsonl(sample_data_dir / "validation.jsonl")[:6]
    examples = [encode_example(loaded.fmt, loaded.tokenizer, r["document"], r["summary"], 256) for r in rows]
    packed = eval_loss(loaded, examples, tokens_per_batch=600)  # several packed rows of several examples
    total = 0.0
    with torch.no_grad():
        for e in examples:
            out = loaded.model(input_ids=torch.tensor([e.input_ids]), labels=torch.tensor([e.labels]))
            total += float(out.loss) * labelled_tokens(e)
    count = sum(labelled_tokens(e) for e in examples)
    assert packed.tokens == count and packed.examples == 6
    assert packed.loss == pytest.approx(total / count, rel=1e-5)
    assert packed.perplexity == pytest.approx(math.exp(packed.loss))


def test_compare_base_scores_both_and_shows_the_differences(final, tmp_path, sample_data_dir):
    data_file = tmp_path / "mine.jsonl"
    data_file.write_text("".join(json.dumps(r) + "\n" for r in read_jsonl(sample_data_dir / "test.jsonl")[:4]))
    result = runner.invoke(app, ["evaluate", "--compare-base", "--file", str(data_file), "--max-new-tokens", "8",
                                 "--output", "cmp"], env=WIDE)  # fmt: skip
    assert result.exit_code == 0, result.output
    metrics = json.loads(Path("cmp/metrics-mine.json").read_text())
    assert metrics["samples"] == 4 and metrics["data"] == str(data_file)
    assert set(metrics["base"]) == set(metrics["delta"]) == METRIC_KEYS
    for key in METRIC_KEYS:
        assert metrics["delta"][key] == pytest.approx(metrics["tuned"][key] - metrics["base"][key])
    assert metrics["tuned"]["eval_loss"] != metrics["base"]["eval_loss"]  # the adapter is really applied
    assert metrics["base"]["perplexity"] == pytest.approx(math.exp(metrics["base"]["eval_loss"]))
    predictions = read_jsonl(Path("cmp/predictions-mine.jsonl"))
    assert sorted(p["id"] for p in predictions) == sorted(split_ids(sample_data_dir, "test")[:4])
    assert all({"prediction", "base_prediction"} <= set(p) for p in predictions)
    header = next(line for line in result.stdout.splitlines() if "metric" in line)
    assert "tuned" in header and "base" in header and "delta" in header
    loss_row = next(line for line in result.stdout.splitlines() if "eval_loss" in line)
    assert f"{metrics['base']['eval_loss']:.4f}" in loss_row and f"{metrics['delta']['eval_loss']:+.4f}" in loss_row


def test_all_examples_when_the_split_has_fewer_than_samples(final, sample_data_dir):
    result = runner.invoke(app, ["evaluate", "--split", "test", "--samples", "1000", "--max-new-tokens", "1"])
    assert result.exit_code == 0, result.output
    metrics = json.loads((final / "metrics-test.json").read_text())
    ids = [p["id"] for p in read_jsonl(final / "predictions-test.jsonl")]
    assert metrics["split"] == "test" and metrics["samples"] == 40
    assert sorted(ids) == sorted(split_ids(sample_data_dir, "test"))
    assert "using all" in result.output


def test_batched_generation_gives_the_same_summaries_as_one_at_a_time(final, sample_data_dir):
    from phi2cli.config import GenerationConfig
    from phi2cli.inference.evaluation import resolve_config
    from phi2cli.inference.generate import generate, stop_token_ids
    from phi2cli.inference.trained_model import load_model

    loaded = load_model(resolve_config(final, {}), final)
    assert stop_token_ids(loaded.tokenizer) == [50256, 198, 628]  # EOS, "\n", "\n\n" of phi-2
    documents = [r["document"] for r in read_jsonl(sample_data_dir / "validation.jsonl")[:5]]
    documents[2] = documents[2][:120]  # a short one among long ones: left padding must not change it
    gen = GenerationConfig(max_new_tokens=12)
    batched = generate(loaded, documents, gen, batch_size=5)
    single = [generate(loaded, [d], gen, batch_size=1)[0] for d in documents]
    assert [g.text for g in batched] == [g.text for g in single]
    assert [g.prompt_tokens for g in batched] == [g.prompt_tokens for g in single]
    assert batched[2].prompt_tokens < batched[0].prompt_tokens  # order restored after length sorting


def test_missing_default_adapter_is_one_line_error():
    result = runner.invoke(app, ["evaluate"])
    assert result.exit_code == 1
    assert "phi2-xsum-final does not exist" in result.output and "phi2 train" in result.output


def test_adapter_dir_without_adapter_config_is_refused(final):
    (final / "adapter_config.json").unlink()
    result = runner.invoke(app, ["evaluate", "--adapter", str(final)])
    assert result.exit_code == 1
    assert "holds no adapter_config.json" in result.output


def test_bad_split_is_a_usage_error_and_missing_file_a_data_error(final):
    bad_split = runner.invoke(app, ["evaluate", "--split", "train"])
    assert bad_split.exit_code == 2 and "must be one of validation, test" in " ".join(bad_split.output.split())
    missing = runner.invoke(app, ["evaluate", "--file", "nope.jsonl"])
    assert missing.exit_code == 1 and "nope.jsonl does not exist" in missing.output


def test_generation_stops_at_a_newline_token(final, sample_data_dir):
    import torch

    from phi2cli.config import GenerationConfig
    from phi2cli.inference.evaluation import resolve_config
    from phi2cli.inference.generate import generate
    from phi2cli.inference.trained_model import load_model

    loaded = load_model(resolve_config(final, {}), final)
    document = read_jsonl(sample_data_dir / "validation.jsonl")[0]["document"]
    free = generate(loaded, [document], GenerationConfig(max_new_tokens=6), batch_size=1)[0]
    assert free.new_tokens == 6 and free.text  # the random model never stops by itself
    with torch.no_grad():
        loaded.model.lm_head.bias[198] = 1e4  # now "\n" is always the most likely next token
    for gen in (GenerationConfig(max_new_tokens=6), GenerationConfig(max_new_tokens=6, num_beams=2)):
        stopped = generate(loaded, [document], gen, batch_size=1)[0]
        assert (stopped.new_tokens, stopped.text) == (1, "")


def test_one_shared_forward_gives_the_two_passes_metrics_and_predictions(final):
    """evaluate() with and without the shared forward: the same loss, ROUGE and summaries, tuned and base."""
    from phi2cli.inference.evaluation import SEPARATE_TIMINGS, SHARED_TIMINGS, EvaluateOptions, evaluate

    results = {flag: evaluate(EvaluateOptions(adapter_dir=str(final), samples=8, output_dir=f"out-{flag}",
                                              compare_base=True, shared_forward=flag))  # fmt: skip
               for flag in (True, False)}
    shared, separate = results[True].metrics, results[False].metrics
    assert 0 < shared["settings"]["shared_forward_articles"] <= 8 and shared["settings"]["timings_note"] == SHARED_TIMINGS
    assert shared["settings"]["base_shared_forward_articles"] == shared["settings"]["shared_forward_articles"]
    assert separate["settings"]["shared_forward_articles"] == 0
    assert separate["settings"]["timings_note"] == SEPARATE_TIMINGS
    for block in ("tuned", "base"):
        assert set(shared[block]) == METRIC_KEYS
        assert shared[block]["eval_loss"] == pytest.approx(separate[block]["eval_loss"], rel=1e-5)
        assert shared[block]["perplexity"] == pytest.approx(separate[block]["perplexity"], rel=1e-5)
        assert {k: v for k, v in shared[block].items() if k.startswith("rouge") or k == "mean_summary_words"} == \
            {k: v for k, v in separate[block].items() if k.startswith("rouge") or k == "mean_summary_words"}  # fmt: skip
    assert shared["tuned"]["eval_loss"] != shared["base"]["eval_loss"]
    assert results[True].predictions == results[False].predictions
    assert {"loss_seconds", "generation_seconds", "generated_tokens", "base_loss_seconds"} <= set(shared["timings"])
    assert shared["timings"]["generated_tokens"] == separate["timings"]["generated_tokens"]


def test_articles_are_tokenized_once_for_the_loss_examples_and_the_prompts(final, sample_data_dir):
    from phi2cli.inference.evaluation import encode_examples, resolve_config
    from phi2cli.inference.generate import encode_documents
    from phi2cli.inference.trained_model import load_model
    from phi2cli.data.prompts import encode_document, encode_example

    loaded = load_model(resolve_config(final, {}), final)
    rows = read_jsonl(sample_data_dir / "validation.jsonl")[:6]
    rows[2]["summary"] = rows[3]["document"]  # no example for this one
    documents = [r["document"] for r in rows]
    document_ids = encode_documents(loaded.tokenizer, documents)
    assert document_ids == [encode_document(loaded.tokenizer, d) for d in documents]
    asked = []
    tokenizer = loaded.tokenizer
    loaded.tokenizer = lambda text, **kwargs: asked.append(text) or tokenizer(text, **kwargs)
    try:
        examples = encode_examples(loaded, rows, document_ids)
    finally:
        loaded.tokenizer = tokenizer
    data = loaded.config.data
    assert examples == [encode_example(loaded.fmt, tokenizer, r["document"], r["summary"], data.max_length,
                                       data.loss_on) for r in rows]  # fmt: skip
    assert examples[2] is None and sum(e is not None for e in examples) == 5
    assert not set(asked) & set(documents) and len(asked) == 6  # only the summaries went to the tokenizer


def test_each_split_and_file_keeps_its_own_results_and_a_rerun_replaces_its_own(final, sample_data_dir, tmp_path):
    base = ["evaluate", "--samples", "2", "--max-new-tokens", "1"]
    assert runner.invoke(app, [*base, "--compare-base"]).exit_code == 0
    validation = (final / "metrics-validation.json").read_text()
    data_file = tmp_path / "my articles.jsonl"
    data_file.write_text("".join(json.dumps(r) + "\n" for r in read_jsonl(sample_data_dir / "test.jsonl")[:2]))
    for extra in (["--split", "test"], ["--file", str(data_file)]):
        result = runner.invoke(app, [*base, *extra], env=WIDE)
        assert result.exit_code == 0, result.output
    assert sorted(p.name for p in final.glob("*-*.json*")) == [
        "metrics-my_articles.json", "metrics-test.json", "metrics-validation.json",
        "predictions-my_articles.jsonl", "predictions-test.jsonl", "predictions-validation.jsonl"]  # fmt: skip
    assert (final / "metrics-validation.json").read_text() == validation  # the --compare-base run is intact
    assert json.loads((final / "metrics-test.json").read_text())["split"] == "test"
    assert json.loads((final / "metrics-my_articles.json").read_text())["data"] == str(data_file)
    result = runner.invoke(app, [*base, "--samples", "3"])  # the same evaluation again replaces its own files
    assert result.exit_code == 0, result.output
    rerun = json.loads((final / "metrics-validation.json").read_text())
    assert rerun["samples"] == 3 and "base" not in rerun
    assert len(read_jsonl(final / "predictions-validation.jsonl")) == 3
    assert len(list(final.glob("metrics*.json"))) == 3
