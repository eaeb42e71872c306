"""BatchCache: the rows of a batched run behind one transformers Cache, for one packed forward.

A batched step feeds every row's new tokens as one packed sequence, batch dimension 1: row 0's
tokens, then row 1's, ... (a prefill chunk for a row still reading its prompt, one token for a row
that decodes). Nothing is padded: no pad token enters the model, no empty slot is stored, attended
or scored. The linear layers see all rows' tokens at once (the weights are read once per step for
the whole batch); only attention differs by row, and it is computed row by row:

  model:  layer.update(k, v)   BatchLayer cuts k and v into the rows' segments and hands each
                               to that row's own PolicyLayer (its store, codec, host tier, merging)
  attention function: `attend_rows` (the hook in core/runtime/attention.py) runs the ordinary
                               single-run attention for each row (its queries over its own kept
                               entries, masked by its own positions; its policy selects and evicts
                               right away) and puts the outputs back in packed order

So a row's cache, policy state, evictions and positions are exactly those of the single run of its
prompt: the same code runs on the same tensors. A row whose policy fails mid-step is marked failed
(`failed[row]`): its remaining layers skip it and its attention output is zero, which nothing
reads; the other rows' tokens never see it (attention is per row, everything else per token).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers.cache_utils import Cache, DynamicLayer

from kvstudio.core.errors import KVStudioError
from kvstudio.core.runtime.attention import (decode_attention_group, groups_decode, kvstudio_attention,
                                             scoring_scratch_bytes)
from kvstudio.core.runtime.cache import PolicyCache
from kvstudio.core.runtime.group_eviction import evict_rows_together
from kvstudio.core.runtime.threads import one_thread


@dataclass
class Segment:
    """One row's part of a packed step: its tokens are positions start..stop-1 of the packed sequence."""

    row: int  # the row's index in the batch (its name in `failed`)
    cache: PolicyCache
    start: int
    stop: int


class BatchLayer(DynamicLayer):
    """One decoder layer of every row: hands each row's keys and values to that row's PolicyLayer."""

    def __init__(self, batch: BatchCache, layer_idx: int):
        super().__init__()
        self.batch = batch
        self.layer_idx = layer_idx
        self.is_initialized = True  # the rows' layers initialise themselves

    def get_seq_length(self) -> int:
        # Read by transformers for default position ids and mask offsets, neither of which a batched
        # step uses (position ids are passed; attention masks each row from its entries' positions).
        return 0

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return query_length, 0  # transformers' mask is not used: the smallest it can build

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        held = self.batch.held[self.layer_idx]
        held.clear()
        for segment in self.batch.segments:
            if segment.row in self.batch.failed:
                continue
            try:
                held[segment.row] = segment.cache.layers[self.layer_idx].update(
                    key_states[:, :, segment.start:segment.stop], value_states[:, :, segment.start:segment.stop])
            except KVStudioError as error:
                self.batch.fail(segment.row, error)
        # What the model passes on to attention, which reads each row's own entries from `held`
        # instead. (Models that re-project what the cache returns, MLA, are refused for batches.)
        return key_states, value_states

    def crop(self, tokens_to_remove: int) -> None:
        raise NotImplementedError("a BatchCache cannot crop: each row holds its own entries")

    def reset(self) -> None:
        raise NotImplementedError("a BatchCache is reset row by row (each row's PolicyCache)")


class BatchCache(Cache):
    """Rows' PolicyCaches seen by the model as one cache. `begin_step(segments)` before each packed
    forward says which rows take part and where their tokens sit; `failed` maps a row to the error
    its policy raised during a step."""

    def __init__(self, n_layers: int):
        self.n_layers = n_layers
        self.segments: list[Segment] = []
        self.held: list[dict[int, tuple[torch.Tensor, torch.Tensor]]] = [{} for _ in range(n_layers)]
        self.failed: dict[int, KVStudioError] = {}
        super().__init__(layers=[BatchLayer(self, i) for i in range(n_layers)])

    def begin_step(self, segments: list[Segment]) -> None:
        self.segments = segments
        self.failed = {}

    def end_step(self) -> None:
        self.segments = []
        for held in self.held:
            held.clear()  # the rows' keys and values of the step: not kept beyond it

    def fail(self, row: int, error: KVStudioError) -> None:
        self.failed.setdefault(row, error)

    def attend_rows(self, module, query: torch.Tensor, scaling, dropout, kwargs: dict) -> tuple[torch.Tensor, None]:
        """The attention output of a packed step, (1, tokens, heads, d_v): each row's queries over its
        own entries, through the single-run attention function (its policy acts there); decoding rows
        that hold as many entries as each other are computed together (`_attend_decoding`)."""
        layer_idx = module.layer_idx
        held = self.held[layer_idx]
        grouped = self._attend_decoding(layer_idx, query, scaling, kwargs)
        outputs = []
        for segment in self.segments:
            row_query = query[:, :, segment.start:segment.stop]
            if segment.row in grouped:
                outputs.append(grouped[segment.row])
                continue
            if segment.row not in self.failed:
                keys, values = held[segment.row]
                try:
                    output, _ = kvstudio_attention(module, row_query, keys, values, None, scaling=scaling,
                                                   dropout=dropout, kvstudio_cache=segment.cache, **kwargs)
                    outputs.append(output)
                    continue
                except KVStudioError as error:
                    self.fail(segment.row, error)
            # A failed row: its tokens' output is never read (the row leaves the batch after the step).
            d_v = held[segment.row][1].shape[-1] if segment.row in held else query.shape[-1]
            outputs.append(query.new_zeros(1, segment.stop - segment.start, query.shape[1], d_v))
        return torch.cat(outputs, dim=1), None

    def _attend_decoding(self, layer_idx: int, query: torch.Tensor, scaling, kwargs: dict) -> dict[int, torch.Tensor]:
        """The outputs of the decoding rows computed together, by row: those that `groups_decode`
        allows, in groups of equal entry counts (under a budget, every row at its budget). A row alone
        in its group, and every other row, goes through the single-run function. Each grouped row's
        policy then acts on its own sums, as after its own attention."""
        if kwargs.get("softcap") is not None or kwargs.get("s_aux") is not None:
            return {}
        by_length: dict[tuple, list[Segment]] = {}
        held = self.held[layer_idx]
        for segment in self.segments:
            if segment.row in self.failed or segment.stop - segment.start != 1:
                continue
            try:  # asks the row's policy how many queries it scores: plugin code, guarded
                joins = groups_decode(segment.cache, layer_idx, query[:, :, segment.start:segment.stop])
            except KVStudioError as error:
                self.fail(segment.row, error)
                continue
            if joins:
                keys = held[segment.row][0]
                by_length.setdefault((keys.shape[2], keys.dtype), []).append(segment)
        outputs: dict[int, torch.Tensor] = {}
        for segments in by_length.values():
            if len(segments) < 2:
                continue
            rows = [held[segment.row] for segment in segments]
            # Small operations, many of them: on one thread where waking the pool costs more (threads.py).
            with one_thread(query.device, len(rows) * rows[0][0].numel()):
                outputs.update(self._attend_group(layer_idx, query, scaling, segments, rows))
        return outputs

    def _attend_group(self, layer_idx: int, query: torch.Tensor, scaling, segments: list[Segment],
                      rows: list[tuple[torch.Tensor, torch.Tensor]]) -> dict[int, torch.Tensor]:
        """One group's attention (decode_attention_group), then its rows' evictions: together where
        their policies share one rule (group_eviction.py), the others one by one."""
        results, sums = decode_attention_group([query[:, :, s.start:s.stop] for s in segments],
                                               [keys for keys, _ in rows], [values for _, values in rows], scaling)
        scratch = scoring_scratch_bytes(query.shape[1], sums.shape[-1], 1, "sums")  # one query's row: any tile
        together, errors = evict_rows_together(layer_idx, [segment.cache for segment in segments], sums)
        outputs = {}
        for i, (segment, output) in enumerate(zip(segments, results)):
            outputs[segment.row] = output
            if i in errors:
                self.fail(segment.row, errors[i])
                continue
            cache = segment.cache
            try:
                cache.note_scoring_scratch(scratch)
                if i not in together:
                    cache.after_attention(layer_idx, None, sums[i], None)
            except KVStudioError as error:
                self.fail(segment.row, error)
        return outputs
