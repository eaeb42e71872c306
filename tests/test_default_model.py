"""The embedded default model (SmolLM2-135M-Instruct): identity with transformers, and a pass key."""

from __future__ import annotations

import pytest
import torch

from kvstudio.core.runtime.engine import GenerationSettings
from kvstudio.core.evaluate import passkey_prompt
from kvstudio.core.spec import create_policy


pytestmark = pytest.mark.slow

PASS_KEY = "57314"


def test_full_policy_is_token_identical_to_generate(default_engine):
    ids = default_engine.encode("The three primary colours are", chat_template=False)
    expected = default_engine.model.generate(torch.tensor([ids]), max_new_tokens=30, do_sample=False,
                                             min_new_tokens=30)[0, len(ids):].tolist()
    result = default_engine.generate(ids, create_policy("full"), GenerationSettings(max_new_tokens=30))
    assert result.token_ids == expected


def test_chunked_prefill_logits_match_one_shot(default_engine):
    # Tolerance: 30 fp32 layers; chunking reorders sums. Observed: max |diff| 2.4e-5 on logits up to 18
    # (chunks of 16, 64, 100 over 294 tokens); 2e-4 leaves headroom for other CPUs.
    ids = default_engine.encode(passkey_prompt(PASS_KEY, 10))
    one_shot = default_engine.prompt_logits(ids, create_policy("full"), chunk_size=len(ids))
    chunked = default_engine.prompt_logits(ids, create_policy("full"), chunk_size=64)
    torch.testing.assert_close(chunked, one_shot, atol=2e-4, rtol=1e-5)


@pytest.fixture(scope="module")
def passkey_ids(default_engine):
    ids = default_engine.encode(passkey_prompt(PASS_KEY, 40))
    assert 950 <= len(ids) <= 1100
    return ids


def _pass_key_positions(engine) -> set[int]:
    """Token positions covering every occurrence of the key's digits, found by character offsets."""
    prompt = passkey_prompt(PASS_KEY, 40)
    offsets = engine.tokenizer(prompt, return_offsets_mapping=True)["offset_mapping"]
    spans, start = [], prompt.find(PASS_KEY)
    while start != -1:
        spans.append((start, start + len(PASS_KEY)))
        start = prompt.find(PASS_KEY, start + 1)
    return {i for i, (a, b) in enumerate(offsets) for s, e in spans if a < e and b > s}


def test_pass_key_is_retrieved_with_the_full_cache(default_engine, passkey_ids):
    result = default_engine.generate(passkey_ids, create_policy("full"),
                                     GenerationSettings(max_new_tokens=8, chunk_size=256))
    assert PASS_KEY in result.text


def test_pass_key_is_lost_when_streaming_llm_evicts_it(default_engine, passkey_ids):
    from kvstudio.core.recording.events import Recorder

    recorder = Recorder()
    result = default_engine.generate(passkey_ids, create_policy("streaming_llm", budget=64, sink=4),
                                     GenerationSettings(max_new_tokens=8, chunk_size=256), recorder=recorder)
    assert PASS_KEY not in result.text
    # It is lost *because* it was evicted: every token of the key left every layer and KV head.
    key_positions = _pass_key_positions(default_engine)
    assert len(key_positions) >= 4  # two occurrences of a 5-digit number
    for layer in range(default_engine.loaded.n_layers):
        for head in range(default_engine.loaded.n_kv_heads):
            evicted = {int(p) for e in recorder.all("evictions") if (e.layer, e.kv_head) == (layer, head)
                       for p in e.positions}
            assert key_positions <= evicted
    assert max(result.kept_per_layer) == 64
