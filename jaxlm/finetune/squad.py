"""SQuAD's answer scoring (the official evaluate-v1.1 script's definitions, in pure Python):
an answer is normalised (lowercased, punctuation removed, the articles a/an/the removed,
whitespace collapsed), exact match is equality of normalised strings, F1 is the harmonic
mean of precision and recall of the normalised tokens (whitespace-split, counted with
multiplicity). A prediction scores the best over its gold answers.
"""

from __future__ import annotations

import collections
import re
import string
from typing import Sequence

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCTUATION = frozenset(string.punctuation)


def normalize_answer(text: str) -> str:
    """Lowercase, strip punctuation, drop the articles a/an/the, collapse whitespace (in
    the official script's order)."""
    text = "".join(ch for ch in text.lower() if ch not in _PUNCTUATION)
    return " ".join(_ARTICLES.sub(" ", text).split())


def exact_match(prediction: str, gold: str) -> float:
    return float(normalize_answer(prediction) == normalize_answer(gold))


def f1(prediction: str, gold: str) -> float:
    predicted, expected = normalize_answer(prediction).split(), normalize_answer(gold).split()
    common = collections.Counter(predicted) & collections.Counter(expected)
    same = sum(common.values())
    if same == 0:
        return 0.0
    precision, recall = same / len(predicted), same / len(expected)
    return 2 * precision * recall / (precision + recall)


def best_over_golds(prediction: str, golds: Sequence[str]) -> tuple[float, float]:
    """(exact match, F1) of `prediction`, each the max over the gold answers."""
    return (max(exact_match(prediction, g) for g in golds),
            max(f1(prediction, g) for g in golds))
