"""Minimum-Bayes-risk decoding: the ROUGE-L used to pick, the pick, and the per-article samples."""

from __future__ import annotations

import json
import random

import pytest
import torch

from phi2cli.inference.consensus import consensus_pick, lcs_length, rouge_l, rouge_tokens
from phi2cli.inference.sampling import UniformRowsProcessor, draw, uniform_rows

from conftest import SHARED


def _lcs_table(a, b) -> int:
    table = [[0] * (len(b) + 1) for _ in range(len(a) + 1)]
    for i, x in enumerate(a):
        for j, y in enumerate(b):
            table[i + 1][j + 1] = table[i][j] + 1 if x == y else max(table[i][j + 1], table[i + 1][j])
    return table[-1][-1]


def test_bit_parallel_lcs_matches_the_dynamic_programming_table():
    rng = random.Random(0)
    for _ in range(3000):
        a = [rng.choice("abcd") for _ in range(rng.randint(0, 70))]  # past 64 tokens: more than one machine word
        b = [rng.choice("abcd") for _ in range(rng.randint(0, 70))]
        assert lcs_length(a, b) == _lcs_table(a, b), (a, b)


def test_rouge_l_is_rouge_scores_own_on_real_summaries():
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    rows = [json.loads(line)["summary"] for line in (SHARED / "data" / "xsum" / "validation.jsonl").open()][:60]
    rows.append("")  # nothing to compare: 0
    rng = random.Random(1)
    for _ in range(400):
        x, y = rng.choice(rows), rng.choice(rows)
        assert rouge_l(rouge_tokens(x), rouge_tokens(y)) == pytest.approx(scorer.score(x, y)["rougeL"].fmeasure, abs=1e-12)
    assert rouge_tokens("The councils' Running costs!") == ("the", "council", "run", "cost")  # stemmed, lower case


def test_the_pick_is_the_candidate_that_agrees_most_with_the_rest():
    candidates = ["a man was arrested after a crash in leeds",
                  "police arrested a man after a crash in leeds on monday",
                  "a man has been arrested after a car crash in leeds",
                  "the weather was sunny in spain"]  # fmt: skip
    sums = [sum(rouge_l(rouge_tokens(c), rouge_tokens(o)) for o in candidates if o is not c) for c in candidates]
    assert consensus_pick(candidates) == sums.index(max(sums)) == 0
    # copies count as votes: the outlier repeated three times wins
    assert consensus_pick(candidates + ["the weather was sunny in spain"] * 3) == 3
    assert consensus_pick(["same words", "same words"]) == 0  # a tie goes to the first (the greedy summary)
    assert consensus_pick(["", "x"]) == 0 and consensus_pick(["only one"]) == 0
    with pytest.raises(ValueError):
        consensus_pick([])


def test_uniforms_belong_to_the_prompt_and_sample_number_not_to_the_batch():
    alone = uniform_rows([[5, 6, 7]], 3, 10, seed=42)
    batched = uniform_rows([[9, 9], [5, 6, 7]], 4, 10, seed=42)
    assert alone.shape == (3, 10) and batched.shape == (8, 10)
    assert torch.equal(alone, batched[4:7])  # prompt [5, 6, 7], samples 0-2, in either batch
    assert not torch.equal(batched[0], batched[1])  # two samples of one prompt differ
    assert not torch.equal(alone, uniform_rows([[5, 6, 7]], 3, 10, seed=43))
    assert float(alone.min()) >= 0.0 and float(alone.max()) < 1.0


def test_draw_follows_the_tempered_softmax():
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0]])
    for temperature in (0.7, 1.0):
        uniforms = torch.rand(200_000, generator=torch.Generator().manual_seed(0))
        drawn = draw(logits.expand(len(uniforms), -1), uniforms, temperature)
        frequency = torch.bincount(drawn, minlength=4).double() / len(uniforms)
        assert torch.allclose(frequency, torch.softmax(logits[0].double() / temperature, 0), atol=0.005)
    # an n-gram-blocked token (score -inf) is never drawn
    blocked = torch.tensor([[0.0, -torch.inf, 0.0]]).expand(1000, -1)
    assert 1 not in draw(blocked, torch.linspace(0, 0.999, 1000), 1.0).tolist()


def test_sampled_decoding_is_the_same_through_the_static_decoder_and_generate():
    from test_decode import random_prompts, tiny_phi

    from phi2cli.inference.decode import cut_at_stop, sample_decode

    model = tiny_phi()
    prompts = random_prompts((5, 17, 9))
    sampled = sample_decode(model, prompts, 4, 1.0, 12, [1], batch_size=3, seed=7)  # 1: the model's EOS
    assert [len(s) for s in sampled] == [4, 4, 4] and all(0 < len(row) <= 12 for s in sampled for row in s)
    assert len({tuple(row) for row in sampled[1]}) > 1  # the samples of one prompt differ
    # per prompt and sample number, whatever the batch or the number of samples drawn
    assert sample_decode(model, [prompts[1]], 2, 1.0, 12, [1], batch_size=1, seed=7)[0] == sampled[1][:2]
    assert sample_decode(model, prompts, 4, 1.0, 12, [1], batch_size=3, seed=8) != sampled
    # generate() drawing with the same uniforms (greedy + UniformRowsProcessor) gives the same tokens
    for index, prompt in enumerate(prompts):
        uniforms = uniform_rows([prompt], 4, 12, seed=7)
        with torch.no_grad():
            out = model.generate(torch.tensor([prompt] * 4), max_new_tokens=12, do_sample=False, pad_token_id=0,
                                 logits_processor=[UniformRowsProcessor(uniforms, len(prompt), 1.0)])  # fmt: skip
        assert [cut_at_stop(row, [1]) for row in out[:, len(prompt):].tolist()] == sampled[index]
