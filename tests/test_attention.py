"""The varlen attention wrapper's argument handling (GQA, head_dim, window, scaling) against SDPA, on the CPU.

torch's varlen flash kernel needs CUDA; here a stand-in with the kernel's signature and semantics
(per-sequence causal attention, (left, right) window, enable_gqa) takes its place, and the wrapper's
output is compared with torch's SDPA over the whole packed row with an explicit block-diagonal mask.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from phi2cli.kernels import attention


def stand_in_kernel(query, key, value, cu_q, cu_k, max_q, max_k, *, scale=None, window_size=(-1, -1),
                    enable_gqa=False):  # fmt: skip
    """varlen_attn's contract on the CPU: [tokens, heads, dim] in, attention within each sequence."""
    assert torch.equal(cu_q, cu_k) and cu_q.dtype == torch.int32
    if key.shape[1] != query.shape[1]:
        assert enable_gqa, "fewer key/value heads than query heads without enable_gqa"
    left, right = window_size
    out = torch.empty_like(query)
    for start, end in zip(cu_q[:-1].tolist(), cu_q[1:].tolist()):
        q, k, v = (t[start:end].transpose(0, 1).float() for t in (query, key, value))
        if k.shape[0] != q.shape[0]:
            k = k.repeat_interleave(q.shape[0] // k.shape[0], 0)
            v = v.repeat_interleave(q.shape[0] // v.shape[0], 0)
        rows = torch.arange(end - start)[:, None]
        cols = torch.arange(end - start)[None, :]
        allowed = (cols <= rows + (right if right >= 0 else 10**9)) & (cols >= rows - (left if left >= 0 else 10**9))
        out[start:end] = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed, scale=scale).transpose(0, 1)
    return out


def block_causal_reference(query, key, value, lengths, scale, window):
    """SDPA over the whole packed row [1, heads, tokens, dim] with an explicit block-diagonal causal mask."""
    total = sum(lengths)
    segment = torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths))
    rows, cols = torch.arange(total)[:, None], torch.arange(total)[None, :]
    mask = (segment[:, None] == segment[None, :]) & (cols <= rows)
    if window:
        mask &= cols > rows - window  # transformers' sliding window: the last `window` keys, itself included
    return F.scaled_dot_product_attention(query.float(), key.float(), value.float(), attn_mask=mask, scale=scale,
                                          enable_gqa=True)  # fmt: skip


def older_torch_kernel(query, key, value, cu_q, cu_k, max_q, max_k, *, scale=None, window_size=(-1, -1)):
    """varlen_attn as torch releases without enable_gqa have it."""
    return stand_in_kernel(query, key, value, cu_q, cu_k, max_q, max_k, scale=scale, window_size=window_size)


@pytest.fixture
def stand_in(monkeypatch):
    monkeypatch.setattr(attention, "_kernel", lambda: stand_in_kernel)


@pytest.mark.parametrize("heads,kv_heads,head_dim,window,gqa_in_kernel", [
    (4, 4, 16, None, True), (8, 2, 24, None, True), (8, 2, 24, None, False), (6, 3, 32, 3, True), (4, 1, 8, 5, False),
])  # fmt: skip
def test_packed_wrapper_matches_block_diagonal_sdpa(stand_in, monkeypatch, heads, kv_heads, head_dim, window,
                                                    gqa_in_kernel):  # fmt: skip
    if not gqa_in_kernel:  # an older torch without enable_gqa: the wrapper repeats key/value heads itself
        monkeypatch.setattr(attention, "_kernel", lambda: older_torch_kernel)
    torch.manual_seed(0)
    lengths = [5, 9, 2]
    total = sum(lengths)
    query = torch.randn(1, heads, total, head_dim, dtype=torch.bfloat16)
    key = torch.randn(1, kv_heads, total, head_dim, dtype=torch.bfloat16)
    value = torch.randn(1, kv_heads, total, head_dim, dtype=torch.bfloat16)
    cu = torch.tensor([0, 5, 14, 16])
    scale = 0.37  # not 1/sqrt(head_dim): the family's own scaling must reach the kernel
    out, weights = attention._attention(None, query, key, value, None, scaling=scale, cu_seq_lens_q=cu,
                                        max_length_q=9, sliding_window=window)  # fmt: skip
    assert weights is None and out.shape == (1, total, heads, head_dim) and out.dtype == torch.bfloat16
    expected = block_causal_reference(query, key, value, lengths, scale, window).transpose(1, 2)
    torch.testing.assert_close(out.float(), expected, atol=2e-2, rtol=2e-2)
    if window:  # the window changes the answer (so it was not dropped)
        unwindowed = block_causal_reference(query, key, value, lengths, scale, None).transpose(1, 2)
        assert (unwindowed - out.float()).abs().max() > 0.05


def test_kernel_arguments_translate_gqa_and_window(stand_in):
    query, key = torch.zeros(7, 8, 16), torch.zeros(7, 2, 16)
    k, v, kwargs = attention.kernel_arguments(query, key, key, 0.25, 4096)
    assert k is key and kwargs == {"scale": 0.25, "window_size": (4095, 0), "enable_gqa": True}
    _, _, kwargs = attention.kernel_arguments(query, query, query, None, None)
    assert kwargs == {"scale": None, "window_size": (-1, 0)}
    with pytest.raises(ValueError, match="8 query heads cannot share 3"):
        attention.kernel_arguments(query, torch.zeros(7, 3, 16), torch.zeros(7, 3, 16), None, None)


def test_softcap_is_refused_not_dropped(stand_in):
    query = torch.zeros(1, 2, 4, 8)
    with pytest.raises(ValueError, match="softcap"):
        attention._attention(None, query, query, query, None, cu_seq_lens_q=torch.tensor([0, 4]), softcap=30.0)


def test_packed_grouped_head_model_matches_separate_sequences(stand_in):
    """A Llama with 4 query heads over 2 key/value heads and head_dim 24 (not hidden/heads): a packed
    forward through the wrapper gives each sequence the logits it gets alone through SDPA."""
    from transformers import AttentionInterface, AttentionMaskInterface, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=24)  # fmt: skip
    model = LlamaForCausalLM(config).to(torch.bfloat16).eval()
    sequences = [torch.randint(0, 97, (n,)) for n in (6, 11, 3)]
    with torch.no_grad():
        alone = [model(input_ids=s[None]).logits[0].float() for s in sequences]
        AttentionInterface.register(attention.NAME, attention._attention)
        AttentionMaskInterface.register(attention.NAME, attention._no_mask)
        model.set_attn_implementation(attention.NAME)
        cu = torch.tensor([0, 6, 17, 20], dtype=torch.int32)
        packed = model(input_ids=torch.cat(sequences)[None],
                       position_ids=torch.cat([torch.arange(len(s)) for s in sequences])[None],
                       cu_seq_lens_q=cu, cu_seq_lens_k=cu, max_length_q=11, max_length_k=11).logits[0].float()
    torch.testing.assert_close(packed, torch.cat(alone), atol=3e-2, rtol=3e-2)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("heads,kv_heads,head_dim,window", [(32, 32, 80, None), (32, 8, 80, None), (9, 3, 64, None),
                                                            (16, 4, 128, 7)])  # fmt: skip
def test_the_real_varlen_kernel_matches_block_diagonal_sdpa(heads, kv_heads, head_dim, window):
    """On a GPU: torch's varlen flash kernel through the wrapper, GQA and window included."""
    assert attention.varlen_available(head_dim, heads, kv_heads, window)
    torch.manual_seed(0)
    lengths = [37, 300, 5, 130]
    total = sum(lengths)
    query = torch.randn(1, heads, total, head_dim, dtype=torch.bfloat16, device="cuda")
    key = torch.randn(1, kv_heads, total, head_dim, dtype=torch.bfloat16, device="cuda")
    value = torch.randn(1, kv_heads, total, head_dim, dtype=torch.bfloat16, device="cuda")
    cu = torch.tensor([0, 37, 337, 342, 472], device="cuda")
    out, _ = attention._attention(None, query, key, value, None, scaling=head_dim**-0.5, cu_seq_lens_q=cu,
                                  max_length_q=300, sliding_window=window)  # fmt: skip
    expected = block_causal_reference(query.cpu(), key.cpu(), value.cpu(), lengths, head_dim**-0.5, window)
    torch.testing.assert_close(out.float().cpu(), expected.transpose(1, 2), atol=2e-2, rtol=2e-2)
