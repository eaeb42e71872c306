"""Key norm: keep the keys with the lowest L2 norm.

Devoto et al., "A Simple and Effective L2 Norm-Based Strategy for KV Cache Compression" (EMNLP
2024, arXiv:2406.11430). Keys with a low L2 norm tend to receive high attention, so the norm is a
free proxy for importance that needs no attention weights (and so works with any attention kernel).
The rule: whenever a KV head holds more than the budget, keep the `budget` keys with the lowest L2
norm, per KV head, at every prefill chunk and decode step. Nothing is protected: not sinks, not the
newest token.
"""

from __future__ import annotations

from kvstudio.core.policies.base import LayerState, LayerView, Policy, keep_all_if_within, keep_top_scores


class KeyNormPolicy(Policy):
    name = "knorm"
    summary = "keep the keys with the lowest L2 norm (needs no attention)"

    def select(self, view: LayerView, state: LayerState):
        if keep_all_if_within(view):
            return None
        return keep_top_scores(-view.keys.float().norm(dim=-1), view.budget)
