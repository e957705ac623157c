"""Batch builders: dynamic padding (reference recipe) and padding-free packing (fast engine)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import torch

from phi2cli.data.prompts import IGNORE_INDEX


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
    `example_lengths` (plain ints, not a tensor) tells the trainer each example's length without
    reading the GPU; the trainer takes it out before the model sees the batch.

    `pad_multiple` (CUDA graphs) rounds the row up to a multiple of that many tokens with one
    trailing pad sequence of its own (labels -100, at least one token, never longer than
    `max_length`), and `label_positions` up to a multiple of `label_multiple` with a position
    whose next label is -100; so a few fixed shapes cover every batch, and the loss, the label
    count and every real token's attention are exactly what they are unpadded.
    """

    max_length: int | None = None
    pad_multiple: int | None = None
    label_multiple: int = 64

    def __post_init__(self) -> None:
        if self.pad_multiple is not None and self.max_length is not None and self.pad_multiple > self.max_length:
            raise ValueError("pad_multiple cannot exceed max_length: the pad sequence must fit the attention bound")

    def __call__(self, features: Sequence[dict[str, Any]]) -> dict[str, Any]:
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
        lengths = tuple(b - a for a, b in zip(bounds, bounds[1:]))
        longest = self.max_length or max(lengths)
        scored = [i for i, label in enumerate(labels[1:]) if label != IGNORE_INDEX]
        if self.pad_multiple:
            width = -(-(bounds[-1] + 1) // self.pad_multiple) * self.pad_multiple
            pad = width - bounds[-1]
            ids.extend([ids[-1]] * pad)  # any real token id: the pad sequence only has to stay finite
            labels.extend([IGNORE_INDEX] * pad)
            positions.extend(range(pad))
            bounds.append(width)
            # lm_head at width-2 predicts label[width-1], which is in the pad sequence: -100, no loss
            scored.extend([width - 2] * (-len(scored) % self.label_multiple))
        cu = torch.tensor(bounds, dtype=torch.int32)
        return {
            "input_ids": torch.tensor([ids], dtype=torch.long),
            "labels": torch.tensor([labels], dtype=torch.long),
            "label_positions": torch.tensor(scored, dtype=torch.long),
            "position_ids": torch.tensor([positions], dtype=torch.long),
            "cu_seq_lens_q": cu,
            "cu_seq_lens_k": cu,
            "max_length_q": longest,
            "max_length_k": longest,
            "example_lengths": lengths,
        }


HOST_KEYS = ("example_lengths",)  # batch entries for the trainer, not the model


def model_inputs(batch: dict[str, Any]) -> dict[str, Any]:
    """The batch without the entries meant for the trainer only."""
    return {k: v for k, v in batch.items() if k not in HOST_KEYS}


def real_tokens(batch: dict[str, Any]) -> int:
    """Non-pad tokens in a batch from either collator (without reading the GPU)."""
    if "example_lengths" in batch:
        return sum(batch["example_lengths"])
    if "attention_mask" in batch:
        return int(batch["attention_mask"].sum())
    return int(batch["input_ids"].numel())


def sequence_lengths(batch: dict[str, Any]) -> list[int]:
    """Length of every example in a batch from either collator."""
    if "example_lengths" in batch:
        return list(batch["example_lengths"])
    if "cu_seq_lens_q" in batch:
        cu = batch["cu_seq_lens_q"]
        return [int(n) for n in (cu[1:] - cu[:-1])]
    return [int(n) for n in batch["attention_mask"].sum(dim=1)]


def token_groups(lengths: Sequence[int], budget: int, padded: bool = False) -> list[range]:
    """Consecutive index ranges of at most `budget` tokens each (one item minimum).

    packed: a group costs the sum of its lengths; padded: rows x its longest length.
    The one packer of the project: eval-loss batches, prefill groups and shared forwards use it.
    """
    groups, start = [], 0
    while start < len(lengths):
        end, longest, total = start, 0, 0
        while end < len(lengths):
            longest, total = max(longest, lengths[end]), total + lengths[end]
            if end > start and (longest * (end - start + 1) if padded else total) > budget:
                break
            end += 1
        groups.append(range(start, end))
        start = end
    return groups

