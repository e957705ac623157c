"""`phi2 prepare`: real XSUM rows, real phi-2 tokenizer, every source format, bad input."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from phi2cli.cli import app
from phi2cli.data.prepare import load_prepared

runner = CliRunner()


def run(*args: str):
    result = runner.invoke(app, list(args), env={"COLUMNS": "200"})
    return result, result.output


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


ROWS = [{"id": str(i), "document": f"Article number {i} says things happened.", "summary": f"Things {i}."}
        for i in range(12)]  # fmt: skip


def test_prepare_real_xsum_writes_dataset_and_manifest(xsum_dir, phi2_tokenizer_dir):
    result, out = run("prepare", "--data-dir", str(xsum_dir), "--samples", "1000",
                      "--model", str(phi2_tokenizer_dir))  # fmt: skip
    assert result.exit_code == 0, out
    dataset, manifest = load_prepared("phi2-xsum-prepared")
    assert dataset["train"].num_rows == 1000 and dataset["validation"].num_rows == 500
    assert manifest["seed"] == 42 and manifest["loss_on"] == "summary"
    assert manifest["tokenizer"] == str(phi2_tokenizer_dir)
    train = manifest["splits"]["train"]
    assert train["available"] == 1495 and train["sampled"] == 1000
    for part in ("prompt", "summary", "total"):
        assert set(train["tokens"][part]) == {"mean", "p50", "p95", "max"}
    assert train["tokens"]["total"]["max"] <= 1024
    assert train["truncated"] == sum(dataset["train"]["truncated"]) > 0
    assert f"train {train['truncated']}" in out and "p95" in out
    # every example ends with the EOS label, the prompt is masked
    for labels, ids in zip(dataset["train"]["labels"][:50], dataset["train"]["input_ids"][:50]):
        assert labels[-1] == ids[-1] == 50256
        assert labels[0] == -100


def test_same_seed_same_sample_other_seed_other_sample(xsum_dir, phi2_tokenizer_dir):
    common = ["prepare", "--data-dir", str(xsum_dir), "--samples", "30", "--val-samples", "5",
              "--model", str(phi2_tokenizer_dir)]  # fmt: skip
    assert run(*common, "-o", "a")[0].exit_code == 0
    assert run(*common, "-o", "b")[0].exit_code == 0
    assert run(*common, "-o", "c", "--seed", "7")[0].exit_code == 0
    ids = {name: load_prepared(name)[0]["train"]["id"] for name in "abc"}
    assert ids["a"] == ids["b"]
    assert ids["a"] != ids["c"]
    assert load_prepared("a")[0]["train"]["input_ids"] == load_prepared("b")[0]["train"]["input_ids"]


def test_more_samples_than_available_uses_all_with_warning(sample_data_dir, phi2_tokenizer_dir):
    result, out = run("prepare", "--data-dir", str(sample_data_dir), "--samples", "5000", "--val-samples", "10",
                      "--model", str(phi2_tokenizer_dir))  # fmt: skip
    assert result.exit_code == 0, out
    assert "asks for more train examples than there are (200): using all" in out
    assert load_prepared("phi2-xsum-prepared")[0]["train"].num_rows == 200


def test_max_length_truncates_articles_and_reports_the_count(sample_data_dir, phi2_tokenizer_dir):
    result, out = run("prepare", "--data-dir", str(sample_data_dir), "--samples", "50", "--val-samples", "5",
                      "--max-length", "128", "--model", str(phi2_tokenizer_dir))  # fmt: skip
    assert result.exit_code == 0, out
    dataset, manifest = load_prepared("phi2-xsum-prepared")
    assert all(len(ids) <= 128 for ids in dataset["train"]["input_ids"])
    assert manifest["splits"]["train"]["truncated"] >= 45
    assert "Truncated articles (to fit --max-length 128): train" in out


@pytest.mark.parametrize("fmt", ["csv", "json", "parquet"])
def test_other_formats_and_custom_columns(tmp_path, phi2_tokenizer_dir, fmt):
    rows = [{"key": r["id"], "text": r["document"], "headline": r["summary"]} for r in ROWS]
    path = tmp_path / f"train.{fmt}"
    if fmt == "csv":
        with path.open("w", newline="", encoding="utf-8") as handle:
            writer = csv.DictWriter(handle, fieldnames=["key", "text", "headline"])
            writer.writeheader()
            writer.writerows(rows)
    elif fmt == "json":
        path.write_text(json.dumps(rows), encoding="utf-8")
    else:
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.Table.from_pylist(rows), path)
    result, out = run("prepare", "--train-file", str(path), "--val-samples", "0", "--samples", "5",
                      "--document-field", "text", "--summary-field", "headline", "--id-field", "key",
                      "--model", str(phi2_tokenizer_dir))  # fmt: skip
    assert result.exit_code == 0, out
    dataset = load_prepared("phi2-xsum-prepared")[0]
    assert dataset["train"].num_rows == 5
    assert set(dataset["train"]["id"]) <= {r["key"] for r in rows}
    assert "validation" not in dataset


def test_empty_documents_are_dropped_and_counted(tmp_path, phi2_tokenizer_dir):
    rows = ROWS + [{"id": "x", "document": "   ", "summary": "s"}, {"id": "y", "document": "d", "summary": ""}]
    write_jsonl(tmp_path / "train.jsonl", rows)
    result, out = run("prepare", "--train-file", str(tmp_path / "train.jsonl"), "--val-samples", "0",
                      "--model", str(phi2_tokenizer_dir))  # fmt: skip
    assert result.exit_code == 0, out
    assert "dropped 2 example(s) with an empty document or summary" in out
    assert load_prepared("phi2-xsum-prepared")[1]["splits"]["train"]["dropped_empty"] == 2


def test_config_file_then_flags(tmp_path, sample_data_dir, phi2_tokenizer_dir):
    cfg = tmp_path / "phi2.yaml"
    cfg.write_text(f"data:\n  samples: 7\n  val_samples: 3\n  data_dir: {sample_data_dir}\n"
                   f"model:\n  model: {phi2_tokenizer_dir}\n", encoding="utf-8")  # fmt: skip
    result, out = run("prepare", "--config", str(cfg), "--val-samples", "4")
    assert result.exit_code == 0, out
    dataset = load_prepared("phi2-xsum-prepared")[0]
    assert (dataset["train"].num_rows, dataset["validation"].num_rows) == (7, 4)


def test_toml_config_is_read(tmp_path, sample_data_dir, phi2_tokenizer_dir):
    cfg = tmp_path / "phi2.toml"
    cfg.write_text(f'[data]\nsamples = 6\nval_samples = 2\ndata_dir = "{sample_data_dir}"\n'
                   f'[model]\nmodel = "{phi2_tokenizer_dir}"\n', encoding="utf-8")  # fmt: skip
    assert run("prepare", "--config", str(cfg))[0].exit_code == 0
    assert load_prepared("phi2-xsum-prepared")[0]["train"].num_rows == 6


# ---- bad input: one line, the right exit code, a message that says what to do --------------


def bad(tmp_path, *args, tokenizer=None):
    result, out = run("prepare", *args, "--model", str(tokenizer))
    assert "Traceback" not in out
    return result.exit_code, " ".join(out.split())


def test_missing_data_dir(tmp_path, phi2_tokenizer_dir):
    code, out = bad(tmp_path, "--data-dir", str(tmp_path / "nope"), tokenizer=phi2_tokenizer_dir)
    assert code == 1 and "does not exist" in out and "nope" in out


def test_malformed_jsonl_reports_file_and_line(tmp_path, phi2_tokenizer_dir):
    path = write_jsonl(tmp_path / "train.jsonl", ROWS[:3])
    path.write_text(path.read_text() + "{not json\n", encoding="utf-8")
    code, out = bad(tmp_path, "--train-file", str(path), "--val-samples", "0", tokenizer=phi2_tokenizer_dir)
    assert code == 1 and "train.jsonl:4: not valid JSON" in out


def test_missing_columns_lists_the_columns_found(tmp_path, phi2_tokenizer_dir):
    path = write_jsonl(tmp_path / "train.jsonl", [{"article": "a", "highlights": "b"}])
    code, out = bad(tmp_path, "--train-file", str(path), "--val-samples", "0", tokenizer=phi2_tokenizer_dir)
    assert code == 1 and "missing column(s) document, summary; found article, highlights" in out


def test_non_utf8_file_is_named(tmp_path, phi2_tokenizer_dir):
    path = tmp_path / "train.jsonl"
    path.write_bytes(b'{"document": "caf\xe9", "summary": "x"}\n')
    code, out = bad(tmp_path, "--train-file", str(path), "--val-samples", "0", tokenizer=phi2_tokenizer_dir)
    assert code == 1 and "train.jsonl is not UTF-8" in out


def test_hub_unreachable_says_how_to_use_local_files(tmp_path, phi2_tokenizer_dir):
    code, out = bad(tmp_path, "--samples", "5", tokenizer=phi2_tokenizer_dir)
    assert code == 1
    assert ("HF_HUB_OFFLINE is set and the local cache lacks: dataset 'EdinburghNLP/xsum' (use --data-dir DIR with "
            "train.jsonl and validation.jsonl)") in " ".join(out.split())  # fmt: skip


def test_numbers_out_of_range_are_usage_errors(tmp_path, phi2_tokenizer_dir, sample_data_dir):
    code, out = bad(tmp_path, "--data-dir", str(sample_data_dir), "--samples", "0", tokenizer=phi2_tokenizer_dir)
    assert code == 2 and "--samples must be at least 1" in out


def test_max_length_shorter_than_prompt(tmp_path, phi2_tokenizer_dir, sample_data_dir):
    code, out = bad(tmp_path, "--data-dir", str(sample_data_dir), "--max-length", "16",
                    tokenizer=phi2_tokenizer_dir)  # fmt: skip
    assert code == 2 and "shorter than the prompt template" in out


def test_unknown_model_offline(tmp_path, sample_data_dir):
    result, out = run("prepare", "--data-dir", str(sample_data_dir), "--model", "no-such-org/no-such-model")
    assert result.exit_code == 1
    assert ("HF_HUB_OFFLINE is set and the local cache lacks: tokenizer 'no-such-org/no-such-model' (use --model "
            "DIR|FILE.gguf, or --tokenizer DIR)") in " ".join(out.split())  # fmt: skip


def test_prepare_over_a_prepared_dataset_needs_overwrite(tiny_phi_dir, sample_data_dir):
    args = ["prepare", "--model", str(tiny_phi_dir), "--data-dir", str(sample_data_dir), "--samples", "4",
            "--val-samples", "2"]  # fmt: skip
    result, out = run(*args)
    assert result.exit_code == 0, out
    first = json.loads(Path("phi2-xsum-prepared/manifest.json").read_text())
    result, out = run(*args, "--seed", "7")
    assert result.exit_code == 1
    assert ("Error: phi2-xsum-prepared already holds a prepared dataset; pass --overwrite to replace it (a run "
            "trained on it then refuses --resume), or choose another --output") in out  # fmt: skip
    assert json.loads(Path("phi2-xsum-prepared/manifest.json").read_text()) == first
    result, out = run(*args, "--seed", "7", "--overwrite")
    assert result.exit_code == 0, out
    second = json.loads(Path("phi2-xsum-prepared/manifest.json").read_text())
    assert second["seed"] == 7 and second["fingerprint"] != first["fingerprint"]
    result, out = run(*args, "--seed", "7", "--overwrite")  # the same data again: the same fingerprint
    assert json.loads(Path("phi2-xsum-prepared/manifest.json").read_text())["fingerprint"] == second["fingerprint"]


def test_resume_refuses_data_prepared_again(tiny_phi_dir, sample_data_dir):
    prep = ["prepare", "--model", str(tiny_phi_dir), "--data-dir", str(sample_data_dir), "--samples", "8",
            "--val-samples", "0", "--max-length", "160", "-o", "data"]  # fmt: skip
    train = ["train", "--model", str(tiny_phi_dir), "--prepared", "data", "--eval-every", "1"]
    assert run(*prep)[0].exit_code == 0
    result, out = run(*train, "--max-steps", "1")
    assert result.exit_code == 0, out
    fingerprint = json.loads(Path("data/manifest.json").read_text())["fingerprint"]
    run_record = json.loads(Path("phi2-xsum-finetuned/phi2_run.json").read_text())
    assert run_record["data_fingerprint"] == fingerprint
    assert run(*prep, "--seed", "3", "--overwrite")[0].exit_code == 0
    result, out = run(*train, "--max-steps", "2", "--resume")
    assert result.exit_code == 1
    assert ("Error: the data in data is not what the run in phi2-xsum-finetuned was trained "
            f"on (it was prepared again or is another dataset); resume with the run's own data, or start over with "
            f"--overwrite") in out  # fmt: skip
    assert sorted(p.name for p in Path("phi2-xsum-finetuned").glob("checkpoint-*")) == ["checkpoint-1"]



def test_prepared_directory_loads_with_datasets_load_from_disk(sample_data_dir, phi2_tokenizer_dir):
    import shutil

    import datasets

    result, out = run("prepare", "--data-dir", str(sample_data_dir), "--samples", "12", "--val-samples", "4",
                      "--model", str(phi2_tokenizer_dir), "-o", "prepared")  # fmt: skip
    assert result.exit_code == 0, out
    plain = datasets.load_from_disk("prepared")  # the directory itself, as the datasets docs load one
    ours, manifest = load_prepared("prepared")
    assert sorted(plain) == ["train", "validation"]
    assert (plain["train"].num_rows, plain["validation"].num_rows) == (12, 4)
    assert plain["train"]["input_ids"] == ours["train"]["input_ids"] and manifest["splits"]["train"]["examples"] == 12
    # the older layout (the DatasetDict in data/) still loads
    Path("older/data").mkdir(parents=True)
    for item in Path("prepared").iterdir():
        shutil.move(str(item), "older/" + (item.name if item.name == "manifest.json" else f"data/{item.name}"))
    older, _ = load_prepared("older")
    assert older["train"]["input_ids"] == ours["train"]["input_ids"]
