"""`phi2 export`: a merged plain-transformers model that reproduces base + adapter."""

from __future__ import annotations

import json
from pathlib import Path

from typer.testing import CliRunner

from phi2cli.cli import app

runner = CliRunner()
MERGED_FILES = {"README.md", "config.json", "generation_config.json", "model.safetensors", "tokenizer.json",
                "tokenizer_config.json"}  # fmt: skip


def test_merged_model_reproduces_base_plus_adapter(final, tiny_phi_dir, sample_data_dir):
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    result = runner.invoke(app, ["export", "--dtype", "float32", "--output", "merged"])
    assert result.exit_code == 0, result.output
    assert {p.name for p in Path("merged").iterdir()} == MERGED_FILES
    assert json.loads(Path("merged/config.json").read_text())["architectures"] == ["PhiForCausalLM"]
    assert "phi2-xsum-final" in Path("merged/README.md").read_text()

    merged = AutoModelForCausalLM.from_pretrained("merged").eval()
    base = AutoModelForCausalLM.from_pretrained(tiny_phi_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        ids = torch.randint(0, 50000, (2, 48), generator=torch.Generator().manual_seed(0))
        base_logits = base(ids).logits
        adapted = PeftModel.from_pretrained(base, str(final)).eval()
        adapted_logits = adapted(ids).logits
        merged_logits = merged(ids).logits
    assert torch.allclose(merged_logits, adapted_logits, atol=1e-4)
    assert not torch.allclose(merged_logits, base_logits, atol=1e-3)  # the adapter really is in the weights

    article = json.loads((sample_data_dir / "test.jsonl").read_text().splitlines()[0])["document"]
    Path("a.txt").write_text(article)
    with_adapter = runner.invoke(app, ["summarize", "a.txt", "--json", "--max-new-tokens", "12"])
    from_merged = runner.invoke(app, ["summarize", "a.txt", "--json", "--max-new-tokens", "12", "--base-only",
                                      "--model", "merged"])  # fmt: skip
    assert with_adapter.exit_code == 0 and from_merged.exit_code == 0, with_adapter.output + from_merged.output
    assert json.loads(from_merged.stdout)[0]["summary"] == json.loads(with_adapter.stdout)[0]["summary"]


def test_existing_output_is_kept_unless_overwrite_and_default_dtype_is_bfloat16(final):
    Path("phi2-xsum-merged").mkdir()
    Path("phi2-xsum-merged/keep.txt").write_text("mine")
    refused = runner.invoke(app, ["export"])
    assert refused.exit_code == 1 and "not empty; pass --overwrite" in refused.output
    assert Path("phi2-xsum-merged/keep.txt").read_text() == "mine"
    replaced = runner.invoke(app, ["export", "--overwrite"])
    assert replaced.exit_code == 0, replaced.output
    assert {p.name for p in Path("phi2-xsum-merged").iterdir()} == MERGED_FILES
    from safetensors import safe_open

    with safe_open("phi2-xsum-merged/model.safetensors", "pt") as weights:
        dtypes = {weights.get_slice(name).get_dtype() for name in weights.keys()}
    assert dtypes == {"BF16"}


def test_bad_export_requests(final):
    bad_dtype = runner.invoke(app, ["export", "--dtype", "int8"])
    assert bad_dtype.exit_code == 2 and "bfloat16, float16, float32" in bad_dtype.output
    no_adapter = runner.invoke(app, ["export", "--adapter", "elsewhere"])
    assert no_adapter.exit_code == 1 and "adapter directory elsewhere does not exist" in no_adapter.output
    Path("file.bin").write_text("x")
    onto_file = runner.invoke(app, ["export", "--output", "file.bin"])
    assert onto_file.exit_code == 1 and "is a file" in onto_file.output
