"""On the embedded default model: the needle task separates a full cache from StreamingLLM.

A pass key in ~1,000 tokens of real prose at depth 0.5: the full cache gives it back; StreamingLLM
with a budget of 64 (4 sinks + the newest 60) has evicted it long before the question comes.
"""

from __future__ import annotations

import pytest

from kvstudio.core.runtime.engine import GenerationSettings
from kvstudio.core.evaluate.tasks import TaskOptions, generation_samples
from kvstudio.core.spec import create_policy

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def sample(default_engine):
    return generation_samples("passkey", default_engine.tokenizer, TaskOptions(lengths=(1024,), depths=(0.5,)))[0]


def _answer(engine, sample, policy):
    settings = GenerationSettings(max_new_tokens=sample.max_new_tokens, chunk_size=512, memory_sample_hz=0)
    return engine.generate(sample.ids, policy, settings).text


def test_full_cache_retrieves_the_pass_key_at_half_depth(default_engine, sample):
    assert len(sample.ids) == 1024 and 0.4 < sample.depth < 0.6
    text = _answer(default_engine, sample, create_policy("full"))
    assert sample.score(text)["score"] == 1.0, text


def test_streaming_llm_at_budget_64_loses_it(default_engine, sample):
    text = _answer(default_engine, sample, create_policy("streaming_llm", budget=64))
    assert sample.score(text)["score"] == 0.0, text
