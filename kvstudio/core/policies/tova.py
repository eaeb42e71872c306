"""TOVA: Token Omission Via Attention.

Oren et al., "Transformers are Multi-State RNNs" (EMNLP 2024, arXiv:2401.06104). A training-free
policy that treats the cache as a bounded multi-state RNN. The rule: whenever the cache exceeds the
budget, keep the entries with the highest attention from the *current* query only, averaged over
all heads of the layer (one decision per layer, shared by every KV head), and drop the rest. Scores
are not accumulated across steps. On the prompt the current query is the last token of each
prefill chunk (the last prompt token when one chunk covers the prompt). With `gqa_aggregation` max or
sum, each GQA group's query heads are combined that way first (mean: the paper's mean over all heads).
"""

from __future__ import annotations

import torch

from kvstudio.core.policies.base import (AttentionScoringConfig, LayerState, LayerView, Phase, Policy,
                                        combine_query_heads, keep_all_if_within, keep_top_scores)


class TOVAPolicy(Policy):
    name = "tova"
    summary = "keep the entries the current query attends to most (mean over heads); no accumulation"
    Config = AttentionScoringConfig
    needs_attention = True
    attention_form = "sums"  # one query: its sums are its row

    def attention_queries(self, n_new: int, phase: Phase) -> int:
        return 1

    def select(self, view: LayerView, state: LayerState):
        if keep_all_if_within(view):
            return None
        # (n,): the current query, each group combined (gqa_aggregation), then the mean over the KV heads
        layer_scores = view.attention_sums_per_kv_head(self.config.gqa_aggregation).mean(dim=0)
        return keep_top_scores(layer_scores.expand(view.kv_heads, -1), view.budget)

    def select_together(self, sums: torch.Tensor, states: list[LayerState], budget: int,
                        kv_heads: int) -> torch.Tensor:
        """`select` for rows of a batch that decode at their budget (base.py, "Rows decoding together"):
        each row's layer scores from its current query, one sort for all rows."""
        rows, heads, n = sums.shape
        combined = combine_query_heads(sums.reshape(rows * heads, n), rows * kv_heads, self.config.gqa_aggregation)
        layer_scores = combined.view(rows, kv_heads, n).mean(dim=1)  # (rows, n): each row's mean over its KV heads
        keep = keep_top_scores(layer_scores[:, None, :].expand(rows, kv_heads, n).reshape(rows * kv_heads, n), budget)
        return keep.view(rows, kv_heads, budget)
