"""The attention function KV Studio registers with transformers.

Output always comes from transformers' own SDPA path, so under the `full` policy a run is the same
computation as `model.generate`. Attention *weights* are computed separately and only for the rows
somebody asked for: the newest queries a policy needs, and the newest query of a watched layer.
SDPA kernels never return weights, and switching the model to eager to get them would cost a full
(q x n) matrix per head per layer on every step.

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


def attention_rows(query: torch.Tensor, key: torch.Tensor, scaling: float | None, n_queries: int) -> torch.Tensor:
    """Softmax attention of the newest `n_queries` queries over all keys, float32.

    query (1, heads, q_len, d), key (1, kv_heads, k_len, d), not GQA-repeated.
    Returns (heads, n_queries, k_len). The last q_len keys belong to the queries' own chunk and
    are masked causally, as in the model's forward.
    """
    _, heads, q_len, head_dim = query.shape
    kv_heads, k_len = key.shape[1], key.shape[2]
    scaling = scaling if scaling is not None else 1.0 / math.sqrt(head_dim)
    group = heads // kv_heads
    # Grouping the query heads of each KV head into one batched matmul avoids repeating the keys.
    q = query[0, :, q_len - n_queries:].float().reshape(kv_heads, group * n_queries, head_dim)
    scores = torch.bmm(q, key[0].float().transpose(1, 2)).mul_(scaling).view(kv_heads, group, n_queries, k_len)
    # Query i of the last n_queries sits at storage index k_len - n_queries + i.
    query_index = torch.arange(k_len - n_queries, k_len, device=key.device)
    future = torch.arange(k_len, device=key.device)[None, :] > query_index[:, None]
    scores.masked_fill_(future, float("-inf"))
    return torch.softmax(scores, dim=-1).reshape(heads, n_queries, k_len)


def kvstudio_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0,
                       kvstudio_cache=None, **kwargs):
    if kvstudio_cache is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling,
                                      dropout=dropout, **kwargs)
    # The host tier (kvstudio.core.storage.host) puts recalled entries in front, for this step only.
    key, value, recalled = kvstudio_cache.recall(module.layer_idx, query, key, value)
    q_len, k_len = query.shape[2], key.shape[2]
    # The mask transformers built is sized for layer 0; layers with other budgets hold a different
    # number of entries, so each layer's mask is made from its own shapes.
    mask = chunk_mask(q_len, k_len, query.device)
    output, _ = sdpa_attention_forward(module, query, key, value, mask, scaling=scaling, dropout=dropout, **kwargs)

    layer_idx = module.layer_idx
    policy_queries, watched = kvstudio_cache.attention_queries_for(layer_idx, q_len)
    n_rows = max(policy_queries, 1 if watched else 0)
    policy_rows = watched_row = None
    if n_rows:
        with torch.no_grad():
            rows = attention_rows(query, key, scaling, n_rows)[..., recalled:]  # the policy scores what it holds
        policy_rows = rows[:, n_rows - policy_queries:] if policy_queries else None
        watched_row = rows[:, -1] if watched else None
    kvstudio_cache.after_attention(layer_idx, policy_rows, watched_row)
    return output, None


def register() -> str:
    """Register the attention function and its mask function; returns the implementation name."""
    AttentionInterface.register(ATTENTION_NAME, kvstudio_attention)
    # Without a registered mask function transformers hands the attention function no mask at all;
    # outside a run we want exactly SDPA's mask.
    AttentionMaskInterface.register(ATTENTION_NAME, sdpa_mask)
    return ATTENTION_NAME
