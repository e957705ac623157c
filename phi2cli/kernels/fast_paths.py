"""A record of which fast paths a run used, and why any fell back.

Every fast path the plan asks for ends up here as active or fell back (with the reason); those it
does not ask for are listed as off. The record goes into phi2_run.json ("fast_paths"); each
fallback also becomes one yellow line for the user, so a slowdown after an upgrade is seen, not
silently suffered.
"""

from __future__ import annotations

from typing import Any

ACTIVE, FELL_BACK, OFF = "active", "fell back", "off"


class FastPaths:
    """name -> {"status": active | fell back | off, "reason": why (fell back / off)}."""

    def __init__(self) -> None:
        self.entries: dict[str, dict[str, Any]] = {}

    def active(self, name: str, detail: str | None = None) -> None:
        self.entries[name] = {"status": ACTIVE, **({"detail": detail} if detail else {})}

    def fell_back(self, name: str, reason: str) -> None:
        self.entries[name] = {"status": FELL_BACK, "reason": reason}

    def off(self, name: str, reason: str) -> None:
        self.entries.setdefault(name, {"status": OFF, "reason": reason})

    def status(self, name: str) -> str | None:
        return self.entries.get(name, {}).get("status")

    def to_dict(self) -> dict[str, dict[str, Any]]:
        return {name: dict(entry) for name, entry in self.entries.items()}

    def fallback_notes(self) -> list[str]:
        """One line per fast path that fell back."""
        return [f"fast path '{name}' fell back: {entry['reason']}" for name, entry in self.entries.items()
                if entry["status"] == FELL_BACK]  # fmt: skip
