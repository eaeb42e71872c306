"""The policy registry: every built-in policy, looked up by name.

Plugins (a later issue) register into the same table through `register`.
"""

from __future__ import annotations

from ..errors import PolicyConfigError
from .base import Policy, PolicyConfig
from .full import FullPolicy
from .h2o import H2OPolicy
from .knorm import KeyNormPolicy
from .pyramidkv import PyramidKVPolicy
from .random_policy import RandomPolicy
from .snapkv import SnapKVPolicy
from .streaming_llm import StreamingLLMPolicy
from .tova import TOVAPolicy
from .window import WindowPolicy

_REGISTRY: dict[str, type[Policy]] = {}


def register(policy_class: type[Policy]) -> type[Policy]:
    name = policy_class.name
    if name in _REGISTRY and _REGISTRY[name] is not policy_class:
        raise PolicyConfigError(f"two policies are named '{name}'")
    _REGISTRY[name] = policy_class
    return policy_class


for _builtin in (FullPolicy, WindowPolicy, StreamingLLMPolicy, H2OPolicy, TOVAPolicy, SnapKVPolicy,
                 PyramidKVPolicy, KeyNormPolicy, RandomPolicy):
    register(_builtin)


def available_policies() -> dict[str, type[Policy]]:
    return dict(_REGISTRY)


def policy_class(name: str) -> type[Policy]:
    try:
        return _REGISTRY[name]
    except KeyError:
        raise PolicyConfigError(f"unknown policy '{name}': choose one of {', '.join(_REGISTRY)}") from None


def create_policy(name: str, **params) -> Policy:
    """Build a policy by name; parameters left as None take the policy's defaults."""
    return policy_class(name)(**{k: v for k, v in params.items() if v is not None})


__all__ = ["Policy", "PolicyConfig", "available_policies", "create_policy", "policy_class", "register"]
