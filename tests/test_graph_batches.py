"""Batches shaped for CUDA graphs: padding to fixed shapes leaves the loss, labels and token counts as they were.

(The graphs themselves need a GPU: tests/test_gpu_graphs.py.)
"""

from __future__ import annotations

import pytest
import torch

from phi2cli.data.collate import HOST_KEYS, PackedCollator, model_inputs, real_tokens, sequence_lengths
from phi2cli.config import Phi2Config, apply_overrides
from phi2cli.errors import ConfigError
from phi2cli.training.trainer_inputs import make_collator
from phi2cli.training.plan import resolve_plan
from phi2cli.data.prompts import IGNORE_INDEX


def features(lengths: list[int], summary: int = 5) -> list[dict]:
    out = []
    for n, length in enumerate(lengths):
        ids = [(7 * n + i) % 300 + 1 for i in range(length)]
        labels = [IGNORE_INDEX] * (length - summary) + ids[length - summary :]
        out.append({"input_ids": ids, "labels": labels})
    return out


def test_padded_batch_ends_in_one_pad_sequence_of_ignored_labels():
    batch = PackedCollator(64, pad_multiple=32, label_multiple=16)(features([20, 30, 9]))
    assert batch["input_ids"].shape == (1, 64)  # 59 real tokens + at least one pad token, rounded up to 32
    assert batch["cu_seq_lens_q"].tolist() == [0, 20, 50, 59, 64]
    assert batch["position_ids"][0, 59:].tolist() == [0, 1, 2, 3, 4]
    assert (batch["labels"][0, 59:] == IGNORE_INDEX).all()
    assert batch["example_lengths"] == (20, 30, 9) and real_tokens(batch) == 59
    assert sequence_lengths(batch) == [20, 30, 9]
    cols = batch["label_positions"]
    assert cols.shape == (16,)  # 3 x 5 labels, the first label of each example is dropped... padded to 16
    real = [c for c in cols.tolist() if c != 62]
    assert len(real) == 3 * 5 and all(batch["labels"][0, c + 1] != IGNORE_INDEX for c in real)
    assert batch["labels"][0, 63] == IGNORE_INDEX  # the pad position's target is ignored


def test_a_batch_that_fills_its_multiple_exactly_still_gets_a_pad_token():
    batch = PackedCollator(64, pad_multiple=32)(features([32, 32]))
    assert batch["input_ids"].shape == (1, 96) and batch["cu_seq_lens_q"].tolist() == [0, 32, 64, 96]
    unpadded = PackedCollator(64)(features([32, 32]))
    assert unpadded["input_ids"].shape == (1, 64) and unpadded["cu_seq_lens_q"].tolist() == [0, 32, 64]


def test_pad_sequence_is_never_longer_than_the_attention_bound():
    with pytest.raises(ValueError, match="pad_multiple cannot exceed max_length"):
        PackedCollator(64, pad_multiple=128)


def test_host_entries_never_reach_the_model():
    batch = PackedCollator(64)(features([10, 12]))
    assert set(HOST_KEYS) <= set(batch) and not set(HOST_KEYS) & set(model_inputs(batch))


def test_padding_for_graphs_leaves_the_loss_and_its_gradient_unchanged(tiny_phi_dir):
    """Same examples, packed as they are and padded to fixed shapes: same loss, same LoRA gradients."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from phi2cli.training.trainer import selective_causal_lm_loss

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(str(tiny_phi_dir), dtype=torch.float32)
    model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, init_lora_weights=False,
                                             target_modules=["q_proj", "k_proj", "v_proj", "dense"]))  # fmt: skip
    rows = features([40, 57, 23, 61], summary=9)
    results = []
    for collate in (PackedCollator(64), PackedCollator(64, pad_multiple=64, label_multiple=32)):
        batch = collate(rows)
        count = sum(1 for row in rows for label in row["labels"][1:] if label != IGNORE_INDEX)
        loss, _ = selective_causal_lm_loss(model, dict(batch), num_items=count)
        loss.backward()
        grads = torch.cat([p.grad.flatten() for p in model.parameters() if p.requires_grad])
        model.zero_grad(set_to_none=True)
        results.append((loss.item(), grads, batch["input_ids"].shape[1]))
    (plain, plain_grads, plain_width), (padded, padded_grads, padded_width) = results
    assert (plain_width, padded_width) == (181, 192)
    assert padded == pytest.approx(plain, rel=1e-5)
    assert torch.allclose(padded_grads, plain_grads, rtol=1e-4, atol=1e-6)


def test_cuda_graphs_are_planned_for_the_bf16_speed_profile_on_cuda_only():
    config = Phi2Config()
    assert config.train.cuda_graphs
    plan = resolve_plan(config, cuda=True, quantized=True, free_gib=140.0)
    assert plan.profile == "speed" and plan.cuda_graphs
    assert not resolve_plan(config, cuda=True, quantized=True, free_gib=140.0, bf16=False).cuda_graphs  # fp16 scaler
    assert not resolve_plan(config, cuda=False, quantized=False, free_gib=None).cuda_graphs
    off = apply_overrides(config, {"train.cuda_graphs": False})
    assert not resolve_plan(off, cuda=True, quantized=True, free_gib=140.0).cuda_graphs
    for profile in ("memory-saver", "reference"):
        other = apply_overrides(config, {"train.profile": profile})
        assert not resolve_plan(other, cuda=True, quantized=True, free_gib=140.0).cuda_graphs


def test_the_speed_profile_compiles_only_runs_long_enough_for_it_to_pay():
    config = Phi2Config()  # 5,000 examples, 8 per step: 625 steps
    short = resolve_plan(config, cuda=True, quantized=True, free_gib=140.0)
    assert short.profile == "speed" and not short.compile
    assert short.uncompiled_reason == ("not compiled: a 625-step run finishes sooner without (compiling pays "
                                       "from 1,900 steps; --compile compiles anyway)")  # fmt: skip
    long_run = apply_overrides(config, {"train.max_steps": 1900})
    assert resolve_plan(long_run, cuda=True, quantized=True, free_gib=140.0).compile
    every = apply_overrides(config, {"train.compile_from_steps": 0})
    plan = resolve_plan(every, cuda=True, quantized=True, free_gib=140.0)
    assert plan.compile and plan.uncompiled_reason is None
    saver = apply_overrides(config, {"train.profile": "memory-saver"})  # compiling pays within a few hundred steps
    assert resolve_plan(saver, cuda=True, quantized=True, free_gib=140.0).compile
    low_memory = resolve_plan(config, cuda=True, quantized=True, free_gib=12.0)  # auto falls back to the memory-saver
    assert low_memory.profile == "memory-saver" and low_memory.compile
    off = apply_overrides(long_run, {"train.compile": False})
    plan = resolve_plan(off, cuda=True, quantized=True, free_gib=140.0)
    assert not plan.compile and plan.uncompiled_reason is None  # the user's choice needs no reason
    assert not resolve_plan(long_run, cuda=False, quantized=False, free_gib=None).compile


def test_graphed_runs_get_a_padding_collator_and_others_do_not():
    config = apply_overrides(Phi2Config(), {"data.max_length": 96})
    graphed = resolve_plan(config, cuda=True, quantized=True, free_gib=140.0)
    collate = make_collator(config, graphed, tokenizer=None)
    assert (collate.max_length, collate.pad_multiple) == (96, 96)  # the pad sequence fits the attention bound
    eager = resolve_plan(apply_overrides(config, {"train.cuda_graphs": False}), cuda=True, quantized=True,
                         free_gib=140.0)  # fmt: skip
    assert make_collator(config, eager, tokenizer=None).pad_multiple is None


def test_cuda_graphs_step_aside_when_their_memory_pool_would_not_fit():
    from phi2cli.training.plan import speed_memory_gib

    config = Phi2Config()  # 8 examples x 1024 tokens
    eager_need, graph_need = speed_memory_gib(8, 1024), speed_memory_gib(8, 1024, graphs=True)
    assert eager_need < graph_need
    between = resolve_plan(config, cuda=True, quantized=True, free_gib=(eager_need + graph_need) / 2)
    assert between.profile == "speed" and not between.cuda_graphs and "CUDA graphs need" in between.note
    roomy = resolve_plan(config, cuda=True, quantized=True, free_gib=graph_need + 1)
    assert roomy.cuda_graphs and roomy.note is None
    two = resolve_plan(config, cuda=True, quantized=True, free_gib=(eager_need + graph_need) / 2, world_size=2)
    assert two.cuda_graphs  # 4 examples per GPU need half the pool


def test_steady_rate_starts_after_the_last_new_recording(monkeypatch):
    """The meter's steady-state figure: tokens and time from the last log after which no process
    recorded a new CUDA graph; the train command prints it with the recording cost."""
    from types import SimpleNamespace

    from phi2cli.cli.train import throughput_lines
    from phi2cli.training.trainer import ThroughputMeter

    clock = {"now": 0.0}
    monkeypatch.setattr("phi2cli.training.trainer.time.perf_counter", lambda: clock["now"])
    tokens, recorded = {"n": 0}, {"n": 0}
    meter = ThroughputMeter(lambda: tokens["n"], skip=2, recordings=lambda: recorded["n"])
    state = SimpleNamespace(global_step=0)
    meter.on_train_begin(None, state, None)
    for step in range(1, 21):
        clock["now"] += 1.0 if step in (1, 7) else 0.1  # steps 1 and 7 record a new shape (slow)
        tokens["n"] += 1000
        recorded["n"] += step in (1, 7)
        state.global_step = step
        meter.on_step_end(None, state, None)
        if step % 5 == 0:
            meter.on_log(None, state, None, logs={"loss": 1.0})
    state.max_steps = 20
    meter.on_train_end(SimpleNamespace(device="cpu"), state, None)
    result = meter.result
    assert result["steady_from_step"] == 10  # the first log after step 7's recording
    assert result["steady_tokens_per_s"] == pytest.approx(10_000 / 1.0)  # 10 steps x 1000 tokens in 1 s
    assert result["tokens_per_s"] == pytest.approx(18_000 / 2.7, abs=0.1)  # steps 3-20 include step 7 (rounded)
    lines = throughput_lines({**result, "cuda_graphs": {"recordings": 2, "record_seconds": 1.9,
                                                        "replays_of_a_longer_shape": 5}})  # fmt: skip
    assert lines[1] == "Steady state: 10,000 real tokens/s from step 10 on (0.100 s per step)"
    assert lines[2].startswith("CUDA graphs: 2 batch shapes recorded in 1.9 s")
    assert throughput_lines({"cuda_graphs": {"recordings": 1, "record_seconds": 20.0,
                                             "replays_of_a_longer_shape": 0}})[0].startswith("CUDA graphs")  # fmt: skip


def test_recorded_shapes_are_coarse_for_short_runs_and_fine_for_long_ones():
    from phi2cli.training.plan import graph_bucket_tokens, planned_steps

    assert graph_bucket_tokens(40, 512) == 512  # a short benchmark: few recordings
    assert graph_bucket_tokens(625, 512) == 512  # the seed job
    assert graph_bucket_tokens(2_000, 512) == 256
    assert graph_bucket_tokens(25_500, 512) == 128  # a full XSUM epoch: little padding
    assert graph_bucket_tokens(40, 300) == 256 and graph_bucket_tokens(40, 200) == 128  # within max_length
    assert graph_bucket_tokens(40, 512, chosen=128) == 128 and graph_bucket_tokens(25_500, 512, chosen=64) == 64
    config = apply_overrides(Phi2Config(), {"data.samples": 1495, "train.epochs": 2.0})
    assert planned_steps(config, 8) == 374  # SmolLM2's recipe
    assert planned_steps(apply_overrides(config, {"train.max_steps": 625}), 8) == 625
    plan = resolve_plan(apply_overrides(config, {"train.max_steps": 625}), cuda=True, quantized=True, free_gib=140.0)
    assert plan.graph_bucket == 512
    pinned = apply_overrides(config, {"train.max_steps": 625, "train.graph_bucket": 128})
    assert resolve_plan(pinned, cuda=True, quantized=True, free_gib=140.0).graph_bucket == 128
    with pytest.raises(ConfigError, match="--graph-bucket must be 0"):
        apply_overrides(config, {"train.graph_bucket": 100}).validate()


def test_a_new_shape_is_recorded_rounded_up_to_its_bucket_with_the_same_loss_and_gradient(tiny_phi_dir):
    """The padded copy a recording is made from: longer row and label list, same loss and LoRA gradients."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from phi2cli.kernels.graphs import GraphedTrainStep
    from phi2cli.training.trainer import selective_causal_lm_loss

    step = GraphedTrainStep.__new__(GraphedTrainStep)  # bucketing needs no GPU; recording does
    step.bucket = 256
    rows = features([40, 57, 23, 61], summary=9)  # 181 real tokens
    batch = PackedCollator(256, pad_multiple=64, label_multiple=32)(rows)
    key = GraphedTrainStep.key(batch)
    assert key == (192, 64, 6, 256)  # 4 x 9 labels, to a multiple of 32
    bucket_key, padded = step.bucketed(key, batch, real_tokens=181)
    assert bucket_key == (256, 256, 6, 256)
    assert padded["input_ids"].shape == (1, 256) and padded["label_positions"].shape == (256,)
    assert padded["cu_seq_lens_q"].tolist()[-1] == 256 and (padded["labels"][0, 181:] == IGNORE_INDEX).all()
    assert step.bucketed(key, batch, real_tokens=None) == (key, batch)  # unknown real length: as it is
    same_bucket = PackedCollator(256, pad_multiple=64, label_multiple=32)(features([40, 57, 23, 50], summary=9))
    assert step.bucket_key(GraphedTrainStep.key(same_bucket), 170) == bucket_key  # replays that recording
    narrow = GraphedTrainStep.__new__(GraphedTrainStep)
    narrow.bucket = 512
    short = PackedCollator(64, pad_multiple=64, label_multiple=32)(rows)
    assert narrow.bucketed(GraphedTrainStep.key(short), short, 181)[0][0] == 192  # pad would exceed the bound

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(str(tiny_phi_dir), dtype=torch.float32)
    model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, init_lora_weights=False,
                                             target_modules=["q_proj", "k_proj", "v_proj", "dense"]))  # fmt: skip
    results = []
    for inputs in (batch, {**padded, "cu_seq_lens_k": padded["cu_seq_lens_q"]}):
        loss, _ = selective_causal_lm_loss(model, model_inputs(dict(inputs)), num_items=4 * 9)
        loss.backward()
        results.append((loss.item(), torch.cat([p.grad.flatten() for p in model.parameters() if p.requires_grad])))
        model.zero_grad(set_to_none=True)
    assert results[1][0] == pytest.approx(results[0][0], rel=1e-5)
    assert torch.allclose(results[1][1], results[0][1], rtol=1e-4, atol=1e-6)


def test_evaluation_batches_are_larger_on_the_speed_profile_unless_the_user_chose():
    from types import SimpleNamespace

    from phi2cli.training.plan import EVAL_BATCH, SPEED_EVAL_BATCH
    from phi2cli.training.trainer_inputs import training_arguments

    config = Phi2Config()
    speed = resolve_plan(config, cuda=True, quantized=True, free_gib=140.0)
    saver = resolve_plan(config, cuda=True, quantized=True, free_gib=4.0)
    reference = resolve_plan(apply_overrides(config, {"train.profile": "reference"}), cuda=True, quantized=True,
                             free_gib=140.0)  # fmt: skip
    assert (speed.profile, saver.profile) == ("speed", "memory-saver")
    assert (speed.eval_batch, saver.eval_batch, reference.eval_batch) == (SPEED_EVAL_BATCH, EVAL_BATCH, EVAL_BATCH)
    chosen = resolve_plan(apply_overrides(config, {"train.eval_batch_size": 16}), cuda=True, quantized=True,
                          free_gib=140.0)  # fmt: skip
    assert chosen.eval_batch == 16
    cpu = SimpleNamespace(device="cpu", compute_dtype="float32")
    args = training_arguments(apply_overrides(config, {"train.output_dir": "out"}), speed, cpu, has_eval=True)
    assert args.per_device_eval_batch_size == SPEED_EVAL_BATCH
    with pytest.raises(ConfigError, match="--eval-batch-size must be 0"):
        apply_overrides(config, {"train.eval_batch_size": -1}).validate()
