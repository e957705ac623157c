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


def test_an_instance_attribute_is_looked_up_in_the_owners_source(monkeypatch):
    monkeypatch.setitem(compat.INTERNALS, "transformers.trainer", ("self._tr_loss", "self._no_such_window"))
    assert compat.missing("transformers.trainer") == ["transformers.trainer.self._no_such_window"]


def test_importing_compat_loads_no_library():
    import subprocess
    import sys

    from conftest import ROOT

    code = "import sys, phi2cli.compat; print(sorted({'torch', 'transformers'} & set(sys.modules)))"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    assert done.stdout.strip() == "[]"


def test_quantization_libraries_import_without_the_compiler():
    """bitsandbytes wraps kernels in torch.compile at import: deferred, TorchInductor stays unloaded."""
    import subprocess
    import sys

    from conftest import ROOT

    code = ("import sys, torch, transformers.modeling_utils; from phi2cli import compat; compile = torch.compile; "
            "compat.import_quantization_libraries(peft=True, bitsandbytes=True); "
            "print({'bitsandbytes', 'peft'} <= set(sys.modules), 'torch._inductor.compile_fx' in sys.modules, "
            "torch.compile is compile)")  # fmt: skip
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    assert done.stdout.split() == ["True", "False", "True"], done.stderr[-2000:]


def test_a_function_compiled_inside_compile_on_first_call_compiles_when_called():
    import torch

    graphs = []

    def backend(graph, example_inputs):  # counts what the compiler is handed
        graphs.append(graph)
        return graph.forward

    with compat.compile_on_first_call():
        double = torch.compile(lambda x: x * 2, backend=backend)
        halve = torch.compile(backend=backend)(lambda x: x / 2)
    assert torch.compile.__module__ == "torch"  # put back after the block
    assert graphs == []  # nothing compiled yet
    x = torch.arange(4.0)
    assert torch.equal(double(x), x * 2) and torch.equal(double(x), x * 2)
    assert len(graphs) == 1  # compiled at the first call, reused at the second
    assert torch.equal(halve(x), x / 2) and len(graphs) == 2


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


@pytest.mark.parametrize("labelled", [None, 15])
def test_trainer_loss_scale_is_what_the_trainers_own_step_applies(tiny_phi_dir, tmp_path, labelled):
    """The CUDA-graph step scales its loss by compat.trainer_loss_scale; the eager step leaves it to the
    Trainer's compute_loss and training_step. Both must back-propagate the same loss: with
    num_items_in_batch the loss is already a mean over the accumulated batch, without it a per-batch
    mean that the Trainer divides by the accumulation steps."""
    import torch
    from transformers import AutoModelForCausalLM, TrainingArguments

    from phi2cli.data.collate import PackedCollator
    from phi2cli.data.prompts import IGNORE_INDEX
    from phi2cli.kernels.loss import selective_causal_lm_loss
    from phi2cli.training.trainer import Phi2Trainer

    model = AutoModelForCausalLM.from_pretrained(str(tiny_phi_dir), dtype=torch.float32)
    args = TrainingArguments(output_dir=str(tmp_path), gradient_accumulation_steps=4, use_cpu=True, report_to=[],
                             average_tokens_across_devices=True)  # fmt: skip
    trainer = Phi2Trainer(model=model, args=args, selective_head=True)
    trainer.current_gradient_accumulation_steps = 4  # set by the training loop for each optimizer step
    rows = [list(range(11, 11 + n)) for n in (20, 30, 9)]
    batch = PackedCollator()([{"input_ids": ids, "labels": [IGNORE_INDEX] * (len(ids) - 5) + ids[-5:]}
                              for ids in rows])  # fmt: skip
    num_items = None if labelled is None else torch.tensor(labelled)
    weight = model.get_output_embeddings().weight

    stepped = trainer.training_step(model, dict(batch), num_items)
    trainer_grad = weight.grad.clone()
    model.zero_grad()
    raw, count = selective_causal_lm_loss(model, dict(batch), num_items)
    scale = compat.trainer_loss_scale(trainer, num_items)
    (raw * scale).backward()

    assert count == 15 and scale == (0.25 if labelled is None else 1.0)
    torch.testing.assert_close(stepped, (raw * scale).detach())
    torch.testing.assert_close(weight.grad, trainer_grad)
