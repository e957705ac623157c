"""The compat module names every private internal that a library version lacks."""

from __future__ import annotations

import pytest

from phi2cli import compat


def test_every_listed_internal_exists_in_the_installed_libraries():
    assert {owner: compat.missing(owner) for owner in compat.INTERNALS} == {owner: [] for owner in compat.INTERNALS}


def test_a_missing_internal_is_named_with_the_checked_versions(monkeypatch):
    monkeypatch.setitem(compat.INTERNALS, "torch", ("_foreach_copy_", "_no_such_internal"))
    monkeypatch.setattr(compat, "_checked", set())
    with pytest.raises(ImportError, match=r"torch\._no_such_internal \(checked on torch 2\.11/2\.13"):
        compat.require("torch")


def test_dynamo_settings_are_scoped_to_the_block():
    import torch._dynamo

    before = torch._dynamo.config.cache_size_limit
    with compat.dynamo_settings(cache_size_limit=before + 7):
        assert torch._dynamo.config.cache_size_limit == before + 7
    assert torch._dynamo.config.cache_size_limit == before
    assert torch._dynamo.config.suppress_errors is False  # nothing sets it process-wide


def test_dequantize_base_keeps_the_nf4_values_bit_for_bit(tmp_path):
    """model.dequantize() (transformers' public API) gives the same bf16 weights as bitsandbytes' own
    dequantize_4bit of each layer, and plain frozen Linear layers."""
    import bitsandbytes as bnb
    import torch
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig, LlamaConfig, LlamaForCausalLM

    from phi2cli.models.loading import dequantize_base

    LlamaForCausalLM(LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                                 num_attention_heads=4, num_key_value_heads=2)).save_pretrained(tmp_path)  # fmt: skip
    quantization = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                      bnb_4bit_compute_dtype=torch.bfloat16)  # fmt: skip
    try:
        model = AutoModelForCausalLM.from_pretrained(tmp_path, quantization_config=quantization, dtype=torch.bfloat16)
    except Exception as err:  # a bitsandbytes without its CPU backend
        pytest.skip(f"4-bit loading needs a GPU here: {err}")
    expected = {name: bnb.functional.dequantize_4bit(module.weight.data, module.weight.quant_state).to(torch.bfloat16)
                for name, module in model.named_modules() if isinstance(module, bnb.nn.Linear4bit)}  # fmt: skip
    assert len(expected) == 7  # q, k, v, o, gate, up, down
    assert dequantize_base(model) == 7
    modules = dict(model.named_modules())
    for name, weight in expected.items():
        assert type(modules[name]) is torch.nn.Linear and not modules[name].weight.requires_grad
        assert torch.equal(modules[name].weight, weight), name
    assert not model.is_loaded_in_4bit
