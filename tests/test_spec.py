"""CacheSpec: the one form of "the cache a run uses" (kvstudio.core.spec)."""

from __future__ import annotations

from dataclasses import dataclass

import pytest

from kvstudio.core.errors import PolicyError
from kvstudio.core.policies import register, unregister
from kvstudio.core.policies.base import Policy, PolicyConfig
from kvstudio.core.spec import CacheSpec, create_policy
from kvstudio.core.storage import StorageConfig, cache_name, stored_parameters


def test_a_cache_name_parses_into_policy_parameters_and_storage():
    spec = CacheSpec.parse("h2o-int4+minicache", {"budget": 64, "storage": {"group_size": 16}})
    assert spec.policy == "h2o" and spec.parameters == {"budget": 64}
    assert (spec.storage.codec, spec.storage.merge, spec.storage.group_size) == ("int4", "minicache", 16)
    assert spec.name == "h2o-int4+minicache"


def test_build_gives_the_policy_with_its_storage_and_the_record_reads_back():
    spec = CacheSpec.parse("snapkv-int8", {"budget": 64})
    policy = spec.build()
    assert policy.name == "snapkv" and policy.config.budget == 64 and cache_name(policy) == "snapkv-int8"
    name, parameters = CacheSpec.of(policy).record()
    assert parameters == stored_parameters(policy)
    again = CacheSpec.from_record(name, parameters)
    assert again.storage == policy.storage and again.build().config == policy.config


def test_an_old_history_row_without_storage_reads_as_fp_on_the_device():
    spec = CacheSpec.from_record("window", {"budget": 8})
    assert spec.storage == StorageConfig() and spec.name == "window" and spec.describe() == "window"
    assert not hasattr(spec.build(), "storage") or spec.build().storage == StorageConfig()


@dataclass
class _RaisingConfig(PolicyConfig):
    def validate(self) -> None:
        raise ValueError("config exploded")


class _Raising(Policy):
    name = "spec_test_raising"
    summary = "raises while configuring"
    Config = _RaisingConfig

    def select(self, view, state):  # pragma: no cover - never reached
        raise AssertionError


def test_build_runs_a_policy_under_the_plugin_guard():
    register(_Raising, source="a plugin file")
    try:
        with pytest.raises(PolicyError, match="config exploded"):
            CacheSpec("spec_test_raising").build()
        with pytest.raises(PolicyError):
            create_policy("spec_test_raising")
    finally:
        unregister("spec_test_raising")
