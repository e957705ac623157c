"""ROUGE and summary-length metrics, pinned on hand-checked pairs (rouge-score, Porter stemming)."""

from __future__ import annotations

import functools
import subprocess
import sys

import pytest

from phi2cli.errors import DataError
from phi2cli.report.metrics import SENTENCE_SPLITTER, first_line, mean_words, regex_sentences, rouge, sentence_lines, summary_metrics

# Every expected value below is worked out by hand: F = 2PR / (P + R), x 100.
HAND_CHECKED = [
    # identical: every n-gram matches -> 100 everywhere
    ("the cat sat on the mat", "the cat sat on the mat",
     {"rouge1": 100.0, "rouge2": 100.0, "rougeL": 100.0, "rougeLsum": 100.0}),
    # pred [the cat sat] vs ref [the dog sat down]: unigrams the, sat = 2 -> P 2/3, R 2/4, F 4/7;
    # no shared bigram -> 0; LCS 'the sat' = 2 -> 4/7 again
    ("the cat sat", "the dog sat down",
     {"rouge1": 400 / 7, "rouge2": 0.0, "rougeL": 400 / 7, "rougeLsum": 400 / 7}),
    # stemming: players->player, scored/scores->score, goals->goal. pred [the player score goal],
    # ref [the player score a goal]: unigrams 4 -> P 1, R 4/5, F 8/9; bigrams 'the player',
    # 'player score' = 2 of 3 and 4 -> P 2/3, R 1/2, F 4/7; LCS 4 -> 8/9
    ("the players scored goals", "the player scores a goal",
     {"rouge1": 800 / 9, "rouge2": 400 / 7, "rougeL": 800 / 9, "rougeLsum": 800 / 9}),
    # two sentences swapped (7 tokens each): unigrams 7/7 -> 100; bigrams 5 of 6 ('out two' and
    # 'died a' differ) -> 5/6; LCS over the whole text is 'a fire broke out' = 4 -> 4/7;
    # Lsum matches sentence by sentence (3 + 4 = 7 of 7) -> 100
    ("A fire broke out. Two people died.", "Two people died. A fire broke out.",
     {"rouge1": 100.0, "rouge2": 500 / 6, "rougeL": 400 / 7, "rougeLsum": 100.0}),
]  # fmt: skip


@pytest.mark.parametrize("prediction, reference, expected", HAND_CHECKED)
def test_rouge_matches_hand_checked_values(prediction, reference, expected):
    scores = rouge([prediction], [reference])
    assert scores == pytest.approx(expected, abs=1e-9)


def test_rouge_is_the_mean_over_pairs():
    predictions = [p for p, _, _ in HAND_CHECKED]
    references = [r for _, r, _ in HAND_CHECKED]
    scores = rouge(predictions, references)
    for name in ("rouge1", "rouge2", "rougeL", "rougeLsum"):
        assert scores[name] == pytest.approx(sum(e[name] for _, _, e in HAND_CHECKED) / len(HAND_CHECKED))


def test_rouge_of_an_empty_prediction_is_zero_and_of_no_pairs_is_zero():
    assert rouge([""], ["a reference summary"]) == {"rouge1": 0.0, "rouge2": 0.0, "rougeL": 0.0, "rougeLsum": 0.0}
    assert rouge([], [])["rouge1"] == 0.0


def test_rouge_refuses_unpaired_lists():
    with pytest.raises(DataError, match="2 predictions but 1 references"):
        rouge(["a", "b"], ["a"])


def test_regex_sentences_split_at_sentence_ends_but_not_after_titles():
    text = 'Mr. Smith won the vote. "We did it!" he said. Then 3 rivals conceded'
    assert regex_sentences(text) == ["Mr. Smith won the vote.", '"We did it!" he said.', "Then 3 rivals conceded"]
    assert sentence_lines("One. Two.") == "One.\nTwo."


def test_rouge_lsum_splits_with_the_regex_even_where_punkt_is_installed(monkeypatch):
    nltk = pytest.importorskip("nltk")
    import nltk.tokenize

    # A machine with punkt data (faked: every word its own sentence) must score exactly as one without.
    monkeypatch.setattr(nltk.data, "find", lambda *args, **kwargs: "punkt")
    monkeypatch.setattr(nltk.tokenize, "sent_tokenize", lambda text, *args, **kwargs: text.split())
    prediction, reference = "the cat sat on the mat. a dog ran", "a dog ran. the cat sat on the mat"
    # regex_sentences sees one sentence in each (no capital after the full stop): Lsum is plain LCS, 6 of 9 words
    assert rouge([prediction], [reference])["rougeLsum"] == pytest.approx(100 * 6 / 9)
    assert SENTENCE_SPLITTER == "phi2cli.report.metrics.regex_sentences"


def test_first_line_and_word_counts():
    assert first_line("  A summary here.\nOutput: more text") == "A summary here."
    assert first_line("\n") == ""
    assert mean_words(["one two three", "four"]) == 2.0
    assert mean_words([]) == 0.0
    metrics = summary_metrics(["the cat sat"], ["the dog sat down"])
    assert metrics["mean_summary_words"] == 3.0
    assert metrics["rouge1"] == pytest.approx(400 / 7)


def test_metrics_module_imports_no_torch():
    code = "import sys, phi2cli.report.metrics; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_preloaded_scorer_is_the_one_rouge_uses(monkeypatch):
    from phi2cli.report import metrics

    built = []
    real = metrics._build_scorer.__wrapped__
    monkeypatch.setattr(metrics, "_build_scorer", functools.lru_cache(maxsize=1)(lambda: built.append(1) or real()))
    thread = metrics.preload_scorer()
    scores = rouge(["the cat sat on the mat"], ["the cat sat on the mat"])  # may wait for the thread's scorer
    thread.join(timeout=60)
    assert built == [1]  # built once, by whichever came first
    assert scores == {name: 100.0 for name in ("rouge1", "rouge2", "rougeL", "rougeLsum")}
