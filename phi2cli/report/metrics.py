"""Summary quality metrics: ROUGE (offline, via the `rouge-score` package) and summary length.

Imports no torch, so reports and tests that only score text start instantly.
Scores follow Hugging Face `evaluate`'s rouge as used by its summarization examples: F-measure
x 100 with Porter stemming, averaged over the pairs; ROUGE-Lsum sees one sentence per line, split
by `regex_sentences` on every machine (named in metrics.json as SENTENCE_SPLITTER), so the same
texts score the same whether or not nltk's punkt data is installed.
"""

from __future__ import annotations

import functools
import re
import threading
from typing import Sequence

from phi2cli.errors import DataError

ROUGE_TYPES = ("rouge1", "rouge2", "rougeL", "rougeLsum")
# End of a sentence: . ! ? (optionally closed by a quote or bracket) before whitespace and a capital/digit.
_SENTENCE_END = re.compile(
    r"(?<!\bMr\.)(?<!\bMs\.)(?<!\bDr\.)(?<!\bSt\.)(?<!\bMrs\.)(?<!\b[A-Z]\.)"  # titles and initials
    r"(?<=[.!?])([\"'\u201d\u2019)\]]?)\s+(?=[\"'\u201c\u2018(\[]?[A-Z0-9])"
)


def regex_sentences(text: str) -> list[str]:
    """Split text into sentences at . ! ? followed by whitespace and a capital letter or digit."""
    marked = _SENTENCE_END.sub(lambda m: m.group(1) + "\n", text.strip())
    return [s.strip() for s in marked.split("\n") if s.strip()]


SENTENCE_SPLITTER = "phi2cli.report.metrics.regex_sentences"  # the only one: punkt's data varies by machine


def sentence_lines(text: str) -> str:
    """Text with one sentence per line, the form ROUGE-Lsum expects."""
    return "\n".join(regex_sentences(text))


def first_line(text: str) -> str:
    """A generated summary cut at its first newline and stripped (summaries are one line)."""
    return text.strip().split("\n", 1)[0].strip()


def word_count(text: str) -> int:
    return len(text.split())


def mean_words(texts: Sequence[str]) -> float:
    """Mean number of whitespace-separated words per text (0.0 for no texts)."""
    return sum(word_count(t) for t in texts) / len(texts) if texts else 0.0


@functools.lru_cache(maxsize=1)
def _build_scorer() -> object:
    from rouge_score import rouge_scorer

    return rouge_scorer.RougeScorer(list(ROUGE_TYPES), use_stemmer=True)


_scorer_lock = threading.Lock()


def _scorer() -> object:
    with _scorer_lock:  # one scorer, whether preload_scorer's thread or the caller builds it
        return _build_scorer()


def preload_scorer() -> threading.Thread:
    """Build the ROUGE scorer on a background thread (its import of nltk: 0.7 s on a 2-core CPU).

    `phi2 evaluate` starts it as the GPU work begins, so the import runs while the host waits on the GPU.
    """
    thread = threading.Thread(target=_scorer, name="rouge-scorer", daemon=True)
    thread.start()
    return thread


def rouge(predictions: Sequence[str], references: Sequence[str]) -> dict[str, float]:
    """Mean ROUGE-1/2/L/Lsum F-measures x 100 of predictions against references.

    Args:
        predictions: generated summaries.
        references: reference summaries, same length and order.
    Returns:
        {"rouge1", "rouge2", "rougeL", "rougeLsum"} -> mean F-measure x 100 (0.0 for no pairs).
    Raises:
        DataError if the two lists differ in length.
    """
    if len(predictions) != len(references):
        raise DataError(f"{len(predictions)} predictions but {len(references)} references; they must pair up")
    totals = dict.fromkeys(ROUGE_TYPES, 0.0)
    if not predictions:
        return totals
    scorer = _scorer()
    for prediction, reference in zip(predictions, references):
        scores = scorer.score(sentence_lines(reference), sentence_lines(prediction))  # type: ignore[attr-defined]
        for name in ROUGE_TYPES:
            totals[name] += scores[name].fmeasure
    return {name: 100.0 * total / len(predictions) for name, total in totals.items()}


def summary_metrics(predictions: Sequence[str], references: Sequence[str]) -> dict[str, float]:
    """ROUGE scores plus the mean summary length in words of the predictions."""
    return {**rouge(predictions, references), "mean_summary_words": mean_words(predictions)}
