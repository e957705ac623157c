"""Multi-GPU launch arithmetic and command line (the GPU runs themselves are in benchmarks/multi_gpu.py)."""

from __future__ import annotations

import dataclasses
import sys

import pytest

from phi2cli.config import Phi2Config, apply_overrides
from phi2cli.errors import ConfigError
from phi2cli.training.launch import SAFE_NCCL_ENV, launch_command, strip_gpus_flag
from phi2cli.training.plan import resolve_plan, split_global_batch, speed_memory_gib


@pytest.mark.parametrize(
    "total, world, micro_wanted, expected",
    [(8, 1, 1, (1, 8)), (8, 2, 1, (1, 4)), (8, 4, 1, (1, 2)), (8, 8, 1, (1, 1)), (8, 1, 8, (8, 1)),
     (8, 2, 8, (4, 1)), (32, 2, 32, (16, 1)), (24, 2, 5, (4, 3)), (8, 2, 3, (2, 2))],
)  # fmt: skip
def test_global_batch_is_split_over_gpus(total, world, micro_wanted, expected):
    micro, accum = split_global_batch(total, world, micro_wanted)
    assert (micro, accum) == expected
    assert micro * accum * world == total


def test_a_global_batch_that_does_not_divide_is_refused():
    with pytest.raises(ConfigError, match="8 examples per step cannot be split over 3 GPUs"):
        split_global_batch(8, 3, 1)


@pytest.mark.parametrize("profile, world, expected", [
    ("reference", 1, (1, 8)), ("reference", 2, (1, 4)), ("speed", 1, (8, 1)), ("speed", 2, (4, 1)),
    ("memory-saver", 4, (2, 1)),
])  # fmt: skip
def test_every_profile_keeps_eight_examples_per_step(profile, world, expected):
    config = apply_overrides(Phi2Config(), {"train.profile": profile})
    plan = resolve_plan(config, cuda=True, quantized=True, free_gib=140.0, world_size=world)
    assert (plan.micro_batch, plan.grad_accum) == expected
    assert plan.examples_per_step == 8 and plan.world_size == world


@pytest.mark.parametrize("profile, world, per_gpu, expected", [
    ("speed", 1, 8, (8, 1, 8)), ("speed", 2, 8, (8, 1, 16)), ("speed", 4, 8, (8, 1, 32)),
    ("speed", 4, 2, (2, 1, 8)), ("reference", 2, 8, (1, 8, 16)), ("memory-saver", 2, 4, (4, 1, 8)),
])  # fmt: skip
def test_per_gpu_batch_keeps_each_gpus_batch_and_scales_the_learning_rate_by_the_square_root(
        profile, world, per_gpu, expected):  # fmt: skip
    config = apply_overrides(Phi2Config(), {"train.profile": profile, "train.per_gpu_batch": per_gpu})
    plan = resolve_plan(config, cuda=True, quantized=True, free_gib=140.0, world_size=world)
    assert (plan.micro_batch, plan.grad_accum, plan.examples_per_step) == expected
    assert plan.scaling == "weak"
    assert plan.lr_scale == pytest.approx((expected[2] / 8) ** 0.5, rel=1e-6)  # the recipe's global batch is 8
    strong = resolve_plan(apply_overrides(Phi2Config(), {"train.profile": profile}), cuda=True, quantized=True,
                          free_gib=140.0, world_size=world)  # fmt: skip
    assert (strong.scaling, strong.lr_scale, strong.examples_per_step) == ("strong", 1.0, 8)


def test_per_gpu_batch_learning_rate_reaches_the_trainer():
    from phi2cli.models.loading import resolve_precision
    from phi2cli.training.trainer_inputs import training_arguments

    config = apply_overrides(Phi2Config(), {"train.per_gpu_batch": 16, "train.learning_rate": 1e-4,
                                            "model.quantization": "none"})  # fmt: skip
    plan = resolve_plan(config, cuda=False, quantized=False, free_gib=None, world_size=2)
    args = training_arguments(config, plan, resolve_precision(config.model), has_eval=False)
    assert args.learning_rate == pytest.approx(1e-4 * 2.0)  # global 32 = 4 x the recipe's 8: x sqrt(4)
    assert (args.per_device_train_batch_size, args.gradient_accumulation_steps) == (16, 1)


def test_auto_profile_follows_free_memory():
    config = Phi2Config()
    assert resolve_plan(config, cuda=True, quantized=True, free_gib=140.0).profile == "speed"
    small = resolve_plan(config, cuda=True, quantized=True, free_gib=7.5)
    assert small.profile == "memory-saver" and small.gradient_checkpointing and not small.dequantize_base
    assert "7.5 GiB free" in small.note
    assert resolve_plan(config, cuda=False, quantized=False, free_gib=None).optimizer == "adamw_torch"
    assert speed_memory_gib(8, 1024) == pytest.approx(6.5 + 0.0052 * 8 * 1024)


@pytest.mark.parametrize("profile", ["speed", "memory-saver"])
def test_fast_profiles_drop_autocast_only_for_bf16_and_flatten_only_8bit_adamw(profile):
    config = apply_overrides(Phi2Config(), {"train.profile": profile, "train.compile_from_steps": 0})
    plan = resolve_plan(config, cuda=True, quantized=True, free_gib=140.0)
    assert (plan.autocast, plan.fused_kernels, plan.flat_optimizer) == (False, True, True)
    eager = resolve_plan(apply_overrides(config, {"train.compile": False}), cuda=True, quantized=True, free_gib=140.0)
    # --no-compile changes nothing else (the memory-saver's NF4 layers in torch serve compiling only)
    assert dataclasses.replace(eager, compile=plan.compile, torch_nf4=plan.torch_nf4) == plan
    assert plan.compile and not eager.compile and plan.torch_nf4 == (profile == "memory-saver") and not eager.torch_nf4
    fp16 = resolve_plan(config, cuda=True, quantized=True, free_gib=140.0, bf16=False)
    assert fp16.autocast and fp16.fused_kernels  # fp16 keeps autocast and its loss scaling
    torch_adam = resolve_plan(apply_overrides(config, {"train.optimizer": "adamw_torch"}), cuda=True,
                              quantized=True, free_gib=140.0)  # fmt: skip
    assert not torch_adam.flat_optimizer
    assert not resolve_plan(config, cuda=False, quantized=False, free_gib=None).flat_optimizer
    reference = resolve_plan(apply_overrides(config, {"train.profile": "reference"}), cuda=True, quantized=True,
                             free_gib=140.0)  # fmt: skip
    assert (reference.autocast, reference.fused_kernels, reference.flat_optimizer) == (True, False, False)


def test_memory_saver_compiles_only_a_4bit_base_on_cuda():
    config = apply_overrides(Phi2Config(), {"train.profile": "memory-saver"})
    for cuda, quantized in ((True, False), (False, True), (False, False)):
        plan = resolve_plan(config, cuda=cuda, quantized=quantized, free_gib=140.0 if cuda else None)
        assert (plan.compile, plan.torch_nf4, plan.cuda_graphs) == (False, False, False), (cuda, quantized)
    plan = resolve_plan(config, cuda=True, quantized=True, free_gib=140.0)
    assert (plan.compile, plan.torch_nf4, plan.cuda_graphs, plan.gradient_checkpointing) == (True, True, False, True)


def test_gpus_flag_is_taken_out_and_the_rest_forwarded():
    argv = ["train", "--samples", "5000", "--gpus", "2", "--lr", "1e-4", "--gpus=4", "--profile", "speed"]
    assert strip_gpus_flag(argv) == ["train", "--samples", "5000", "--lr", "1e-4", "--profile", "speed"]


def test_launch_command_runs_one_process_per_gpu_under_accelerate():
    command = launch_command(2, ["train", "--samples", "100"], main_port=29555)
    assert command[:3] == [sys.executable, "-m", "accelerate.commands.launch"]
    assert command[command.index("--num_processes") + 1] == "2" and "--multi_gpu" in command
    assert command[command.index("--main_process_port") + 1] == "29555"
    assert command[-5:] == ["-m", "phi2cli", "train", "--samples", "100"]
    assert SAFE_NCCL_ENV["NCCL_NVLS_ENABLE"] == "0"
    with pytest.raises(ConfigError, match="--gpus must be 2 or more"):
        launch_command(1, ["train"])


@pytest.mark.parametrize("visible", [0, 1, 3])
def test_more_gpus_than_the_machine_has_is_a_one_line_error(monkeypatch, visible):
    """The machine's own GPU count does not matter: it is set here, and no process is ever started."""
    import subprocess

    import torch
    from typer.testing import CliRunner

    from phi2cli.cli import app

    monkeypatch.setattr(torch.cuda, "device_count", lambda: visible)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.delenv("LOCAL_RANK", raising=False)

    def no_launch(*args, **kwargs):
        raise AssertionError("a training run was started")

    monkeypatch.setattr(subprocess, "call", no_launch)
    wanted = max(visible + 1, 2)
    result = CliRunner().invoke(app, ["train", "--gpus", str(wanted), "--samples", "8"])
    assert result.exit_code == 1
    assert f"--gpus {wanted} asks for more GPUs than this machine has ({visible})" in result.output
    assert len(result.output.strip().splitlines()) == 1 and "Traceback" not in result.output


@pytest.mark.slow
def test_two_processes_keep_eight_examples_per_step_and_only_rank_0_writes(tiny_phi_dir, sample_data_dir, tmp_path):
    """Real data-parallel training on the CPU (torchrun, gloo): the same files and, without dropout,
    the same losses as one process; an interrupted 2-process run resumes to the same losses."""
    import json
    import os
    import subprocess

    args = ["train", "--data-dir", str(sample_data_dir), "--model", str(tiny_phi_dir), "--samples", "32",
            "--val-samples", "8", "--max-steps", "4", "--eval-every", "2", "--max-length", "192",
            "--lora-dropout", "0", "--neftune-alpha", "0", "--logging-steps", "1"]  # fmt: skip (no random noise)
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}

    def launch(procs: int, cwd: Path, *extra: str) -> subprocess.CompletedProcess:
        command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(procs),
                   "--master_port", str(29600 + procs), "-m", "phi2cli", *args, *extra]  # fmt: skip
        done = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
        return done

    def losses(cwd: Path) -> dict[int, float]:
        state = json.loads((cwd / "phi2-xsum-finetuned" / "checkpoint-4" / "trainer_state.json").read_text())
        return {e["step"]: e["loss"] for e in state["log_history"] if "loss" in e}

    runs, curves = {}, {}
    for procs in (1, 2):
        cwd = tmp_path / f"p{procs}"
        cwd.mkdir()
        done = launch(procs, cwd)
        assert done.stdout.count("Adapter saved to") == 1  # one display, from the main process
        run = json.loads((cwd / "phi2-xsum-final" / "phi2_run.json").read_text())
        plan = run["plan"]
        assert plan["world_size"] == procs and plan["micro_batch"] * plan["grad_accum"] * procs == 8
        state = json.loads((cwd / "phi2-xsum-finetuned" / "checkpoint-4" / "trainer_state.json").read_text())
        assert state["log_history"][-1]["epoch"] == 1.0  # 4 steps x 8 examples = the 32 samples, once
        runs[procs] = sorted(str(p.relative_to(cwd)) for p in cwd.rglob("*") if p.is_file())
        curves[procs] = losses(cwd)
    normalise = [n.replace("rng_state_0.pth", "rng_state.pth") for n in runs[2] if "rng_state_1" not in n]
    assert sorted(normalise) == runs[1]
    assert sorted(curves[1]) == sorted(curves[2]) == [1, 2, 3, 4]
    for step in curves[1]:  # same examples at each step, split over 2 processes: same loss
        assert curves[2][step] == pytest.approx(curves[1][step], rel=1e-4), step

    resumed = tmp_path / "resumed"
    resumed.mkdir()
    launch(2, resumed, "--max-steps", "2", "--eval-every", "2")
    launch(2, resumed, "--resume")
    for step in (3, 4):
        assert losses(resumed)[step] == pytest.approx(curves[2][step], rel=1e-4), step


def test_each_step_is_dealt_to_the_processes_with_balanced_tokens():
    import random

    from phi2cli.training.trainer import BalancedShards

    rng = random.Random(0)
    lengths = [rng.choice([120, 300, 512, 512, 450, 200]) for _ in range(64)]
    base = list(range(64))
    rng.shuffle(base)
    sharded = list(BalancedShards(base, lengths, per_device=4, grad_accum=1, processes=2))
    assert sorted(sharded) == sorted(base)
    worst_naive = worst_balanced = 0
    for step in range(8):
        given, dealt = base[8 * step : 8 * step + 8], sharded[8 * step : 8 * step + 8]
        assert sorted(given) == sorted(dealt)  # the same examples at the same step as on one GPU
        loads = [sum(lengths[i] for i in dealt[:4]), sum(lengths[i] for i in dealt[4:])]
        naive = [sum(lengths[i] for i in given[:4]), sum(lengths[i] for i in given[4:])]
        worst_balanced = max(worst_balanced, abs(loads[0] - loads[1]))
        worst_naive = max(worst_naive, abs(naive[0] - naive[1]))
        assert abs(loads[0] - loads[1]) <= max(lengths)  # greedy: within one example of even
    assert worst_balanced < worst_naive


def test_balanced_order_interleaves_micro_batches_as_accelerate_deals_them():
    from phi2cli.training.trainer import BalancedShards

    lengths = [10, 80, 20, 70, 30, 60, 40, 50]
    order = list(BalancedShards(list(range(8)), lengths, per_device=2, grad_accum=2, processes=2))
    # micro-batch m goes to process m % 2: process 0 gets micro-batches 0 and 2, process 1 gets 1 and 3
    rank0 = order[0:2] + order[4:6]
    rank1 = order[2:4] + order[6:8]
    assert sum(lengths[i] for i in rank0) == sum(lengths[i] for i in rank1) == 180
    assert rank0 == sorted(rank0) and rank1 == sorted(rank1)  # each keeps the original order
    assert list(BalancedShards(list(range(8)), lengths, 8, 1, 1)) == list(range(8))  # one process: unchanged
    assert list(BalancedShards(list(range(10)), lengths + [1, 2], 2, 2, 2))[8:] == [8, 9]  # incomplete step


def test_several_processes_get_accelerates_shuffle_balanced(tiny_phi_dir, sample_data_dir, tmp_path, monkeypatch):
    """The Trainer's sampler under 2 processes: accelerate's seeded order, each step balanced."""
    from accelerate.data_loader import SeedableRandomSampler
    from transformers import TrainingArguments

    from phi2cli.data.prepare import load_prepared, prepare
    from phi2cli.models.loading import load_tokenizer
    from phi2cli.training.trainer import BalancedShards, Phi2Trainer

    config = apply_overrides(Phi2Config(), {"model.model": str(tiny_phi_dir), "data.data_dir": str(sample_data_dir),
                                            "data.samples": 32, "data.val_samples": 0, "data.max_length": 256})  # fmt: skip
    tokenizer = load_tokenizer(str(tiny_phi_dir))
    prepare(config, tokenizer, tmp_path / "prepared")
    train_set = load_prepared(tmp_path / "prepared")[0]["train"]
    args = TrainingArguments(output_dir=str(tmp_path / "out"), per_device_train_batch_size=4, data_seed=7,
                             use_cpu=True, report_to=[])  # fmt: skip
    trainer = Phi2Trainer.__new__(Phi2Trainer)  # only the sampler is needed, not a model
    trainer.args, trainer.train_dataset = args, train_set
    monkeypatch.setattr(type(args), "world_size", property(lambda self: 2))
    sampler = trainer._get_train_sampler()
    assert isinstance(sampler, BalancedShards) and sampler.processes == 2
    seeded = list(SeedableRandomSampler(data_source=train_set, data_seed=7))
    dealt = list(sampler)
    for step in range(4):
        assert sorted(dealt[8 * step : 8 * step + 8]) == sorted(seeded[8 * step : 8 * step + 8])
    monkeypatch.setattr(type(args), "world_size", property(lambda self: 1))
    assert not isinstance(trainer._get_train_sampler(), BalancedShards)


def _torchrun(procs: int, cwd: Path, args: list[str], port: int) -> None:
    import os
    import subprocess

    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(procs),
               "--master_port", str(port), "-m", "phi2cli", *args]  # fmt: skip
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PHI2_DDP_BACKEND": "gloo", "OMP_NUM_THREADS": "1"}
    done = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]


@pytest.mark.slow
@pytest.mark.parametrize("procs, per_gpu, steps_per_epoch", [(2, 8, 2), (4, 0, 4), (4, 2, 4), (4, 4, 2)])
def test_processes_take_the_batch_each_mode_says(tiny_phi_dir, sample_data_dir, tmp_path, procs, per_gpu,
                                                 steps_per_epoch):  # fmt: skip
    """Several processes on the CPU (torchrun, gloo): per-device batch, grad-accum and global batch of
    strong (--per-gpu-batch 0) and weak scaling, seen in the plan, the epoch the Trainer counts and
    the learning rate it logs. 32 samples: an epoch is 32 / global batch steps."""
    import json

    lr = 1e-3
    args = ["train", "--data-dir", str(sample_data_dir), "--model", str(tiny_phi_dir), "--samples", "32",
            "--val-samples", "8", "--max-steps", str(steps_per_epoch), "--eval-every", str(steps_per_epoch),
            "--max-length", "160",
            "--logging-steps", "1", "--warmup-steps", "0", "--lr-scheduler", "constant", "--lr", str(lr),
            "--per-gpu-batch", str(per_gpu)]  # fmt: skip
    _torchrun(procs, tmp_path, args, 29650 + procs + per_gpu)
    run = json.loads((tmp_path / "phi2-xsum-final" / "phi2_run.json").read_text())
    plan, global_batch = run["plan"], (per_gpu * procs if per_gpu else 8)
    assert plan["world_size"] == procs
    assert (plan["micro_batch"], plan["grad_accum"]) == ((per_gpu or 8 // procs), 1)
    assert plan["micro_batch"] * plan["grad_accum"] * procs == global_batch == 32 // steps_per_epoch
    assert plan["scaling"] == ("weak" if per_gpu else "strong")
    checkpoint = tmp_path / "phi2-xsum-finetuned" / f"checkpoint-{steps_per_epoch}" / "trainer_state.json"
    history = json.loads(checkpoint.read_text())["log_history"]
    assert [e["epoch"] for e in history if "loss" in e][-1] == 1.0  # every sample once, none twice
    logged_lr = [e["learning_rate"] for e in history if "loss" in e]
    assert logged_lr[0] == pytest.approx(lr * (global_batch / 8) ** 0.5, rel=1e-6)
    assert run["timing"]["train_steps_s"] > 0 and run["throughput"]["real_tokens"] > 0


@pytest.mark.slow
def test_a_weak_scaling_two_process_run_resumes_to_the_same_losses(tiny_phi_dir, sample_data_dir, tmp_path):
    import json

    args = ["train", "--data-dir", str(sample_data_dir), "--model", str(tiny_phi_dir), "--samples", "64",
            "--val-samples", "8", "--max-length", "160", "--eval-every", "2", "--logging-steps", "1",
            "--lora-dropout", "0", "--per-gpu-batch", "8"]  # fmt: skip
    args[args.index("--logging-steps") + 1] = "3"  # the log at step 3 averages steps 1-3 across the cut at 2

    def losses(cwd: Path) -> dict[int, float]:
        state = json.loads((cwd / "phi2-xsum-finetuned" / "checkpoint-4" / "trainer_state.json").read_text())
        return {e["step"]: e["loss"] for e in state["log_history"] if "loss" in e}

    whole, resumed = tmp_path / "whole", tmp_path / "resumed"
    whole.mkdir(), resumed.mkdir()
    _torchrun(2, whole, [*args, "--max-steps", "4"], 29671)
    first = losses(whole)
    assert 3 in first  # 64 samples / 16 per step; logged every 3
    _torchrun(2, resumed, [*args, "--max-steps", "2"], 29673)  # stops with checkpoint-2, then continues
    _torchrun(2, resumed, [*args, "--max-steps", "4", "--resume"], 29674)
    window = json.loads((resumed / "phi2-xsum-finetuned" / "checkpoint-2" / "log_window.json").read_text())
    assert len(window["loss_sums"]) == 2 and window["loss_sums"][0] != window["loss_sums"][1]  # each process's own
    assert not list(resumed.rglob("log_window_*.json"))  # one file on any number of processes
    for step in sorted(first):
        assert losses(resumed)[step] == pytest.approx(first[step], rel=1e-4), step
