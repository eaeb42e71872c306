"""--measure-loss: the attention mass on evicted entries, checked against a direct computation.

On layer 0 the compressed run's queries and keys are the full model's (its input is the token
embeddings, which no eviction touches), so transformers' own eager attention over the whole
sequence gives the attention each decode step would pay to every token: the mass on the tokens the
layer no longer holds is the loss, computed here head by head.
"""

from __future__ import annotations

import pytest
import torch

from kvstudio.core.errors import KVStudioError
from kvstudio.core.figures.data import TokenMap
from kvstudio.core.recording.event_types import EVICTED_FLOOR, TOP_EVICTED
from kvstudio.core.recording.events import Recorder
from kvstudio.core.runtime.engine import GenerationSettings
from kvstudio.core.spec import create_policy

from .helpers import random_ids

N, NEW = 48, 5


def measured(engine, policy, prompt, chunk_size=N, new_tokens=NEW, recorder=None):
    settings = GenerationSettings(max_new_tokens=new_tokens, chunk_size=chunk_size, measure_loss=True,
                                  ignore_eos=True, memory_sample_hz=0)
    return engine.generate(prompt, policy, settings, keep_cache=True, recorder=recorder)


def eager_layer_zero(engine, sequence):
    """(heads, n, n): transformers' eager attention of layer 0 over the whole sequence."""
    model = engine.model
    model.set_attn_implementation("eager")
    try:
        with torch.no_grad():
            return model(torch.tensor([sequence]), output_attentions=True).attentions[0][0].float()
    finally:
        model.set_attn_implementation("kvstudio")


def test_the_full_cache_loses_nothing(llama_engine):
    result = measured(llama_engine, create_policy("full"), random_ids(N, seed=3), chunk_size=16)
    assert result.attention_loss == 0.0
    assert all(loss == 0.0 for step in result.steps for loss in step.attention_loss)
    assert result.shadow_bytes > 0


def test_layer_zero_loss_is_the_eager_attention_on_what_snapkv_evicted(llama_engine):
    prompt = random_ids(N, seed=5)
    result = measured(llama_engine, create_policy("snapkv", budget=16, observation_window=4), prompt)
    sequence = prompt + result.token_ids[:-1]  # the tokens fed: the last generated one never was
    attention = eager_layer_zero(llama_engine, sequence)
    held = result.cache.positions(0).tolist()  # SnapKV evicts only the prompt: what stayed, plus decoded tokens
    heads, kv_heads = attention.shape[0], len(held)
    group = heads // kv_heads
    assert result.steps[0].attention_loss[0] == 0.0  # the prompt's step ran before its own eviction
    decode_steps = result.steps[1:]
    assert len(decode_steps) == NEW - 1
    for j, step in enumerate(decode_steps):
        position = N + j
        row = attention[:, position, :position + 1]
        lost = [sum(float(row[h, p]) for p in range(position + 1) if p not in held[h // group]) for h in range(heads)]
        expected = sum(lost) / heads
        assert expected > 0.01  # a budget of 16 of 48 loses something worth checking
        assert step.attention_loss[0] == pytest.approx(expected, abs=2e-6)
    losses = [s.attention_loss for s in result.steps if s.token_id is not None]
    assert result.attention_loss == pytest.approx(sum(sum(x) / len(x) for x in losses) / len(losses), abs=1e-5)
    assert len(result.attention_loss_per_layer) == llama_engine.loaded.n_layers


def test_each_evicted_tokens_would_be_attention_is_the_eager_attention_it_lost(llama_engine):
    """Per evicted token, the share of layer 0's attention it would have received at each decode step
    (averaged over the query heads) against eager attention, and the token map's hover that says it."""
    prompt = random_ids(N, seed=5)
    recorder = Recorder()
    result = measured(llama_engine, create_policy("snapkv", budget=16, observation_window=4), prompt,
                      recorder=recorder)
    attention = eager_layer_zero(llama_engine, prompt + result.token_ids[:-1])
    held = result.cache.positions(0).tolist()
    heads, group = attention.shape[0], attention.shape[0] // len(held)
    for j, step in enumerate(result.steps[1:]):
        position = N + j
        expected = {p: sum(float(attention[h, position, p]) for h in range(heads) if p not in held[h // group]) / heads
                    for p in range(position + 1)}
        evicted = {p: share for p, share in expected.items() if share > 0}
        wanted = sorted(evicted, key=evicted.get, reverse=True)[:TOP_EVICTED]
        wanted = [p for p in wanted if evicted[p] >= EVICTED_FLOOR + 1e-5]  # clear of the floor's rounding
        recorded = dict(step.evicted_attention[0])
        assert len(wanted) >= 5 and set(wanted) <= set(recorded)
        for p, share in recorded.items():
            assert share == pytest.approx(expected[p], abs=2e-6)
        shares = [share for _, share in step.evicted_attention[0]]
        assert shares == sorted(shares, reverse=True) and sum(shares) <= step.attention_loss[0] + 1e-5
    # The token map's hover of the token layer 0 would have attended most at the last step
    last = result.steps[-1]
    position, share = last.evicted_attention[0][0]
    token_map = TokenMap.for_run(recorder.all("runs")[-1])
    token_map.add({kind: recorder.all(kind) for kind in ("tokens", "steps", "evictions")})
    assert f"would have received {share:.1%} of layer 0's attention at step {last.step}" in token_map.describe(position, 0)
    unlisted = next(p for p in range(N) if p not in held[0] and p not in dict(last.evicted_attention[0]))
    assert "would have received under" in token_map.describe(unlisted, 0)
    assert "would have received" in token_map.describe(position, None)
    kept = next(p for p in held[0] if all(p in h for h in held))  # held by every KV head: nothing lost
    assert "would have received" not in token_map.describe(kept, 0)


def test_a_policy_that_evicts_while_decoding_loses_more_as_it_goes(llama_engine):
    result = measured(llama_engine, create_policy("window", budget=8), random_ids(N, seed=7), chunk_size=8,
                      new_tokens=8)
    assert all(0.0 <= loss <= 1.0 for step in result.steps for loss in step.attention_loss)
    assert result.attention_loss > 0.0


def test_measure_loss_is_refused_where_the_shadow_cannot_be_complete(llama_engine):
    with pytest.raises(KVStudioError, match="--rerotate"):
        measured(llama_engine, create_policy("streaming_llm", budget=16, rerotate=True), random_ids(N))


def test_without_measure_loss_nothing_is_measured(llama_engine):
    result = llama_engine.generate(random_ids(N), create_policy("window", budget=8),
                                   GenerationSettings(max_new_tokens=2, memory_sample_hz=0))
    assert result.attention_loss is None and result.steps[0].attention_loss == []
