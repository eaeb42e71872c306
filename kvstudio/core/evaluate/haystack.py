"""Real prose, and token-exact contexts with needles placed at asked depths.

The haystack is the prose of Python's own reference documentation (`pydoc_data.topics`, part of
every Python installation): paragraphs of plain English, with the indented grammar and code blocks
left out. A repeated sentence would let a policy keep "one of each" and look better than it is.

A context is built from token ids, not from text, so its length is exact: the instruction, the
haystack cut to fill what is left, the needles spliced in at their depths, the question at the end.
A needle goes at the sentence end nearest its asked token index (never mid-word), so its real
position can sit some tokens from the asked one; `Context.needle_positions` says exactly where each
one starts, and samples report the depth actually used.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass, field
from functools import lru_cache

from kvstudio.core.errors import KVStudioError

# Stored sweeps name the version their prompts were generated with: change it whenever a change here
# or in tasks.py changes any prompt, so an old sweep is never resumed with different prompts.
GENERATOR_VERSION = 1
SENTENCE_SEARCH_TOKENS = 64  # how far from the asked index a needle may move to reach a sentence end


@lru_cache(maxsize=1)
def prose_paragraphs() -> tuple[str, ...]:
    """Plain-English paragraphs of Python's reference documentation, in topic order."""
    from pydoc_data.topics import topics

    paragraphs = []
    for name in sorted(topics):
        for block in re.split(r"\n\s*\n", topics[name]):
            lines = block.split("\n")
            if any(line.startswith((" ", "\t")) for line in lines):
                continue  # indented: grammar, code, tables
            text = " ".join(line.strip() for line in lines).strip()
            if len(text) < 80 or "::=" in text or set(text) <= set("*=-~^ ") or not text.endswith((".", ":")):
                continue
            if text.endswith(":"):
                continue  # it introduces a code block that was left out
            paragraphs.append(text)
    return tuple(dict.fromkeys(paragraphs))  # some topics share paragraphs: each once


def prose(seed: int, min_chars: int) -> str:
    """At least `min_chars` of prose. The seed picks where in the documentation it starts (the
    paragraphs keep their order, so the text reads as written)."""
    paragraphs = prose_paragraphs()
    start = random.Random(seed).randrange(len(paragraphs))
    parts, size, index = [], 0, start
    while size < min_chars:
        parts.append(paragraphs[index % len(paragraphs)])
        size += len(parts[-1]) + 1
        index += 1
    return " ".join(parts)


def prose_ids(tokenizer, seed: int, n_tokens: int) -> list[int]:
    """Exactly `n_tokens` token ids of prose (no special tokens)."""
    chars = max(n_tokens * 6, 2000)
    while True:
        ids = tokenizer(prose(seed, chars), add_special_tokens=False)["input_ids"]
        if len(ids) >= n_tokens:
            return list(ids[:n_tokens])
        chars *= 2


@dataclass
class Needle:
    depth: float  # 0.0 = right after the instruction, 1.0 = right before the question
    text: str  # what is spliced in, with its leading space


@dataclass
class Context:
    ids: list[int]
    needle_positions: list[int] = field(default_factory=list)  # token index where each needle starts
    haystack_tokens: int = 0
    question_start: int | None = None  # token index where the question begins (after the context)

    def depth_of(self, index: int, prefix_tokens: int) -> float:
        """Where needle `index` really sits, as a fraction of the haystack."""
        return (self.needle_positions[index] - prefix_tokens) / max(self.haystack_tokens, 1)


def encode_piece(tokenizer, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def build_context(tokenizer, length: int, instruction: str, needles: list[Needle], question: str,
                  seed: int, haystack_ids: list[int] | None = None) -> Context:
    """A prompt of exactly `length` tokens: instruction, haystack with needles, question.

    `haystack_ids` replaces the prose (RULER's word lists bring their own haystack); it is cut to fit.
    """
    head = list(tokenizer(instruction, add_special_tokens=True)["input_ids"])
    tail = encode_piece(tokenizer, question)
    needle_ids = [encode_piece(tokenizer, needle.text) for needle in needles]
    fixed = len(head) + len(tail) + sum(map(len, needle_ids))
    room = length - fixed
    if room < 1:
        raise KVStudioError(f"a context of {length} tokens is too short for this task: the instruction, "
                            f"needles and question alone take {fixed}; ask for a longer length")
    hay = (haystack_ids or prose_ids(tokenizer, seed, room))[:room]
    if len(hay) < room:
        hay = hay + prose_ids(tokenizer, seed, room - len(hay))
    order = sorted(range(len(needles)), key=lambda i: needles[i].depth)
    cuts = [_sentence_cut(tokenizer, hay, round(needles[i].depth * room)) for i in order]
    ids, positions, previous = list(head), [0] * len(needles), 0
    for i, cut in zip(order, cuts):
        cut = max(cut, previous)  # needles stay in depth order whatever the sentence ends did
        ids += hay[previous:cut]
        positions[i] = len(ids)
        ids += needle_ids[i]
        previous = cut
    ids += hay[previous:]
    return Context(ids + tail, positions, room, question_start=len(ids))


def _sentence_cut(tokenizer, hay: list[int], target: int) -> int:
    """The sentence end nearest `target` (the index just after its last token), within
    SENTENCE_SEARCH_TOKENS either way; `target` itself when no sentence ends that close."""
    target = max(0, min(target, len(hay)))
    if target in (0, len(hay)):
        return target  # the very start or end of the haystack is a boundary already
    for distance in range(SENTENCE_SEARCH_TOKENS):
        for index in (target - distance, target + distance):
            if 0 < index <= len(hay) and tokenizer.decode(hay[index - 1:index]).rstrip().endswith("."):
                return index
    return target
