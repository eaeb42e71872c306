"""StreamingLLM: attention sinks plus a recent window.

Xiao et al., "Efficient Streaming Language Models with Attention Sinks" (ICLR 2024,
arXiv:2309.17453). Models put large attention on the first few tokens whatever they say ("attention
sinks"); evicting them breaks generation. The rule: keep the first `sink` tokens and the most recent
`budget - sink` tokens, evict everything in between, at every step. The paper assigns positions
within the cache (contiguous), which `--rerotate` reproduces; by default tokens keep their original
positions, as kvpress and KVCache-Factory do.
"""

from __future__ import annotations

from dataclasses import dataclass

from kvstudio.core.errors import PolicyConfigError
from kvstudio.core.policies.base import LayerState, LayerView, Policy, PolicyConfig, keep_all_if_within, keep_sinks_and_recent, parameter


@dataclass
class StreamingLLMConfig(PolicyConfig):
    sink: int = parameter(4, help="first tokens always kept (attention sinks)", minimum=0)
    window: int | None = parameter(None, help="most recent entries kept after the sinks (budget = sink + window)",
                                   minimum=1)

    def validate(self) -> None:
        if self.window is not None and self.budget is not None and self.sink + self.window != self.budget:
            raise PolicyConfigError(
                f"--sink {self.sink} + --window {self.window} != --budget {self.budget}: give two of the three"
            )
        if self.budget is None and self.window is not None:
            self.budget = self.sink + self.window
        if self.budget is None:
            raise PolicyConfigError("the streaming_llm policy needs --budget N (or --window N)")
        super().validate()
        if self.budget <= self.sink:
            raise PolicyConfigError(
                f"--budget {self.budget} leaves no room for recent tokens after --sink {self.sink}: "
                f"the budget must be larger than the sink"
            )
        self.window = self.budget - self.sink


class StreamingLLMPolicy(Policy):
    name = "streaming_llm"
    summary = "attention sinks (first tokens) + the most recent tokens"
    Config = StreamingLLMConfig

    def select(self, view: LayerView, state: LayerState):
        if keep_all_if_within(view):
            return None
        return keep_sinks_and_recent(view, sink=self.config.sink)
