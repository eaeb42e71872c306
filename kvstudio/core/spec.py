"""The cache a run uses, as one value: a policy's name, its parameters and its storage (CacheSpec).

A run's cache goes by several forms: a name a user types (`h2o-int4+minicache`, `snapkv+host`), a
history row (the policy's name and its parameters with the storage fields that differ from the
defaults under "storage"), a saved cache's header, an eval variant. They are all read into a
CacheSpec and written back from it, and `CacheSpec.build()` is the only way a policy object is
made: the policy's Config, validate() and __init__ run under the plugin guard (a plugin that
raises there is a PolicyError naming its file and line), and the storage is attached.

    CacheSpec.parse("h2o-int4", {"budget": 128}).build()    # the policy, stored in int4
    CacheSpec.of(policy).record()                              # ("h2o", {"budget": 128, ..., "storage": {...}})
"""

from __future__ import annotations

from dataclasses import dataclass, field

from kvstudio.core.plugins.guard import build_policy as guarded_construction
from kvstudio.core.policies import completed_record, policy_class
from kvstudio.core.policies.base import Policy
from kvstudio.core.storage.base import StorageConfig
from kvstudio.core.storage.policy_storage import (STORAGE_KEY, attach, cache_name_for, changed_fields, split_cache_name,
                                                  storage_config, storage_fields, storage_of)


@dataclass(frozen=True)
class CacheSpec:
    """A policy (by registered name), the parameters given to it (the rest take its defaults) and
    its storage. Frozen: a spec is passed around and recorded, never changed in place."""

    policy: str
    parameters: dict = field(default_factory=dict)
    storage: StorageConfig = field(default_factory=StorageConfig)

    @classmethod
    def parse(cls, name: str, parameters: dict | None = None) -> CacheSpec:
        """From a cache name ('h2o', 'h2o-int4', 'full+minicache') and parameters whose "storage" entry
        (a dict of StorageConfig fields) sets the storage; the name's codec and merge win over it."""
        parameters = dict(parameters or {})
        fields = storage_fields(name, parameters.pop(STORAGE_KEY, None))
        return cls(split_cache_name(name)[0], parameters, storage_config(fields))

    @classmethod
    def from_record(cls, name: str, parameters: dict | None) -> CacheSpec:
        """From a run history row (its policy or cache name and its recorded parameters); rows of older
        versions, without a "storage" entry or with fields this version does not know, read too, and
        parameters added since take the value those runs had (PolicyConfig.former_values)."""
        spec = cls.parse(name, parameters)
        return cls(spec.policy, completed_record(spec.policy, spec.parameters), spec.storage)

    @classmethod
    def of(cls, policy: Policy) -> CacheSpec:
        """The spec of a policy object: its configuration (every parameter) and its storage."""
        return cls(policy.name, policy.config.as_dict(), storage_of(policy))

    @property
    def name(self) -> str:
        """'h2o-int4+host': the policy with its codec, tier and merging (KeysAndValues' naming)."""
        return cache_name_for(self.policy, self.storage)

    def record(self) -> tuple[str, dict]:
        """(policy name, parameters) as the run history and eval variants store them: the storage fields
        that differ from the defaults under "storage" (nothing for fp on the device)."""
        changed = changed_fields(self.storage)
        return self.policy, dict(self.parameters) | ({STORAGE_KEY: changed} if changed else {})

    def describe(self) -> str:
        """The cache's name and, when it is not fp on the device, its storage in words."""
        default = not changed_fields(self.storage)
        return self.name if default else f"{self.name} ({self.storage.describe()})"

    def build(self) -> Policy:
        """The policy object, constructed under the plugin guard, with this storage attached."""
        given = {k: v for k, v in self.parameters.items() if v is not None}
        policy = guarded_construction(policy_class(self.policy), given)
        return attach(policy, self.storage) if self.storage != StorageConfig() else policy


def create_policy(name: str, **parameters) -> Policy:
    """A policy by registered name; parameters left as None take the policy's defaults. Guarded."""
    return CacheSpec(name, parameters).build()


def build_policy(name: str, parameters: dict) -> Policy:
    """A policy from a cache name ('h2o' or 'h2o-int4') and parameters with an optional "storage" entry."""
    return CacheSpec.parse(name, parameters).build()
