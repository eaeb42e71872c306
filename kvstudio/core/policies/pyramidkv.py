"""PyramidKV: SnapKV's selection with budgets that shrink with depth.

Cai et al., "PyramidKV: Dynamic KV Cache Compression based on Pyramidal Information Funneling"
(arXiv:2406.02069). Attention is spread widely in lower layers and concentrates on a few tokens in
higher ones ("pyramidal information funneling"), so lower layers get more cache and higher layers
less. The rule, as in the authors' KVCache-Factory: with s = budget - observation window,
min = s // beta and max = 2s - min, layer l keeps window + max - l * ((max - min) // (L - 1))
entries, selected exactly as SnapKV selects. Integer steps make that total drift from a uniform
allocation; the drift is spread evenly (remainder on the deepest layers), so the total is exactly
L x budget and budgets never increase with depth.
"""

from __future__ import annotations

from dataclasses import dataclass

from kvstudio.core.errors import PolicyConfigError
from kvstudio.core.policies.base import parameter
from kvstudio.core.policies.snapkv import SnapKVConfig, SnapKVPolicy


@dataclass
class PyramidKVConfig(SnapKVConfig):
    beta: int = parameter(20, help="steepness: the top layer keeps about (budget - window) / beta", minimum=1)


def pyramid_budgets(budget: int, window: int, n_layers: int, beta: int) -> list[int]:
    """Per-layer budgets: linearly decreasing with depth, summing to n_layers * budget."""
    if n_layers == 1:
        return [budget]
    spare = budget - window
    smallest = spare // beta
    largest = 2 * spare - smallest
    step = (largest - smallest) // (n_layers - 1)
    budgets = [window + largest - layer * step for layer in range(n_layers)]
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
            "--observation-window"
        )
    return budgets


class PyramidKVPolicy(SnapKVPolicy):
    name = "pyramidkv"
    summary = "SnapKV's selection with per-layer budgets shrinking with depth (same total)"
    Config = PyramidKVConfig
    uniform_budgets = False

    def budget_for(self, layer_idx: int, n_layers: int) -> int | None:
        budgets = pyramid_budgets(self.config.budget, self.config.observation_window, n_layers, self.config.beta)
        return budgets[layer_idx]
