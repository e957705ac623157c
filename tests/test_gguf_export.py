"""`phi2 export --format gguf`: the file llama.cpp reads (read back with gguf's own reader) and its Modelfile."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from phi2cli.cli import app

from conftest import EXAMPLES_DATA, ROOT

runner = CliRunner()
CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")  # fmt: skip


def _fields(reader) -> dict:
    return {name: field for name, field in reader.fields.items()}


def _value(reader, key):
    return reader.fields[key].contents()


def _array(tensor) -> np.ndarray:
    """A tensor as float32 (rows, columns), dequantized when it is q8_0."""
    import gguf

    if tensor.tensor_type == gguf.GGMLQuantizationType.Q8_0:
        return gguf.quants.dequantize(tensor.data, tensor.tensor_type)
    return np.asarray(tensor.data, dtype=np.float32)


def _merged_weights(run_dir: Path, base_dir: Path) -> tuple[dict, dict]:
    """(merged, base) state dicts in float32, merged by peft independently of the exporter."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    base_state = {k: v.clone() for k, v in base.state_dict().items()}
    merged = PeftModel.from_pretrained(base, str(run_dir)).merge_and_unload()
    return {k: v.numpy() for k, v in merged.state_dict().items()}, {k: v.numpy() for k, v in base_state.items()}


@pytest.fixture(scope="module")
def tiny_llama_run(tmp_path_factory) -> tuple[Path, Path]:
    """(adapter dir, base dir) of a 2-step chat-template run of a tiny Llama (GQA, tied embeddings)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    root = tmp_path_factory.mktemp("tiny-llama-run")
    base = root / "tiny-llama"
    config = LlamaConfig(vocab_size=51200, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                         tie_word_embeddings=True, bos_token_id=50256, eos_token_id=50256)  # fmt: skip
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(base)
    for item in (ROOT / "examples" / "tiny-phi-2-tokenizer").iterdir():
        if item.name != "config.json" and item.suffix != ".md":
            shutil.copy(item, base / item.name)
    tokenizer_config = json.loads((base / "tokenizer_config.json").read_text())
    (base / "tokenizer_config.json").write_text(json.dumps({**tokenizer_config, "chat_template": CHATML}))
    here = os.getcwd()
    os.chdir(root)
    try:
        result = runner.invoke(app, [
            "train", "--data-dir", str(EXAMPLES_DATA), "--model", str(base), "--template", "chat", "--samples", "8",
            "--val-samples", "4", "--max-steps", "2", "--eval-every", "2", "--max-length", "192",
            "--warmup-steps", "0", "--lr", "0.01", "--lora-targets", "all-linear",
        ])  # fmt: skip
    finally:
        os.chdir(here)
    assert result.exit_code == 0, result.output
    return root / "phi2-xsum-final", base


def test_phi_run_exports_q8_0_gguf_with_phi2_names_tokenizer_and_modelfile(final, tiny_phi_dir):
    import gguf

    result = runner.invoke(app, ["export", "--format", "gguf"])
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in Path(".").iterdir()) == [
        "phi2-xsum-final", "phi2-xsum-merged-q8_0.Modelfile", "phi2-xsum-merged-q8_0.gguf"]  # fmt: skip
    reader = gguf.GGUFReader("phi2-xsum-merged-q8_0.gguf")
    assert _value(reader, "general.architecture") == "phi2"
    assert _value(reader, "general.file_type") == gguf.LlamaFileType.MOSTLY_Q8_0
    assert _value(reader, "phi2.block_count") == 2 and _value(reader, "phi2.embedding_length") == 64
    assert _value(reader, "phi2.rope.dimension_count") == 6  # int(0.4 x head dim 16): phi's partial rotary

    per_block = ["attn_norm.weight", "attn_norm.bias", "attn_q.weight", "attn_q.bias", "attn_k.weight",
                 "attn_k.bias", "attn_v.weight", "attn_v.bias", "attn_output.weight", "attn_output.bias",
                 "ffn_up.weight", "ffn_up.bias", "ffn_down.weight", "ffn_down.bias"]  # fmt: skip
    expected = {"token_embd.weight", "output_norm.weight", "output_norm.bias", "output.weight", "output.bias"} | {
        f"blk.{i}.{name}" for i in range(2) for name in per_block}  # fmt: skip
    tensors = {t.name: t for t in reader.tensors}
    assert set(tensors) == expected
    assert [int(n) for n in tensors["token_embd.weight"].shape] == [64, 51200]  # gguf lists the row length first
    assert [int(n) for n in tensors["blk.1.ffn_up.weight"].shape] == [64, 128]
    assert {t.tensor_type.name for n, t in tensors.items() if len(t.shape) == 1} == {"F32"}
    assert {t.tensor_type.name for n, t in tensors.items() if len(t.shape) == 2} == {"Q8_0"}

    merged, _ = _merged_weights(final, tiny_phi_dir)
    for gguf_name, hf_name in [("blk.0.attn_q.weight", "model.layers.0.self_attn.q_proj.weight"),
                               ("output.weight", "lm_head.weight"), ("output.bias", "lm_head.bias")]:  # fmt: skip
        ref = merged[hf_name]
        blocks = np.abs(ref.reshape(-1, 32)).max(axis=1, keepdims=True) if ref.ndim == 2 else 0
        error = np.abs(_array(tensors[gguf_name]).reshape(-1, 32 if ref.ndim == 2 else ref.size) -
                       ref.reshape(-1, 32 if ref.ndim == 2 else ref.size))  # fmt: skip
        assert (error <= blocks / 127 + 1e-6).all(), gguf_name  # within one q8_0 step of its block

    tokenizer = json.loads((final / "tokenizer.json").read_text())
    tokens = _value(reader, "tokenizer.ggml.tokens")
    assert len(tokens) == 51200 and tokens[464] == "The" and tokens[50256] == "<|endoftext|>"
    assert tokens[50300] == "[PAD50300]"  # embedding rows past the tokenizer's 50295 tokens
    types = _value(reader, "tokenizer.ggml.token_type")
    assert (types[464], types[50256], types[50257], types[50300]) == (1, 3, 4, 5)  # normal, control, user, unused
    assert len(_value(reader, "tokenizer.ggml.merges")) == len(tokenizer["model"]["merges"]) == 50000
    assert _value(reader, "tokenizer.ggml.model") == "gpt2" and _value(reader, "tokenizer.ggml.pre") == "gpt-2"
    assert _value(reader, "tokenizer.ggml.eos_token_id") == 50256
    assert _value(reader, "tokenizer.ggml.add_bos_token") is False  # training prompts carry no BOS

    assert Path("phi2-xsum-merged-q8_0.Modelfile").read_text() == (
        "# Ollama model of a phi2cli fine-tune: ollama create NAME -f THIS_FILE; ollama run NAME < article.txt\n"
        "FROM ./phi2-xsum-merged-q8_0.gguf\n"
        'TEMPLATE """Instruct: Summarize the following news article in one sentence.\n{{ .Prompt }}\nOutput:"""\n'
        'PARAMETER stop """<|endoftext|>"""\n'
        'PARAMETER stop """\n"""\n'
        "PARAMETER temperature 0\n"
        "PARAMETER num_ctx 256\n"
        "PARAMETER num_predict 60\n"
    )


def test_llama_run_exports_f16_with_rotary_rows_reordered_tied_output_and_chat_template(tiny_llama_run):
    import gguf

    adapter, base = tiny_llama_run
    result = runner.invoke(app, ["export", "--format", "gguf", "--gguf-type", "f16", "--adapter", str(adapter),
                                 "--output", "out/llama.gguf"])  # fmt: skip
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in Path("out").iterdir()) == ["llama.Modelfile", "llama.gguf"]
    reader = gguf.GGUFReader("out/llama.gguf")
    assert _value(reader, "general.architecture") == "llama"
    assert (_value(reader, "llama.attention.head_count"), _value(reader, "llama.attention.head_count_kv")) == (4, 2)
    assert _value(reader, "llama.rope.dimension_count") == 16
    tensors = {t.name: t for t in reader.tensors}
    assert "output.weight" not in tensors  # tied: llama.cpp reuses token_embd, as transformers does
    assert {n.split(".", 2)[2] for n in tensors if n.startswith("blk.0.")} == {
        "attn_norm.weight", "attn_q.weight", "attn_k.weight", "attn_v.weight", "attn_output.weight",
        "ffn_norm.weight", "ffn_gate.weight", "ffn_up.weight", "ffn_down.weight"}  # fmt: skip
    assert [int(n) for n in tensors["blk.0.attn_k.weight"].shape] == [64, 32]  # 2 kv heads x 16
    assert {t.tensor_type.name for t in tensors.values() if len(t.shape) == 2} == {"F16"}

    merged, base_state = _merged_weights(adapter, base)
    gate = "model.layers.1.mlp.gate_proj.weight"
    assert np.allclose(_array(tensors["blk.1.ffn_gate.weight"]), merged[gate], atol=1e-3)
    assert not np.allclose(merged[gate], base_state[gate], atol=1e-3)  # the adapter is in the exported weights
    # llama.cpp rotates pairs (2i, 2i+1) of each head; transformers rotates (i, i + half): rows are reordered.
    for gguf_name, hf_name, heads in [("blk.0.attn_q.weight", "model.layers.0.self_attn.q_proj.weight", 4),
                                      ("blk.1.attn_k.weight", "model.layers.1.self_attn.k_proj.weight", 2)]:  # fmt: skip
        exported, ref = _array(tensors[gguf_name]), merged[hf_name]
        half = 8
        for head in range(heads):
            for i in range(half):
                assert np.allclose(exported[head * 16 + 2 * i], ref[head * 16 + i], atol=1e-3)
                assert np.allclose(exported[head * 16 + 2 * i + 1], ref[head * 16 + half + i], atol=1e-3)

    assert _value(reader, "tokenizer.chat_template") == CHATML
    modelfile = Path("out/llama.Modelfile").read_text()
    assert "FROM ./llama.gguf\n" in modelfile and "PARAMETER num_ctx 192\n" in modelfile
    assert ('TEMPLATE """<|im_start|>user\nSummarize the following news article in one sentence.\n\n'
            '{{ .Prompt }}<|im_end|>\n<|im_start|>assistant\n"""\n') in modelfile  # fmt: skip


def test_gguf_export_refusals(final, tmp_path):
    bad_type = runner.invoke(app, ["export", "--format", "gguf", "--gguf-type", "q4_k"])
    assert bad_type.exit_code == 2 and "must be one of f16, q8_0" in bad_type.output
    bad_format = runner.invoke(app, ["export", "--format", "onnx"])
    assert bad_format.exit_code == 2 and "must be one of hf, gguf" in bad_format.output
    not_gguf = runner.invoke(app, ["export", "--format", "gguf", "--output", "model.bin"])
    assert not_gguf.exit_code == 2 and "--output must name a .gguf file" in not_gguf.output

    Path("mine.gguf").write_text("keep")
    refused = runner.invoke(app, ["export", "--format", "gguf", "--output", "mine.gguf"])
    assert refused.exit_code == 1 and "mine.gguf already exist(s); pass --overwrite" in refused.output
    assert Path("mine.gguf").read_text() == "keep" and not Path("mine.Modelfile").exists()
    assert len(refused.output.strip().splitlines()) == 1  # one red line, no traceback

    other_family = tmp_path / "tiny-gpt2"
    other_family.mkdir()
    (other_family / "config.json").write_text(json.dumps({"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"]}))
    unsupported = runner.invoke(app, ["export", "--format", "gguf", "--model", str(other_family)])
    assert unsupported.exit_code == 1
    assert "GGUF export supports llama, phi, qwen2 models; this one is 'gpt2'" in unsupported.output
    assert not any(Path(".").glob("*.gguf*")) or sorted(p.name for p in Path(".").glob("*.gguf*")) == ["mine.gguf"]


def test_gguf_export_overwrite_replaces_both_files(final):
    Path("phi2-xsum-merged-q8_0.Modelfile").write_text("old")
    refused = runner.invoke(app, ["export", "--format", "gguf"])
    assert refused.exit_code == 1 and "phi2-xsum-merged-q8_0.Modelfile already exist(s)" in refused.output
    replaced = runner.invoke(app, ["export", "--format", "gguf", "--overwrite"])
    assert replaced.exit_code == 0, replaced.output
    assert Path("phi2-xsum-merged-q8_0.Modelfile").read_text().startswith("# Ollama model")
    assert Path("phi2-xsum-merged-q8_0.gguf").read_bytes()[:4] == b"GGUF"
    assert not any(p.name.startswith(".") for p in Path(".").iterdir())  # no partial file left behind


def test_qwen2_keeps_transformers_rotary_rows_and_its_qkv_biases(tiny_phi_dir, tmp_path):
    import gguf
    import torch
    from transformers import AutoTokenizer, Qwen2Config, Qwen2ForCausalLM

    from phi2cli.io.gguf_export import write_gguf

    torch.manual_seed(0)
    model = Qwen2ForCausalLM(Qwen2Config(vocab_size=51200, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False))
    summary = write_gguf(model, AutoTokenizer.from_pretrained(tiny_phi_dir), tmp_path / "q.gguf", "f16", "tiny qwen2")
    assert (summary.architecture, summary.tensors) == ("qwen2", 15)
    reader = gguf.GGUFReader(tmp_path / "q.gguf")
    tensors = {t.name: t for t in reader.tensors}
    assert {"blk.0.attn_q.bias", "blk.0.attn_k.bias", "blk.0.attn_v.bias", "output.weight"} <= set(tensors)
    q = model.model.layers[0].self_attn.q_proj
    assert np.allclose(_array(tensors["blk.0.attn_q.weight"]), q.weight.detach().numpy(), atol=1e-3)  # NEOX rotary
    assert np.allclose(_array(tensors["blk.0.attn_q.bias"]), q.bias.detach().numpy())


def test_pre_tokenizer_is_read_from_the_tokenizer_structure():
    from phi2cli.errors import ModelError
    from phi2cli.io.gguf_export import pre_tokenizer_name

    byte_level = {"type": "ByteLevel", "add_prefix_space": False, "use_regex": False}
    qwen2 = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
    llama3 = qwen2.replace(r"|\p{N}|", r"|\p{N}{1,3}|")

    def split(pattern: str) -> dict:
        return {"pre_tokenizer": {"type": "Sequence", "pretokenizers": [
            {"type": "Split", "pattern": {"Regex": pattern}, "behavior": "Isolated"}, byte_level]}}  # fmt: skip

    assert pre_tokenizer_name({"pre_tokenizer": {**byte_level, "use_regex": True}}) == "gpt-2"
    assert pre_tokenizer_name(split(qwen2)) == "qwen2"
    assert pre_tokenizer_name(split(llama3)) == "llama-bpe"
    assert pre_tokenizer_name({"pre_tokenizer": {"type": "Sequence", "pretokenizers": [
        {"type": "Digits", "individual_digits": True}, {**byte_level, "use_regex": True}]}}) == "smollm"  # fmt: skip
    with pytest.raises(ModelError, match="pre-splits text with \\['Metaspace'\\]"):
        pre_tokenizer_name({"pre_tokenizer": {"type": "Metaspace"}})


def test_reading_a_gguf_parses_it_once_and_gives_the_same_model_and_tokenizer(tiny_phi_dir, tmp_path):
    import gguf
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from phi2cli.compat import gguf_parsed_once
    from phi2cli.io.gguf_export import write_gguf

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=51200, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2))  # fmt: skip
    write_gguf(model, AutoTokenizer.from_pretrained(tiny_phi_dir), tmp_path / "l.gguf", "f16", "tiny llama")
    reader, name_map = gguf.GGUFReader, gguf.get_tensor_name_map
    built: list[str] = []

    def counting_reader(*args, **kwargs):
        built.append("reader")
        return reader(*args, **kwargs)

    def load():
        loaded = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="l.gguf", dtype=torch.float32)
        return loaded.state_dict(), AutoTokenizer.from_pretrained(tmp_path, gguf_file="l.gguf")

    gguf.GGUFReader = counting_reader
    try:
        plain_state, plain_tokenizer = load()
        plain_reads = len(built)
        built.clear()
        with gguf_parsed_once():
            state, tokenizer = load()
        assert gguf.GGUFReader is counting_reader and gguf.get_tensor_name_map is name_map  # restored
    finally:
        gguf.GGUFReader = reader
    assert plain_reads == 3 and len(built) == 1  # config, tokenizer and weights each parsed the file before
    assert state.keys() == plain_state.keys() and all(torch.equal(state[k], plain_state[k]) for k in state)
    assert torch.equal(state["model.layers.1.mlp.up_proj.weight"], model.state_dict()["model.layers.1.mlp.up_proj.weight"].half().float())
    assert tokenizer.get_vocab() == plain_tokenizer.get_vocab()
    text = "The council said the bridge would reopen on Monday."
    assert tokenizer(text).input_ids == plain_tokenizer(text).input_ids
