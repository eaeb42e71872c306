"""Random: a baseline that keeps a uniformly random subset of entries.

Any policy worth its attention computation should beat this. The rule: whenever a KV head holds
more than the budget, keep `budget` of its entries chosen uniformly at random, independently per KV
head and per layer. Seeded: the same seed gives the same choices on the same run.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kvstudio.core.policies.base import LayerState, LayerView, Policy, PolicyConfig, keep_all_if_within, keep_top_scores, parameter


@dataclass
class RandomConfig(PolicyConfig):
    random_seed: int = parameter(0, help="seed of the random choices", minimum=0)


class RandomPolicy(Policy):
    name = "random"
    summary = "keep a random subset (seeded baseline)"
    Config = RandomConfig

    def new_layer_state(self, layer_idx: int) -> LayerState:
        state = LayerState()
        # One generator per layer, so layers draw independently and reproducibly.
        state.extra["generator"] = torch.Generator().manual_seed(self.config.random_seed * 100_003 + layer_idx)
        return state

    def select(self, view: LayerView, state: LayerState):
        if keep_all_if_within(view):
            return None
        scores = torch.rand(view.kv_heads, view.n_entries, generator=state.extra["generator"])
        return keep_top_scores(scores.to(view.keys.device), view.budget)
