"""Decayed H2O: heavy hitters judged mostly by recent attention.

A recency-weighted variant of H2O (Zhang et al., 2023, arXiv:2306.14048). Plain H2O sums every
attention an entry ever received, so tokens that were important early keep their place forever.
Here the running score decays: at every step, score = decay * score + attention received now
(mean over the query heads of each KV head, summed over the step's queries). The cache keeps the
`recent` newest entries plus the highest-scoring others, up to the budget. decay = 1 is plain H2O.
"""

from __future__ import annotations

from dataclasses import dataclass

from kvstudio.core.errors import PolicyConfigError
from kvstudio.core.policies.base import (Policy, PolicyConfig, keep_all_if_within, keep_top_scores, parameter,
                                         recent_mask)


@dataclass
class DecayedH2OConfig(PolicyConfig):
    recent: int | None = parameter(None, help="newest entries always kept (default: half the budget)", minimum=0)
    decay: float = parameter(0.9, help="how much of the old score survives each step (1: plain H2O)",
                             minimum=0.0, maximum=1.0)

    def validate(self) -> None:
        super().validate()
        if self.budget is not None:
            self.recent = self.budget // 2 if self.recent is None else self.recent
            if self.recent > self.budget:
                raise PolicyConfigError(f"--recent {self.recent} is larger than --budget {self.budget}")


class DecayedH2OPolicy(Policy):
    name = "decayed_h2o"
    summary = "H2O whose accumulated attention decays each step (recency-weighted heavy hitters)"
    Config = DecayedH2OConfig
    needs_attention = True
    attention_form = "sums"  # each entry's attention summed over this step's queries is all it uses

    def select(self, view, state):
        score = state.grow("score", view.kv_heads, view.n_entries, device=view.keys.device)
        score.mul_(self.config.decay).add_(view.attention_sums_per_kv_head())
        if keep_all_if_within(view):
            return None
        return keep_top_scores(score, view.budget, recent_mask(view.n_entries, self.config.recent, view.keys.device))
