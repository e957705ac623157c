"""Llama-family and Qwen2 models with grouped key/value heads through train, evaluate and summarize (CPU)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from phi2cli.cli import app
from phi2cli.models.families import attention_shape, default_lora_targets, family_of, varlen_refusal

from conftest import ROOT

runner = CliRunner()
TOKENIZER_DIR = ROOT / "examples" / "tiny-phi-2-tokenizer"


def tiny_model(kind: str, out: Path) -> Path:
    """A 2-layer random model of the family, 4 query heads sharing 2 key/value heads, phi-2's tokenizer."""
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    shape = dict(vocab_size=51200, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, max_position_embeddings=2048, bos_token_id=50256, eos_token_id=50256,
                 tie_word_embeddings=False)  # fmt: skip
    torch.manual_seed(0)
    if kind == "llama":
        model = LlamaForCausalLM(LlamaConfig(head_dim=24, **shape))  # head_dim != hidden / heads (16)
    else:
        model = Qwen2ForCausalLM(Qwen2Config(**shape))
    model.save_pretrained(out)
    for item in TOKENIZER_DIR.iterdir():
        if item.name != "config.json" and item.suffix != ".md":
            shutil.copy(item, out / item.name)
    return out


@pytest.fixture(scope="module", params=["llama", "qwen2"])
def family_model(request, tmp_path_factory) -> tuple[str, Path]:
    return request.param, tiny_model(request.param, tmp_path_factory.mktemp(f"tiny-{request.param}"))


def test_the_spec_reads_grouped_heads_and_head_dim_from_the_config():
    from transformers import LlamaConfig, PhiConfig, Qwen2Config

    llama = attention_shape(LlamaConfig(hidden_size=64, num_attention_heads=4, num_key_value_heads=2, head_dim=24))
    assert (llama.heads, llama.kv_heads, llama.head_dim, llama.sliding_window) == (4, 2, 24, None)
    qwen = attention_shape(Qwen2Config(hidden_size=64, num_attention_heads=4, num_key_value_heads=1,
                                       use_sliding_window=True, sliding_window=128, max_window_layers=0))  # fmt: skip
    assert (qwen.kv_heads, qwen.head_dim, qwen.sliding_window) == (1, 16, 128)
    assert attention_shape(Qwen2Config(sliding_window=4096, use_sliding_window=False)).sliding_window is None
    phi = attention_shape(PhiConfig(hidden_size=2560, num_attention_heads=32))
    assert (phi.heads, phi.kv_heads, phi.head_dim) == (32, 32, 80)
    assert varlen_refusal(phi) is None
    assert "softcap" in varlen_refusal(dataclasses_replace(phi, softcap=50.0))
    assert family_of("mistral").name == "llama" and family_of("gemma2") is None
    assert default_lora_targets("phi") == ("q_proj", "k_proj", "v_proj", "dense")
    assert default_lora_targets("qwen2") == ("q_proj", "k_proj", "v_proj", "o_proj")
    assert default_lora_targets("gpt2") == ("all-linear",)


def dataclasses_replace(shape, **changes):
    import dataclasses

    return dataclasses.replace(shape, **changes)


def test_grouped_head_models_train_evaluate_and_summarize(family_model, sample_data_dir):
    kind, model_dir = family_model
    result = runner.invoke(app, ["train", "--model", str(model_dir), "--data-dir", str(sample_data_dir),
                                 "--samples", "8", "--val-samples", "4", "--max-steps", "1", "--eval-every", "1",
                                 "--max-length", "128", "--lr", "0.01", "--warmup-steps", "0"])  # fmt: skip
    assert result.exit_code == 0, result.output
    final = Path("phi2-xsum-final")
    adapter = json.loads((final / "adapter_config.json").read_text())
    # a tiny model gets the small row of the size recipe: every linear layer, the family's o_proj among them
    family = {"q_proj", "k_proj", "v_proj", "o_proj"}
    mlp = {"gate_proj", "up_proj", "down_proj"}
    assert {name.rsplit(".", 1)[-1] for name in adapter["target_modules"]} == family | mlp
    run = json.loads((final / "phi2_run.json").read_text())
    assert run["recipe"]["row"].startswith("small") and run["config"]["lora"]["targets"] == ["all-linear"]
    assert run["fast_paths"]["lean_lora"] == {"status": "active", "detail": "14 layers"}  # 2 layers x 7 linears
    assert run["fast_paths"]["varlen_attention"]["status"] == "off"  # CPU: packed rows through SDPA
    from safetensors.torch import load_file

    names = load_file(str(final / "adapter_model.safetensors")).keys()
    adapted = {name.split(".")[-3] for name in names if "lora_A" in name}
    assert adapted == family | mlp
    assert any("self_attn.o_proj.lora_B" in name for name in names)

    result = runner.invoke(app, ["evaluate", "--samples", "2", "--max-new-tokens", "4"], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    assert "static-cache decoder drives" not in result.output  # no fallback note: grouped heads decode statically
    metrics = json.loads((final / "metrics-validation.json").read_text())
    assert metrics["settings"]["decoder"] == "static" and metrics["settings"]["adapter_merged"]
    assert metrics["samples"] == 2 and metrics["tuned"]["eval_loss"] > 0
    predictions = [json.loads(line) for line in (final / "predictions-validation.jsonl").read_text().splitlines()]
    assert len(predictions) == 2

    Path("a.txt").write_text("The council approved a new budget for the town's schools on Monday.\n")
    result = runner.invoke(app, ["summarize", "a.txt", "--json", "--max-new-tokens", "4"])
    assert result.exit_code == 0, result.output
    summaries = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")] or \
        json.loads(result.stdout)  # fmt: skip
    assert summaries and summaries[0]["source"] == "a.txt"


def test_the_memory_estimate_scales_with_the_model():
    from transformers import LlamaConfig, PhiConfig

    from phi2cli.models.families import PHI2_SHAPE, model_shape
    from phi2cli.training.plan import speed_memory_gib

    phi2 = model_shape(PhiConfig(vocab_size=51200, hidden_size=2560, intermediate_size=10240, num_hidden_layers=32,
                                 num_attention_heads=32, tie_word_embeddings=False))  # fmt: skip
    assert abs(phi2.parameters - PHI2_SHAPE.parameters) / PHI2_SHAPE.parameters < 0.001  # biases and norms aside
    assert speed_memory_gib(8, 1024, shape=phi2) == pytest.approx(speed_memory_gib(8, 1024), rel=1e-3)
    smol = model_shape(LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                                   num_attention_heads=9, num_key_value_heads=3, tie_word_embeddings=True))  # fmt: skip
    assert 134e6 < smol.parameters < 136e6  # SmolLM2-135M
    assert speed_memory_gib(8, 1024, shape=smol) < speed_memory_gib(8, 1024) / 4
    assert model_shape(object()) is None


def test_the_decoder_is_selectable_and_recorded(final, monkeypatch):
    result = runner.invoke(app, ["evaluate", "--samples", "2", "--max-new-tokens", "48", "-o", "static"])
    assert result.exit_code == 0, result.output
    static = json.loads(Path("static/metrics-validation.json").read_text())
    assert static["settings"]["decoder"] == "static" and static["settings"]["shared_forward_articles"] == 2
    monkeypatch.setenv("PHI2_DECODER", "hf")
    result = runner.invoke(app, ["evaluate", "--samples", "2", "--max-new-tokens", "48", "-o", "hf"])
    assert result.exit_code == 0, result.output
    hf = json.loads(Path("hf/metrics-validation.json").read_text())
    assert hf["settings"]["decoder"] == "hf" and hf["settings"]["shared_forward_articles"] == 0
    assert "static-cache decoder" not in result.output  # the user's choice is no fallback
    for key in ("eval_loss", "rouge1"):  # greedy either way: the same loss and summaries
        assert hf["tuned"][key] == pytest.approx(static["tuned"][key], rel=1e-4, abs=1e-4)
    monkeypatch.setenv("PHI2_DECODER", "fast")
    result = runner.invoke(app, ["evaluate", "--samples", "2"])
    assert result.exit_code == 2
    assert "PHI2_DECODER='fast': use one of static, hf" in result.output
