"""Scores of one answer, and of one position of a text.

Answers follow SQuAD / LongBench: lower-case, drop punctuation, articles and extra spaces, then
exact match or the F1 of the two bags of tokens (the best over the accepted answers). Digit tasks
(pass key, needle) also get a partial score: the share of the key's digits that come back in place.
"""

from __future__ import annotations

import math
import re
import string
from collections import Counter

import torch

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCTUATION = set(string.punctuation)


def normalize_answer(text: str) -> str:
    text = "".join(ch for ch in text.lower() if ch not in _PUNCTUATION)
    return " ".join(_ARTICLES.sub(" ", text).split())


def exact_match(prediction: str, answers: list[str]) -> float:
    """1.0 when the normalised prediction equals one normalised answer, else 0.0."""
    predicted = normalize_answer(prediction)
    return float(any(predicted == normalize_answer(answer) for answer in answers))


def token_f1(prediction: str, answers: list[str]) -> float:
    """The best F1 between the prediction's tokens and one answer's tokens (normalised words)."""
    predicted = normalize_answer(prediction).split()
    best = 0.0
    for answer in answers:
        expected = normalize_answer(answer).split()
        common = sum((Counter(predicted) & Counter(expected)).values())
        if not predicted or not expected:
            best = max(best, float(predicted == expected))
            continue
        if common == 0:
            continue
        precision, recall = common / len(predicted), common / len(expected)
        best = max(best, 2 * precision * recall / (precision + recall))
    return best


def partial_digits(generated: str, key: str) -> float:
    """The share of the key's digits found in place in the first number of the output.

    '57314' against output '57324' is 0.8; a key found whole anywhere is 1.0; no number is 0.0.
    """
    if key in generated:
        return 1.0
    found = re.search(r"\d+", generated)
    if not found:
        return 0.0
    digits = found.group()
    return sum(a == b for a, b in zip(digits, key)) / len(key)


def string_matches(generated: str, expected: list[str]) -> float:
    """RULER's score: the share of the expected strings found in the output (case-insensitive)."""
    if not expected:
        return 0.0
    lowered = generated.lower()
    return sum(item.lower() in lowered for item in expected) / len(expected)


def kl_divergence(reference_logprobs: torch.Tensor, logprobs: torch.Tensor) -> torch.Tensor:
    """KL(reference || other) per row, in nats, from log-probabilities over the same vocabulary.

    Rows are positions: (n, vocab) -> (n,). Computed in float64 (a sum of 49k small terms), and
    clamped at 0 where rounding leaves a tiny negative.
    """
    reference = reference_logprobs.double()
    other = logprobs.double()
    return (reference.exp() * (reference - other)).sum(dim=-1).clamp_min(0.0)


def perplexity(true_token_logprobs) -> float:
    """exp of the mean negative log-probability of the true next tokens."""
    values = list(true_token_logprobs)
    if not values:
        return float("nan")
    return math.exp(-sum(values) / len(values))
