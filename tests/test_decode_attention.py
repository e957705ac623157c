"""The decoding step's masked attention: its values, and which kernels it lets torch choose from."""

from __future__ import annotations

import contextlib

import pytest
import torch

from phi2cli.kernels import attention


def reference(query, keys, values, mask, scale):
    groups = query.shape[1] // keys.shape[1]
    keys, values = keys.repeat_interleave(groups, 1), values.repeat_interleave(groups, 1)
    weights = torch.softmax(query @ keys.transpose(-1, -2) * scale + mask, dim=-1)
    return weights @ values


def inputs(rows, heads, kv_heads, cache=12, dim=8, hidden=3):
    generator = torch.Generator().manual_seed(rows * 100 + kv_heads)
    query = torch.randn(rows, heads, 1, dim, generator=generator)
    keys = torch.randn(rows, kv_heads, cache, dim, generator=generator)
    values = torch.randn(rows, kv_heads, cache, dim, generator=generator)
    mask = torch.zeros(rows, 1, 1, cache)
    mask[:, :, :, cache - hidden:] = -torch.inf  # the cache's unwritten slots
    return query, keys, values, mask


@pytest.fixture
def chosen(monkeypatch):
    """The backend lists decode_attention hands to sdpa_kernel (none: torch's own choice)."""
    seen: list[list[str]] = []
    real = torch.nn.attention.sdpa_kernel

    @contextlib.contextmanager
    def recording(backends, *args, **kwargs):
        seen.append([backend.name for backend in backends])
        with real(backends, *args, **kwargs):
            yield

    monkeypatch.setattr(torch.nn.attention, "sdpa_kernel", recording)
    return seen


@pytest.mark.parametrize("rows,heads,kv_heads", [(1, 4, 4), (8, 4, 4), (9, 4, 4), (2, 6, 2), (12, 6, 3)])
def test_values_match_softmax_attention_over_the_written_slots(rows, heads, kv_heads):
    query, keys, values, mask = inputs(rows, heads, kv_heads)
    got = attention.decode_attention(query, keys, values, mask, 0.35)
    torch.testing.assert_close(got, reference(query, keys, values, mask, 0.35), atol=1e-5, rtol=1e-5)
    changed = values.clone()
    changed[:, :, -3:] = 1e4  # what sits in a masked slot never reaches the output
    torch.testing.assert_close(attention.decode_attention(query, keys, changed, mask, 0.35), got)


def test_a_few_rows_skip_cudnn_and_larger_or_grouped_batches_keep_torchs_choice(chosen):
    attention.decode_attention(*inputs(attention.FEW_ROWS, 4, 4), 0.35)
    assert chosen == [["FLASH_ATTENTION", "EFFICIENT_ATTENTION", "MATH"]]
    assert "CUDNN_ATTENTION" not in chosen[0]
    attention.decode_attention(*inputs(attention.FEW_ROWS + 1, 4, 4), 0.35)
    attention.decode_attention(*inputs(2, 6, 2), 0.35)
    assert len(chosen) == 1  # neither went through sdpa_kernel


def test_every_decoding_step_attends_through_it(monkeypatch):
    from test_decode import random_prompts, tiny_phi

    from phi2cli.inference import decode

    rows: list[int] = []

    def counted(query, *rest):
        rows.append(query.shape[0])
        return attention.decode_attention(query, *rest)

    monkeypatch.setattr(decode, "decode_attention", counted)
    model = tiny_phi()
    produced = decode.greedy_decode(model, random_prompts(), 6, [], batch_size=4)
    assert len(produced) == len(random_prompts()) and all(len(row) == 6 for row in produced)
    layers = model.config.num_hidden_layers
    assert rows == [4] * (5 * layers) + [3] * (5 * layers)  # two batches (4 + 3 prompts), 5 steps after the prefill
