"""SnapKV: the observation window votes for what to keep.

Li et al., "SnapKV: LLM Knows What You are Looking for Before Generation" (NeurIPS 2024,
arXiv:2404.14469). The attention that the last `w` prompt queries (the observation window) give to
earlier entries predicts what generation will need. The rule: sum the window queries' attention to
every entry before the window, smooth the sums with a 1-D pooling of `kernel_size` over the entry
axis (so neighbours of important tokens stay too), keep the top `budget - w` entries by that score
plus the window itself. As in the paper the prompt is compressed and decoding then appends freely;
`compress_every N` optionally re-compresses during decoding with the queries of the last N steps.

Chunked prefill: after each chunk the chunk's last `w` queries are the observation window over the
entries held so far. When one chunk covers the prompt this is exactly the paper's SnapKV; with
chunks it is what keeps memory bounded, at the price of earlier chunks being judged by nearer
queries. Pooling runs over stored order, where earlier evictions may already have left gaps.

GQA: a group's query heads are combined onto their KV head (`gqa_aggregation`: mean by default, max
or sum), after the window's sums and before pooling, as KVCache-Factory does; each KV head selects on
its own.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from kvstudio.core.errors import PolicyConfigError
from kvstudio.core.policies.base import (AttentionScoringConfig, LayerState, LayerView, Phase, Policy, keep_top_scores,
                                        parameter)


@dataclass
class SnapKVConfig(AttentionScoringConfig):
    observation_window: int = parameter(32, help="last prompt queries whose attention scores the rest", minimum=1)
    kernel_size: int = parameter(5, help="pooling kernel over neighbouring entries (odd)", minimum=1)
    pooling: str = parameter("avgpool", help="how scores are smoothed", choices=("avgpool", "maxpool"))
    compress_every: int = parameter(0, help="re-compress every N decode steps (0: never, as in the paper)",
                                    minimum=0)

    def validate(self) -> None:
        super().validate()
        if self.kernel_size % 2 == 0:
            raise PolicyConfigError(f"--kernel-size must be odd so pooling keeps every entry, got {self.kernel_size}")
        if self.budget is not None and self.budget <= self.observation_window:
            raise PolicyConfigError(
                f"--budget {self.budget} must be larger than --observation-window {self.observation_window}: "
                "the window is always kept and the rest of the budget goes to the entries it votes for"
            )


def pool_scores(scores: torch.Tensor, kernel_size: int, pooling: str) -> torch.Tensor:
    """Smooth (kv_heads, n) scores over the entry axis; the length is unchanged (odd kernel)."""
    pool = F.avg_pool1d if pooling == "avgpool" else F.max_pool1d
    return pool(scores.unsqueeze(1), kernel_size=kernel_size, padding=kernel_size // 2, stride=1).squeeze(1)


class SnapKVPolicy(Policy):
    name = "snapkv"
    summary = "the last prompt queries vote (pooled attention) for the entries to keep, plus the window"
    Config = SnapKVConfig
    needs_attention = True
    attention_form = "sums"  # the window's votes are its rows summed

    def attention_queries(self, n_new: int, phase: Phase) -> int:
        if phase == "prefill":
            return min(self.config.observation_window, n_new)
        return 1 if self.config.compress_every else 0

    def limit_for(self, layer_idx: int, n_layers: int, phase: Phase) -> int | None:
        budget = self.budget_for(layer_idx, n_layers)
        if phase == "decode":
            return budget + self.config.compress_every if self.config.compress_every else None
        return budget

    def compression_budget(self, view: LayerView, state: LayerState) -> int:
        """What this layer keeps when it compresses now (PyramidKV's schedule overrides it)."""
        return view.budget

    def select(self, view: LayerView, state: LayerState):
        if view.phase == "prefill":
            budget = self.compression_budget(view, state)
            if view.n_entries <= budget:
                return None
            return self._compress(view, view.attention_sums_per_kv_head(self.config.gqa_aggregation), budget)
        if not self.config.compress_every:
            return None
        # Decoding: gather the votes of the queries since the last compression.
        observed = state.grow("observed", view.kv_heads, view.n_entries, device=view.keys.device)
        observed += view.attention_sums_per_kv_head(self.config.gqa_aggregation)  # one query at decode: its row
        state.extra["steps"] = state.extra.get("steps", 0) + 1
        budget = self.compression_budget(view, state)
        if state.extra["steps"] < self.config.compress_every or view.n_entries <= budget:
            return None
        window = min(self.config.observation_window, state.extra["steps"])
        votes = observed[:, : view.n_entries - window].clone()
        observed.zero_()
        state.extra["steps"] = 0
        return self._keep(view, self._pool(votes), window, budget)

    def _compress(self, view: LayerView, window_sums: torch.Tensor, budget: int) -> torch.Tensor:
        """window_sums (kv_heads, n): what the last `window` queries gave each entry, summed."""
        window = min(self.config.observation_window, view.n_new)
        votes = window_sums[:, : view.n_entries - window]
        return self._keep(view, self._pool(votes), window, budget)

    def _pool(self, votes: torch.Tensor) -> torch.Tensor:
        return pool_scores(votes, self.config.kernel_size, self.config.pooling)

    @staticmethod
    def _keep(view: LayerView, votes: torch.Tensor, window: int, budget: int) -> torch.Tensor:
        chosen = keep_top_scores(votes, budget - window)
        window_entries = torch.arange(view.n_entries - window, view.n_entries, device=chosen.device)
        return torch.cat([chosen, window_entries.expand(view.kv_heads, -1)], dim=1)
