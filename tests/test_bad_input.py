"""Bad input to every command: one red 'Error:' line that names the problem and the fix, never a traceback.

Exit code 2 is a usage error (a flag or config value), 1 a runtime error (a file, a model, the disk).
Flags that Typer itself checks (ranges, choices) print Typer's usage panel instead, also exit code 2.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import pytest
import torch
from typer.testing import CliRunner

from phi2cli.cli import app

runner = CliRunner()
FIXTURES = Path(__file__).parent / "fixtures"
NO_SUCH_MODEL = "no-such-org/no-such-model"
ROWS = [{"id": str(i), "document": f"Article {i} says that things happened in town.", "summary": f"Things {i}."}
        for i in range(6)]  # fmt: skip


@pytest.fixture(scope="session")
def trained_run(trained) -> Path:
    """The session's tiny run (conftest's `trained`): its final adapter directory."""
    return trained / "phi2-xsum-final"


@pytest.fixture(scope="session")
def other_phi_dir(tmp_path_factory, tiny_phi_dir) -> Path:
    """A tiny Phi like tiny_phi_dir but with another hidden size: adapters of one do not fit the other."""
    from transformers import PhiConfig, PhiForCausalLM

    out = tmp_path_factory.mktemp("other-phi")
    config = PhiConfig.from_pretrained(tiny_phi_dir)
    config.hidden_size = 32
    torch.manual_seed(0)
    PhiForCausalLM(config).save_pretrained(out)
    for file in tiny_phi_dir.iterdir():
        if file.name.startswith(("tokenizer", "vocab", "merges", "special_tokens", "added_tokens")):
            shutil.copy(file, out / file.name)
    return out


class Ctx:
    """What a case needs: fixtures on demand (training only when a case asks for an adapter) and bad files."""

    def __init__(self, request: pytest.FixtureRequest, tmp_path: Path) -> None:
        self.request, self.tmp = request, tmp_path

    @property
    def model(self) -> str:
        return str(self.request.getfixturevalue("tiny_phi_dir"))

    @property
    def data(self) -> str:
        return str(self.request.getfixturevalue("sample_data_dir"))

    @property
    def adapter(self) -> str:
        return str(self.request.getfixturevalue("trained_run"))

    @property
    def other_model(self) -> str:
        return str(self.request.getfixturevalue("other_phi_dir"))

    def path(self, name: str) -> str:
        return str(self.tmp / name)

    def file(self, name: str, content: str | bytes = "") -> str:
        path = self.tmp / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(content if isinstance(content, bytes) else content.encode("utf-8"))
        return str(path)

    def jsonl(self, name: str, rows: list[dict], tail: str = "") -> str:
        return self.file(name, "".join(json.dumps(r) + "\n" for r in rows) + tail)

    def dir(self, name: str, *children: str) -> str:
        path = self.tmp / name
        path.mkdir(parents=True, exist_ok=True)
        for child in children:
            (path / child).mkdir(parents=True, exist_ok=True)
        return str(path)

    def read_only_dir(self, name: str) -> str:
        path = Path(self.dir(name))
        path.chmod(0o500)
        return str(path)

    def adapter_for_other_base(self) -> str:
        """A copy of the trained adapter whose run config names a base model of another size."""
        copy = shutil.copytree(self.adapter, self.tmp / "other-base-adapter")
        run = json.loads((copy / "phi2_run.json").read_text())
        run["config"]["model"]["model"] = self.other_model
        (copy / "phi2_run.json").write_text(json.dumps(run))
        return str(copy)


@dataclass(frozen=True)
class Case:
    args: Callable[[Ctx], list[str]]
    code: int  # 2: usage error, 1: runtime error
    expected: tuple[str, ...]  # each must appear in the error message
    stdin: str | None = None
    needs_non_root: bool = False  # permission checks do not apply to root


def case(case_id: str, args: Callable[[Ctx], list[str]], code: int, *expected: str, **kwargs: Any) -> Any:
    return pytest.param(Case(args, code, expected, **kwargs), id=case_id)


def prep(c: Ctx, *args: str) -> list[str]:
    return ["prepare", "--model", c.model, *args]


def train_args(model: str | Path, data: str | Path, *args: str) -> list[str]:
    return ["train", "--model", str(model), "--data-dir", str(data), "--samples", "16", "--val-samples", "8",
            "--max-steps", "2", "--eval-every", "2", "--max-length", "192", *args]  # fmt: skip


def train(c: Ctx, *args: str) -> list[str]:
    return train_args(c.model, c.data, *args)


def evaluate(c: Ctx, *args: str) -> list[str]:
    return ["evaluate", "--adapter", c.adapter, "--samples", "2", "--output", c.path("eval"), *args]


def article(c: Ctx) -> str:
    return c.file("article.txt", "The council voted on Tuesday to close the old bridge for repairs.")


def corrupt_prepared(c: Ctx) -> str:
    c.dir("prepared", "data/train")
    c.file("prepared/manifest.json", "{")
    return c.path("prepared")


def state(c: Ctx, content: str | bytes) -> str:
    return c.file("run/trainer_state.json", content)


def reference_state(c: Ctx) -> str:
    return str(shutil.copy(FIXTURES / "trainer_state_reference.json", c.tmp / "trainer_state.json"))


EMPTY_TEXT_ROWS = [{"document": "  ", "summary": "x"}, {"document": "a", "summary": "\n\t"},
                   {"document": "", "summary": ""}]
NO_UTF8 = b'{"document": "caf\xe9", "summary": "x"}\n'
NUL_BYTES = b"document,summary\n\x00\x01\x02,x\n"

CASES = [
    # --- prepare: data files ---
    case("prepare-missing-data-dir", lambda c: prep(c, "--data-dir", c.path("nope")), 1,
         "--data-dir", "nope does not exist; point it at a folder with train/validation files"),
    case("prepare-missing-train-file", lambda c: prep(c, "--train-file", c.path("nope.jsonl")), 1,
         "nope.jsonl does not exist; check the path"),
    case("prepare-directory-as-file", lambda c: prep(c, "--train-file", c.dir("split.jsonl")), 1,
         "split.jsonl is a directory, not a file; use --data-dir for a folder of split files"),
    case("prepare-file-as-directory", lambda c: prep(c, "--data-dir", c.jsonl("train.jsonl", ROWS)), 1,
         "train.jsonl is a file, not a directory; use --train-file for a single file"),
    case("prepare-empty-file", lambda c: prep(c, "--train-file", c.file("train.jsonl"), "--val-samples", "0"), 1,
         "train.jsonl is empty; it needs one example per row"),
    case("prepare-non-utf8-file", lambda c: prep(c, "--train-file", c.file("train.jsonl", NO_UTF8)), 1,
         "train.jsonl is not UTF-8 text (byte 17); convert it to UTF-8"),
    case("prepare-binary-file", lambda c: prep(c, "--train-file", c.file("train.csv", NUL_BYTES)), 1,
         "train.csv looks binary (NUL bytes), not CSV text"),
    case("prepare-malformed-jsonl", lambda c: prep(c, "--train-file", c.jsonl("train.jsonl", ROWS[:3], "{not json\n")),
         1, "train.jsonl:4: not valid JSON", "fix or remove that line"),
    case("prepare-jsonl-line-not-an-object", lambda c: prep(c, "--train-file", c.file("train.jsonl", "[1, 2]\n")), 1,
         "train.jsonl:1: expected a JSON object per line, got list"),
    case("prepare-csv-without-columns",
         lambda c: prep(c, "--train-file", c.file("train.csv", "article,highlights\na,b\n")), 1,
         "train.csv: missing column(s) document, summary; found article, highlights",
         "Name them with --document-field/--summary-field"),
    case("prepare-csv-header-only", lambda c: prep(c, "--train-file", c.file("train.csv", "document,summary\n")), 1,
         "train.csv has a header but no examples"),
    case("prepare-only-empty-texts", lambda c: prep(c, "--train-file", c.jsonl("train.jsonl", EMPTY_TEXT_ROWS)), 1,
         "every example has an empty 'document' or 'summary', nothing is left; fill them in"),
    case("prepare-unknown-dataset-offline", lambda c: prep(c, "--dataset", NO_SUCH_MODEL, "--samples", "4"), 1,
         f"HF_HUB_OFFLINE is set and the local cache lacks: dataset '{NO_SUCH_MODEL}' (use --data-dir DIR with "
         "train.jsonl and validation.jsonl)"),
    # --- prepare: numbers, model, output, config file ---
    case("prepare-samples-0", lambda c: prep(c, "--data-dir", c.data, "--samples", "0"), 2,
         "--samples must be at least 1 (got 0)"),
    case("prepare-negative-val-samples", lambda c: prep(c, "--data-dir", c.data, "--val-samples", "-1"), 2,
         "--val-samples must be 0 or more (got -1)"),
    case("prepare-max-length-below-prompt", lambda c: prep(c, "--data-dir", c.data, "--max-length", "16"), 2,
         "--max-length 16 is shorter than the prompt template (17 tokens) plus a summary; raise --max-length"),
    case("prepare-unknown-model-offline", lambda c: ["prepare", "--data-dir", c.data, "--model", NO_SUCH_MODEL], 1,
         f"HF_HUB_OFFLINE is set and the local cache lacks: tokenizer '{NO_SUCH_MODEL}' (use --model DIR|FILE.gguf, "
         "or --tokenizer DIR)"),
    case("prepare-missing-model-path", lambda c: ["prepare", "--data-dir", c.data, "--model", c.path("nope")], 1,
         "tokenizer path", "nope does not exist; check the path"),
    case("prepare-output-is-a-file", lambda c: prep(c, "--data-dir", c.data, "--output", c.file("out")), 1,
         "out is a file, not a directory; choose another output path"),
    case("prepare-output-under-a-file", lambda c: prep(c, "--data-dir", c.data, "--output", c.file("out") + "/sub"),
         1, "cannot create", "out is a file, not a directory; choose another output path"),
    case("prepare-output-read-only", lambda c: prep(c, "--data-dir", c.data, "--output", c.read_only_dir("ro") + "/x"),
         1, "ro: permission denied; choose a writable output directory", needs_non_root=True),
    case("prepare-config-missing", lambda c: prep(c, "--config", c.path("nope.yaml")), 2,
         "config file", "nope.yaml does not exist (write one with 'phi2 config > nope.yaml')"),
    # --- train ---
    case("train-negative-lr", lambda c: train(c, "--lr", "-1"), 2, "--lr must be positive (got -1.0)"),
    case("train-lora-r-0", lambda c: train(c, "--lora-r", "0"), 2, "--lora-r must be at least 1 (got 0)"),
    case("train-several-bad-numbers", lambda c: train(c, "--lora-r", "0", "--lora-dropout", "1.5", "--max-steps", "0"),
         2, "--lora-r must be at least 1 (got 0); --lora-dropout must be in [0, 1) (got 1.5); "
            "--max-steps must be -1 or at least 1 (got 0)"),
    case("train-samples-0", lambda c: train(c, "--samples", "0"), 2, "--samples must be at least 1 (got 0)"),
    case("train-max-length-below-prompt", lambda c: train(c, "--max-length", "16"), 2,
         "shorter than the prompt template", "raise --max-length"),
    case("train-unknown-model-offline", lambda c: train(c, "--model", NO_SUCH_MODEL), 1,
         f"the local cache lacks: model '{NO_SUCH_MODEL}' (use --model DIR|FILE.gguf); tokenizer '{NO_SUCH_MODEL}'"),
    case("train-malformed-jsonl", lambda c: train(c, "--train-file", c.jsonl("t.jsonl", ROWS, "oops\n")), 1,
         "t.jsonl:7: not valid JSON"),
    case("train-prepared-missing", lambda c: train(c, "--prepared", c.path("nope")), 1,
         "prepared dataset", "nope does not exist; create it with 'phi2 prepare'"),
    case("train-prepared-is-a-file", lambda c: train(c, "--prepared", c.file("prepared.json", "{}")), 1,
         "prepared.json is a file; --prepared expects the directory written by 'phi2 prepare'"),
    case("train-prepared-half-written", lambda c: train(c, "--prepared", c.dir("half", "data/train")), 1,
         "half is not a complete prepared dataset (no manifest.json); run 'phi2 prepare' again"),
    case("train-prepared-corrupt-manifest",
         lambda c: train(c, "--prepared", corrupt_prepared(c)),
         1, "manifest.json is corrupt; run 'phi2 prepare' again"),
    case("train-output-dir-is-a-file", lambda c: train(c, "--output-dir", c.file("out")), 1,
         "out is a file, not a directory; choose another output path"),
    case("train-output-dir-under-a-file", lambda c: train(c, "--output-dir", c.file("out") + "/run"), 1,
         "cannot create", "out is a file, not a directory; choose another output path"),
    case("train-final-dir-is-a-file", lambda c: train(c, "--final-dir", c.file("final")), 1,
         "final is a file, not a directory; choose another output path"),
    case("train-output-dir-read-only", lambda c: train(c, "--output-dir", c.read_only_dir("ro") + "/run"), 1,
         "permission denied; choose a writable output directory", needs_non_root=True),
    case("train-resume-and-overwrite", lambda c: train(c, "--resume", "--overwrite"), 2,
         "--resume continues the run in the output directory and --overwrite deletes it; pass only one of them"),
    case("train-model-is-a-text-file", lambda c: train(c, "--model", article(c)), 1,
         "article.txt is a file, not a tokenizer", "a .gguf file or a hub id"),
    case("train-model-is-a-broken-gguf", lambda c: train(c, "--model", c.file("broken.gguf", b"not a gguf")), 1,
         "broken.gguf is not a GGUF model transformers can read"),
    # --- evaluate ---
    case("evaluate-missing-adapter", lambda c: ["evaluate", "--adapter", c.path("nope")], 1,
         "adapter directory", "nope does not exist; train one with 'phi2 train' or pass --adapter DIR"),
    case("evaluate-adapter-is-a-file", lambda c: ["evaluate", "--adapter", c.file("adapter.bin", b"\0")], 1,
         "adapter.bin is a file; pass the directory written by 'phi2 train'"),
    case("evaluate-adapter-without-config", lambda c: ["evaluate", "--adapter", c.dir("empty")], 1,
         "empty holds no adapter_config.json: not a LoRA adapter directory",
         "train one with 'phi2 train', or pass --adapter DIR"),
    case("evaluate-run-dir-instead-of-adapter", lambda c: ["evaluate", "--adapter", c.dir("run", "checkpoint-2")], 1,
         "run holds no adapter_config.json", "(it holds checkpoints: pass --adapter", "run/checkpoint-2)"),
    case("evaluate-adapter-of-other-base", lambda c: evaluate(c, "--model", c.other_model), 1,
         "was trained on another base model", "(LoRA weight [16, 64] vs [16, 32] in the base); pass --model"),
    case("evaluate-unknown-model-offline", lambda c: evaluate(c, "--model", NO_SUCH_MODEL), 1,
         f"HF_HUB_OFFLINE is set and the local cache lacks: model '{NO_SUCH_MODEL}' (use --model DIR|FILE.gguf)"),
    case("evaluate-missing-file", lambda c: evaluate(c, "--file", c.path("nope.jsonl")), 1,
         "nope.jsonl does not exist; check the path"),
    case("evaluate-file-is-a-directory", lambda c: evaluate(c, "--file", c.dir("val.jsonl")), 1,
         "val.jsonl is a directory, not a file"),
    case("evaluate-empty-file", lambda c: evaluate(c, "--file", c.file("val.jsonl")), 1,
         "val.jsonl is empty; it needs one example per row"),
    case("evaluate-non-utf8-file", lambda c: evaluate(c, "--file", c.file("val.jsonl", NO_UTF8)), 1,
         "val.jsonl is not UTF-8 text (byte 17); convert it to UTF-8"),
    case("evaluate-malformed-jsonl", lambda c: evaluate(c, "--file", c.jsonl("val.jsonl", ROWS[:1], "{\n")), 1,
         "val.jsonl:2: not valid JSON", "fix or remove that line"),
    case("evaluate-csv-without-columns", lambda c: evaluate(c, "--file", c.file("val.csv", "text,headline\na,b\n")),
         1, "missing column(s) document, summary; found text, headline"),
    case("evaluate-only-empty-summaries", lambda c: evaluate(c, "--file", c.jsonl("val.jsonl", EMPTY_TEXT_ROWS)), 1,
         "nothing is left"),
    case("evaluate-samples-0", lambda c: evaluate(c, "--samples", "0"), 2, "Error: --samples must be at least 1 (got 0)"),
    case("evaluate-bad-split", lambda c: evaluate(c, "--split", "train"), 2,
         "Error: --split must be one of validation, test (got 'train')"),
    case("evaluate-max-new-tokens-0", lambda c: evaluate(c, "--max-new-tokens", "0"), 2,
         "--max-new-tokens must be at least 1 (got 0)"),
    case("evaluate-output-is-a-file", lambda c: evaluate(c, "--output", c.file("metrics")), 1,
         "metrics is a file, not a directory; choose another output path"),
    case("evaluate-output-under-a-file", lambda c: evaluate(c, "--output", c.file("metrics") + "/x"), 1,
         "cannot create", "metrics is a file, not a directory"),
    # --- summarize ---
    case("summarize-missing-input", lambda c: ["summarize", c.path("nope.txt")], 1,
         "nope.txt does not exist; check the path"),
    case("summarize-empty-file", lambda c: ["summarize", c.file("a.txt", " \n")], 1,
         "a.txt is empty; it needs the article text"),
    case("summarize-binary-file", lambda c: ["summarize", c.file("a.txt", b"PK\x03\x04\x00\x00")], 1,
         "a.txt looks binary (NUL bytes); give a UTF-8 text file with the article"),
    case("summarize-non-utf8-file", lambda c: ["summarize", c.file("a.txt", b"caf\xe9 society")], 1,
         "a.txt is not UTF-8 text (byte 3); convert it to UTF-8"),
    case("summarize-directory-without-txt", lambda c: ["summarize", c.dir("articles")], 1,
         "articles holds no .txt files; put one article per .txt file there"),
    case("summarize-malformed-jsonl", lambda c: ["summarize", c.jsonl("a.jsonl", ROWS[:1], "{\n")], 1,
         "a.jsonl:2: not valid JSON"),
    case("summarize-jsonl-without-field", lambda c: ["summarize", c.jsonl("a.jsonl", [{"text": "x"}])], 1,
         "a.jsonl: no 'document' field (found text); name it with --document-field"),
    case("summarize-jsonl-empty-document", lambda c: ["summarize", c.jsonl("a.jsonl", [ROWS[0], {"document": " "}])],
         1, "a.jsonl: row 2 has no text in 'document'; fill it in or remove the row"),
    case("summarize-empty-stdin", lambda c: ["summarize", "-"], 1, "standard input is empty; pipe the article text in",
         stdin="  \n"),
    case("summarize-missing-adapter", lambda c: ["summarize", article(c), "--adapter", c.path("nope")], 1,
         "adapter directory", "nope does not exist"),
    case("summarize-adapter-without-config", lambda c: ["summarize", article(c), "--adapter", c.dir("empty")], 1,
         "empty holds no adapter_config.json"),
    case("summarize-adapter-of-other-base",
         lambda c: ["summarize", article(c), "--adapter", c.adapter_for_other_base()], 1,
         "other-base-adapter was trained on another base model than", "[16, 64] vs [16, 32]",
         "pass --model"),
    case("summarize-unknown-model-offline",
         lambda c: ["summarize", article(c), "--base-only", "--model", NO_SUCH_MODEL], 1,
         f"the local cache lacks: model '{NO_SUCH_MODEL}' (use --model DIR|FILE.gguf); tokenizer '{NO_SUCH_MODEL}'"),
    case("summarize-base-only-without-model", lambda c: ["summarize", article(c), "--base-only"], 1,
         "--base-only needs --model MODEL, or a run in phi2-xsum-final to take the base model from"),
    case("summarize-base-only-with-adapter",
         lambda c: ["summarize", article(c), "--base-only", "--adapter", c.adapter], 2,
         "--base-only runs the model without an adapter, but --adapter", "drop one of them"),
    case("summarize-model-is-a-text-file", lambda c: ["summarize", article(c), "--base-only", "--model", article(c)],
         1, "article.txt is a file, not a tokenizer: pass a tokenizer directory"),
    case("summarize-max-new-tokens-0",
         lambda c: ["summarize", article(c), "--adapter", c.adapter, "--max-new-tokens", "0"], 2,
         "--max-new-tokens must be at least 1 (got 0)"),
    case("summarize-max-new-tokens-fills-max-length",
         lambda c: ["summarize", article(c), "--adapter", c.adapter, "--max-new-tokens", "245"], 2,
         "--max-new-tokens 245 leaves no room for the article within the run's max_length 256"),
    # --- export ---
    case("export-missing-adapter", lambda c: ["export", "--adapter", c.path("nope")], 1, "nope does not exist"),
    case("export-adapter-without-config", lambda c: ["export", "--adapter", c.dir("empty")], 1,
         "empty holds no adapter_config.json"),
    case("export-adapter-of-other-base",
         lambda c: ["export", "--adapter", c.adapter, "--model", c.other_model, "--output", c.path("m")], 1,
         "was trained on another base model", "pass --model"),
    case("export-unknown-model-offline",
         lambda c: ["export", "--adapter", c.adapter, "--model", NO_SUCH_MODEL, "--output", c.path("m")], 1,
         f"HF_HUB_OFFLINE is set and the local cache lacks: model '{NO_SUCH_MODEL}' (use --model DIR|FILE.gguf)"),
    case("export-output-is-a-file", lambda c: ["export", "--adapter", c.adapter, "--output", c.file("m")], 1,
         "--output", "m is a file; choose a directory path"),
    case("export-output-under-a-file", lambda c: ["export", "--adapter", c.adapter, "--output", c.file("m") + "/x"], 1,
         "cannot create", "m is a file, not a directory; choose another output path"),
    case("export-output-not-empty",
         lambda c: ["export", "--adapter", c.adapter, "--output", c.dir("m", "old")], 1,
         "m already exists and is not empty; pass --overwrite to replace it or choose --output"),
    case("export-bad-dtype", lambda c: ["export", "--dtype", "int8"], 2,
         "Invalid value for '--dtype': must be one of bfloat16, float16, float32"),
    # --- report ---
    case("report-missing-path", lambda c: ["report", c.path("nope")], 1,
         "nope does not exist; pass a run directory, a checkpoint directory or a trainer_state.json file"),
    case("report-no-run-here", lambda c: ["report"], 1, "no run found at ./phi2-xsum-finetuned; train one"),
    case("report-directory-without-state", lambda c: ["report", c.dir("run", "logs")], 1,
         "no trainer_state.json in", "pass a run directory written by 'phi2 train'"),
    case("report-empty-state", lambda c: ["report", state(c, "")], 1,
         "trainer_state.json is empty (was the run stopped while saving?); pass an earlier checkpoint directory"),
    case("report-state-not-json", lambda c: ["report", state(c, "{\"log_history\": [")], 1,
         "trainer_state.json is not valid JSON", "pass a trainer_state.json written by the Hugging Face Trainer"),
    case("report-state-without-log-history", lambda c: ["report", state(c, '{"global_step": 3}')], 1,
         "trainer_state.json has no 'log_history' list, so it is not a Trainer state file"),
    case("report-state-non-utf8", lambda c: ["report", state(c, b"\xff\xfe{}")], 1,
         "cannot read", "trainer_state.json", "pass a readable trainer_state.json"),
    case("report-output-is-a-directory",
         lambda c: ["report", reference_state(c), "--format", "markdown", "--output", c.dir("report.md")], 1,
         "cannot write", "report.md: it is a directory; give a file name"),
    case("report-output-under-a-file",
         lambda c: ["report", reference_state(c), "--format", "markdown", "--output", c.file("out") + "/report.md"], 1,
         "out is a file, not a directory; choose another output path"),
    case("report-plot-under-a-file", lambda c: ["report", reference_state(c), "--plot", c.file("out") + "/loss.png"], 1,
         "out is a file, not a directory; choose another output path"),
    case("report-every-0", lambda c: ["report", reference_state(c), "--every", "0"], 2, "Invalid value for '--every'"),
    # --- config files (every command reads them the same way) ---
    case("config-missing-file", lambda c: ["config", "--config", c.path("nope.yaml")], 2,
         "nope.yaml does not exist (write one with 'phi2 config > nope.yaml')"),
    case("config-file-is-a-directory", lambda c: ["config", "--config", c.dir("conf.yaml")], 2,
         "config file", "conf.yaml is a directory; pass a .yaml or .toml file"),
    case("config-malformed-yaml", lambda c: ["config", "--config", c.file("c.yaml", "data:\n  samples: 5\n   x: [1\n")],
         2, "c.yaml:3 could not be parsed: mapping values are not allowed here; fix it"),
    case("config-non-utf8", lambda c: ["config", "--config", c.file("c.yaml", b"data:\n  template: caf\xe9\n")], 2,
         "c.yaml is not UTF-8 text; save it as UTF-8"),
    case("config-unknown-section", lambda c: ["config", "--config", c.file("c.yaml", "trainer:\n  lr: 1\n")], 2,
         "unknown section 'trainer' (known: data, model, lora, train, generation)"),
    case("config-unknown-setting", lambda c: ["config", "--config", c.file("c.yaml", "lora:\n  rank: 8\n")], 2,
         "unknown setting 'lora.rank' (known in lora: r, alpha, dropout, targets)"),
    case("config-wrong-type", lambda c: ["config", "--config", c.file("c.yaml", "train:\n  max_steps: many\n")], 2,
         "'train.max_steps' must be an integer, got 'many'"),
    case("config-out-of-range", lambda c: ["config", "--config", c.file("c.toml", "[lora]\nr = 0\n")], 2,
         "--lora-r must be at least 1 (got 0)"),
]  # fmt: skip


def error_message(output: str) -> str:
    """The single error in `output`: our red 'Error:' line, or the body of Typer's usage-error panel."""
    lines = output.splitlines()
    ours = [line for line in lines if line.startswith("Error:")]
    panels = [i for i, line in enumerate(lines) if line.startswith("╭─ Error")]
    assert len(ours) + len(panels) == 1, f"expected exactly one error, got:\n{output}"
    if ours:
        return ours[0]
    body = []
    for line in lines[panels[0] + 1:]:
        if line.startswith("╰"):
            break
        body.append(line.strip("│ "))
    return " ".join(body)


def invoke(args: list[str], stdin: str | None = None):
    return runner.invoke(app, args, input=stdin, env={"COLUMNS": "300"})


@pytest.mark.parametrize("bad", CASES)
def test_bad_input_gives_one_line_that_says_what_to_do(bad: Case, request, tmp_path):
    if bad.needs_non_root and os.geteuid() == 0:
        pytest.skip("root ignores directory permissions")
    result = invoke(bad.args(Ctx(request, tmp_path)), bad.stdin)
    assert "Traceback" not in result.output, result.output
    message = error_message(result.output)
    assert result.exit_code == bad.code, result.output
    for text in bad.expected:
        assert text in message, f"{text!r} not in {message!r}"


def test_debug_shows_the_traceback(tmp_path, tiny_phi_dir):
    args = ["prepare", "--model", str(tiny_phi_dir), "--data-dir", str(tmp_path / "nope")]
    plain, debug = invoke(args), invoke(["--debug", *args])
    assert plain.exit_code == debug.exit_code == 1
    assert "Traceback" not in plain.output
    assert "Traceback (most recent call last)" in debug.output and "DataError" in debug.output
    assert error_message(debug.output) == error_message(plain.output)


def test_empty_texts_are_dropped_and_counted(tmp_path, tiny_phi_dir):
    train_file = Ctx(None, tmp_path).jsonl("train.jsonl", ROWS + EMPTY_TEXT_ROWS)
    result = invoke(["prepare", "--model", str(tiny_phi_dir), "--train-file", train_file, "--val-samples", "0"])
    assert result.exit_code == 0, result.output
    assert "Warning: train: dropped 3 example(s) with an empty document or summary" in result.output
    manifest = json.loads(Path("phi2-xsum-prepared/manifest.json").read_text())
    assert manifest["splits"]["train"]["available"] == 6 and manifest["splits"]["train"]["dropped_empty"] == 3


# --- failures that are nobody's typo: still one line -----------------------------------------------


def out_of_memory(*args, **kwargs):
    raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")


def test_out_of_memory_while_training_gives_advice(monkeypatch, tiny_phi_dir, sample_data_dir):
    from phi2cli.training.trainer import Phi2Trainer

    monkeypatch.setattr(Phi2Trainer, "training_step", out_of_memory)
    result = invoke(train_args(tiny_phi_dir, sample_data_dir))
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert error_message(result.output) == ("Error: the GPU ran out of memory; use '--profile memory-saver', "
                                            "'--no-cuda-graphs', a shorter '--max-length', or '--quantization 4bit'")  # fmt: skip


def test_out_of_memory_while_loading_for_training_gives_advice(monkeypatch, tiny_phi_dir, sample_data_dir):
    monkeypatch.setattr("phi2cli.models.loading.attach_lora", out_of_memory)
    result = invoke(train_args(tiny_phi_dir, sample_data_dir))
    assert result.exit_code == 1
    assert "the GPU ran out of memory; use '--profile memory-saver'" in error_message(result.output)


def test_out_of_memory_while_evaluating_gives_advice(monkeypatch, trained_run, tmp_path):
    monkeypatch.setattr("phi2cli.kernels.loss.selective_causal_lm_loss", out_of_memory)
    result = invoke(["evaluate", "--adapter", str(trained_run), "--samples", "2", "--output", str(tmp_path / "e")])
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert error_message(result.output) == ("Error: the GPU ran out of memory computing the eval loss; "
                                            "use a shorter --max-length")  # fmt: skip


def test_out_of_memory_while_generating_halves_the_batch_then_gives_advice(monkeypatch, trained_run, tmp_path):
    from phi2cli.inference import generate as inference

    sizes = []

    def out_of_memory_batch(loaded, prompts, *settings):
        sizes.append(len(prompts))
        raise torch.cuda.OutOfMemoryError("CUDA out of memory")

    monkeypatch.setattr(inference, "_generate_batch", out_of_memory_batch)  # beam search, sampling, other models
    monkeypatch.setattr(inference, "_decode_batch", out_of_memory_batch)  # greedy Phi (phi2cli.inference.decode)
    (tmp_path / "a.txt").write_text("The council met.")
    (tmp_path / "b.txt").write_text("The team won.")
    result = invoke(["summarize", str(tmp_path / "a.txt"), str(tmp_path / "b.txt"), "--adapter", str(trained_run),
                     "--gen-batch-size", "2"])  # fmt: skip
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert sizes == [2, 1]
    assert error_message(result.output) == ("Error: the GPU ran out of memory generating one summary; "
                                            "lower --max-new-tokens")  # fmt: skip


def test_disk_full_while_exporting_keeps_the_previous_export(monkeypatch, trained_run, tmp_path):
    output = tmp_path / "exports" / "merged"
    first = invoke(["export", "--adapter", str(trained_run), "--output", str(output), "--dtype", "float32"])
    assert first.exit_code == 0, first.output
    before = {p.name: p.read_bytes() for p in output.iterdir()}
    real_replace = os.replace

    def replace(src, dst):  # the new export is complete; moving it into place finds the disk full
        if Path(dst) == output and Path(src).name.endswith(".partial"):
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_replace(src, dst)

    monkeypatch.setattr(os, "replace", replace)
    result = invoke(["export", "--adapter", str(trained_run), "--output", str(output), "--overwrite"])
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert error_message(result.output) == (f"Error: disk full while writing {output}; "
                                            f"free space and run the command again")  # fmt: skip
    assert {p.name: p.read_bytes() for p in output.iterdir()} == before
    assert sorted(p.name for p in output.parent.iterdir()) == ["merged"]  # no temp or moved-aside directory left
