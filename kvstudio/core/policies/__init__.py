"""The policy registry: every built-in policy, looked up by name.

Plugins (kvstudio.core.plugins.loader) register into the same table, with the file they came from.
A policy object is made by kvstudio.core.spec (CacheSpec.build, create_policy), under the plugin guard.
"""

from __future__ import annotations

from kvstudio.core.errors import PolicyConfigError
from kvstudio.core.registry import BUILT_IN, Registry
from kvstudio.core.policies.base import Policy, PolicyConfig
from kvstudio.core.policies.full import FullPolicy
from kvstudio.core.policies.h2o import H2OPolicy
from kvstudio.core.policies.knorm import KeyNormPolicy
from kvstudio.core.policies.pyramidkv import PyramidKVPolicy
from kvstudio.core.policies.random_policy import RandomPolicy
from kvstudio.core.policies.snapkv import SnapKVPolicy
from kvstudio.core.policies.streaming_llm import StreamingLLMPolicy
from kvstudio.core.policies.tova import TOVAPolicy
from kvstudio.core.policies.window import WindowPolicy

_POLICIES: Registry[type[Policy]] = Registry("policy", "policies", PolicyConfigError)


def register(policy_class: type[Policy], source: str = BUILT_IN) -> type[Policy]:
    """Register under the class's name; the same file registering again (a reload) replaces it."""
    return _POLICIES.register(policy_class.name, policy_class, source)


def unregister(name: str) -> None:
    _POLICIES.unregister(name)


def source_of(name: str) -> str | None:
    """Where a registered policy came from: "built-in", a plugin file, or None if unknown."""
    return _POLICIES.source_of(name)


for _builtin in (FullPolicy, WindowPolicy, StreamingLLMPolicy, H2OPolicy, TOVAPolicy, SnapKVPolicy,
                 PyramidKVPolicy, KeyNormPolicy, RandomPolicy):
    register(_builtin)


def completed_record(name: str, parameters: dict) -> dict:
    """A record's parameters (a history row's, a saved cache's) with the parameters it predates filled in
    with the values its run had (`PolicyConfig.former_values`); unknown policies are left as they are."""
    known = _POLICIES.classes.get(name)
    if known is None:
        return dict(parameters)
    return {**{k: v for k, v in known.Config.former_values.items() if k not in parameters}, **parameters}


def available_policies() -> dict[str, type[Policy]]:
    return dict(_POLICIES.classes)


def policy_class(name: str) -> type[Policy]:
    return _POLICIES.get(name)


__all__ = ["Policy", "PolicyConfig", "available_policies", "completed_record", "policy_class", "register",
           "source_of", "unregister"]
