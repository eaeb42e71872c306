"""How a prompt with a question meets the policy: three protocols, named and chosen per evaluation.

  bounded            (the default) the whole prompt in prefill chunks of --chunk-size, the policy
                     evicting between chunks: peak cache memory stays bounded by budget + chunk,
                     whatever the prompt. The question may fall in the last chunk, partly or whole.
  question-aware     the whole prompt, question included, in one prefill chunk, then compression: the
                     question is inside the policy's observation window (KVCache-Factory, SnapKV's
                     paper). Memory grows with the prompt.
  question-agnostic  the context alone in one prefill chunk, then compression; the question is fed
                     after, in one step the policy treats as decoding (kvpress's default: the cache
                     is compressed without knowing the question). Several questions about one context
                     reuse its compressed cache: it is captured once and restored per question.

Every generation task has a question: the sample says where it begins (`Sample.question_start`).
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import replace

from kvstudio.core.errors import KVStudioError

BOUNDED, QUESTION_AWARE, QUESTION_AGNOSTIC = "bounded", "question-aware", "question-agnostic"
PROTOCOLS = (BOUNDED, QUESTION_AWARE, QUESTION_AGNOSTIC)
DEFAULT_PROTOCOL = BOUNDED
CONTEXTS_KEPT = 8  # compressed contexts a sweep keeps for the questions that follow (each one budget's worth)


def check_protocol(protocol: str) -> str:
    if protocol not in PROTOCOLS:
        raise KVStudioError(f"unknown protocol '{protocol}': choose one of {', '.join(PROTOCOLS)}")
    return protocol


def protocol_settings(protocol: str, settings, ids: list[int], question_start: int | None):
    """The GenerationSettings that feed `ids` under `protocol` (chunking and the question's split)."""
    check_protocol(protocol)
    if protocol == BOUNDED:
        return settings
    if protocol == QUESTION_AWARE:
        return replace(settings, chunk_size=len(ids), question_start=None)
    if question_start is None or not 0 < question_start <= len(ids):
        raise KVStudioError("this task's prompts do not say where their question begins, so it cannot be "
                            "compressed question-agnostic; use --protocol bounded or question-aware")
    return replace(settings, chunk_size=question_start, question_start=question_start)


class CompressedContexts:
    """The compressed cache of each recent (policy, context), captured after its prefill, so the
    questions about one context restore it instead of prefilling the context again."""

    def __init__(self, kept: int = CONTEXTS_KEPT):
        self.kept = kept
        self._states: OrderedDict[tuple, tuple] = OrderedDict()

    def generate(self, engine, policy_key: str, ids: list[int], policy, settings, **options):
        """engine.generate of a question-agnostic prompt (settings from protocol_settings), from the
        context's compressed cache when it was computed before. Returns (result, context peak bytes,
        whether the context was reused)."""
        split = settings.question_start
        key = (policy_key, tuple(ids[:split]))
        found = self._states.get(key)
        reused = found is not None
        if found is None:
            context_settings = replace(settings, max_new_tokens=0, question_start=None, memory_sample_hz=0)
            prefilled = engine.generate(ids[:split], policy, context_settings, keep_state=True)
            found = (prefilled.state, prefilled.peak_cache_bytes)
            if prefilled.state is not None:  # (a codec or tier saved states cannot hold: computed each time)
                self._states[key] = found
                while len(self._states) > self.kept:
                    self._states.popitem(last=False)
        else:
            self._states.move_to_end(key)
        state, context_peak = found
        if state is None:
            return engine.generate(ids, policy, settings, **options), 0, False
        return engine.generate(ids, policy, settings, start=state, **options), context_peak, reused
