"""Cache memory is bounded by budget + chunk for every evicting policy, whatever the prompt length."""

from __future__ import annotations

import pytest

from kvstudio.core.runtime.engine import GenerationSettings
from kvstudio.core.policies import BUILT_IN, available_policies, source_of
from kvstudio.core.spec import create_policy

from .helpers import random_ids

BUDGET, CHUNK, LAYERS = 32, 64, 4
BYTES_PER_ENTRY = 2 * 2 * 16 * 4  # keys and values x 2 KV heads x head size 16 x fp32
EXTRA = {"snapkv": {"observation_window": 8}, "pyramidkv": {"observation_window": 8}}


def peak_bytes(engine, policy_name, prompt_length, **params):
    policy = create_policy(policy_name, **params)
    result = engine.generate(random_ids(prompt_length, seed=prompt_length), policy,
                             GenerationSettings(max_new_tokens=1, chunk_size=CHUNK))
    return result.peak_cache_bytes


@pytest.mark.parametrize("name", sorted({n for n in available_policies() if source_of(n) == BUILT_IN} - {"full"}))
def test_peak_cache_bytes_stay_within_budget_plus_chunk(llama_engine, name):
    params = {"budget": BUDGET, **EXTRA.get(name, {})}
    bound = LAYERS * (BUDGET + CHUNK) * BYTES_PER_ENTRY
    short, long = peak_bytes(llama_engine, name, 300, **params), peak_bytes(llama_engine, name, 1500, **params)
    assert short <= bound and long <= bound
    assert long == short  # five times the prompt, not one byte more


def test_full_cache_grows_with_the_prompt(llama_engine):
    short, long = peak_bytes(llama_engine, "full", 300), peak_bytes(llama_engine, "full", 1500)
    assert short == LAYERS * 300 * BYTES_PER_ENTRY
    assert long == LAYERS * 1500 * BYTES_PER_ENTRY
