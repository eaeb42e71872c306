"""H2O: Heavy-Hitter Oracle.

Zhang et al., "H2O: Heavy-Hitter Oracle for Efficient Generative Inference of Large Language
Models" (NeurIPS 2023, arXiv:2306.14048). A few tokens ("heavy hitters") collect most of the
attention. The rule: each cached entry accumulates the attention it receives from every query, over
all steps so far; the cache keeps the `recent` newest entries plus the entries with the highest
accumulated attention, up to the budget. It is the paper's greedy online algorithm: scores add up
step by step and eviction happens between prefill chunks and at every decode step, so an evicted
entry never comes back and stops collecting score.

GQA: the attention of a group's query heads is combined onto their KV head (`gqa_aggregation`: mean
by default, max or sum) each step, before accumulating; each KV head selects on its own scores.
"""

from __future__ import annotations

from dataclasses import dataclass

from kvstudio.core.errors import PolicyConfigError
import torch

from kvstudio.core.policies.base import (AttentionScoringConfig, LayerState, LayerView, Policy, combine_query_heads,
                                        keep_all_if_within, keep_top_scores, parameter, recent_mask)


@dataclass
class H2OConfig(AttentionScoringConfig):
    recent: int | None = parameter(None, help="newest entries always kept (default: half the budget)", minimum=0)

    def validate(self) -> None:
        super().validate()
        if self.budget is not None:
            if self.recent is None:
                self.recent = self.budget // 2
            if self.recent > self.budget:
                raise PolicyConfigError(f"--recent {self.recent} is larger than --budget {self.budget}")


class H2OPolicy(Policy):
    name = "h2o"
    summary = "heavy hitters (most attention accumulated over all steps) + recent entries"
    Config = H2OConfig
    needs_attention = True  # every new query's row, at prefill and decode
    attention_form = "sums"  # only each entry's total over those rows is used

    def select(self, view: LayerView, state: LayerState):
        accumulated = state.grow("accumulated", view.kv_heads, view.n_entries, device=view.keys.device)
        accumulated += view.attention_sums_per_kv_head(self.config.gqa_aggregation)
        if keep_all_if_within(view):
            return None
        return keep_top_scores(accumulated, view.budget, recent_mask(view.n_entries, self.config.recent,
                                                                     view.keys.device))

    def select_together(self, sums: torch.Tensor, states: list[LayerState], budget: int,
                        kv_heads: int) -> torch.Tensor | None:
        """`select` for rows of a batch that decode at their budget (base.py, "Rows decoding together"):
        their accumulated scores stacked, each row's new entry starting at 0, one sort for all."""
        rows, heads, n = sums.shape
        previous = [state.per_entry.get("accumulated") for state in states]
        if any(scores is None or scores.shape != (kv_heads, n - 1) for scores in previous):
            return None  # a row whose state does not cover its older entries: row by row
        stacked = torch.stack(previous)
        accumulated = torch.cat([stacked, stacked.new_zeros(rows, kv_heads, 1)], dim=2)
        # The query heads of row r are rows r*heads.. of the flattened sums: grouped as one row's are.
        accumulated += combine_query_heads(sums.reshape(rows * heads, n), rows * kv_heads,
                                           self.config.gqa_aggregation).view(rows, kv_heads, n)
        for state, row_scores in zip(states, accumulated):
            state.per_entry["accumulated"] = row_scores
        keep = keep_top_scores(accumulated.view(rows * kv_heads, n), budget,
                               recent_mask(n, self.config.recent, sums.device))
        return keep.view(rows, kv_heads, budget)
