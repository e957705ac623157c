"""Batch builders: dynamic padding (reference recipe) and padding-free packing (fast engine)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import torch

from phi2cli.prompts import IGNORE_INDEX


@dataclass
class PaddedCollator:
    """Pads to the longest sequence of the batch (not to max length).

    Labels are padded with -100 by position, so a pad id equal to EOS never masks the real EOS.
    `pad_to` forces a fixed length (what notebook recipes do; the benchmark's reference uses it).
    """

    pad_id: int
    pad_to: int | None = None
    padding_side: str = "right"

    def __call__(self, features: Sequence[dict[str, Any]]) -> dict[str, torch.Tensor]:
        width = self.pad_to or max(len(f["input_ids"]) for f in features)
        ids = torch.full((len(features), width), self.pad_id, dtype=torch.long)
        labels = torch.full((len(features), width), IGNORE_INDEX, dtype=torch.long)
        mask = torch.zeros((len(features), width), dtype=torch.long)
        for row, feature in enumerate(features):
            n = min(len(feature["input_ids"]), width)
            span = slice(0, n) if self.padding_side == "right" else slice(width - n, width)
            ids[row, span] = torch.tensor(feature["input_ids"][:n])
            labels[row, span] = torch.tensor(feature["labels"][:n])
            mask[row, span] = 1
        return {"input_ids": ids, "attention_mask": mask, "labels": labels}


@dataclass
class PackedCollator:
    """Concatenates a batch into one row; position ids restart per example.

    Attention stays within each example: the cumulative lengths go to a varlen attention kernel
    on CUDA, and transformers builds a block-diagonal mask from the position ids elsewhere. The
    first label of every example is -100, so no example predicts the next one's first token.
    `max_length` (when given) is passed as the kernel's longest-sequence bound, so it stays one
    constant and compiled code need not specialise on each batch's longest example.
    `label_positions` lists the positions whose next token is labelled (where the selective loss
    runs lm_head), found here on the host so the GPU never has to be asked.
    """

    max_length: int | None = None

    def __call__(self, features: Sequence[dict[str, Any]]) -> dict[str, torch.Tensor]:
        ids: list[int] = []
        labels: list[int] = []
        positions: list[int] = []
        bounds = [0]
        for feature in features:
            n = len(feature["input_ids"])
            ids.extend(feature["input_ids"])
            labels.append(IGNORE_INDEX)
            labels.extend(feature["labels"][1:])
            positions.extend(range(n))
            bounds.append(bounds[-1] + n)
        cu = torch.tensor(bounds, dtype=torch.int32)
        longest = self.max_length or int((cu[1:] - cu[:-1]).max())
        scored = [i for i, label in enumerate(labels[1:]) if label != IGNORE_INDEX]
        return {
            "input_ids": torch.tensor([ids], dtype=torch.long),
            "labels": torch.tensor([labels], dtype=torch.long),
            "label_positions": torch.tensor(scored, dtype=torch.long),
            "position_ids": torch.tensor([positions], dtype=torch.long),
            "cu_seq_lens_q": cu,
            "cu_seq_lens_k": cu,
            "max_length_q": longest,
            "max_length_k": longest,
        }


def real_tokens(batch: dict[str, torch.Tensor]) -> int:
    """Non-pad tokens in a batch from either collator."""
    if "attention_mask" in batch:
        return int(batch["attention_mask"].sum())
    return int(batch["input_ids"].numel())


def sequence_lengths(batch: dict[str, torch.Tensor]) -> list[int]:
    """Length of every example in a batch from either collator."""
    if "cu_seq_lens_q" in batch:
        cu = batch["cu_seq_lens_q"]
        return [int(n) for n in (cu[1:] - cu[:-1])]
    return [int(n) for n in batch["attention_mask"].sum(dim=1)]
