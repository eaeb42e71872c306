"""What the benchmark scripts share: a realistic prompt of an exact token length."""

from __future__ import annotations

from kvstudio.core.evaluate import passkey_prompt


def prompt_of_length(engine, n_tokens: int, key: str = "57314") -> list[int]:
    """Token ids of a pass-key prompt (real prose-like text) cut or grown to exactly n_tokens."""
    repeats = max(2, n_tokens // 20)
    ids = engine.encode(passkey_prompt(key, repeats))
    while len(ids) < n_tokens:
        repeats *= 2
        ids = engine.encode(passkey_prompt(key, repeats))
    return ids[-n_tokens:]  # keep the question at the end
