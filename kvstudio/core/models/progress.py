"""How a long model step (a load, the default model's conversion) reports progress: a message and a fraction."""

from __future__ import annotations

from collections.abc import Callable

Progress = Callable[[str, "float | None"], None]


def say(progress: Progress | None, message: str, fraction: float | None = None) -> None:
    if progress is not None:
        progress(message, fraction)
