"""Policy configuration, the contract's checks, and property-based invariants on a real model."""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kvstudio.core.runtime.engine import GenerationSettings
from kvstudio.core.errors import PolicyConfigError, PolicyError
from kvstudio.core.recording.events import Recorder
from kvstudio.core.policies import available_policies
from kvstudio.core.spec import create_policy
from kvstudio.core.policies.base import LayerState, Policy, PolicyConfig, keep_top_scores, parameter

from .conftest import engine_for
from .helpers import check_policy_invariants, random_ids


def test_registry_lists_the_builtins_with_declared_parameters():
    policies = available_policies()
    assert {"full", "window", "streaming_llm"} <= set(policies)
    sink = {spec.name: spec for spec in policies["streaming_llm"].Config.parameters()}["sink"]
    assert (sink.type, sink.default, sink.minimum, sink.option) == (int, 4, 0, "--sink")
    for policy in policies.values():
        assert policy.summary and policy.__module__.startswith("kvstudio.core.policies.")


@pytest.mark.parametrize("name, params, message", [
    ("nope", {}, "unknown policy 'nope'"),
    ("streaming_llm", {"budget": 3, "sink": 4}, "budget must be larger than the sink"),
    ("streaming_llm", {"budget": 4, "sink": 4}, "budget must be larger than the sink"),
    ("streaming_llm", {"sink": 4}, "needs --budget"),
    ("streaming_llm", {"budget": 10, "sink": 2, "window": 5}, "give two of the three"),
    ("streaming_llm", {"budget": 0}, "--budget must be at least 1"),
    ("streaming_llm", {"budget": 10, "sink": -1}, "--sink must be at least 0"),
    ("streaming_llm", {"budget": "10"}, "--budget must be int"),
    ("window", {}, "needs --budget"),
    ("window", {"budget": 8, "window": 9}, "disagree"),
    ("full", {"budget": 8}, "keeps everything"),
    ("full", {"sink": 2}, "its parameters are budget, rerotate"),
])
def test_bad_parameters_name_what_to_change(name, params, message):
    with pytest.raises(PolicyConfigError, match=message):
        create_policy(name, **params)


def test_window_and_sink_derive_the_budget():
    assert create_policy("streaming_llm", sink=2, window=6).config.budget == 8
    assert create_policy("streaming_llm", budget=8, sink=2).config.window == 6
    assert create_policy("window", window=5).config.budget == 5


def test_keep_top_scores_forces_protected_entries_and_sorts():
    scores = torch.tensor([[0.1, 0.9, 0.5, 0.7, 0.2], [0.3, 0.3, 0.3, 0.3, 0.9]])
    protected = torch.tensor([True, False, False, False, False])
    kept = keep_top_scores(scores, 3, protected)
    assert kept.tolist() == [[0, 1, 3], [0, 1, 4]]  # ties go to the earlier entry


class _Misbehaving(Policy):
    name = "misbehaving"
    summary = "returns whatever the test asks"

    @classmethod
    def returning(cls, fn, budget=4):
        policy = cls(budget=budget)
        policy.fn = fn
        return policy

    def select(self, view, state):
        return self.fn(view)


@pytest.mark.parametrize("bad, message", [
    (lambda v: torch.arange(v.n_entries).expand(v.kv_heads, -1)[:, -6:], "above its budget"),
    (lambda v: torch.tensor([[3, 2, 1, 0]] * v.kv_heads), "not strictly increasing"),
    (lambda v: torch.tensor([[0, 1, 2, 99]] * v.kv_heads), "outside"),
    (lambda v: torch.tensor([0, 1, 2, 3]), "shape"),
    (lambda v: None, "kept all"),
    (lambda v: 1 / 0, "raised in layer 0: ZeroDivisionError"),
])
def test_a_misbehaving_policy_stops_the_run_with_its_name(llama_engine, bad, message):
    with pytest.raises(PolicyError, match=message) as caught:
        llama_engine.generate(random_ids(10), _Misbehaving.returning(bad), GenerationSettings(max_new_tokens=2))
    assert "misbehaving" in str(caught.value)
    # The engine is still usable afterwards.
    assert llama_engine.generate(random_ids(10), create_policy("full"),
                                 GenerationSettings(max_new_tokens=2)).token_ids


class _CountingState(Policy):
    """Keeps the newest entries and counts, per entry, the steps it survived: exercises LayerState."""

    name = "counting"
    summary = "test policy"

    def select(self, view, state):
        ages = state.grow("age", view.kv_heads, view.n_entries, fill=0.0)
        ages += 1
        if view.n_entries <= view.budget:
            return None
        return torch.arange(view.n_entries - view.budget, view.n_entries).expand(view.kv_heads, -1)


def test_per_entry_state_follows_evictions(llama_engine):
    result = llama_engine.generate(random_ids(12), _CountingState(budget=5),
                                   GenerationSettings(max_new_tokens=4, chunk_size=4), keep_cache=True)
    # Chunks of 4 tokens, then 3 decode steps: 6 steps. The 5 kept entries are the newest 5 tokens
    # (positions 10..14): tokens 10, 11 arrived in step 2 (4 steps old), 12 in 3, 13 in 4, 14 in 5.
    ages = result.cache.layers[0].state.per_entry["age"]
    assert ages.tolist() == [[4.0, 4.0, 3.0, 2.0, 1.0]] * 2


# --- property-based invariants --------------------------------------------------------------------

_BUDGET = st.integers(2, 24)
# One strategy of parameters per built-in policy; a new built-in without one fails the test below.
POLICY_PARAMETERS = {
    "window": _BUDGET.map(lambda b: {"budget": b}),
    "streaming_llm": _BUDGET.flatmap(lambda b: st.integers(0, b - 1).map(lambda s: {"budget": b, "sink": s})),
    "h2o": _BUDGET.flatmap(lambda b: st.integers(0, b).map(lambda r: {"budget": b, "recent": r})),
    "tova": _BUDGET.map(lambda b: {"budget": b}),
    "snapkv": st.integers(3, 24).flatmap(lambda b: st.fixed_dictionaries({
        "budget": st.just(b), "observation_window": st.integers(1, min(b - 1, 8)),
        "kernel_size": st.sampled_from([1, 3, 5]), "compress_every": st.integers(0, 4)})),
    "pyramidkv": st.integers(12, 40).map(lambda b: {"budget": b, "observation_window": 2}),
    "knorm": _BUDGET.map(lambda b: {"budget": b}),
    "random": _BUDGET.flatmap(lambda b: st.integers(0, 50).map(lambda s: {"budget": b, "random_seed": s})),
}


def test_every_builtin_policy_has_an_invariant_strategy():
    from kvstudio.core.policies import BUILT_IN, source_of

    builtins = {name for name in available_policies() if source_of(name) == BUILT_IN}
    assert builtins - {"full"} == set(POLICY_PARAMETERS)


_cases = st.sampled_from(sorted(POLICY_PARAMETERS)).flatmap(
    lambda name: POLICY_PARAMETERS[name].map(lambda params: (name, params)))


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(case=_cases, prompt_length=st.integers(1, 70), chunk_size=st.integers(1, 32),
       new_tokens=st.integers(0, 8), rerotate=st.booleans(), seed=st.integers(0, 1000))
def test_policy_invariants(case, prompt_length, chunk_size, new_tokens, rerotate, seed):
    name, params = case
    rerotate = rerotate and name != "pyramidkv"  # per-layer budgets have no single contiguous position
    policy = create_policy(name, rerotate=rerotate, **params)
    sink = params.get("sink", 0)
    result = check_policy_invariants(policy, prompt_length, chunk_size, new_tokens, seed, sink=sink)
    if name in ("window", "streaming_llm"):  # the rule fixes exactly which positions remain
        fed = prompt_length + max(len(result.token_ids) - 1, 0)
        budget = params["budget"]
        recent = list(range(max(sink, fed - (budget - sink)), fed))
        expected = list(range(min(sink, fed))) + recent if fed > budget else list(range(fed))
        for layer in range(4):
            assert result.cache.positions(layer).tolist() == [expected] * 2
