"""A diverged run (NaN/inf loss) stops, keeps its last good checkpoint and saves no adapter; the live display
shows the run's warnings before it starts and each logged step's own loss."""

from __future__ import annotations

import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from transformers import TrainerCallback

from phi2cli.config import Phi2Config, apply_overrides
from phi2cli.errors import RunError
from phi2cli.training.engine import train
from phi2cli.training.guards import StopOnNonFiniteLoss


def control(**flags):
    names = ("should_log", "should_save", "should_evaluate", "should_training_stop")
    return SimpleNamespace(**{name: flags.get(name, False) for name in names})


def test_a_nan_loss_is_read_only_at_steps_that_log_or_save_and_cancels_their_save():
    reads = []
    count = torch.tensor(0)

    def non_finite():
        reads.append(1)
        return count

    guard = StopOnNonFiniteLoss(non_finite)
    args = SimpleNamespace(save_steps=5, device="cpu")
    quiet = control()
    guard.on_step_end(args, SimpleNamespace(global_step=3, max_steps=10), quiet)
    assert reads == [] and not quiet.should_training_stop  # no GPU wait at plain steps
    count = torch.tensor(1)
    state = SimpleNamespace(global_step=5, max_steps=10)
    saving = control(should_save=True, should_evaluate=True)
    guard.on_step_end(args, state, saving)
    assert (saving.should_save, saving.should_evaluate, saving.should_training_stop) == (False, False, True)
    assert guard.stopped_at == 5 and guard.what == "the training loss"


@pytest.mark.parametrize("key, what", [("grad_norm", "the gradient norm"), ("eval_loss", "the eval loss"),
                                       ("loss", "the training loss")])  # fmt: skip
def test_a_logged_nan_or_inf_stops_the_run(key, what):
    guard = StopOnNonFiniteLoss(lambda: None)
    fine = control(should_save=True)
    guard.on_log(None, SimpleNamespace(global_step=5), fine, {key: 2.5, "epoch": 0.5})
    assert guard.stopped_at is None and fine.should_save
    bad = control(should_save=True)
    guard.on_log(None, SimpleNamespace(global_step=6), bad, {key: math.inf if key == "loss" else math.nan})
    assert guard.stopped_at == 6 and guard.what == what and not bad.should_save and bad.should_training_stop


class History(TrainerCallback):
    def on_train_end(self, args, state, control, **kwargs):
        self.log_history = list(state.log_history)


def test_lr_1e6_stops_with_the_last_good_checkpoint_and_no_adapter(tiny_phi_dir, sample_data_dir):
    """Warm-up keeps steps 1-2 sane (lr 0, then 5e5 applied after step 2's eval); step 3's eval loss is NaN."""
    config = apply_overrides(Phi2Config(), {
        "model.model": str(tiny_phi_dir), "data.data_dir": str(sample_data_dir), "data.samples": 8,
        "data.val_samples": 4, "data.max_length": 160, "train.max_steps": 3, "train.eval_every": 1,
        "train.logging_steps": 1, "train.warmup_steps": 2, "train.learning_rate": 1e6,
    }).validate()  # fmt: skip
    events, history = [], History()
    with pytest.raises(RunError) as raised:
        train(config, display=lambda event, info: events.append((event, dict(info))), callbacks=[history])
    assert str(raised.value) == (
        "training stopped at step 3: the eval loss became NaN or infinite; the last good checkpoint is "
        "phi2-xsum-finetuned/checkpoint-2 and no adapter was saved. Lower --lr (it was 1e+06) "
        "and start again with --overwrite")  # fmt: skip
    out = Path("phi2-xsum-finetuned")
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-1", "checkpoint-2"]
    assert not Path("phi2-xsum-final").exists()
    # the warning about this machine comes before training starts, not after it ends
    kinds = [event for event, _ in events]
    assert kinds.index("note") < kinds.index("begin")
    assert events[kinds.index("note")][1]["message"].startswith("no CUDA GPU")
    # each logged step shows its own loss and learning rate, the last one included
    logged = {e["step"]: e for e in history.log_history if "loss" in e}
    shown = {info["step"]: info for event, info in events if event == "step"}
    assert sorted(logged) == [1, 2, 3]
    for step, entry in logged.items():
        assert (shown[step]["loss"], shown[step]["learning_rate"]) == (entry["loss"], entry["learning_rate"])
