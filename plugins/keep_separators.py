"""Separators: keep sinks, punctuation and special tokens, and the newest entries.

After SepLLM (Chen et al., 2024, arXiv:2412.12094): models compress the content of a segment into
the separator that closes it (".", ",", "?", a newline...), so keeping separators keeps a summary of
what was evicted around them. The rule, per layer: always keep the first `sink` tokens and the
`recent` newest entries; spend the rest of the budget on separator and special tokens, newest
first; if any budget is left, on the newest other entries.
"""

from __future__ import annotations

import string
from dataclasses import dataclass

import torch

from kvstudio.core.errors import PolicyConfigError
from kvstudio.core.policies.base import Policy, PolicyConfig, keep_all_if_within, keep_top_scores, parameter

SEPARATOR_CHARACTERS = set(string.punctuation) | {"\n"}


@dataclass
class SeparatorsConfig(PolicyConfig):
    sink: int = parameter(4, help="first tokens always kept", minimum=0)
    recent: int = parameter(16, help="newest entries always kept", minimum=0)

    def validate(self) -> None:
        super().validate()
        if self.budget is not None and self.sink + self.recent > self.budget:
            raise PolicyConfigError(f"--sink {self.sink} + --recent {self.recent} exceed --budget {self.budget}")


def is_separator(tokenizer, token_id: int) -> bool:
    """Special tokens, and tokens made only of punctuation or newlines (spaces aside)."""
    if token_id in set(tokenizer.all_special_ids):
        return True
    text = tokenizer.decode([token_id]).strip(" ")
    return bool(text) and all(character in SEPARATOR_CHARACTERS for character in text)


class SeparatorsPolicy(Policy):
    name = "separators"
    summary = "sinks + punctuation/special tokens + the newest entries (after SepLLM)"
    Config = SeparatorsConfig

    def select(self, view, state):
        if keep_all_if_within(view):
            return None
        known = state.extra.setdefault("separator", {})  # token id -> is a separator; ids repeat a lot
        ids = view.token_ids[view.positions]  # (kv_heads, n)
        for token_id in set(ids.unique().tolist()) - known.keys():
            known[token_id] = is_separator(view.tokenizer, token_id)
        separator = torch.tensor([[known[i] for i in row] for row in ids.tolist()], device=ids.device)
        n = view.n_entries
        always = (view.positions < self.config.sink) | (torch.arange(n, device=ids.device) >= n - self.config.recent)
        # Newer is better; any separator outranks any other token.
        score = view.positions.float() + separator.float() * (view.positions.max().item() + 1)
        return keep_top_scores(score, view.budget, always)
