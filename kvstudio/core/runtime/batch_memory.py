"""Will a batch fit? What its rows' caches and one packed step need, against the memory free now.

A batched run holds what its rows hold, not the longest row times the batch: each row's cache is
bounded by its own policy (budget + one chunk + the tokens a policy lets decoding add) or, without a
budget, by its own prompt and new tokens. A packed step adds the activations of every row's next
piece at once. The estimate is an upper bound in the model's dtype (codecs hold less), so a batch
refused here would have been close; one that passes can still run out (the run then fails with
the usual out-of-memory explanation). Without --batch-size, a batch runs as many rows at a time as
fit (the others start as rows finish).
"""

from __future__ import annotations

from dataclasses import dataclass

import psutil
import torch

from kvstudio.core.errors import KVStudioError
from kvstudio.core.models.layer_kinds import text_config
from kvstudio.core.models.loading import LoadedModel
from kvstudio.core.plugins.guard import call_policy, checked_count
from kvstudio.core.policies.base import Policy
from kvstudio.core.units import format_bytes

HEADROOM = 0.8  # of the free memory, what a batch may plan to use: the allocator and the OS need the rest


def row_cache_bytes(loaded: LoadedModel, prompt_tokens: int, policy: Policy, chunk_size: int,
                    max_new_tokens: int) -> int:
    """The most one row's cache can hold: every layer, both keys and values."""
    n_layers = loaded.n_layers
    budgets = [checked_count(policy, "budget_for", call_policy(policy, "budget_for()", layer, policy.budget_for, layer,
                                                               n_layers), minimum=1, allow_none=True, layer=layer)
               for layer in range(n_layers)]
    whole = prompt_tokens + max_new_tokens
    entries = [whole if budget is None else min(whole, budget + chunk_size + max_new_tokens) for budget in budgets]
    element = torch.empty((), dtype=loaded.dtype).element_size()
    return sum(entries) * loaded.n_kv_heads * loaded.head_dim * 2 * element


def step_bytes(loaded: LoadedModel, tokens: int) -> int:
    """Activations of one packed forward of `tokens` tokens: the hidden states, the MLP's, q/k/v and
    the kept logits (a few rows of the vocabulary), in float32 at most."""
    config = text_config(loaded.config)
    hidden = config.hidden_size
    intermediate = getattr(config, "intermediate_size", None) or 4 * hidden
    per_token = 6 * hidden + 3 * intermediate + 2 * loaded.n_heads * loaded.head_dim
    return tokens * per_token * 4


def free_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    return psutil.virtual_memory().available


@dataclass
class Fit:
    """How many of a batch's rows fit in flight together, and the figures that say why."""

    rows: int  # of the rows asked about, the most that fit together (largest first)
    need_bytes: int  # what that many need: their caches and one packed step
    wanted_bytes: int  # what all the rows asked about (at most the limit) would need together
    allowed_bytes: int  # what a batch may plan to use (HEADROOM of the free memory)
    available_bytes: int  # the memory free now


def rows_that_fit(loaded: LoadedModel, encoded: list[list[int]], policies: list[Policy], settings,
                  limit: int | None = None, available_bytes: int | None = None) -> Fit:
    """How many rows (at most `limit`, the largest first) fit in flight together."""
    rows = sorted((row_cache_bytes(loaded, len(ids), policy, settings.chunk_size, settings.max_new_tokens)
                   for ids, policy in zip(encoded, policies)), reverse=True)
    piece = min(settings.chunk_size, max(len(ids) for ids in encoded))
    available = free_bytes(loaded.device) if available_bytes is None else available_bytes
    allowed = int(available * HEADROOM)
    wanted = min(limit or len(rows), len(rows))

    def need(count: int) -> int:
        return sum(rows[:count]) + step_bytes(loaded, count * piece)

    fitting = 0
    while fitting < wanted and need(fitting + 1) <= allowed:
        fitting += 1
    return Fit(fitting, need(max(fitting, 1)), need(wanted), allowed, available)


def check_fits(loaded: LoadedModel, encoded: list[list[int]], policies: list[Policy], settings, max_rows: int | None,
               available_bytes: int | None = None) -> int:
    """How many rows may be in flight: `max_rows` when its largest rows fit together, else a refusal
    saying how many would; without `max_rows`, as many as fit (all of them when they do)."""
    wanted = min(max_rows or len(encoded), len(encoded))
    fit = rows_that_fit(loaded, encoded, policies, settings, wanted, available_bytes)
    fitting = fit.rows
    if fitting == wanted or (max_rows is None and fitting):
        return fitting
    advice = (f"{fitting} row{'s' if fitting != 1 else ''} at a time would: use --batch-size {fitting}" if fitting
              else "not even one row would: use a smaller --budget or --chunk-size, or shorter prompts")
    raise KVStudioError(f"a batch of {wanted} rows needs about {format_bytes(fit.wanted_bytes)} for its caches and "
                        f"one step, and {format_bytes(fit.allowed_bytes)} of {format_bytes(fit.available_bytes)} "
                        f"free may be used; {advice}")
