"""The fast engine's lean LoRA forward and flat 8-bit optimizer compute what PEFT and bitsandbytes do."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
peft = pytest.importorskip("peft")


def tiny_lora_model(dropout: float = 0.0, seed: int = 0):
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    base = torch.nn.Sequential(torch.nn.Linear(48, 64), torch.nn.GELU(), torch.nn.Linear(64, 32))
    for param in base.parameters():
        param.requires_grad_(False)
    model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, lora_dropout=dropout, target_modules=["0", "2"]))
    for name, param in model.named_parameters():  # B starts at zero: make the update non-trivial
        if "lora_B" in name:
            torch.nn.init.normal_(param, std=0.2)
    return model


def forward_and_grads(model, x):
    out = model(x)
    out.pow(2).sum().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad()
    return out.detach(), grads


def test_lean_lora_forward_matches_peft_values_and_gradients():
    from phi2cli.kernels import lora as lora_fast

    x = torch.randn(2, 5, 48)
    reference, fast = tiny_lora_model(), tiny_lora_model()
    assert lora_fast.install(fast) == 2
    out_ref, grads_ref = forward_and_grads(reference, x)
    out_fast, grads_fast = forward_and_grads(fast, x)
    torch.testing.assert_close(out_fast, out_ref, rtol=1e-5, atol=1e-5)
    assert grads_fast.keys() == grads_ref.keys() and len(grads_ref) == 4
    for name in grads_ref:
        torch.testing.assert_close(grads_fast[name], grads_ref[name], rtol=1e-4, atol=1e-5)
    # the LoRA update is really there: without it the output differs
    with fast.disable_adapter():
        assert not torch.allclose(fast(x), out_fast)


def test_lean_lora_forward_applies_dropout_in_training_and_not_in_eval():
    from phi2cli.kernels import lora as lora_fast

    x = torch.randn(4, 8, 48)
    reference, fast = tiny_lora_model(dropout=0.5), tiny_lora_model(dropout=0.5)
    lora_fast.install(fast)
    reference.eval()
    fast.eval()
    torch.testing.assert_close(fast(x), reference(x), rtol=1e-5, atol=1e-5)
    fast.train()
    torch.manual_seed(1)
    first = fast(x)
    torch.manual_seed(2)
    assert not torch.allclose(first, fast(x))  # different masks, different outputs


def test_lean_lora_forward_leaves_merged_and_disabled_layers_to_peft():
    from phi2cli.kernels import lora as lora_fast

    x = torch.randn(3, 48)
    model = tiny_lora_model()
    lora_fast.install(model)
    expected = model(x).detach()
    model.merge_adapter()
    torch.testing.assert_close(model(x), expected, rtol=1e-5, atol=1e-5)
    model.unmerge_adapter()
    with model.disable_adapter():
        plain = model(x)
    assert not torch.allclose(plain, expected)


def test_lean_lora_update_runs_in_bf16_and_keeps_the_base_output_dtype():
    from phi2cli.kernels.lora import lora_update

    x = torch.randn(6, 16, dtype=torch.bfloat16)
    a = torch.randn(4, 16, requires_grad=True)  # fp32 masters, as PEFT keeps them
    b = torch.randn(8, 4, requires_grad=True)
    base = torch.randn(6, 8, dtype=torch.bfloat16)
    out = lora_update(x, base, a, b, 2.0, torch.nn.Identity())
    assert out.dtype == torch.bfloat16
    expected = base.float() + 2.0 * (x.float() @ a.T @ b.T)
    torch.testing.assert_close(out.float(), expected, rtol=0.05, atol=0.1)
    out.float().sum().backward()
    assert a.grad.dtype == torch.float32 and b.grad.dtype == torch.float32


def test_tanh_gelu_swap_keeps_phi2_activation_values(tiny_phi_dir):
    from transformers import AutoModelForCausalLM
    from transformers.activations import GELUTanh, NewGELUActivation

    from phi2cli.kernels.lora import fuse_gelu

    x = torch.linspace(-6, 6, 2001)
    torch.testing.assert_close(GELUTanh()(x), NewGELUActivation()(x), rtol=1e-6, atol=1e-6)
    model = AutoModelForCausalLM.from_pretrained(str(tiny_phi_dir), dtype=torch.float32).eval()
    ids = torch.arange(2, 40).unsqueeze(0)
    before = model(ids).logits
    layers = model.config.num_hidden_layers
    assert fuse_gelu(model) == layers and fuse_gelu(model) == 0
    assert sum(isinstance(m, GELUTanh) for m in model.modules()) == layers
    torch.testing.assert_close(model(ids).logits, before, rtol=1e-4, atol=1e-4)


def bnb_or_skip():
    return pytest.importorskip("bitsandbytes")


def two_optimizers(shapes, weight_decay=0.01):
    bnb = bnb_or_skip()
    from phi2cli.kernels.optim import FlatAdamW8bit, flatten_bnb_adamw

    torch.manual_seed(0)
    per_tensor = [torch.nn.Parameter(torch.randn(s)) for s in shapes]
    flat = [torch.nn.Parameter(p.detach().clone()) for p in per_tensor]

    def groups(params):
        return [{"params": params, "weight_decay": weight_decay}, {"params": [], "weight_decay": 0.0}]

    reference = bnb.optim.AdamW(groups(per_tensor), lr=1e-2, optim_bits=8, is_paged=True)
    flat_opt = flatten_bnb_adamw(bnb.optim.AdamW(groups(flat), lr=1e-2, optim_bits=8, is_paged=True))
    assert isinstance(flat_opt, FlatAdamW8bit)
    return per_tensor, reference, flat, flat_opt


def step_both(per_tensor, reference, flat, flat_opt, shapes, lr=None):
    grads = [torch.randn(s) for s in shapes]
    for params, opt in ((per_tensor, reference), (flat, flat_opt)):
        for p, g in zip(params, grads):
            p.grad = g.clone()
        if lr is not None:
            for group in opt.param_groups:
                group["lr"] = lr
        opt.step()


# LoRA's A (r x in) and B (out x r) of phi-2 at r=16, and one whose size is not a multiple of 256
SHAPES = [(16, 2560), (2560, 16), (16, 4100), (4100, 16)]


def test_flat_8bit_adamw_updates_every_element_as_bitsandbytes_does():
    per_tensor, reference, flat, flat_opt = two_optimizers(SHAPES)
    for step in range(4):
        step_both(per_tensor, reference, flat, flat_opt, SHAPES, lr=1e-2 / (step + 1))  # a schedule
        for a, b in zip(per_tensor, flat):
            assert torch.equal(a, b)
    assert reference.state[per_tensor[0]]["state1"].dtype == torch.uint8  # really the 8-bit path
    moved = per_tensor[0].detach() - two_optimizers(SHAPES)[0][0].detach()
    assert moved.abs().max() > 1e-3  # and the parameters did move


def test_flat_8bit_adamw_state_dict_resumes_the_same_trajectory():
    from phi2cli.kernels.optim import flatten_bnb_adamw

    bnb = bnb_or_skip()
    per_tensor, reference, flat, flat_opt = two_optimizers(SHAPES)
    step_both(per_tensor, reference, flat, flat_opt, SHAPES)
    saved = flat_opt.state_dict()
    copies = [torch.nn.Parameter(p.detach().clone()) for p in flat]
    resumed = flatten_bnb_adamw(bnb.optim.AdamW([{"params": copies, "weight_decay": 0.01}], lr=1e-2, optim_bits=8))
    resumed.load_state_dict(saved)
    grads = [torch.randn(s) for s in SHAPES]
    for params, opt in ((flat, flat_opt), (copies, resumed)):
        for p, g in zip(params, grads):
            p.grad = g.clone()
        opt.step()
    for a, b in zip(flat, copies):
        assert torch.equal(a, b)


def test_small_tensors_keep_the_original_optimizer():
    bnb = bnb_or_skip()
    from phi2cli.kernels.optim import flatten_bnb_adamw

    params = [torch.nn.Parameter(torch.randn(4, 64))]  # under bitsandbytes' min_8bit_size: 32-bit state
    optimizer = bnb.optim.AdamW(params, lr=1e-3, optim_bits=8)
    assert flatten_bnb_adamw(optimizer) is optimizer
    torch_adam = torch.optim.AdamW(params, lr=1e-3)
    assert flatten_bnb_adamw(torch_adam) is torch_adam
