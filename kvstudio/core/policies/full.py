"""Full cache: keep every entry. The reference every other policy is measured against."""

from __future__ import annotations

from dataclasses import dataclass

from kvstudio.core.errors import PolicyConfigError
from kvstudio.core.policies.base import LayerState, LayerView, Policy, PolicyConfig


@dataclass
class FullConfig(PolicyConfig):
    def validate(self) -> None:
        super().validate()
        if self.budget is not None:
            raise PolicyConfigError("the full policy keeps everything: drop --budget, or pick window, streaming_llm, ...")


class FullPolicy(Policy):
    """Keep every key and value. Memory grows linearly with the sequence."""

    name = "full"
    summary = "keep every entry (no eviction): the reference"
    Config = FullConfig
    requires_budget = False

    def select(self, view: LayerView, state: LayerState):
        return None
