"""Attention aggregates ("sums") equal the rows they replace, at every tile size, and keep the same entries."""

from __future__ import annotations

import pytest
import torch

from kvstudio.core.runtime.attention import (attention_and_sums, attention_rows, attention_sums, chunk_mask, query_tile,
                                     scoring_scratch_bytes)
from kvstudio.core.runtime.engine import GenerationSettings
from kvstudio.core.recording.events import Recorder
from kvstudio.core.spec import create_policy
from kvstudio.core.policies.base import LayerView

from .helpers import random_ids

# Both sides sum the same float32 softmax weights, in a different order (tiles): sums of up to ~100
# weights in [0, 1] agree to 1e-5 absolute.
TOLERANCE = dict(atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("q_len, k_len, n_queries", [(1, 30, 1), (8, 8, 8), (8, 40, 3), (37, 90, 37), (64, 64, 20)])
@pytest.mark.parametrize("tile", [1, 3, 7, 1000])
def test_sums_equal_the_sum_of_the_rows_at_every_tile_size(q_len, k_len, n_queries, tile):
    generator = torch.Generator().manual_seed(q_len * 100 + k_len)
    query = torch.randn(1, 6, q_len, 16, generator=generator)
    key = torch.randn(1, 2, k_len, 16, generator=generator)
    scratch = tile * 6 * k_len * 4  # exactly `tile` queries' scores
    assert query_tile(6, k_len, scratch) == tile
    sums = attention_sums(query, key, 0.25, n_queries, scratch_bytes=scratch)
    rows = attention_rows(query, key, 0.25, n_queries)
    torch.testing.assert_close(sums, rows.sum(dim=1), **TOLERANCE)


def test_scratch_stays_within_its_bound_whatever_the_chunk():
    bound = 16 * 2**20
    for q_len, k_len in [(512, 768), (2048, 2048), (8192, 8192)]:
        assert scoring_scratch_bytes(9, k_len, q_len, "sums", bound) <= bound
        # The rows a "rows" policy asks for are the whole matrix: 9 x 2048 x 2048 x 4 = 151 MiB.
    assert scoring_scratch_bytes(9, 2048, 2048, "rows", bound) == 9 * 2048 * 2048 * 4


def test_a_view_gives_sums_from_rows_for_policies_handed_rows():
    rows = torch.rand(4, 3, 10)  # 4 query heads over 2 KV heads, 3 queries, 10 entries
    view = LayerView(0, 1, 0, "prefill", keys=torch.zeros(2, 10, 2), values=torch.zeros(2, 10, 2),
                     positions=torch.arange(10).expand(2, -1), n_new=3, budget=4, attention=rows)
    expected = rows.view(2, 2, 3, 10).mean(dim=1).sum(dim=1)
    torch.testing.assert_close(view.attention_sums_per_kv_head(), expected)


def _rows_twin(name):
    """The same policy reading rows: what every scoring policy did before aggregates."""
    from kvstudio.core.policies import available_policies

    policy_class = available_policies()[name]
    return type(f"Rows{policy_class.__name__}", (policy_class,), {"attention_form": "rows"})


@pytest.mark.parametrize("name", ["h2o", "tova", "snapkv", "pyramidkv"])
@pytest.mark.parametrize("chunk_size", [7, 40])
def test_sums_keep_the_same_entries_as_rows(tiny_engine, name, chunk_size):
    """Every scoring policy, on every tiny architecture, at several chunk and tile sizes: the same
    entries kept after a prefill and 6 decode steps as the same policy reading whole rows."""
    params = dict(budget=12) if name in ("h2o", "tova") else dict(budget=12, observation_window=4)
    prompt = random_ids(40, seed=7)
    settings = GenerationSettings(max_new_tokens=6, chunk_size=chunk_size)
    rows_result = tiny_engine.generate(prompt, _rows_twin(name)(**params), settings, keep_cache=True)
    for one_query_tiles in (True, False):
        policy = create_policy(name, **params)
        cache = tiny_engine.new_cache(policy)
        if one_query_tiles:  # the smallest bound: every query's scores a tile of their own
            cache.scoring_scratch_bytes = 1
        result = _generate_with(tiny_engine, prompt, policy, settings, cache)
        assert result.token_ids == rows_result.token_ids
        for layer in range(tiny_engine.loaded.n_layers):
            assert torch.equal(result.cache.positions(layer), rows_result.cache.positions(layer)), (one_query_tiles, layer)


def _generate_with(engine, prompt, policy, settings, cache):
    return engine.generate(prompt, policy, settings, keep_cache=True, cache=cache)


def test_scoring_scratch_is_reported_and_bounded(llama_engine):
    prompt = random_ids(64, seed=3)
    policy = create_policy("h2o", budget=16)
    cache = llama_engine.new_cache(policy)
    cache.scoring_scratch_bytes = 4096
    result = _generate_with(llama_engine, prompt, policy, GenerationSettings(max_new_tokens=2, chunk_size=64), cache)
    heads = llama_engine.loaded.n_heads
    assert 0 < result.cache.peak_scoring_bytes <= 4096
    rows = _generate_with(llama_engine, prompt, _rows_twin("h2o")(budget=16),
                          GenerationSettings(max_new_tokens=2, chunk_size=64),
                          llama_engine.new_cache(_rows_twin("h2o")(budget=16)))
    assert rows.cache.peak_scoring_bytes == heads * 64 * 64 * 4  # the whole first chunk's matrix


def test_the_watched_row_is_recorded_under_a_sums_policy(llama_engine):
    recorder = Recorder(watch_layers=(1,))
    llama_engine.generate(random_ids(20, seed=2), create_policy("h2o", budget=8),
                          GenerationSettings(max_new_tokens=3, chunk_size=8), recorder=recorder)
    events = recorder.all("attention")
    assert len(events) == 3 + 3 - 1  # 3 prefill chunks, then 2 decode steps
    for event in events:
        assert event.layer == 1
        assert abs(float(event.weights.sum(axis=-1).mean()) - 1.0) < 1e-5  # a softmax row per head


@pytest.mark.parametrize("q_len, k_len", [(1, 33), (8, 8), (37, 90), (64, 64)])  # 1: a decode step
@pytest.mark.parametrize("tile", [1, 5, 1000])
def test_one_pass_gives_sdpas_output_and_the_same_sums(q_len, k_len, tile):
    """attention_and_sums: the output SDPA gives for every query, and the sums of the separate pass."""
    generator = torch.Generator().manual_seed(q_len + k_len)
    query = torch.randn(1, 6, q_len, 16, generator=generator)
    key = torch.randn(1, 2, k_len, 16, generator=generator)
    value = torch.randn(1, 2, k_len, 16, generator=generator)
    scratch = tile * 6 * k_len * 4
    output, sums = attention_and_sums(query, key, value, 0.25, q_len, scratch)
    mask = chunk_mask(q_len, k_len, "cpu")
    expected = torch.nn.functional.scaled_dot_product_attention(
        query, key.repeat_interleave(3, dim=1), value.repeat_interleave(3, dim=1), attn_mask=mask,
        is_causal=mask is None and q_len > 1, scale=0.25)
    torch.testing.assert_close(output, expected.transpose(1, 2), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(sums, attention_sums(query, key, 0.25, q_len, scratch), **TOLERANCE)


def test_fused_and_separate_scoring_keep_the_same_entries(tiny_engine):
    prompt = random_ids(40, seed=5)
    settings = GenerationSettings(max_new_tokens=5, chunk_size=16)
    kept = {}
    for fused in (True, False):
        policy = create_policy("h2o", budget=12)
        cache = tiny_engine.new_cache(policy)
        cache.fused_scoring = fused
        result = _generate_with(tiny_engine, prompt, policy, settings, cache)
        kept[fused] = (result.token_ids, [result.cache.positions(layer).tolist()
                                          for layer in range(tiny_engine.loaded.n_layers)])
    assert kept[True] == kept[False]


@pytest.mark.slow
@pytest.mark.parametrize("name", ["h2o", "tova", "snapkv", "pyramidkv"])
def test_sums_keep_the_same_entries_as_rows_on_the_default_models_pass_key_prompt(default_engine, name):
    """The default model, a ~1k-token pass-key prompt in 256-token chunks, budget 128: the entries kept
    in every layer (and the answer) are those the same policy keeps reading whole rows."""
    from kvstudio.core.evaluate import passkey_prompt

    prompt = default_engine.encode(passkey_prompt("57314", 40))
    settings = GenerationSettings(max_new_tokens=4, chunk_size=256)
    params = dict(budget=128)
    rows = default_engine.generate(prompt, _rows_twin(name)(**params), settings, keep_cache=True)
    sums = default_engine.generate(prompt, create_policy(name, **params), settings, keep_cache=True)
    assert sums.token_ids == rows.token_ids
    for layer in range(default_engine.loaded.n_layers):
        assert torch.equal(sums.cache.positions(layer), rows.cache.positions(layer)), layer
