"""What a training run returns: where its adapter is, what it measured and what it noted."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from phi2cli.training.plan import EnginePlan


@dataclass
class TrainResult:
    output_dir: Path
    final_dir: Path
    best_checkpoint: str | None
    best_metric: float | None
    global_step: int
    plan: EnginePlan
    metrics: dict[str, Any] = field(default_factory=dict)
    memory: dict[str, float] = field(default_factory=dict)
    throughput: dict[str, float] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    timing: dict[str, float] = field(default_factory=dict)
    already_finished: bool = False  # --resume of a run that had finished: nothing was changed
