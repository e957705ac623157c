"""The speed profile's load path: bf16 weights rounded to NF4 directly, the values 4-bit loading gives."""

from __future__ import annotations

import json

import pytest
import torch


def test_rounding_gives_what_a_4bit_layer_dequantizes_to_and_leaves_the_head(tiny_phi_dir):
    bnb = pytest.importorskip("bitsandbytes")
    from transformers import AutoModelForCausalLM

    from phi2cli.models.dequantized import round_to_nf4

    model = AutoModelForCausalLM.from_pretrained(str(tiny_phi_dir), dtype=torch.bfloat16)
    before = {n: m.weight.detach().clone() for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    assert round_to_nf4(model, double_quant=True) == len(before) - 1  # every linear layer but lm_head
    after = {n: m.weight for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    assert torch.equal(after["lm_head"], before["lm_head"])
    for name, weight in before.items():
        if name == "lm_head":
            continue
        # what bitsandbytes' Linear4bit holds after quantizing this weight (as from_pretrained builds it)
        param = bnb.nn.Params4bit(weight.clone(), requires_grad=False, compress_statistics=True, quant_type="nf4")
        param = param._quantize("cpu")
        expected = bnb.functional.dequantize_4bit(param.data, param.quant_state).to(torch.bfloat16)
        assert torch.equal(after[name], expected), name
        assert not torch.equal(after[name], weight), name  # rounded, not left as loaded


def test_the_direct_path_is_taken_only_where_the_stored_dtype_is_the_compute_dtype(tiny_phi_dir, tmp_path):
    from phi2cli.models.dequantized import stored_dtype

    assert stored_dtype(str(tiny_phi_dir)) == json.loads((tiny_phi_dir / "config.json").read_text())["dtype"]
    assert stored_dtype("microsoft/phi-2") is None  # not a local directory: the 4-bit path as before
    (tmp_path / "config.json").write_text('{"torch_dtype": "bfloat16"}')
    assert stored_dtype(str(tmp_path)) == "bfloat16"


@pytest.mark.gpu
def test_direct_rounding_matches_loading_in_4bit_then_dequantizing_bit_for_bit(tiny_phi_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    from phi2cli.config import ModelConfig
    from phi2cli.models.loading import Precision, load_base_model
    from phi2cli.models.dequantized import round_to_nf4
    from phi2cli.models.loading import dequantize_base

    bf16_dir = tmp_path / "bf16"
    AutoModelForCausalLM.from_pretrained(str(tiny_phi_dir), dtype=torch.bfloat16).save_pretrained(str(bf16_dir))
    for item in tiny_phi_dir.iterdir():
        if item.name not in ("config.json", "model.safetensors") and item.is_file():
            (bf16_dir / item.name).write_bytes(item.read_bytes())
    cfg = ModelConfig(model=str(bf16_dir))
    quantized = load_base_model(cfg, Precision("cuda", "4bit", "bfloat16"), for_training=True)
    dequantize_base(quantized)
    direct = load_base_model(cfg, Precision("cuda", "none", "bfloat16"), for_training=True)
    round_to_nf4(direct, cfg.double_quant)
    expected = dict(quantized.named_parameters())
    for name, param in direct.named_parameters():
        assert torch.equal(param, expected[name]), name
