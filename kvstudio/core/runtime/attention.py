"""The attention function KV Studio registers with transformers.

Output always comes from transformers' own SDPA path, so under the `full` policy a run is the same
computation as `model.generate`. Attention *weights* are computed separately and only for the rows
somebody asked for: the newest queries a policy needs, and the newest query of a watched layer.
SDPA kernels never return weights, and switching the model to eager to get them would cost a full
(q x n) matrix per head per layer on every step. Most policies need only an aggregate of those
rows (H2O: each entry's attention summed over the new queries); that is computed in query tiles of
bounded scratch (`attention_sums`), so the (heads x queries x keys) matrix of a long chunk never
exists.

Outside a KV Studio run (no `kvstudio_cache` keyword) the function is exactly SDPA, so a model with
it registered still works with `model.generate`.
"""

from __future__ import annotations

import math

import torch
from transformers import AttentionInterface, AttentionMaskInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import sdpa_mask

ATTENTION_NAME = "kvstudio"


def chunk_mask(q_len: int, k_len: int, device) -> torch.Tensor | None:
    """The causal mask of a chunk of q_len new queries over k_len stored + new keys.

    Every stored entry is older than the chunk, so the mask is all-visible over the first
    k_len - q_len keys and causal over the last q_len. None where SDPA needs no mask: a single
    query, or no stored entries (SDPA's own is_causal then applies).
    """
    if q_len == 1 or q_len == k_len:
        return None
    visible = torch.ones(q_len, k_len, dtype=torch.bool, device=device).tril(diagonal=k_len - q_len)
    return visible[None, None]


# The most float32 scratch one tile of scores may take: heads x tile queries x keys x 4 bytes. At 2k
# keys and 9 heads that is a tile of ~56 queries; the whole matrix of a 2k-token chunk is 151 MiB.
# Measured on 2 CPU cores (benchmarks/policy_cost.py, h2o one 2k chunk vs full): 16 MiB tiles 1.31x,
# 4 MiB 1.15x: a tile that stays in cache between its matmul, softmax and sum is faster.
SCRATCH_BYTES = 4 * 2**20


def _scores_softmax(query: torch.Tensor, key: torch.Tensor, scaling: float | None, start: int, stop: int) -> torch.Tensor:
    """Softmax weights of queries start..stop-1 (of the chunk's q_len) over the keys they can see:
    (heads, stop-start, visible), where visible = k_len - q_len + stop. Keys after that are in the
    future of every query of the tile, so their weights are zero and are not computed at all (on a
    one-chunk prompt that halves the work).

    query (1, heads, q_len, d), key (1, kv_heads, k_len, d), not GQA-repeated. The last q_len keys
    belong to the queries' own chunk and are masked causally, as in the model's forward.
    """
    _, heads, q_len, head_dim = query.shape
    kv_heads, k_len = key.shape[1], key.shape[2]
    n = stop - start
    visible = k_len - q_len + stop
    scaling = scaling if scaling is not None else 1.0 / math.sqrt(head_dim)
    group = heads // kv_heads
    # Grouping the query heads of each KV head into one batched matmul avoids repeating the keys.
    q = query[0, :, start:stop].float().reshape(kv_heads, group * n, head_dim)
    keys = key[0, :, :visible].float()
    scores = torch.bmm(q, keys.transpose(1, 2)).mul_(scaling).view(kv_heads, group, n, visible)
    if n > 1:  # query i of the tile sits at storage index visible - n + i; the last one sees every key
        query_index = torch.arange(visible - n, visible, device=key.device)
        future = torch.arange(visible, device=key.device)[None, :] > query_index[:, None]
        scores.masked_fill_(future, float("-inf"))
    return torch.softmax(scores, dim=-1).view(heads, n, visible)


def attention_rows(query: torch.Tensor, key: torch.Tensor, scaling: float | None, n_queries: int) -> torch.Tensor:
    """Softmax attention of the newest `n_queries` queries over all keys, float32: (heads, n_queries, k_len).

    The whole rows: for policies that really want them (`attention_form = "rows"`) and the viewer's
    newest row. Scratch is the result itself, heads x n_queries x k_len x 4 bytes.
    """
    q_len = query.shape[2]
    return _scores_softmax(query, key, scaling, q_len - n_queries, q_len)  # the last query sees every key


def query_tile(heads: int, k_len: int, scratch_bytes: int = SCRATCH_BYTES) -> int:
    """How many queries' scores fit in `scratch_bytes` of float32 scratch (at least one)."""
    return max(1, scratch_bytes // (heads * k_len * 4))


def attention_sums(query: torch.Tensor, key: torch.Tensor, scaling: float | None, n_queries: int,
                   scratch_bytes: int = SCRATCH_BYTES) -> torch.Tensor:
    """Sum over the newest `n_queries` queries of their softmax weights, float32: (heads, k_len).

    What H2O, SnapKV and most scorers consume. Computed in query tiles that each fit in
    `scratch_bytes` of float32 scores (the bound holds whatever the chunk size, except that one
    query's row always fits), accumulated in float32; the heads x queries x keys matrix never exists.
    """
    heads, q_len, k_len = query.shape[1], query.shape[2], key.shape[2]
    tile = query_tile(heads, k_len, scratch_bytes)
    total = torch.zeros(heads, k_len, dtype=torch.float32, device=query.device)
    for start in range(q_len - n_queries, q_len, tile):
        weights = _scores_softmax(query, key, scaling, start, min(start + tile, q_len))
        total[:, :weights.shape[-1]] += weights.sum(dim=1)
    return total


def attention_and_sums(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, scaling: float | None,
                       n_queries: int, scratch_bytes: int = SCRATCH_BYTES) -> tuple[torch.Tensor, torch.Tensor]:
    """The attention output of every query and `attention_sums` of the newest `n_queries`, from one
    pass of scores: each tile's softmax weights are multiplied by the values and summed for the
    policy, so nothing is computed twice. Output (1, q_len, heads, d_v) in the query's dtype, as
    transformers' SDPA path returns it; sums (heads, k_len) float32.

    Worth it when the policy wants (nearly) every query, as H2O does: SDPA plus a separate scoring
    pass computes the scores of those queries twice. Scratch: one tile of float32 scores.
    """
    _, heads, q_len, _ = query.shape
    kv_heads, k_len = key.shape[1], key.shape[2]
    group, d_v = heads // kv_heads, value.shape[-1]
    tile = query_tile(heads, k_len, scratch_bytes)
    values = value[0].float()
    output = torch.empty(kv_heads, group, q_len, d_v, dtype=torch.float32, device=query.device)
    sums = torch.zeros(heads, k_len, dtype=torch.float32, device=query.device)
    first_scored = q_len - n_queries
    for start in range(0, q_len, tile):
        stop = min(start + tile, q_len)
        weights = _scores_softmax(query, key, scaling, start, stop)  # (heads, t, visible)
        visible = weights.shape[-1]
        tile_output = torch.bmm(weights.view(kv_heads, group * (stop - start), visible), values[:, :visible])
        output[:, :, start:stop] = tile_output.view(kv_heads, group, stop - start, d_v)
        if stop > first_scored:
            sums[:, :visible] += weights[:, max(first_scored - start, 0):].sum(dim=1)
    output = output.view(heads, q_len, d_v).to(query.dtype).transpose(0, 1).unsqueeze(0).contiguous()
    return output, sums


def _fusable(kvstudio_cache, query: torch.Tensor, form: str, policy_queries: int, kwargs: dict) -> bool:
    """Whether one pass should give both the output and the policy's sums (see attention_and_sums).
    Not while training (SDPA's output is what autograd differentiates) and not for attention
    variants (soft-capping, sliding windows, sinks) that only transformers' own path implements."""
    q_len = query.shape[2]
    plain = all(kwargs.get(name) is None for name in ("softcap", "sliding_window", "s_aux"))
    return (plain and form == "sums" and q_len > 1 and policy_queries == q_len and not torch.is_grad_enabled()
            and kvstudio_cache.fuses_scoring_on(query.device))


def scoring_scratch_bytes(heads: int, k_len: int, n_queries: int, form: str,
                          scratch_bytes: int = SCRATCH_BYTES) -> int:
    """Float32 bytes the scores of one layer's scoring pass occupy at once (rows: all of them)."""
    rows = n_queries if form == "rows" else min(n_queries, query_tile(heads, k_len, scratch_bytes))
    return heads * rows * k_len * 4


def kvstudio_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0,
                       kvstudio_cache=None, **kwargs):
    if kvstudio_cache is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling,
                                      dropout=dropout, **kwargs)
    # The host tier (kvstudio.core.storage.host) puts recalled entries in front, for this step only.
    key, value, recalled = kvstudio_cache.recall(module.layer_idx, query, key, value)
    q_len, k_len = query.shape[2], key.shape[2]
    layer_idx = module.layer_idx
    policy_queries, watched = kvstudio_cache.attention_queries_for(layer_idx, q_len)
    form = kvstudio_cache.policy.attention_form
    rows = sums = watched_row = None
    if policy_queries and _fusable(kvstudio_cache, query, form, policy_queries, kwargs):
        output, sums = attention_and_sums(query, key, value, scaling, policy_queries,
                                          kvstudio_cache.scoring_scratch_bytes)
    else:
        # The mask transformers built is sized for layer 0; layers with other budgets hold a
        # different number of entries, so each layer's mask is made from its own shapes.
        mask = chunk_mask(q_len, k_len, query.device)
        output, _ = sdpa_attention_forward(module, query, key, value, mask, scaling=scaling, dropout=dropout,
                                           **kwargs)
    with torch.no_grad():
        if policy_queries and form == "rows":
            rows = attention_rows(query, key, scaling, policy_queries)
        elif policy_queries and sums is None:
            sums = attention_sums(query, key, scaling, policy_queries, kvstudio_cache.scoring_scratch_bytes)
        if watched:
            watched_row = rows[:, -1] if rows is not None else attention_rows(query, key, scaling, 1)[:, 0]
    if policy_queries:
        kvstudio_cache.note_scoring_scratch(scoring_scratch_bytes(query.shape[1], k_len, policy_queries, form,
                                                                  kvstudio_cache.scoring_scratch_bytes))
    # Recalled host entries sit in front of the keys for this step only: the policy scores, and the
    # viewer shows, the entries the layer holds.
    if recalled:
        rows = rows[..., recalled:] if rows is not None else None
        sums = sums[..., recalled:] if sums is not None else None
        watched_row = watched_row[..., recalled:] if watched_row is not None else None
    kvstudio_cache.after_attention(layer_idx, rows, sums, watched_row)
    return output, None


def register() -> str:
    """Register the attention function and its mask function; returns the implementation name."""
    AttentionInterface.register(ATTENTION_NAME, kvstudio_attention)
    # Without a registered mask function transformers hands the attention function no mask at all;
    # outside a run we want exactly SDPA's mask.
    AttentionMaskInterface.register(ATTENTION_NAME, sdpa_mask)
    return ATTENTION_NAME
