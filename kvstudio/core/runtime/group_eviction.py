"""The decode-step eviction of several rows of a batch at once.

At a decode step at its budget, each row of a batched run holds budget + 1 entries per KV head at a
layer (its new one included) and evicts one. Row by row (PolicyLayer.apply_policy) that is a view,
the policy's select, the eviction's bookkeeping and the store's compaction: some thirty small
tensor operations per row and layer, which on a CPU cost more than the arithmetic they do. The rows
that the batched step attends together (batch_cache.py, `_attend_decoding`) and whose policies share
one rule are evicted here in one stack of tensors instead: one selection (`select_together` of the
policy: its scores stacked, one sort), one gather of the evicted positions, one of the policy state.
Only each row's store compaction stays per row (its buffers are its own).

Which rows: a built-in policy whose own class defines `select_together` (policies/base.py, "Rows
decoding together"), equal configurations and budgets, full-precision storage (FpStore) with no
merging, re-rotation, window or host tier, at a decode step with exactly budget + 1 entries. Every
other row goes through its own apply_policy, as in a single run.

Exact: a sort, gather or mean over stacked rows computes each row as its own call does (the same
reductions over the same elements), so each row keeps, evicts and records exactly what its single
run does (tests/test_group_eviction.py compares the selections and states bit for bit, and
tests/test_batch.py whole runs).
"""

from __future__ import annotations

import torch

from kvstudio.core.errors import KVStudioError
from kvstudio.core.policies.base import LayerState
from kvstudio.core.runtime.cache import PolicyCache
from kvstudio.core.storage.layer_stores import FpStore


def evicts_together(cache: PolicyCache, layer_idx: int) -> bool:
    """Whether this row's decode eviction at this layer may be computed with other rows' (see above)."""
    policy, layer = cache.policy, cache.layers[layer_idx]
    budget = cache.budgets[layer_idx]
    limit = cache.limits["decode"][layer_idx]
    return ("select_together" in type(policy).__dict__ and not cache.checks_index_values  # built-in policies only
            and cache.context.phase == "decode" and budget is not None and (limit is None or limit >= budget)
            and type(layer.store) is FpStore and layer.merge is None and cache.merging is None
            and layer.window is None and layer.host is None and not policy.config.rerotate
            and layer.entry_count() == budget + 1)


def same_rule(a: PolicyCache, b: PolicyCache, layer_idx: int) -> bool:
    return (type(a.policy) is type(b.policy) and a.policy.config == b.policy.config
            and a.budgets[layer_idx] == b.budgets[layer_idx])


def evict_rows_together(layer_idx: int, caches: list[PolicyCache], sums: torch.Tensor
                        ) -> tuple[set[int], dict[int, KVStudioError]]:
    """Of the rows attended together at a decode step (caches[i], sums[i] (query_heads, n)), evict
    those that may together, in sets of one rule. Returns the indices evicted here and the errors of
    those that failed on the way; every other row is left for its own apply_policy."""
    sets: list[list[int]] = []
    for i, cache in enumerate(caches):
        if evicts_together(cache, layer_idx):
            members = next((members for members in sets if same_rule(caches[members[0]], cache, layer_idx)), None)
            if members is None:
                sets.append([i])
            else:
                members.append(i)
    done: set[int] = set()
    errors: dict[int, KVStudioError] = {}
    for members in sets:
        if len(members) < 2:
            continue  # one row: its own apply_policy is the same work
        rows_sums = sums if len(members) == len(caches) else sums[torch.tensor(members, device=sums.device)]
        try:
            if evict_together(layer_idx, [caches[i] for i in members], rows_sums):
                done.update(members)
        except KVStudioError as error:  # (built-in code: out of memory, say) every row of the set ends
            errors.update({i: error for i in members})
    return done, errors


def evict_together(layer_idx: int, caches: list[PolicyCache], sums: torch.Tensor) -> bool:
    """Select and evict one entry per KV head in each row, together. caches: rows that `evicts_together`
    allows under one rule (`same_rule`); sums (rows, query_heads, n) float32, each row's attention of
    its decode query. False when the policy declines (the rows then go one by one, nothing changed)."""
    layers = [cache.layers[layer_idx] for cache in caches]
    states = [layer.state for layer in layers]
    budget = caches[0].budgets[layer_idx]
    positions = torch.stack([layer.positions for layer in layers])  # (rows, kv_heads, n)
    keep = caches[0].policy.select_together(sums, states, budget, positions.shape[1])
    if keep is None:
        return False
    # keep is 0..budget of each head with one index d missing: the first d indices are their own.
    dropped = (keep == torch.arange(budget, device=keep.device)).sum(dim=2, keepdim=True)  # (rows, kv_heads, 1)
    evicted_positions = positions.gather(2, dropped)
    first_moved = dropped.amin(dim=1).view(-1).tolist()  # per row: the first entry any head moves
    _keep_states(states, keep)
    for layer, row_keep, row_evicted, first in zip(layers, keep, evicted_positions, first_moved):
        layer.evict_decided(row_keep, row_evicted, first)
    return True


def _keep_states(states: list[LayerState], keep: torch.Tensor) -> None:
    """Each row's per-entry policy state gathered at its kept indices, as LayerState.keep does: in one
    gather per name over the rows' KV heads stacked, when the rows hold the same tensors' shapes."""
    first = states[0].per_entry
    if not all(state.per_entry.keys() == first.keys()
               and all(state.per_entry[name].shape == tensor.shape for name, tensor in first.items())
               for state in states):
        for state, row_keep in zip(states, keep):
            state.keep(row_keep)
        return
    rows, kv_heads = keep.shape[:2]
    stacked = LayerState()  # every row's KV heads as one state's: (rows * kv_heads, n, ...)
    stacked.per_entry = {name: torch.stack([state.per_entry[name] for state in states]).flatten(0, 1) for name in first}
    stacked.keep(keep.flatten(0, 1))
    for name, tensor in stacked.per_entry.items():
        for state, row_tensor in zip(states, tensor.unflatten(0, (rows, kv_heads))):
            state.per_entry[name] = row_tensor
