"""Named classes and where each came from: the registry behind policies and codecs.

Built-ins register at import; a plugin file registers what it defines under its own path as the
source. The same source registering a name again (a plugin reloaded) replaces it; another source
taking a registered name is refused, so a plugin can never silently shadow a built-in.
"""

from __future__ import annotations

from typing import Generic, TypeVar

BUILT_IN = "built-in"
T = TypeVar("T")


class Registry(Generic[T]):
    def __init__(self, noun: str, plural: str, error: type[Exception]):
        self.noun, self.plural = noun, plural  # "policy", "policies": for messages
        self.error = error  # the KVStudioError subclass a bad name raises
        self.classes: dict[str, T] = {}
        self.sources: dict[str, str] = {}  # name -> BUILT_IN or the plugin file it came from

    def register(self, name: str, cls: T, source: str = BUILT_IN) -> T:
        if name in self.classes and self.classes[name] is not cls and self.sources[name] != source:
            raise self.error(f"two {self.plural} are named '{name}': {self.sources[name]} and {source}")
        self.classes[name] = cls
        self.sources[name] = source
        return cls

    def unregister(self, name: str) -> None:
        """Forget a plugin's entry; built-ins stay."""
        if self.sources.get(name, BUILT_IN) != BUILT_IN:
            self.classes.pop(name, None)
            self.sources.pop(name, None)

    def source_of(self, name: str) -> str | None:
        """Where a registered name came from: BUILT_IN, a plugin file, or None if unknown."""
        return self.sources.get(name)

    def get(self, name: str) -> T:
        if name not in self.classes:
            raise self.error(f"unknown {self.noun} '{name}': choose one of {', '.join(self.classes)}")
        return self.classes[name]
