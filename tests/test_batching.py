"""The one packer and the one out-of-memory back-off."""

from __future__ import annotations

import pytest
import torch

from phi2cli.data.collate import token_groups
from phi2cli.errors import DeviceError
from phi2cli.inference.batching import halving_batches


def test_token_groups_keep_order_and_budget():
    assert token_groups([3, 4, 5, 9, 1], 8) == [range(0, 2), range(2, 3), range(3, 4), range(4, 5)]
    assert token_groups([3, 4, 1], 9, padded=True) == [range(0, 2), range(2, 3)]  # 2 rows x 4 fits, 3 x 4 not
    assert token_groups([20], 8) == [range(0, 1)]  # one item even over the budget
    assert token_groups([], 8) == []


def test_halving_batches_retries_smaller_chunks_and_reports_progress():
    ran: list[list[int]] = []

    def run(chunk):
        if len(chunk) > 2:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory")
        ran.append(list(chunk))

    assert halving_batches(list(range(7)), 8, run, lambda: None) == 7
    assert ran == [[0, 1], [2, 3], [4, 5], [6]]


def test_halving_batches_stops_or_raises_when_one_item_does_not_fit():
    def run(chunk):
        if 3 in chunk:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory")

    assert halving_batches([0, 1, 2, 3, 4], 2, run, lambda: None) == 3  # stopped before item 3

    def refuse():
        raise DeviceError("one does not fit")

    with pytest.raises(DeviceError, match="one does not fit"):
        halving_batches([3], 4, run, refuse)
