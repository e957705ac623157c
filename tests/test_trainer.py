"""Phi2Trainer's per-step bookkeeping: the Trainer's values, from what was gathered at the first step."""

from __future__ import annotations

import pytest


@pytest.fixture
def lora_trainer(tiny_phi_dir, tmp_path):
    """A Phi2Trainer over the tiny Phi with LoRA adapters, built twice from the same seed: (trainer, model, twin)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, TrainingArguments

    from phi2cli.training.trainer import Phi2Trainer

    def build():
        torch.manual_seed(0)
        base = AutoModelForCausalLM.from_pretrained(str(tiny_phi_dir), dtype=torch.float32)
        model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                                init_lora_weights=False))  # fmt: skip
        for index, p in enumerate(q for q in model.parameters() if q.requires_grad):
            p.grad = torch.full_like(p, 0.01 * (index + 1))
        return model

    model, twin = build(), build()
    args = TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to=[], max_grad_norm=0.05)
    return Phi2Trainer(model=model, args=args), model, twin


def test_flop_estimate_is_the_trainers_with_the_parameter_count_taken_once(lora_trainer, monkeypatch):
    import torch
    from transformers import Trainer

    trainer, model, _ = lora_trainer
    batch = {"input_ids": torch.ones(1, 37, dtype=torch.long), "labels": torch.ones(1, 37, dtype=torch.long)}
    expected = Trainer.floating_point_ops(trainer, batch)

    assert trainer.floating_point_ops(batch) == expected > 0
    monkeypatch.setattr(type(model), "num_parameters", lambda *a, **k: pytest.fail("counted again"), raising=False)
    longer = {"input_ids": torch.ones(1, 74, dtype=torch.long)}
    assert trainer.floating_point_ops(longer) == 2 * expected
    assert trainer.floating_point_ops({"labels": batch["labels"]}) == 0  # no main input: the Trainer's 0


def test_clipping_gives_the_trainers_norm_and_gradients(lora_trainer, tmp_path):
    import torch
    from transformers import Trainer, TrainingArguments

    trainer, model, twin = lora_trainer
    reference = Trainer(model=twin, args=TrainingArguments(output_dir=str(tmp_path / "twin"), use_cpu=True,
                                                           report_to=[], max_grad_norm=0.05))  # fmt: skip

    norm = trainer._clip_grad_norm(model)
    expected = Trainer._clip_grad_norm(reference, twin)

    torch.testing.assert_close(norm, expected)
    assert float(norm) > 0.05  # the gradients were clipped, not left alone
    trained = [p.grad for p in model.parameters() if p.requires_grad]
    torch.testing.assert_close(trained, [p.grad for p in twin.parameters() if p.requires_grad])
    assert trainer._trainable is not None and len(trainer._trainable) == len(trained)
    model.zero_grad()  # the Trainer clears the gradients after each step; the listed parameters are the same objects
    assert all(p.grad is None for p in trainer._trainable)


def test_training_mode_is_switched_only_where_the_model_is_not_training(lora_trainer, monkeypatch):
    trainer, model, _ = lora_trainer
    switched = []
    original = type(model).train

    def counting_train(self, mode=True):
        switched.append(mode)
        return original(self, mode)

    monkeypatch.setattr(type(model), "train", counting_train)
    model.train()
    switched.clear()

    trainer._training_mode(model)
    assert switched == []
    model.eval()  # what an evaluation leaves behind
    trainer._training_mode(model)
    assert switched[-1] is True and model.training
    assert all(module.training for module in model.modules())


def test_neftune_scales_the_embeddings_found_at_the_first_step(lora_trainer, monkeypatch):
    import math

    trainer, model, _ = lora_trainer
    trainer.neftune_noise_alpha = 5.0
    unwrapped = []
    original = trainer.accelerator.unwrap_model
    monkeypatch.setattr(trainer.accelerator, "unwrap_model", lambda m: unwrapped.append(m) or original(m))

    trainer._scale_neftune(4)
    trainer._scale_neftune(9)

    assert len(unwrapped) == 1
    assert model.get_input_embeddings().neftune_noise_alpha == pytest.approx(5.0 * math.sqrt(9))


def test_host_overhead_benchmark_puts_back_exactly_the_trainers_bookkeeping(lora_trainer, monkeypatch):
    """benchmarks/host_overhead.py's "before" must be the Trainer's own per-step work, nothing else."""
    import importlib.util
    import sys

    from transformers import Trainer

    from conftest import ROOT
    from phi2cli.training.trainer import Phi2Trainer

    for name in ("floating_point_ops", "_clip_grad_norm", "_training_mode", "_scale_neftune"):
        monkeypatch.setattr(Phi2Trainer, name, getattr(Phi2Trainer, name))  # restored after the test
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    spec = importlib.util.spec_from_file_location("host_overhead", ROOT / "benchmarks" / "host_overhead.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    monkeypatch.setitem(sys.modules, "host_overhead", bench)

    bench.trainer_bookkeeping()
    trainer, model, _ = lora_trainer
    switched = []
    monkeypatch.setattr(type(model), "train", lambda self, mode=True: switched.append(mode) or self)
    trainer._training_mode(model)
    trainer._training_mode(model)
    unwrapped = []
    original = trainer.accelerator.unwrap_model
    monkeypatch.setattr(trainer.accelerator, "unwrap_model", lambda m: unwrapped.append(m) or original(m))
    trainer.neftune_noise_alpha = 5.0
    trainer._scale_neftune(4)
    trainer._scale_neftune(4)

    assert Phi2Trainer.floating_point_ops is Trainer.floating_point_ops
    assert Phi2Trainer._clip_grad_norm is Trainer._clip_grad_norm
    assert switched == [True, True] and len(unwrapped) == 2
