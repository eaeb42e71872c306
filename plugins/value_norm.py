"""Value norm: keep the entries whose values would move the output most.

After "Attention Score is not All You Need for Token Importance Indicator in KV Cache Reduction:
Value Also Matters" (Guo et al., 2024, arXiv:2406.12335): an entry's contribution to the output is
its attention times its value vector, so a large value norm marks an entry worth keeping even
without looking at attention. The rule: keep the `recent` newest entries, and fill the rest of the
budget with the entries whose value vectors have the largest L2 norm, per KV head, at every step.
Needs no attention weights.
"""

from __future__ import annotations

from dataclasses import dataclass

from kvstudio.core.errors import PolicyConfigError
from kvstudio.core.policies.base import (Policy, PolicyConfig, keep_all_if_within, keep_top_scores, parameter,
                                         recent_mask)


@dataclass
class ValueNormConfig(PolicyConfig):
    recent: int = parameter(8, help="newest entries always kept", minimum=0)

    def validate(self) -> None:
        super().validate()
        if self.budget is not None and self.recent > self.budget:
            raise PolicyConfigError(f"--recent {self.recent} is larger than --budget {self.budget}")


class ValueNormPolicy(Policy):
    name = "value_norm"
    summary = "keep the entries with the largest value norms, plus the newest"
    Config = ValueNormConfig

    def select(self, view, state):
        if keep_all_if_within(view):
            return None
        norms = view.values.float().norm(dim=-1)  # (kv_heads, n)
        return keep_top_scores(norms, view.budget, recent_mask(view.n_entries, self.config.recent, view.keys.device))
