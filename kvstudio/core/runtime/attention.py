"""The attention function KV Studio registers with transformers.

Under the `full` policy a run is the same computation as transformers' own forward with its own
cache (tests/test_conformance.py, every family of the matrix, max |delta logit| <= 1e-4 in fp32).
Each layer's visibility comes from its entries' original token positions (causal AND, on sliding
layers, position > query position - W), never from their index in the compacted cache. Plain layers
go through transformers' SDPA with that mask; soft-capped (Gemma 2) and sink (GPT-OSS) layers through
KV Studio's own tiled pass (`attention_and_sums`), since SDPA raises on the first and would silently
drop the second. Policy scores use the same logits (after soft-capping, sinks in the denominator). Attention *weights* are computed separately and only for the rows
somebody asked for: the newest queries a policy needs, and the newest query of a watched layer.
SDPA kernels never return weights, and switching the model to eager to get them would cost a full
(q x n) matrix per head per layer on every step. Most policies need only an aggregate of those
rows (H2O: each entry's attention summed over the new queries); that is computed in query tiles of
bounded scratch (`attention_sums`), so the (heads x queries x keys) matrix of a long chunk never
exists. On CUDA (where Triton is installed) those sums come from Triton kernels instead
(core/runtime/triton_scoring.py: a flash pass that gives the output and each query's log-sum-exp,
then one pass over the keys); `PolicyCache.scoring_kernel` chooses ("triton", "torch", None = auto).

Outside a KV Studio run (no `kvstudio_cache` keyword) the function is SDPA (eager for soft-capped
and sink layers), so a model with it registered still works with `model.generate`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from transformers import AttentionInterface, AttentionMaskInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import sdpa_mask

from kvstudio.core.runtime import triton_scoring
from kvstudio.core.runtime.threads import one_thread

ATTENTION_NAME = "kvstudio"


@dataclass
class LogitRule:
    """What a layer's attention logits are beyond q.k x scaling, for the output and the policy's scores
    alike: which entries each query may see (from the entries' original token positions, so a
    compacted cache is masked exactly as transformers masks the whole sequence), soft-capping
    (Gemma 2: tanh(s / c) * c before the mask) and learned sinks (GPT-OSS: one logit per query head
    in the softmax's denominator, with no value).

    key_positions (rows, k) long, rows = the stored KV heads or 1 (the same tokens for all heads);
    query_positions (q,) long. Without positions, every key but the chunk's own is older than the
    chunk (a run's stored entries always are)."""

    key_positions: torch.Tensor | None = None
    query_positions: torch.Tensor | None = None
    window: int | None = None  # sliding layers: a query at p sees positions p-W+1..p
    softcap: float | None = None
    sinks: torch.Tensor | None = None  # (query heads,)

    @property
    def needs_own_path(self) -> bool:
        """SDPA has neither soft-capping nor sinks: such layers are computed here (SDPA raises on the
        first and would silently drop the second)."""
        return self.softcap is not None or self.sinks is not None

    def hidden(self, start: int, stop: int, visible: int) -> torch.Tensor | None:
        """(rows, stop-start, visible) bool, True where query start..stop-1 may not see key j; None
        where every one of those keys is visible."""
        if self.key_positions is None:
            return None
        keys = self.key_positions[:, None, :visible]
        queries = self.query_positions[start:stop].to(keys.device)[None, :, None]
        hidden = keys > queries
        if self.window is not None:
            hidden |= keys <= queries - self.window
        return hidden


def chunk_mask(q_len: int, k_len: int, device) -> torch.Tensor | None:
    """The causal mask of a chunk of q_len new queries over k_len keys whose first k_len - q_len are
    all older than the chunk; None where SDPA needs no mask (one query, or no older keys)."""
    if q_len == 1 or q_len == k_len:
        return None
    visible = torch.ones(q_len, k_len, dtype=torch.bool, device=device).tril(diagonal=k_len - q_len)
    return visible[None, None]


def visibility_mask(rule: LogitRule, heads: int, q_len: int, k_len: int, device=None) -> torch.Tensor | None:
    """SDPA's boolean mask (True: attend), (1, heads or 1, q_len, k_len), from the entries' positions;
    None where SDPA needs none: one query with no window (every stored entry is older), or no
    stored entries (SDPA's own is_causal then applies)."""
    if rule.key_positions is None:
        # on the layer's device (`device`: the query's), which differs from the input's under a device map
        return chunk_mask(q_len, k_len, device if device is not None else
                          rule.query_positions.device if rule.query_positions is not None else None)
    if rule.window is None and (q_len == 1 or q_len == k_len):
        return None
    visible = ~rule.hidden(0, q_len, k_len)  # (rows, q, k)
    rows = visible.shape[0]
    if rows > 1 and rows != heads:
        visible = visible.repeat_interleave(heads // rows, dim=0)
    return visible[None]


# The most float32 scratch one tile of scores may take: heads x tile queries x keys x 4 bytes. At 2k
# keys and 9 heads that is a tile of ~56 queries; the whole matrix of a 2k-token chunk is 151 MiB.
# Measured on 2 CPU cores (benchmarks/policy_cost.py, h2o one 2k chunk vs full): 16 MiB tiles 1.31x,
# 4 MiB 1.15x: a tile that stays in cache between its matmul, softmax and sum is faster.
SCRATCH_BYTES = 4 * 2**20


def _scores_softmax(query: torch.Tensor, key: torch.Tensor, scaling: float | None, start: int, stop: int,
                    rule: LogitRule | None = None) -> torch.Tensor:
    """Softmax weights of queries start..stop-1 (of the chunk's q_len) over the keys they can see:
    (heads, stop-start, visible), where visible = k_len - q_len + stop. Keys after that are in the
    future of every query of the tile, so their weights are zero and are not computed at all (on a
    one-chunk prompt that halves the work).

    query (1, heads, q_len, d), key (1, kv_heads, k_len, d), not GQA-repeated. The last q_len keys
    belong to the queries' own chunk and are masked causally, as in the model's forward; `rule`
    adds the layer's window (from positions), soft-capping and sinks.
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
    if rule is not None and rule.softcap is not None:
        scores = torch.tanh(scores / rule.softcap) * rule.softcap
    hidden = rule.hidden(start, stop, visible) if rule is not None else None
    if hidden is not None:  # (rows, n, visible), rows = kv_heads or 1
        scores = scores.masked_fill(hidden[:, None], float("-inf"))
    elif n > 1:  # query i of the tile sits at storage index visible - n + i; the last one sees every key
        query_index = torch.arange(visible - n, visible, device=key.device)
        future = torch.arange(visible, device=key.device)[None, :] > query_index[:, None]
        scores.masked_fill_(future, float("-inf"))
    if rule is not None and rule.sinks is not None:
        # The sink's logit joins the softmax's denominator and has no value: its column is dropped.
        sinks = rule.sinks.float().view(kv_heads, group, 1, 1).expand(kv_heads, group, n, 1)
        combined = torch.cat([scores, sinks], dim=-1)
        combined = combined - combined.max(dim=-1, keepdim=True).values
        return torch.softmax(combined, dim=-1)[..., :-1].reshape(heads, n, visible)
    return torch.softmax(scores, dim=-1).view(heads, n, visible)


def attention_rows(query: torch.Tensor, key: torch.Tensor, scaling: float | None, n_queries: int,
                   rule: LogitRule | None = None) -> torch.Tensor:
    """Softmax attention of the newest `n_queries` queries over all keys, float32: (heads, n_queries, k_len).

    The whole rows: for policies that really want them (`attention_form = "rows"`) and the viewer's
    newest row. Scratch is the result itself, heads x n_queries x k_len x 4 bytes.
    """
    q_len = query.shape[2]
    return _scores_softmax(query, key, scaling, q_len - n_queries, q_len, rule)


def query_tile(heads: int, k_len: int, scratch_bytes: int = SCRATCH_BYTES) -> int:
    """How many queries' scores fit in `scratch_bytes` of float32 scratch (at least one)."""
    return max(1, scratch_bytes // (heads * k_len * 4))


def attention_sums(query: torch.Tensor, key: torch.Tensor, scaling: float | None, n_queries: int,
                   scratch_bytes: int = SCRATCH_BYTES, rule: LogitRule | None = None) -> torch.Tensor:
    """Sum over the newest `n_queries` queries of their softmax weights, float32: (heads, k_len).

    What H2O, SnapKV and most scorers consume. Computed in query tiles that each fit in
    `scratch_bytes` of float32 scores (the bound holds whatever the chunk size, except that one
    query's row always fits), accumulated in float32; the heads x queries x keys matrix never exists.
    """
    heads, q_len, k_len = query.shape[1], query.shape[2], key.shape[2]
    tile = query_tile(heads, k_len, scratch_bytes)
    total = torch.zeros(heads, k_len, dtype=torch.float32, device=query.device)
    for start in range(q_len - n_queries, q_len, tile):
        weights = _scores_softmax(query, key, scaling, start, min(start + tile, q_len), rule)
        total[:, :weights.shape[-1]] += weights.sum(dim=1)
    return total


def attention_and_sums(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, scaling: float | None,
                       n_queries: int, scratch_bytes: int = SCRATCH_BYTES, rule: LogitRule | None = None,
                       dropout: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
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
        weights = _scores_softmax(query, key, scaling, start, stop, rule)  # (heads, t, visible)
        visible = weights.shape[-1]
        weighted = torch.nn.functional.dropout(weights, p=dropout) if dropout else weights
        tile_output = torch.bmm(weighted.reshape(kv_heads, group * (stop - start), visible), values[:, :visible])
        output[:, :, start:stop] = tile_output.view(kv_heads, group, stop - start, d_v)
        if stop > first_scored:
            with torch.no_grad():
                sums[:, :visible] += weights[:, max(first_scored - start, 0):].sum(dim=1)
    output = output.view(heads, q_len, d_v).to(query.dtype).transpose(0, 1).unsqueeze(0).contiguous()
    return output, sums


def _fusable(kvstudio_cache, query: torch.Tensor, form: str, policy_queries: int) -> bool:
    """Whether one pass should give both the output and the policy's sums (see attention_and_sums).
    Not while training (SDPA's output is what autograd differentiates). A decode step's one query
    fuses too: its scores are computed once, not by SDPA and again for the policy, and a batched
    step computes the decoding rows of a layer together the same way (`decode_attention_group`)."""
    q_len = query.shape[2]
    return (form == "sums" and policy_queries == q_len and not torch.is_grad_enabled()
            and kvstudio_cache.fuses_scoring_on(query.device))


def groups_decode(kvstudio_cache, layer_idx: int, query: torch.Tensor) -> bool:
    """Whether a batched step may compute this row's attention at this layer with the other rows that
    decode (`decode_attention_group`), bit for bit as kvstudio_attention would alone: one query, fused
    scoring of that query for a "sums" policy, and nothing that makes the row's logits its own (a
    window, soft-capping, sinks, host recall, the attention loss's shadow, a watched row)."""
    if query.shape[2] != 1 or kvstudio_cache.storage.tier == "host" or kvstudio_cache.loss_meter is not None:
        return False
    if kvstudio_cache.layers[layer_idx].window is not None:
        return False
    policy_queries, watched = kvstudio_cache.attention_queries_for(layer_idx, 1)
    return not watched and _fusable(kvstudio_cache, query, kvstudio_cache.policy.attention_form, policy_queries)


def decode_attention_group(queries: list[torch.Tensor], keys: list[torch.Tensor], values: list[torch.Tensor],
                           scaling: float | None) -> tuple[list[torch.Tensor], torch.Tensor]:
    """attention_and_sums for rows of one query each whose layers hold the same number of entries, in
    one batched matmul per stage: the rows' KV heads are the batch of each bmm, so every row's scores,
    softmax and output are the products and reductions its own call computes (a batched matmul
    computes each of its matrices as the single one; tests/test_batch.py compares bit for bit).
    queries[r] (1, heads, 1, d), keys[r]/values[r] (1, kv_heads, k, d). Per row: the output
    (1, 1, heads, d_v) in the query's dtype; and the sums, (rows, heads, k) float32. A decode query sees every
    stored entry (all are older), so no mask is applied, as none hides anything alone."""
    rows, (_, heads, _, head_dim), (_, kv_heads, k_len, _) = len(queries), queries[0].shape, keys[0].shape
    group, d_v = heads // kv_heads, values[0].shape[-1]
    scaling = scaling if scaling is not None else 1.0 / math.sqrt(head_dim)
    q = torch.cat(queries).float().reshape(rows * kv_heads, group, head_dim)
    k = torch.cat(keys).float().reshape(rows * kv_heads, k_len, head_dim)
    v = torch.cat(values).float().reshape(rows * kv_heads, k_len, d_v)
    weights = torch.softmax(torch.bmm(q, k.transpose(1, 2)).mul_(scaling), dim=-1)  # (rows*kv_heads, group, k)
    output = torch.bmm(weights, v).view(rows, heads, 1, d_v).to(queries[0].dtype).transpose(1, 2)
    sums = weights.view(rows, heads, k_len)
    return [output[r:r + 1].contiguous() for r in range(rows)], sums


def scoring_scratch_bytes(heads: int, k_len: int, n_queries: int, form: str,
                          scratch_bytes: int = SCRATCH_BYTES) -> int:
    """Float32 bytes the scores of one layer's scoring pass occupy at once (rows: all of them)."""
    rows = n_queries if form == "rows" else min(n_queries, query_tile(heads, k_len, scratch_bytes))
    return heads * rows * k_len * 4


def eager_attention(query, key, value, attention_mask, scaling, dropout, softcap, sinks):
    """Attention with soft-capping and/or sinks over a transformers mask (bool, True = attend, or
    additive float; None = every key), any batch size: outside a KV Studio run, where SDPA cannot
    compute these layers. Output (b, q, heads, d_v)."""
    heads, kv_heads = query.shape[1], key.shape[1]
    key = key.repeat_interleave(heads // kv_heads, dim=1)
    value = value.repeat_interleave(heads // kv_heads, dim=1)
    scaling = scaling if scaling is not None else 1.0 / math.sqrt(query.shape[-1])
    scores = torch.matmul(query.float(), key.float().transpose(2, 3)) * scaling
    if softcap is not None:
        scores = torch.tanh(scores / softcap) * softcap
    if attention_mask is not None:
        mask = attention_mask[..., :key.shape[2]]
        scores = scores.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else scores + mask
    if sinks is not None:
        column = sinks.float().reshape(1, -1, 1, 1).expand(scores.shape[0], -1, scores.shape[2], 1)
        combined = torch.cat([scores, column], dim=-1)
        weights = torch.softmax(combined - combined.max(dim=-1, keepdim=True).values, dim=-1)[..., :-1]
    else:
        weights = torch.softmax(scores, dim=-1)
    if dropout:
        weights = torch.nn.functional.dropout(weights, p=dropout)
    output = torch.matmul(weights.to(value.dtype), value)
    return output.transpose(1, 2).contiguous(), None


def layer_rule(kvstudio_cache, layer_idx: int, recalled: int, kwargs: dict) -> LogitRule:
    """The layer's logits as the model defines them: positions from the cache (recalled host entries
    in front), the window of the layer's kind, and the soft-cap and sinks the model passes."""
    key_positions, window = kvstudio_cache.key_positions(layer_idx, recalled)
    return LogitRule(key_positions, kvstudio_cache.context.positions, window, kwargs.get("softcap"),
                     kwargs.get("s_aux"))


def kvstudio_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0,
                       kvstudio_cache=None, **kwargs):
    if kvstudio_cache is None:
        if kwargs.get("softcap") is not None or kwargs.get("s_aux") is not None:
            return eager_attention(query, key, value, attention_mask, scaling, dropout, kwargs.get("softcap"),
                                   kwargs.get("s_aux"))
        return sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling,
                                      dropout=dropout, **kwargs)
    if getattr(kvstudio_cache, "attend_rows", None) is not None:  # a batched step (core/runtime/batch_cache.py)
        return kvstudio_cache.attend_rows(module, query, scaling, dropout, kwargs)
    if query.shape[2] == 1:  # a decode step's small operations: on one thread where waking the pool costs more
        with one_thread(query.device, key.numel()):
            return _attend(module, query, key, value, scaling, dropout, kvstudio_cache, kwargs)
    return _attend(module, query, key, value, scaling, dropout, kvstudio_cache, kwargs)


def _attend(module, query, key, value, scaling, dropout, kvstudio_cache, kwargs):
    """One run's attention at one layer, and its policy's turn (kvstudio_attention inside a run)."""
    # The host tier (kvstudio.core.storage.host) puts recalled entries in front, for this step only.
    key, value, recalled = kvstudio_cache.recall(module.layer_idx, query, key, value)
    q_len, k_len = query.shape[2], key.shape[2]
    layer_idx = module.layer_idx
    # The mask transformers built is sized for the first layer of each kind and knows nothing of
    # evicted entries: each layer's visibility comes from its own entries' original positions.
    rule = layer_rule(kvstudio_cache, layer_idx, recalled, kwargs)
    policy_queries, watched = kvstudio_cache.attention_queries_for(layer_idx, q_len)
    form = kvstudio_cache.policy.attention_form
    rows = sums = watched_row = output = None
    kernel = bool(policy_queries) and form == "sums" and triton_scoring.usable(query, rule, dropout,
                                                                               kvstudio_cache.scoring_kernel)
    if kernel:  # scores in the attention pass; the output too when every query is scored (H2O, decode)
        fused = policy_queries == q_len and value.shape[-1] == query.shape[-1]
        output, sums = triton_scoring.attention_and_sums(query, key, value if fused else None, scaling, policy_queries,
                                                         rule)
    if output is not None:
        pass  # the kernel gave it
    elif not kernel and (rule.needs_own_path or (policy_queries and _fusable(kvstudio_cache, query, form,
                                                                                 policy_queries))):
        wanted = policy_queries if form == "sums" else 0
        output, sums = attention_and_sums(query, key, value, scaling, wanted, kvstudio_cache.scoring_scratch_bytes,
                                          rule, dropout)
        sums = sums if wanted else None
    else:
        mask = visibility_mask(rule, query.shape[1], q_len, k_len, query.device)
        if "sliding_window" in kwargs:
            kwargs = {name: item for name, item in kwargs.items() if name != "sliding_window"}
        output, _ = sdpa_attention_forward(module, query, key, value, mask, scaling=scaling, dropout=dropout,
                                           **kwargs)
    if (policy_queries and sums is None) or watched:  # (no_grad costs microseconds a layer)
        with torch.no_grad():
            if policy_queries and form == "rows":
                rows = attention_rows(query, key, scaling, policy_queries, rule)
            elif policy_queries and sums is None:
                sums = attention_sums(query, key, scaling, policy_queries, kvstudio_cache.scoring_scratch_bytes,
                                      rule)
            if watched:
                watched_row = rows[:, -1] if rows is not None else attention_rows(query, key, scaling, 1, rule)[:, 0]
    if kernel:  # the kernels' only scratch: one log-sum-exp per query and head
        kvstudio_cache.note_scoring_scratch(query.shape[1] * q_len * 4)
    elif policy_queries:
        kvstudio_cache.note_scoring_scratch(scoring_scratch_bytes(query.shape[1], k_len, policy_queries, form,
                                                                  kvstudio_cache.scoring_scratch_bytes))
    # Recalled host entries sit in front of the keys for this step only: the policy scores, and the
    # viewer shows, the entries the layer holds.
    if recalled:
        rows = rows[..., recalled:] if rows is not None else None
        sums = sums[..., recalled:] if sums is not None else None
        watched_row = watched_row[..., recalled:] if watched_row is not None else None
    if kvstudio_cache.loss_meter is not None:  # --measure-loss (attention_loss.py): before this step's eviction
        kvstudio_cache.loss_meter.observe(layer_idx, query, key, rule, scaling)
    kvstudio_cache.after_attention(layer_idx, rows, sums, watched_row)
    return output, None


def register() -> str:
    """Register the attention function and its mask function; returns the implementation name."""
    AttentionInterface.register(ATTENTION_NAME, kvstudio_attention)
    # Without a registered mask function transformers hands the attention function no mask at all;
    # outside a run we want exactly SDPA's mask.
    AttentionMaskInterface.register(ATTENTION_NAME, sdpa_mask)
    return ATTENTION_NAME
