"""The policy registry: every built-in policy, looked up by name.

Plugins (kvstudio.core.plugins) register into the same table, with the file they came from.
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

BUILT_IN = "built-in"
_REGISTRY: dict[str, type[Policy]] = {}
_SOURCES: dict[str, str] = {}  # policy name -> "built-in" or the plugin file it came from


def register(policy_class: type[Policy], source: str = BUILT_IN) -> type[Policy]:
    name = policy_class.name
    # The same file registering again (a reload) replaces its policy; another source may not.
    if name in _REGISTRY and _REGISTRY[name] is not policy_class and _SOURCES[name] != source:
        raise PolicyConfigError(f"two policies are named '{name}': {_SOURCES[name]} and {source}")
    _REGISTRY[name] = policy_class
    _SOURCES[name] = source
    return policy_class


def unregister(name: str) -> None:
    _REGISTRY.pop(name, None)
    _SOURCES.pop(name, None)


def source_of(name: str) -> str | None:
    """Where a registered policy came from: "built-in", a plugin file, or None if unknown."""
    return _SOURCES.get(name)


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
    """Build a policy by name; parameters left as None take the policy's defaults. Its Config,
    validate() and __init__ run under the plugin guard: any fault there is a PolicyError."""
    from ..plugin_guard import build_policy

    return build_policy(policy_class(name), {k: v for k, v in params.items() if v is not None})


__all__ = ["Policy", "PolicyConfig", "available_policies", "create_policy", "policy_class", "register",
           "source_of", "unregister"]
