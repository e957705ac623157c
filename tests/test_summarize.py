"""`phi2 summarize`: files, directories, JSONL, stdin, --json, --base-only, streaming and bad input."""

from __future__ import annotations

import io
import json
import shutil
from pathlib import Path

import pytest
from typer.testing import CliRunner

from phi2cli.cli import app

runner = CliRunner()
GEN = ["--max-new-tokens", "8"]


@pytest.fixture
def articles(sample_data_dir) -> list[str]:
    rows = [json.loads(line) for line in (sample_data_dir / "test.jsonl").read_text().splitlines()]
    return [rows[0]["document"], rows[1]["document"][:300]]


def summaries(result) -> list[dict]:
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def test_one_file_prints_its_summary_the_same_as_json_and_batched(final, articles):
    Path("a.txt").write_text(articles[0])
    Path("b.txt").write_text(articles[1])
    plain = runner.invoke(app, ["summarize", "a.txt", *GEN])
    assert plain.exit_code == 0, plain.output
    single = summaries(runner.invoke(app, ["summarize", "a.txt", "--json", *GEN]))
    both = summaries(runner.invoke(app, ["summarize", "a.txt", "b.txt", "--json", *GEN]))
    assert single == [{"source": "a.txt", "summary": plain.stdout.strip()}]
    assert [s["source"] for s in both] == ["a.txt", "b.txt"]
    assert both[0]["summary"] == single[0]["summary"]  # batching (left padding) does not change it
    assert plain.stdout.count("\n") == 1 and plain.stdout.strip()


def test_several_files_print_each_source_and_summary(final, articles):
    Path("a.txt").write_text(articles[0])
    Path("b.txt").write_text(articles[1])
    result = runner.invoke(app, ["summarize", "a.txt", "b.txt", *GEN])
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert lines[0] == "a.txt" and lines[2] == "b.txt" and len(lines) == 4


def test_directory_of_txt_files_stdin_and_jsonl_give_the_same_summaries(final, articles):
    folder = Path("articles")
    folder.mkdir()
    (folder / "1.txt").write_text(articles[0])
    (folder / "2.txt").write_text(articles[1])
    (folder / "notes.md").write_text("not an article")
    Path("docs.jsonl").write_text("".join(json.dumps({"text": a}) + "\n" for a in articles))
    from_dir = summaries(runner.invoke(app, ["summarize", "articles", "--json", *GEN]))
    from_jsonl = summaries(runner.invoke(app, ["summarize", "docs.jsonl", "--document-field", "text", "--json",
                                               *GEN]))  # fmt: skip
    from_stdin = summaries(runner.invoke(app, ["summarize", "-", "--json", *GEN], input=articles[1]))
    assert [s["source"] for s in from_dir] == [str(folder / "1.txt"), str(folder / "2.txt")]
    assert [s["source"] for s in from_jsonl] == ["docs.jsonl:1", "docs.jsonl:2"]
    assert from_stdin[0]["source"] == "<stdin>"
    assert [s["summary"] for s in from_dir] == [s["summary"] for s in from_jsonl]
    assert from_stdin[0]["summary"] == from_dir[1]["summary"]


def test_long_article_is_truncated_with_a_note_on_stderr(final, articles):
    Path("long.txt").write_text(articles[0] * 4)
    result = runner.invoke(app, ["summarize", "long.txt", *GEN])
    assert result.exit_code == 0, result.output
    assert "long.txt: article truncated to" in result.stderr
    assert "truncated" not in result.stdout


def test_base_only_needs_no_adapter_when_the_model_is_given(tiny_phi_dir, articles):
    Path("a.txt").write_text(articles[0])
    result = runner.invoke(app, ["summarize", "a.txt", "--base-only", "--model", str(tiny_phi_dir), "--json", *GEN])
    assert len(summaries(result)) == 1
    refused = runner.invoke(app, ["summarize", "a.txt", "--base-only"])
    assert refused.exit_code == 1 and "--base-only needs --model" in refused.output


def test_a_single_article_streams_the_summary_it_returns(final, articles):
    from phi2cli.inference.evaluation import Article, summarize

    out = io.StringIO()
    results, _ = summarize([Article("x", articles[1])], final, overrides={"generation.max_new_tokens": 8}, stream=out)
    assert out.getvalue() == results[0].summary + "\n"


@pytest.mark.parametrize("content, message", [
    (None, "missing.txt does not exist"),
    (b"", "empty.txt is empty"),
    (b"  \n\t", "empty.txt is empty"),
    (b"\x89PNG\r\n\x1a\n\x00\x00\x00", "looks binary"),
    (b"\xff\xfe\xfa bad bytes", "is not UTF-8 text"),
])  # fmt: skip
def test_bad_input_is_a_one_line_error(final, content, message):
    name = "missing.txt" if content is None else ("empty.txt" if not content.strip() else "bad.txt")
    if content is not None:
        Path(name).write_bytes(content)
    result = runner.invoke(app, ["summarize", name])
    assert result.exit_code == 1
    assert message in result.output and result.output.count("\n") == 1 and "Traceback" not in result.output


def test_adapter_problems_and_usage_errors(final, articles):
    Path("a.txt").write_text(articles[1])
    missing = runner.invoke(app, ["summarize", "a.txt", "--adapter", "nowhere"])
    assert missing.exit_code == 1 and "adapter directory nowhere does not exist" in missing.output
    (final / "adapter_config.json").unlink()
    not_adapter = runner.invoke(app, ["summarize", "a.txt"])
    assert not_adapter.exit_code == 1 and "holds no adapter_config.json" in not_adapter.output
    shutil.rmtree(final)
    no_default = runner.invoke(app, ["summarize", "a.txt"])
    assert no_default.exit_code == 1 and "phi2-xsum-final does not exist" in no_default.output
    no_args = runner.invoke(app, ["summarize"])
    assert no_args.exit_code == 2 and "Missing argument" in no_args.output
    empty_stdin = runner.invoke(app, ["summarize", "-"], input="")
    assert empty_stdin.exit_code == 1 and "standard input is empty" in empty_stdin.output
