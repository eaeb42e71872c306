"""Sliding window: keep the most recent N entries.

The simplest bounded cache (as in Mistral's sliding-window attention, applied to the cache alone):
after every step each layer keeps the `window` newest entries and drops the rest. The StreamingLLM
paper (Xiao et al., 2023, arXiv:2309.17453) shows this collapses once the first tokens leave the
window, which is why `streaming_llm` keeps sinks.
"""

from __future__ import annotations

from dataclasses import dataclass

from kvstudio.core.errors import PolicyConfigError
from kvstudio.core.policies.base import LayerState, LayerView, Policy, PolicyConfig, keep_all_if_within, keep_sinks_and_recent, parameter


@dataclass
class WindowConfig(PolicyConfig):
    window: int | None = parameter(None, help="most recent entries kept (same as --budget)", minimum=1)

    def validate(self) -> None:
        # window and budget are two names for one number here; either may be given.
        if self.window is not None and self.budget is not None and self.window != self.budget:
            raise PolicyConfigError(f"--window {self.window} and --budget {self.budget} disagree: give one of them")
        self.budget = self.budget if self.budget is not None else self.window
        self.window = self.budget
        if self.budget is None:
            raise PolicyConfigError("the window policy needs --budget N (or --window N)")
        super().validate()


class WindowPolicy(Policy):
    name = "window"
    summary = "keep the most recent N entries"
    Config = WindowConfig

    def select(self, view: LayerView, state: LayerState):
        if keep_all_if_within(view):
            return None
        return keep_sinks_and_recent(view, sink=0)
