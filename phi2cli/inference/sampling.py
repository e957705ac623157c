"""Sampled summaries that depend on the article, not on the batch it was decoded in.

Sampling with torch's generator draws each batch's noise from one stream, so the same article
gets other samples alone than beside others (and `phi2 summarize a.txt` would disagree with
`phi2 summarize folder/`). Here each sampled sequence owns a row of uniform numbers, drawn from
numpy's generator seeded by (run seed, the prompt's tokens, sample number), and its i-th new token
is the one where that row's i-th number falls in the cumulative softmax(logits / T): exactly a draw
from softmax(logits / T), and the same draw whatever else is in the batch. The static-cache decoder
(phi2cli.inference.decode) does this inside its graphed step; generate() through
UniformRowsProcessor.
"""

from __future__ import annotations

import zlib
from typing import Sequence

import numpy as np
import torch
from transformers import LogitsProcessor


def uniform_rows(prompts: Sequence[Sequence[int]], copies: int, steps: int, seed: int) -> torch.Tensor:
    """[len(prompts) * copies, steps] float32 uniforms in [0, 1); rows of prompt p are p * copies + c."""
    rows = np.empty((len(prompts) * copies, max(steps, 1)), dtype=np.float32)
    for index, prompt in enumerate(prompts):
        key = zlib.crc32(np.asarray(prompt, dtype=np.int64).tobytes())
        for copy in range(copies):
            rows[index * copies + copy] = np.random.default_rng([seed, key, copy]).random(rows.shape[1])
    return torch.from_numpy(rows)


def draw(logits: torch.Tensor, uniforms: torch.Tensor, temperature: float) -> torch.Tensor:
    """The token of each row [rows, vocab] where its uniform [rows] falls in the cumulative
    softmax(logits / temperature); no host synchronisation (graph-safe)."""
    cumulative = torch.softmax(logits.float() / temperature, dim=-1).cumsum_(dim=-1)
    target = (uniforms.to(cumulative.device) * cumulative[:, -1]).unsqueeze(-1)  # the sum is 1 up to rounding
    return torch.searchsorted(cumulative, target, right=True).squeeze(-1).clamp_(max=logits.shape[-1] - 1)


class UniformRowsProcessor(LogitsProcessor):
    """A transformers logits processor that turns greedy generate() into the same sampling as the
    static-cache decoder: each row's next token is drawn with its own uniforms and every other
    token's score set to -inf (the other processors, n-gram blocking or a minimum length, act first)."""

    def __init__(self, uniforms: torch.Tensor, prompt_width: int, temperature: float) -> None:
        self.uniforms, self.prompt_width, self.temperature = uniforms, prompt_width, temperature

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        step = min(input_ids.shape[1] - self.prompt_width, self.uniforms.shape[1] - 1)
        chosen = draw(scores, self.uniforms[:, step], self.temperature)
        picked = torch.full_like(scores, -torch.inf)
        return picked.scatter_(1, chosen.unsqueeze(1), 0.0)
