"""benchmarks/step_floor.py on the CPU: which products and attention calls a step's floor counts, at which
shapes, the batches it draws from real rows, and what it reads out of end_to_end.json."""

from __future__ import annotations

import json

import pytest
import torch

from phi2cli.kernels import attention
from test_attention import stand_in_kernel
from test_bench_multi_gpu import load_benchmark


@pytest.fixture(scope="module")
def bench():
    return load_benchmark("step_floor")


def test_the_floor_times_every_product_and_attention_at_the_steps_shapes(bench, monkeypatch):
    monkeypatch.setattr(attention, "_kernel", lambda: stand_in_kernel)
    shape = bench.Shape(hidden=32, intermediate=128, layers=3, heads=4, vocab=100, rank=4)
    lengths, labelled = [5, 9, 3], 6
    outputs = []

    def timer(call):  # every timed call costs 1 ms and leaves the shape of what it made
        made = call()
        outputs.append(tuple(tuple(t.shape) for t in made) if isinstance(made, tuple) else tuple(made.shape))
        return 1.0

    found = bench.batch_floor(shape, lengths, labelled, "cpu", torch.float32, timer)
    tokens = 17
    forward = [(tokens, 96), (tokens, 32), (tokens, 128), (tokens, 32)]  # q/k/v fused, dense, fc1, fc2
    backward = [(tokens, 32), (tokens, 32), (tokens, 32), (tokens, 128)]  # each one's input gradient
    assert outputs[:8] == forward + backward
    # LoRA: the shared q/k/v down-projection, dense's, an up-projection; then the up weight's gradient,
    # the low-rank gradient, the down weight's gradient and the input's
    assert outputs[8:15] == [(tokens, 12), (tokens, 4), (tokens, 32), (32, 4), (tokens, 4), (4, 32), (tokens, 32)]
    assert len(outputs) == 19
    assert outputs[-4] == (tokens, 4, 8)  # attention forward
    assert outputs[-3] == ((tokens, 4, 8),) * 3  # its gradients for q, k, v
    assert outputs[-2:] == [(labelled, 100), (labelled, 32)]  # the head over labelled tokens, forward and back
    assert found["matmul_forward"] == found["matmul_backward"] == 4 * 3  # four products, three layers
    assert found["lora"] == (2 + 4 + 16) * 3
    assert found["attention_forward"] == 3 and found["attention_backward"] == 0  # 1 ms both ways less 1 ms forward
    assert found["head"] == 2
    assert found["total"] == 12 + 12 + 66 + 3 + 0 + 2


def test_kernel_ms_times_the_call_after_warm_up(bench):
    calls = []
    ms = bench.kernel_ms(lambda: calls.append(1), "cpu", repeat=4)
    assert len(calls) == 3 + 4 and ms >= 0


def test_step_batches_are_eight_real_rows_each(bench, xsum_dir, phi2_tokenizer_dir):
    batches = bench.step_batches(xsum_dir, 3, 512)
    assert len(batches) == 3
    for lengths, labelled in batches:
        assert len(lengths) == 8 and all(0 < n <= 512 for n in lengths)
        assert 8 <= labelled < sum(lengths)  # every example labels its summary and EOS, never its prompt
    assert bench.step_batches(xsum_dir, 3, 512) == batches  # one seeded draw
    longer = bench.step_batches(xsum_dir, 3, 1024)
    assert [n for _, n in longer] == [n for _, n in batches]  # the same rows: only articles are cut
    assert sum(map(sum, (l for l, _ in longer))) > sum(map(sum, (l for l, _ in batches)))
    with pytest.raises(SystemExit, match="steps of 8 examples"):
        bench.step_batches(xsum_dir, 10_000, 512)


def test_bounds_set_the_measured_rates_and_jobs_against_the_floor(bench):
    measured = {"trl_plain": {"tokens_per_s": 10_000.0}, "speed": {"tokens_per_s": 40_000.0},
                "reference_seed_job_s": 2_250.0,
                "seed_job_cold": {"wall_s": 100.0, "timing": {"train_steps_s": 80.0,
                                                              "train_steps_tokens_per_s": 30_000.0}}}  # fmt: skip
    found = bench.bounds(60_000.0, 30_000.0 * 80 / 40, measured)
    assert found["speed"] == {"measured_tokens_per_s": 40_000.0, "fraction_of_floor_rate": 0.667,
                              "trl_plain_tokens_per_s": 10_000.0, "floor_rate_over_trl_plain": 6.0,
                              "target_tokens_per_s": 50_000.0}  # fmt: skip
    assert found["seed_job"] == {"real_tokens": 2_400_000, "measured_steps_s": 80.0, "steps_s_at_floor": 40.0,
                                 "measured_rest_s": 20.0, "wall_s_with_steps_at_floor": 60.0,
                                 "target_s": 50.0}  # fmt: skip
    assert bench.bounds(60_000.0, 60_000.0, {}) == {}


def test_the_shape_is_phi2s_with_the_default_rank(bench):
    shape = bench.phi2_shape()
    assert (shape.hidden, shape.intermediate, shape.layers, shape.heads, shape.vocab, shape.rank) == (
        2560, 10240, 32, 32, 51200, 16)
    assert shape.head_dim == 80
    assert json.loads((bench.TOKENIZER_DIR / "config.json").read_text())["model_type"] == "phi"


@pytest.mark.parametrize("argv,message", [
    (["--batches", "0"], "--batches must be at least 1"),
    (["--data-dir", "/nonexistent"], "no train.jsonl in /nonexistent"),
    (["--end-to-end", "/nonexistent.json"], "--end-to-end /nonexistent.json: no such file"),
    (["--sustain", "-1"], "--sustain must be 0 or more seconds"),
])
def test_bad_arguments_end_in_one_line_and_exit_2(bench, capsys, xsum_dir, argv, message):
    with pytest.raises(SystemExit) as exited:
        bench.main(["--data-dir", str(xsum_dir), *argv])
    assert exited.value.code == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_the_whole_step_runs_each_floor_call_as_often_as_a_step_does(bench, monkeypatch):
    monkeypatch.setattr(attention, "_kernel", lambda: stand_in_kernel)
    shape = bench.Shape(hidden=32, intermediate=128, layers=3, heads=4, vocab=100, rank=4)
    calls = bench.floor_calls(shape, [5, 9, 3], 6, "cpu", torch.float32)
    ran: list[int] = []
    counted = [bench.FloorCall(kind, (lambda i=i: ran.append(i)), per_step) for i, (kind, _, per_step) in enumerate(calls)]
    bench.whole_step(counted, shape.layers)()
    times = [ran.count(i) for i in range(len(calls))]
    assert times == [per_step if kind != "attention_forward" else 0 for kind, _, per_step in calls]
    assert sum(times) == 3 * (8 + 2 + 4 + 16 + 1) + 2  # per layer: 8 frozen, 22 LoRA, attention once; the head
    first_layer = [i for i, (kind, _, per_step) in enumerate(calls) if kind not in ("head", "attention_forward")
                   for _ in range(per_step // 3)]  # fmt: skip
    assert ran[:len(first_layer)] == first_layer == ran[len(first_layer):2 * len(first_layer)]  # layer by layer
    assert ran[-2:] == [len(calls) - 2, len(calls) - 1]  # the head last
    assert bench.sustained(bench.whole_step(calls, shape.layers), "cpu", 1.0) is None  # no clock to lower off a GPU


def test_the_sustained_floor_scales_the_floor_by_the_loads_slowdown(bench, monkeypatch, tmp_path, xsum_dir):
    load = {"seconds": 2.0, "replays": 40, "first_ms": 1.0, "ms_by_second": [1.0, 1.25], "last_second_ms": 1.25,
            "clocks": ["1500 MHz, 1980 MHz, 690 W, 700 W, 60"]}  # fmt: skip
    monkeypatch.setattr(bench, "batch_floor", lambda *a, **k: {"matmul_forward": 0.5, "total": 1.0})
    monkeypatch.setattr(bench, "floor_calls", lambda *a, **k: [])
    monkeypatch.setattr(bench, "plain_matmul_tflops", lambda *a, **k: 1.0)
    monkeypatch.setattr(bench, "sustained", lambda step, device, seconds: dict(load, seconds=seconds))
    measured = tmp_path / "end_to_end.json"
    measured.write_text(json.dumps({"trl_plain": {"tokens_per_s": 1_000.0}, "speed": {"tokens_per_s": 2_000.0}}))
    out = tmp_path / "floor.json"
    bench.main(["--data-dir", str(xsum_dir), "--batches", "2", "--sustain", "2", "--end-to-end", str(measured),
                "--out", str(out)])  # fmt: skip
    found = json.loads(out.read_text())
    for floor in found["floors"].values():
        assert floor["sustained_load"]["slowdown"] == 1.25 and floor["sustained_load"]["floor_ms"] == 1.0
        assert floor["sustained_floor_tokens_per_s"] == round(floor["floor_tokens_per_s"] / 1.25, 1)
    speed = found["end_to_end"][0]
    assert speed["at_sustained_floor"]["speed"]["fraction_of_floor_rate"] == round(
        2_000.0 / found["floors"]["speed"]["sustained_floor_tokens_per_s"], 3)


def test_floors_from_an_earlier_run_are_set_against_later_results_without_timing(bench, monkeypatch, tmp_path,
                                                                                    capsys):  # fmt: skip
    monkeypatch.setattr(bench, "measure", lambda *a: pytest.fail("--floors-from times nothing"))
    earlier = tmp_path / "floor.json"
    earlier.write_text(json.dumps({"command": "python benchmarks/step_floor.py", "plain_matmul_tflops": 700.0,
                                   "floors": {name: {"max_length": n, "mean_tokens_per_step": 3000.0,
                                                     "floor_tokens_per_s": 50_000.0, "floor_ms_per_step": {"total": 60.0}}
                                              for name, n in (("speed", 512), ("seed_job", 1024))}}))  # fmt: skip
    later = tmp_path / "end_to_end.json"
    later.write_text(json.dumps({"trl_plain": {"tokens_per_s": 8_000.0}, "speed": {"tokens_per_s": 40_000.0}}))
    out = tmp_path / "again.json"
    bench.main(["--floors-from", str(earlier), "--end-to-end", str(later), "--out", str(out)])
    found = json.loads(out.read_text())
    assert found["command"] == "python benchmarks/step_floor.py"  # the timing run's command is kept
    assert found["set_against_by"].endswith(f"--out {out}")
    assert found["end_to_end"] == [{"file": str(later), "speed": {
        "measured_tokens_per_s": 40_000.0, "fraction_of_floor_rate": 0.8, "trl_plain_tokens_per_s": 8_000.0,
        "floor_rate_over_trl_plain": 6.25, "target_tokens_per_s": 40_000.0}}]  # fmt: skip
    assert "fraction_of_floor_rate 0.8" in capsys.readouterr().out
    with pytest.raises(SystemExit) as exited:
        bench.main(["--floors-from", str(later), "--end-to-end", str(later), "--out", str(out)])
    assert exited.value.code == 2 and "not a step_floor.py result" in capsys.readouterr().err
