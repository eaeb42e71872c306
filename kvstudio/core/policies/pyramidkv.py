"""PyramidKV: SnapKV's selection with budgets that shrink with depth.

Cai et al., "PyramidKV: Dynamic KV Cache Compression based on Pyramidal Information Funneling"
(arXiv:2406.02069). Attention is spread widely in lower layers and concentrates on a few tokens in
higher ones ("pyramidal information funneling"), so lower layers get more cache and higher layers
less. Entries are selected exactly as SnapKV selects; only each layer's budget differs.

Two schedules (`schedule`):

- `kvcache-factory` (the default): exactly what the authors' KVCache-Factory computes in
  `PyramidKVCluster.update_kv` (pyramidkv/pyramidkv_utils.py), from the budget C (window included),
  the observation window W, beta and the prompt length q. With s = C - W, min = s // beta and
  max = 2s - min, layer l keeps W + max - l * ((max - min) // (L - 1)) entries. Prompts too short
  for that pyramid: q < C keeps everything; q < 2s keeps C entries on every layer (plain SnapKV);
  when max >= q - W the pyramid is clipped to max = q - W, min = 2s - max (layer 0 then keeps the
  whole prompt). Integer steps make the total drift from L x C (at C=128, W=32, 30 layers: 3 840
  budgeted, 3 990 kept), as the authors' code does.
- `even`: the same pyramid at long prompts with that drift spread evenly (remainder on the deepest
  layers), so the total is exactly L x C and budgets never increase with depth; no short-prompt rule
  beyond keeping everything while it fits. KV Studio's schedule before KVCache-Factory's was made
  the default; history rows that name no schedule ran this one.

The prompt length q is the tokens fed so far when a layer compresses: the prompt itself when one
prefill chunk covers it (KVCache-Factory compresses once, after the whole prompt); with chunked
prefill, each chunk's compression uses the tokens seen up to it, the same for every layer.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import Any, ClassVar

from kvstudio.core.errors import PolicyConfigError
from kvstudio.core.policies.base import LayerState, LayerView, Phase, parameter
from kvstudio.core.policies.snapkv import SnapKVConfig, SnapKVPolicy

KVCACHE_FACTORY, EVEN = "kvcache-factory", "even"
SCHEDULES = (KVCACHE_FACTORY, EVEN)


@dataclass
class PyramidKVConfig(SnapKVConfig):
    beta: int = parameter(20, help="steepness: the top layer keeps about (budget - window) / beta", minimum=1)
    schedule: str = parameter(KVCACHE_FACTORY, help="per-layer budgets: kvcache-factory (the authors' code: "
                              "rounding and short-prompt rule) or even (the total is exactly layers x budget)",
                              choices=SCHEDULES)
    former_values: ClassVar[dict[str, Any]] = {**SnapKVConfig.former_values, "schedule": EVEN}


def kvcache_factory_budgets(budget: int, window: int, n_layers: int, beta: int,
                            prompt_length: int | None = None) -> list[int]:
    """Entries each layer keeps after compressing a prompt of `prompt_length` tokens, as KVCache-Factory
    computes them (window included). None: a prompt long enough for the whole pyramid."""
    if n_layers == 1:  # (KVCache-Factory divides by L - 1; one layer is plain SnapKV)
        return [budget if prompt_length is None else min(budget, prompt_length)]
    spare = budget - window
    smallest = spare // beta
    largest = 2 * spare - smallest
    if prompt_length is not None:
        if prompt_length < budget:
            return [prompt_length] * n_layers  # nothing to compress yet
        if prompt_length < 2 * spare:
            return [budget] * n_layers  # too short for a pyramid: SnapKV's budget everywhere
        if largest >= prompt_length - window:  # the top of the pyramid cannot keep more than the prompt
            largest = prompt_length - window
            smallest = 2 * spare - largest
    step = (largest - smallest) // (n_layers - 1)
    return [window + largest - layer * step for layer in range(n_layers)]


@lru_cache(maxsize=64)
def kvcache_factory_limits(budget: int, window: int, n_layers: int, beta: int) -> tuple[int, ...]:
    """The most entries each layer keeps over every prompt length (the engine's check after a step):
    the schedule changes only for prompts up to the top layer's long-prompt budget."""
    longest = kvcache_factory_budgets(budget, window, n_layers, beta)
    limits = list(longest)
    for length in range(budget, longest[0] + 1):
        limits = [max(a, b) for a, b in zip(limits, kvcache_factory_budgets(budget, window, n_layers, beta, length))]
    return tuple(limits)


def even_budgets(budget: int, window: int, n_layers: int, beta: int) -> list[int]:
    """Per-layer budgets: linearly decreasing with depth, summing to n_layers * budget."""
    if n_layers == 1:
        return [budget]
    budgets = kvcache_factory_budgets(budget, window, n_layers, beta)
    drift = sum(budgets) - n_layers * budget  # > 0: integer steps left the pyramid too wide
    even, remainder = divmod(drift, n_layers)
    budgets = [b - even for b in budgets]
    for layer in range(n_layers - remainder, n_layers):
        budgets[layer] -= 1
    # The deepest layer may keep only the window (as in KVCache-Factory when spare // beta is 0),
    # never less.
    if budgets[-1] < window:
        raise PolicyConfigError(
            f"--budget {budget} is too small for a pyramid over {n_layers} layers with --observation-window "
            f"{window}: the deepest layer could not even keep the window; raise --budget or lower "
            "--observation-window, or use --schedule kvcache-factory"
        )
    return budgets


def pyramid_budgets(budget: int, window: int, n_layers: int, beta: int, schedule: str = KVCACHE_FACTORY) -> list[int]:
    """Each layer's budget at long prompts under `schedule`."""
    if schedule == EVEN:
        return even_budgets(budget, window, n_layers, beta)
    return kvcache_factory_budgets(budget, window, n_layers, beta)


class PyramidKVPolicy(SnapKVPolicy):
    name = "pyramidkv"
    summary = "SnapKV's selection with per-layer budgets shrinking with depth (KVCache-Factory's schedule)"
    Config = PyramidKVConfig
    uniform_budgets = False

    def _shape(self) -> tuple[int, int, int]:
        """(budget, observation window, beta): what the schedules are computed from."""
        return self.config.budget, self.config.observation_window, self.config.beta

    def budget_for(self, layer_idx: int, n_layers: int) -> int | None:
        budget, window, beta = self._shape()
        return pyramid_budgets(budget, window, n_layers, beta, self.config.schedule)[layer_idx]

    def limit_for(self, layer_idx: int, n_layers: int, phase: Phase) -> int | None:
        if self.config.schedule == EVEN:
            return super().limit_for(layer_idx, n_layers, phase)
        budget, window, beta = self._shape()
        limit = kvcache_factory_limits(budget, window, n_layers, beta)[layer_idx]
        if phase == "decode":
            return limit + self.config.compress_every if self.config.compress_every else None
        return limit

    def compression_budget(self, view: LayerView, state: LayerState) -> int:
        if self.config.schedule == EVEN:
            return view.budget
        if view.phase == "decode":  # re-compressing while decoding: what the prompt left this layer
            return state.extra.get("budget", view.budget)
        seen = view.token_ids.shape[0] if view.token_ids is not None else view.n_entries
        budget, window, beta = self._shape()
        kept = kvcache_factory_budgets(budget, window, view.n_layers, beta, seen)[view.layer_idx]
        state.extra["budget"] = kept
        return kept
