"""CUDA-graphed training steps on the GPU, phi-2's exact shape (random weights), real XSUM rows.

Run on the GPU machine: python -m pytest -m gpu -s tests/test_gpu_graphs.py
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
SAMPLE = ROOT / "examples/data/xsum-sample"


@pytest.fixture(scope="module")
def speed_model():
    """The speed profile's model (dequantized bf16 base, lean LoRA, varlen attention), eager layers,
    LoRA B non-zero so that every LoRA weight gets a gradient."""
    from phi2cli.config import Phi2Config, apply_overrides
    from phi2cli.training.engine import build_model
    from phi2cli.models.loading import resolve_precision
    from phi2cli.training.plan import resolve_plan

    config = apply_overrides(Phi2Config(), {"model.model": str(phi2_shape_model()), "lora.dropout": 0.0,
                                            "train.profile": "speed", "train.compile": False}).validate()  # fmt: skip
    precision = resolve_precision(config.model)
    plan = resolve_plan(config, cuda=True, quantized=True, free_gib=None)
    assert plan.cuda_graphs
    model = build_model(config, plan, precision)
    torch.manual_seed(1)
    for name, param in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(param, std=0.02)
    no_dropout(model)  # phi-2's residual dropout (0.1) would draw different masks in the two paths
    return model.train()


def no_dropout(model) -> None:
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0


def _batches(sizes: list[int], max_length: int = 512, shorter: bool = False) -> list[dict]:
    """Collated batches of real rows; `shorter` adds a copy of the first, its first article
    trimmed so that the batch is one pad multiple (128 tokens) shorter."""
    from phi2cli.data.collate import PackedCollator
    from phi2cli.config import DEFAULT_TEMPLATE, DataConfig
    from phi2cli.models.loading import load_tokenizer
    from phi2cli.data.prompts import PromptFormat, encode_example
    from phi2cli.data.sources import load_split

    tokenizer = load_tokenizer(str(phi2_shape_model()))
    rows = load_split(DataConfig(data_dir=str(SAMPLE)), "train").rows
    fmt = PromptFormat.create(DEFAULT_TEMPLATE, tokenizer)
    features = [vars(encode_example(fmt, tokenizer, r["document"], r["summary"], max_length)) for r in rows]
    collate = PackedCollator(max_length, pad_multiple=128, label_multiple=128)
    groups, start = [], 0
    for size in sizes:
        groups.append(features[start : start + size])
        start += size
    if shorter:
        first = groups[0]
        real = sum(len(f["input_ids"]) for f in first)
        width = -(-(real + 1) // 128) * 128
        trim = 128 - (width - real - 1) + 10  # lands in the previous multiple of 128
        groups.append([{"input_ids": first[0]["input_ids"][trim:], "labels": first[0]["labels"][trim:]}, *first[1:]])
    out = []
    for group in groups:
        batch = collate(group)
        out.append({k: (v.cuda() if isinstance(v, torch.Tensor) else v) for k, v in batch.items()})
    return out


def _eager(model, batch) -> tuple[float, torch.Tensor]:
    from phi2cli.training.trainer import selective_causal_lm_loss

    params = [p for p in model.parameters() if p.requires_grad]
    for p in params:
        p.grad = None
    count = (batch["labels"] != -100).sum()
    loss, _ = selective_causal_lm_loss(model, dict(batch), num_items=count)
    loss.backward()
    grads = torch.cat([p.grad.flatten().float() for p in params])
    for p in params:
        p.grad = None
    return loss.item(), grads


def test_graphed_step_gives_the_eager_loss_and_gradients(speed_model):
    from phi2cli.kernels.graphs import GraphedTrainStep

    first, second, other, shorter = _batches([8, 8, 5], shorter=True)
    assert GraphedTrainStep.key(first) != GraphedTrainStep.key(other)
    assert shorter["input_ids"].shape[1] == first["input_ids"].shape[1] - 128
    step = GraphedTrainStep(speed_model)
    results = []
    for batch in (first, second, first, other, shorter):
        for p in step.params:
            p.grad = None  # what the trainer's zero_grad does between steps
        graphed = step(batch, real_tokens=sum(batch["example_lengths"])).item()
        graphed_grads = step.grads.clone()
        eager, eager_grads = _eager(speed_model, batch)
        cosine = torch.nn.functional.cosine_similarity(graphed_grads, eager_grads, dim=0).item()
        ratio = (graphed_grads.norm() / eager_grads.norm()).item()
        results.append((graphed, eager, cosine, ratio))
    record("graphed_vs_eager_step", results=[tuple(round(v, 6) for v in r) for r in results],
           **step.summary())  # fmt: skip
    for graphed, eager, cosine, ratio in results:
        assert math.isfinite(graphed) and graphed == pytest.approx(eager, rel=2e-3)
        assert cosine > 0.999 and abs(ratio - 1) < 0.01
    # three shapes (two batches of 8 may share one); the repeated batch replays, it is not recorded
    # again, and the shorter batch replays the first one's recording with 128 more pad tokens
    assert len(step.recordings) == len({GraphedTrainStep.key(b) for b in (first, second, other)})
    assert GraphedTrainStep.key(shorter) not in step.recordings and step.reused >= 1
    assert results[0][0] == pytest.approx(results[2][0], rel=1e-4)


def test_graphed_step_accumulates_and_draws_new_dropout_masks(speed_model):
    from phi2cli.kernels.graphs import GraphedTrainStep

    (batch,) = _batches([8])
    step = GraphedTrainStep(speed_model)
    for p in step.params:
        p.grad = None
    step(batch)
    once = step.grads.clone()
    step(batch)  # a second micro-batch of the same step: added to .grad
    # the same values up to the attention backward's atomic (order-dependent) sums
    assert ((step.grads - 2 * once).norm() / (2 * once).norm()).item() < 1e-2
    assert all(p.grad.data_ptr() == v.data_ptr() for p, v in zip(step.params, step.views))

    for module in speed_model.modules():  # LoRA dropout on: every replay draws new masks
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.1
    try:
        step = GraphedTrainStep(speed_model)
        losses = [step(batch).item() for _ in range(3)]
    finally:
        for module in speed_model.modules():
            if isinstance(module, torch.nn.Dropout):
                module.p = 0.0
    record("graphed_dropout_losses", losses=losses)
    assert all(math.isfinite(v) for v in losses) and len(set(losses)) == 3


def test_graphed_step_draws_new_neftune_noise_on_each_replay(speed_model):
    """--neftune-alpha: the Trainer's embedding hook is recorded with the step; each replay draws new noise."""
    from transformers.integrations.neftune import activate_neftune, deactivate_neftune

    from phi2cli.kernels.graphs import GraphedTrainStep

    (batch,) = _batches([8])
    quiet = GraphedTrainStep(speed_model)
    plain = [quiet(batch).item() for _ in range(2)]
    handle = activate_neftune(speed_model, 5.0)
    try:
        step = GraphedTrainStep(speed_model)
        noisy = [step(batch).item() for _ in range(3)]
    finally:
        deactivate_neftune(speed_model, handle)
    record("graphed_neftune_losses", plain=plain, noisy=noisy)
    assert plain[0] == pytest.approx(plain[1], rel=1e-4)  # no dropout, no noise: replays agree
    assert all(math.isfinite(v) for v in noisy) and len(set(noisy)) == 3


def test_training_with_cuda_graphs_follows_the_eager_run(tmp_path):
    """The whole Trainer, compiled layers, 8 steps, dropout off (phi-2's residual dropout too): same
    losses with and without graphs."""
    from transformers import TrainerCallback

    from phi2cli.config import Phi2Config, apply_overrides
    from phi2cli.training.engine import train

    class NoDropout(TrainerCallback):
        def on_train_begin(self, args, state, control, model=None, **kwargs):
            no_dropout(model)

    histories, results = {}, {}
    for graphs in (True, False):
        name = "graphs" if graphs else "eager"
        config = apply_overrides(Phi2Config(), {
            "model.model": str(phi2_shape_model()), "data.data_dir": str(SAMPLE), "data.samples": 64,
            "data.val_samples": 8, "data.max_length": 512, "lora.dropout": 0.0, "train.max_steps": 8,
            "train.eval_every": 8, "train.logging_steps": 1, "train.profile": "speed", "train.cuda_graphs": graphs,
            "train.compile_from_steps": 0, "train.output_dir": str(tmp_path / name),
            "train.final_dir": str(tmp_path / f"{name}-final"),
        }).validate()  # fmt: skip
        results[name] = train(config, callbacks=[NoDropout()])
        state = json.loads((results[name].output_dir / "checkpoint-8" / "trainer_state.json").read_text())
        histories[name] = [e["loss"] for e in state["log_history"] if "loss" in e]
    graphed, eager = histories["graphs"], histories["eager"]
    record("trainer_graphs_vs_eager", graphs=graphed, eager=eager, graph_stats=results["graphs"].throughput)
    assert results["graphs"].plan.cuda_graphs and not results["eager"].plan.cuda_graphs
    assert results["graphs"].throughput["cuda_graphs"]["recordings"] >= 1, results["graphs"].notes
    assert len(graphed) == len(eager) == 8
    assert max(abs(a - b) for a, b in zip(graphed, eager)) < 0.02


def test_two_processes_with_cuda_graphs_learn_what_one_does(tmp_path):
    """Data-parallel training with CUDA graphs: the graphed backward, the all-reduce of the flat
    gradient buffer, the loss scale and the balanced shards. Two processes share this one GPU
    (gloo, since NCCL needs a GPU per process); the tiny model, no dropout: same losses as one."""
    import os
    import subprocess
    import sys

    sys.path.insert(0, str(ROOT / "examples"))
    from make_tiny_model import main as make_tiny

    model = tmp_path / "tiny"
    make_tiny(model)
    args = [sys.executable, "-m", "phi2cli", "train", "--data-dir", str(SAMPLE), "--model", str(model),
            "--samples", "64", "--val-samples", "8", "--max-steps", "8", "--eval-every", "8", "--max-length", "256",
            "--lora-dropout", "0", "--logging-steps", "1", "--profile", "speed"]  # fmt: skip
    curves, runs = {}, {}
    for procs in (1, 2):
        cwd = tmp_path / f"p{procs}"
        cwd.mkdir()
        env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(29700 + procs), "WORLD_SIZE": str(procs),
               "LOCAL_RANK": "0", "PHI2_DDP_BACKEND": "gloo", "HF_HUB_OFFLINE": "1"}  # fmt: skip
        if procs == 1:
            env = {k: v for k, v in env.items() if k not in ("WORLD_SIZE", "LOCAL_RANK", "PHI2_DDP_BACKEND")}
        started = [subprocess.Popen(args, cwd=cwd, env={**env, "RANK": str(rank)}, stdout=subprocess.PIPE,
                                    stderr=subprocess.STDOUT, text=True) for rank in range(procs)]  # fmt: skip
        outputs = [p.communicate(timeout=500)[0] for p in started]
        assert all(p.returncode == 0 for p in started), "\n".join(o[-3000:] for o in outputs)
        runs[procs] = json.loads((cwd / "phi2-xsum-final" / "phi2_run.json").read_text())
        state = json.loads((cwd / "phi2-xsum-finetuned" / "checkpoint-8" / "trainer_state.json").read_text())
        curves[procs] = {e["step"]: e["loss"] for e in state["log_history"] if "loss" in e}
    record("two_processes_with_graphs", one=curves[1], two=curves[2],
           graphs_1=runs[1]["throughput"].get("cuda_graphs"), graphs_2=runs[2]["throughput"].get("cuda_graphs"))
    assert runs[2]["plan"]["world_size"] == 2 and runs[2]["plan"]["cuda_graphs"]
    assert runs[2]["throughput"]["cuda_graphs"]["recordings"] >= 1
    assert sorted(curves[1]) == sorted(curves[2]) == list(range(1, 9))
    assert max(abs(curves[1][s] - curves[2][s]) for s in curves[1]) < 0.02
