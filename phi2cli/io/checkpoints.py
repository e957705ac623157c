"""How the Trainer names its checkpoint directories (checkpoint-N), in one place."""

from __future__ import annotations

import re

CHECKPOINT_RE = re.compile(r"checkpoint-(\d+)$")  # match(): a directory name; search(): the end of a path


def checkpoint_step(name: str) -> int | None:
    """N for a name or path ending in checkpoint-N, else None."""
    found = CHECKPOINT_RE.search(name.rstrip("/\\"))
    return int(found.group(1)) if found else None
