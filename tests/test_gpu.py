"""The real 4-bit path on a CUDA GPU with a random-weight model of phi-2's exact shape.

Run on the GPU machine: python -m pytest -m gpu -s
(PHI2_GPU_MODEL names where the 2.78 B model is saved; it is built there on first use.)
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from gpu_support import phi2_shape_model, record

torch = pytest.importorskip("torch")
pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def phi2_shape_dir() -> Path:
    return phi2_shape_model()


class Keep:
    def __init__(self):
        self.model = None

    def __call__(self):
        from transformers import TrainerCallback

        keep = self

        class _Cb(TrainerCallback):
            def on_train_end(self, args, state, control, model=None, **kwargs):
                keep.model = model

        return _Cb()


def gpu_config(model_dir: Path, profile: str, tmp: Path, **extra):
    from phi2cli.config import Phi2Config, apply_overrides

    values = {"model.model": str(model_dir), "data.data_dir": str(ROOT / "examples/data/xsum-sample"),
              "data.samples": 40, "data.val_samples": 8, "train.max_steps": 4, "train.eval_every": 4,
              "train.logging_steps": 1, "train.profile": profile, "train.output_dir": str(tmp / profile),
              "train.final_dir": str(tmp / f"{profile}-final"), **extra}  # fmt: skip
    return apply_overrides(Phi2Config(), values).validate()


def test_reference_recipe_runs_the_real_4bit_path(phi2_shape_dir, tmp_path):
    import bitsandbytes as bnb

    from phi2cli.training.engine import train

    keep = Keep()
    config = gpu_config(phi2_shape_dir, "reference", tmp_path)
    result = train(config, callbacks=[keep()])
    four_bit = [m for m in keep.model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert len(four_bit) == 32 * 6  # q, k, v, dense, fc1, fc2 in each of 32 layers
    assert four_bit[0].weight.quant_type == "nf4" and four_bit[0].weight.quant_state.nested  # double quant
    assert result.plan.profile == "reference" and (result.plan.micro_batch, result.plan.grad_accum) == (1, 8)
    assert {"adapter_config.json", "adapter_model.safetensors"} <= {p.name for p in result.final_dir.iterdir()}
    assert result.memory["peak_allocated_gib"] > 1.0
    runtime = result.metrics["train_runtime"]
    record("reference_4bit", steps=result.global_step, train_runtime_s=round(runtime, 2),
           samples_per_s=result.metrics["train_samples_per_second"], **result.memory)


def test_speed_profile_dequantizes_once_and_uses_varlen_attention(phi2_shape_dir, tmp_path):
    import bitsandbytes as bnb

    from phi2cli.training.engine import train

    keep = Keep()
    result = train(gpu_config(phi2_shape_dir, "speed", tmp_path), callbacks=[keep()])
    assert result.plan.profile == "speed" and result.plan.dequantize_base and not result.plan.gradient_checkpointing
    assert not any(isinstance(m, bnb.nn.Linear4bit) for m in keep.model.modules())
    assert keep.model.config._attn_implementation == "phi2_varlen"
    history = json.loads((result.output_dir / "checkpoint-4" / "trainer_state.json").read_text())["log_history"]
    assert all(math.isfinite(e["loss"]) for e in history if "loss" in e)
    record("speed_profile", **result.memory, train_runtime_s=round(result.metrics["train_runtime"], 2))


def test_memory_saver_compiles_4bit_layers_that_hold_bitsandbytes_codes_and_values(phi2_shape_dir, tmp_path):
    """The memory-saver on a GPU: NF4 layers in torch operations (bitsandbytes' codes, its dequantized
    values bit for bit), compiled, checkpointed; its losses stay near the eager 4-bit layers' (phi-2's
    residual dropout draws other masks in the compiled order, and bf16 rounding differs: measured up to
    0.04 apart at lr 0, against 11.35)."""
    import bitsandbytes as bnb

    from phi2cli.kernels.nf4 import NF4Linear, from_linear4bit
    from phi2cli.training.engine import train

    losses, models = {}, {}
    for name, compile_ in (("eager", False), ("compiled", True)):
        keep = Keep()
        config = gpu_config(phi2_shape_dir, "memory-saver", tmp_path / name, **{"train.compile": compile_})
        result = train(config, callbacks=[keep()])
        assert result.plan.gradient_checkpointing and result.plan.compile == compile_
        paths = json.loads((result.final_dir / "phi2_run.json").read_text())["fast_paths"]
        assert paths["torch_nf4"]["status"] == paths["compile"]["status"] == ("active" if compile_ else "off")
        history = json.loads((result.output_dir / "checkpoint-4" / "trainer_state.json").read_text())["log_history"]
        losses[name] = [e["loss"] for e in history if "loss" in e]
        models[name] = keep.model
        record(f"memory_saver_{name}", **result.memory, losses=losses[name],
               train_runtime_s=round(result.metrics["train_runtime"], 2))  # fmt: skip
    layers = [m for m in models["compiled"].modules() if isinstance(m, NF4Linear)]
    assert len(layers) == 32 * 6 and not any(isinstance(m, bnb.nn.Linear4bit) for m in models["compiled"].modules())
    four_bit = [m for m in models["eager"].modules() if isinstance(m, bnb.nn.Linear4bit)]
    for layer in four_bit[:6] + four_bit[-6:]:
        expected = bnb.functional.dequantize_4bit(layer.weight.data, layer.weight.quant_state)
        assert torch.equal(from_linear4bit(layer).dequantized(), expected)
    assert losses["compiled"] == pytest.approx(losses["eager"], rel=2e-2)


def test_fast_path_and_reference_path_give_the_same_loss(phi2_shape_dir):
    """One batch of 8 real examples: padded 4-bit HF loss vs packed, dequantized, varlen, selective-head loss."""

    from phi2cli.kernels import attention
    from phi2cli.data.collate import PackedCollator, PaddedCollator
    from phi2cli.config import DEFAULT_TEMPLATE, DataConfig, ModelConfig
    from phi2cli.models.loading import dequantize_base
    from phi2cli.models.loading import load_base_model, load_tokenizer, resolve_precision
    from phi2cli.data.prompts import PromptFormat, encode_example
    from phi2cli.data.sources import load_split
    from phi2cli.training.trainer import selective_causal_lm_loss

    tokenizer = load_tokenizer(str(phi2_shape_dir))
    rows = load_split(DataConfig(data_dir=str(ROOT / "examples/data/xsum-sample")), "validation").rows[:8]
    fmt = PromptFormat.create(DEFAULT_TEMPLATE, tokenizer)
    features = [vars(encode_example(fmt, tokenizer, r["document"], r["summary"], 1024)) for r in rows]
    model_cfg = ModelConfig(model=str(phi2_shape_dir))
    model = load_base_model(model_cfg, resolve_precision(model_cfg), for_training=True).eval()
    padded = {k: v.cuda() for k, v in PaddedCollator(tokenizer.pad_token_id)(features).items()}
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
        reference = model(**padded).loss.float().item()
        dequantize_base(model)
        assert attention.register(80)
        model.set_attn_implementation(attention.NAME)
        packed = {k: (v.cuda() if hasattr(v, "cuda") else v) for k, v in PackedCollator()(features).items()}
        fast, count = selective_causal_lm_loss(model, packed)
    assert count == sum(f["summary_tokens"] for f in features)
    record("fast_vs_reference_loss", reference=reference, fast=fast.item())
    assert fast.item() == pytest.approx(reference, rel=1e-2)


def test_fast_engine_with_lora_matches_the_reference_path(phi2_shape_dir):
    """Same batch, same (non-zero) LoRA weights, no dropout: the reference path (4-bit, PEFT's forward,
    fp16/bf16 autocast, padded, full logits) and the fast engine (dequantized bf16 without autocast,
    lean LoRA forward, tanh-GELU kernel, packed varlen, selective head) give the same
    loss and gradients."""
    from peft import LoraConfig, get_peft_model

    from phi2cli.kernels import attention

    from phi2cli.kernels import lora as lora_fast
    from phi2cli.data.collate import PackedCollator, PaddedCollator
    from phi2cli.config import DEFAULT_TEMPLATE, DataConfig, ModelConfig
    from phi2cli.models.loading import dequantize_base
    from phi2cli.models.loading import load_base_model, load_tokenizer, resolve_precision
    from phi2cli.data.prompts import PromptFormat, encode_example
    from phi2cli.data.sources import load_split
    from phi2cli.training.trainer import selective_causal_lm_loss

    tokenizer = load_tokenizer(str(phi2_shape_dir))
    rows = load_split(DataConfig(data_dir=str(ROOT / "examples/data/xsum-sample")), "validation").rows[8:16]
    fmt = PromptFormat.create(DEFAULT_TEMPLATE, tokenizer)
    features = [vars(encode_example(fmt, tokenizer, r["document"], r["summary"], 512)) for r in rows]
    model_cfg = ModelConfig(model=str(phi2_shape_dir))
    base = load_base_model(model_cfg, resolve_precision(model_cfg), for_training=True)
    torch.manual_seed(0)
    model = get_peft_model(base, LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, init_lora_weights=False,
                                            target_modules=["q_proj", "k_proj", "v_proj", "dense"]))  # fmt: skip
    lora = {n: p for n, p in model.named_parameters() if p.requires_grad}

    def grads():
        out = {n: p.grad.float().clone() for n, p in lora.items()}
        model.zero_grad(set_to_none=True)
        return out

    padded = {k: v.cuda() for k, v in PaddedCollator(tokenizer.pad_token_id)(features).items()}
    with torch.autocast("cuda", dtype=torch.bfloat16):
        reference = model(**padded).loss
    reference.backward()
    reference_grads = grads()

    dequantize_base(model)
    assert lora_fast.install(model) == 4 * 32 and lora_fast.fuse_gelu(model) == 32
    assert attention.register(80)
    model.set_attn_implementation(attention.NAME)
    packed = {k: (v.cuda() if hasattr(v, "cuda") else v) for k, v in PackedCollator(512)(features).items()}
    fast, _ = selective_causal_lm_loss(model, packed)
    fast.backward()
    fast_grads = grads()
    cosines = [torch.nn.functional.cosine_similarity(fast_grads[n].flatten(), reference_grads[n].flatten(), dim=0).item()
               for n in lora]  # fmt: skip
    norms = [fast_grads[n].norm().item() / reference_grads[n].norm().item() for n in lora]
    record("fast_engine_vs_reference_with_lora", reference=reference.item(), fast=fast.item(),
           min_grad_cosine=round(min(cosines), 4), grad_norm_ratio=(round(min(norms), 3), round(max(norms), 3)))
    assert fast.item() == pytest.approx(reference.item(), rel=1e-2)
    assert min(cosines) > 0.95 and 0.8 < min(norms) and max(norms) < 1.25
