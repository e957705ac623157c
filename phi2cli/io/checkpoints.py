"""How the Trainer names its checkpoint directories (checkpoint-N), in one place."""

from __future__ import annotations

import re
from pathlib import Path

CHECKPOINT_RE = re.compile(r"checkpoint-(\d+)$")  # match(): a directory name; search(): the end of a path


def checkpoint_step(name: str) -> int | None:
    """N for a name or path ending in checkpoint-N, else None."""
    found = CHECKPOINT_RE.search(name.rstrip("/\\"))
    return int(found.group(1)) if found else None


def checkpoints(output_dir: str | Path) -> list[Path]:
    """checkpoint-N directories, oldest first."""
    root = Path(output_dir)
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if p.is_dir() and (m := CHECKPOINT_RE.match(p.name))]
    return [p for _, p in sorted(found)]
