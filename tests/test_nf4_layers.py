"""The memory-saver's 4-bit layers in torch operations: bitsandbytes' values, compiled and recomputed."""

from __future__ import annotations

import functools

import pytest
import torch

bnb = pytest.importorskip("bitsandbytes")


def linear4bit(out_features: int, in_features: int, double_quant: bool, seed: int = 0) -> tuple:
    """A bitsandbytes NF4 Linear4bit on the CPU, quantized from a random bf16 layer."""
    torch.manual_seed(seed)
    dense = torch.nn.Linear(in_features, out_features).to(torch.bfloat16)
    layer = bnb.nn.Linear4bit(in_features, out_features, compute_dtype=torch.bfloat16,
                              compress_statistics=double_quant, quant_type="nf4")  # fmt: skip
    layer.weight = bnb.nn.Params4bit(dense.weight.data.clone(), requires_grad=False,
                                     compress_statistics=double_quant, quant_type="nf4")  # fmt: skip
    layer.bias = torch.nn.Parameter(dense.bias.data.clone(), requires_grad=False)
    return layer.to("cpu"), dense


@pytest.mark.parametrize("double_quant", [True, False])
def test_nf4_linear_holds_the_4bit_codes_and_gives_bitsandbytes_values(double_quant):
    from phi2cli.kernels.nf4 import NF4Linear, convertible, from_linear4bit

    layer, dense = linear4bit(192, 320, double_quant)
    assert convertible(layer) and not convertible(dense)
    swapped = from_linear4bit(layer)
    assert isinstance(swapped, NF4Linear) and (swapped.in_features, swapped.out_features) == (320, 192)
    assert swapped.codes.data_ptr() == layer.weight.data.data_ptr()  # shared, not copied
    expected = bnb.functional.dequantize_4bit(layer.weight.data, layer.weight.quant_state)
    assert torch.equal(swapped.dequantized(), expected)
    assert not torch.equal(swapped.dequantized(), dense.weight)  # NF4-rounded, not the bf16 weight
    x = torch.randn(2, 7, 320, dtype=torch.bfloat16)
    assert torch.equal(swapped(x), layer(x))
    layer.weight.quant_state.packing_format_for_cpu = True  # bitsandbytes' CPU inference layout: left alone
    assert not convertible(layer)


def test_swap_replaces_every_nf4_layer_and_keeps_the_rest():
    from phi2cli.kernels.nf4 import NF4Linear, swap_linear4bit

    fp4 = bnb.nn.Linear4bit(64, 64, quant_type="fp4")
    fp4.weight = bnb.nn.Params4bit(torch.randn(64, 64, dtype=torch.bfloat16), requires_grad=False, quant_type="fp4")
    model = torch.nn.Sequential(linear4bit(64, 128, True)[0], torch.nn.GELU(),
                                torch.nn.Sequential(linear4bit(128, 64, True, seed=1)[0]), fp4.to("cpu"),
                                torch.nn.Linear(128, 8))  # fmt: skip
    x = torch.randn(3, 128, dtype=torch.bfloat16)
    before = model[2](model[1](model[0](x)))
    assert swap_linear4bit(model) == 2
    assert [type(m).__name__ for m in (model[0], model[2][0], model[3], model[4])] == \
        ["NF4Linear", "NF4Linear", "Linear4bit", "Linear"]  # fmt: skip
    assert isinstance(model[2][0], NF4Linear)
    assert torch.equal(model[2](model[1](model[0](x))), before)


def lora_model(model_dir, *, checkpointing: bool, torch_nf4: bool, compiled: bool, dtype: str = "float32",
               layer: str = "PhiDecoderLayer"):  # fmt: skip
    """The memory-saver's build on the CPU: 4-bit base, lean LoRA (dropout 0.3, B non-zero)."""
    from phi2cli.config import LoraConfig, ModelConfig
    from phi2cli.kernels import lora as lora_fast
    from phi2cli.kernels.compiled import compile_layers
    from phi2cli.kernels.nf4 import swap_linear4bit
    from phi2cli.models.loading import Precision, attach_lora, load_base_model

    torch.manual_seed(0)
    model = load_base_model(ModelConfig(model=str(model_dir)), Precision("cpu", "4bit", dtype), for_training=True)
    model = attach_lora(model, LoraConfig(dropout=0.3), checkpointing, lean=True, upcast_norms=False)
    lora_fast.install(model)
    for name, param in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(param, std=0.02)
    if torch_nf4:
        assert swap_linear4bit(model) > 0
    if compiled:
        failures = []
        assert compile_layers(model, (layer,), failures.append) == 2
    return model.train()


def loss_and_grads(model, ids):
    torch.manual_seed(1)
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    return loss.item(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_nf4_layers_eager_train_exactly_as_bitsandbytes_layers(tiny_phi_dir):
    ids = torch.randint(0, 1000, (1, 40), generator=torch.Generator().manual_seed(2))
    loss, grads = loss_and_grads(lora_model(tiny_phi_dir, checkpointing=True, torch_nf4=False, compiled=False,
                                            dtype="bfloat16"), ids)  # fmt: skip
    loss_nf4, grads_nf4 = loss_and_grads(lora_model(tiny_phi_dir, checkpointing=True, torch_nf4=True,
                                                    compiled=False, dtype="bfloat16"), ids)  # fmt: skip
    assert loss_nf4 == loss and grads.keys() == grads_nf4.keys() and len(grads) == 16
    for name, grad in grads.items():
        assert torch.equal(grads_nf4[name], grad), name


@pytest.fixture(scope="module", params=["phi", "llama"])
def family_dir(request, tiny_phi_dir, tmp_path_factory):
    """(decoder layer class, model directory): the tiny Phi, and a tiny Llama with grouped key/value heads."""
    if request.param == "phi":
        return "PhiDecoderLayer", tiny_phi_dir
    from transformers import LlamaConfig, LlamaForCausalLM

    # head_dim 32: every weight row a whole number of 64-weight blocks (bitsandbytes' CPU dequantize kernel
    # splits blocks by row otherwise, unlike its quantize and its CUDA kernel, which the layers follow)
    out = tmp_path_factory.mktemp("tiny-llama")
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(vocab_size=51200, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                 num_attention_heads=4, num_key_value_heads=2, head_dim=32,
                                 tie_word_embeddings=False)).save_pretrained(out)  # fmt: skip
    for item in tiny_phi_dir.iterdir():
        if item.name.startswith(("tokenizer", "vocab", "merges", "special_tokens")):
            (out / item.name).write_bytes(item.read_bytes())
    return "LlamaDecoderLayer", out


@pytest.mark.slow
def test_compiled_checkpointed_nf4_layers_redraw_the_dropout_masks_of_the_eager_forward(family_dir):
    """Compiled layers under gradient checkpointing (the memory-saver on a GPU) learn what the eager
    4-bit layers without checkpointing learn: the same loss, and gradients to float32 rounding, so the
    recompute drew the forward's dropout masks (dropout 0.3 would change them by far more)."""
    layer, model_dir = family_dir
    build = functools.partial(lora_model, model_dir, layer=layer)
    ids = torch.randint(0, 1000, (1, 40), generator=torch.Generator().manual_seed(2))
    loss, grads = loss_and_grads(build(checkpointing=False, torch_nf4=False, compiled=False), ids)
    loss_c, grads_c = loss_and_grads(build(checkpointing=True, torch_nf4=True, compiled=True), ids)
    assert loss_c == pytest.approx(loss, rel=1e-6)
    for name, grad in grads.items():
        assert torch.allclose(grads_c[name], grad, rtol=1e-4, atol=1e-5 * grad.abs().max().item()), name
    _, unmasked = loss_and_grads(build(checkpointing=False, torch_nf4=False, compiled=False).eval(), ids)
    assert any(not torch.allclose(unmasked[name], grad, rtol=1e-2, atol=1e-3 * grad.abs().max().item())
               for name, grad in grads.items())  # the masks mattered: without them the gradients differ  # fmt: skip
