"""Decode evictions of several batch rows at once (core/runtime/group_eviction.py) are each row's own.

The selection without a sort (one entry goes: keep_top_scores' `_all_but_lowest`) against the sort,
H2O's and TOVA's `select_together` against their `select` row by row (indices and states, bit for
bit), and a batched run that takes the path against the single runs.
"""

from __future__ import annotations

import pytest
import torch

from kvstudio.core.policies import base
from kvstudio.core.policies.base import LayerState, LayerView, keep_top_scores
from kvstudio.core.runtime import group_eviction
from kvstudio.core.runtime.batch import BatchRow, generate_batch
from kvstudio.core.runtime.engine import GenerationSettings
from kvstudio.core.recording.events import Recorder
from kvstudio.core.spec import create_policy

from .helpers import random_ids


def sorted_keep(scores: torch.Tensor, budget: int, always_keep=None) -> torch.Tensor:
    """keep_top_scores' general rule, spelled out: the stable descending sort's first `budget`, in order."""
    scores = scores.float()
    if always_keep is not None:
        scores = scores.masked_fill(always_keep.expand_as(scores), float("inf"))
    order = torch.sort(scores, dim=-1, descending=True, stable=True).indices
    return order[..., :budget].sort(dim=-1).values


def test_dropping_the_lowest_ranks_as_the_stable_sort_does_ties_infinities_and_nans():
    generator = torch.Generator().manual_seed(3)
    for _ in range(600):
        rows = int(torch.randint(1, 6, (1,), generator=generator))
        n = int(torch.randint(2, 30, (1,), generator=generator))
        scores = torch.randint(0, 4, (rows, n), generator=generator).float()  # many ties
        scores[torch.rand(rows, n, generator=generator) < 0.1] = float("-inf")
        scores[torch.rand(rows, n, generator=generator) < 0.1] = float("inf")
        scores[torch.rand(rows, n, generator=generator) < 0.1] = float("nan")
        protected = torch.rand(n, generator=generator) < 0.3
        forced = scores.masked_fill(protected.expand_as(scores), float("inf"))
        assert torch.equal(base._all_but_lowest(forced), sorted_keep(scores, n - 1, protected)), (scores, protected)
    # Rows of only NaN and +inf: NaN ranks above +inf, so a +inf goes; a row of NaNs loses its last.
    edge = torch.tensor([[float("inf"), float("nan")], [float("nan"), float("nan")]])
    assert base._all_but_lowest(edge).tolist() == sorted_keep(edge, 1).tolist() == [[1], [0]]
    # keep_top_scores takes the path for large score tensors only (where it is faster): same answer.
    large = torch.randn(8, 257, generator=generator).round(decimals=1)
    assert torch.equal(keep_top_scores(large, 256), sorted_keep(large, 256))


def view_of(n: int, kv_heads: int, heads: int, budget: int, sums: torch.Tensor) -> LayerView:
    return LayerView(layer_idx=0, n_layers=1, step=5, phase="decode", keys=torch.zeros(kv_heads, n, 4),
                     values=torch.zeros(kv_heads, n, 4), positions=torch.arange(n).expand(kv_heads, n), n_new=1,
                     budget=budget, attention=None, attention_sums=sums)


@pytest.mark.parametrize("name,parameters", [("h2o", {}), ("h2o", {"recent": 3, "gqa_aggregation": "max"}),
                                             ("tova", {}), ("tova", {"gqa_aggregation": "sum"})])
def test_select_together_is_each_rows_select_bit_for_bit(name, parameters):
    rows, heads, kv_heads, budget = 5, 6, 2, 12
    n = budget + 1
    policy = create_policy(name, budget=budget, **parameters)
    generator = torch.Generator().manual_seed(11)
    sums = torch.rand(rows, heads, n, generator=generator).round(decimals=2)  # ties among the sums
    alone, together = [], []
    for _ in range(rows):
        state = LayerState()
        if name == "h2o":
            state.per_entry["accumulated"] = torch.rand(kv_heads, n - 1, generator=generator).round(decimals=1)
        copy = LayerState()
        copy.per_entry = {key: tensor.clone() for key, tensor in state.per_entry.items()}
        alone.append(state)
        together.append(copy)
    expected = [policy.select(view_of(n, kv_heads, heads, budget, sums[r]), alone[r]) for r in range(rows)]
    keep = policy.select_together(sums, together, budget, kv_heads)
    assert keep.shape == (rows, kv_heads, budget)
    for r in range(rows):
        assert torch.equal(keep[r], expected[r])
        assert together[r].per_entry.keys() == alone[r].per_entry.keys()
        for key in alone[r].per_entry:
            assert torch.equal(together[r].per_entry[key], alone[r].per_entry[key])
    assert not all(torch.equal(keep[0], keep[r]) for r in range(1, rows))  # rows differ: a mix-up would show


def test_h2o_declines_rows_whose_state_does_not_cover_their_entries():
    policy = create_policy("h2o", budget=4)
    states = [LayerState(), LayerState()]
    states[0].per_entry["accumulated"] = torch.zeros(2, 4)
    states[1].per_entry["accumulated"] = torch.zeros(2, 3)  # one entry short
    assert policy.select_together(torch.rand(2, 4, 5), states, 4, 2) is None


@pytest.mark.parametrize("name", ["h2o", "tova"])
def test_a_batch_evicts_its_decoding_rows_together_as_their_single_runs(llama_engine, monkeypatch, name):
    sizes = []
    original = group_eviction.evict_together
    monkeypatch.setattr(group_eviction, "evict_together",
                        lambda layer_idx, caches, sums: sizes.append(len(caches)) or original(layer_idx, caches, sums))
    prompts = [random_ids(n, seed=40 + i) for i, n in enumerate((30, 45, 26, 60))]
    settings = GenerationSettings(max_new_tokens=12, chunk_size=16, memory_sample_hz=0, ignore_eos=True)
    batch = generate_batch(llama_engine, [BatchRow(p, create_policy(name, budget=20)) for p in prompts], settings)
    assert sizes and max(sizes) == len(prompts), sizes
    for row, prompt in zip(batch.rows, prompts):
        recorder = Recorder()
        single = llama_engine.generate(prompt, create_policy(name, budget=20), settings, recorder=recorder)
        assert row.result.token_ids == single.token_ids
        evictions = [(e.step, e.layer, e.kv_head, e.positions.tolist()) for e in row.recorder.all("evictions")]
        assert evictions == [(e.step, e.layer, e.kv_head, e.positions.tolist()) for e in recorder.all("evictions")]
        assert row.result.peak_cache_bytes == single.peak_cache_bytes and single.evictions > 0


def test_rows_under_different_rules_are_not_evicted_together(llama_engine, monkeypatch):
    sizes = []
    original = group_eviction.evict_together
    monkeypatch.setattr(group_eviction, "evict_together",
                        lambda layer_idx, caches, sums: sizes.append(len(caches)) or original(layer_idx, caches, sums))
    prompts = [random_ids(n, seed=50 + i) for i, n in enumerate((30, 45, 26, 60))]
    policies = [create_policy("h2o", budget=20), create_policy("h2o", budget=20, recent=4),
                create_policy("h2o", budget=20), create_policy("h2o", budget=20, recent=4)]
    settings = GenerationSettings(max_new_tokens=8, chunk_size=16, memory_sample_hz=0, ignore_eos=True)
    generate_batch(llama_engine, [BatchRow(p, policy) for p, policy in zip(prompts, policies)], settings)
    assert sizes and max(sizes) == 2  # two sets of two: equal configurations only
