"""Preallocated per-layer buffers that entries are written into and compacted in place.

The rule (what paged/static caches do, e.g. vLLM's PagedAttention, Kwon et al. 2023,
arXiv:2309.06180, and transformers' StaticCache): write each step's new entries into the free tail,
and when the policy evicts, move only the kept entries that sit after the first hole down over it.
Nothing concatenates the whole cache per step. The allocation grows with what the layer holds,
geometrically (x2, so the copy on growth costs O(1) amortized per entry), and a bounded policy's
stops at budget + the largest append (a chunk): its true peak. It is never sized by the budget
alone: a budget of 10^9 on a 5-token prompt holds 64 entries, not 10^9 (memory by need).

Every tensor has the entry axis at dim 1: (kv_heads, capacity, ...). Different fields (keys,
values, positions, a codec's codes and scales) share one entry count and compact together.

Autograd: when grad is enabled (fine-tuning through the cache), in-place writes
would overwrite tensors autograd saved for backward. From that step on the buffers switch to
exact-size tensors built out of place (cat / index_select); values are the same either way.
"""

from __future__ import annotations

import math

import torch


MIN_CAPACITY = 64  # entries: the first allocation of a layer, so short decodes do not regrow every step


class EntryBuffers:
    def __init__(self, capacity_hint: int | None = None):
        self.capacity_hint = capacity_hint
        self.tensors: dict[str, torch.Tensor] = {}
        self.count = 0
        self.out_of_place = False  # autograd mode: exact-size tensors, never written in place
        self.pin_memory = False  # host tier on CUDA: page-locked, so copies can run asynchronously

    @property
    def capacity(self) -> int:
        return next(iter(self.tensors.values())).shape[1] if self.tensors else 0

    def view(self, name: str) -> torch.Tensor:
        return self.tensors[name][:, :self.count]

    def __contains__(self, name: str) -> bool:
        return name in self.tensors

    def append(self, new: dict[str, torch.Tensor], count: int) -> None:
        """Add `count` entries; fields missing from `new` get unwritten rows (filled later)."""
        # With grad on, attention may have saved these very tensors for backward (even when the keys
        # themselves need no grad, the query's gradient reads them): never overwrite them then.
        if self.out_of_place or torch.is_grad_enabled():
            self._append_out_of_place(new, count)
            return
        tensors = self.tensors
        if not tensors.keys() >= new.keys():
            for name, tensor in new.items():
                if name not in tensors:
                    self.add_field(name, tensor[:, :0])
        start = self.count
        if start + count > self.capacity:
            self._reserve(start + count)
        for name, tensor in new.items():
            tensors[name][:, start:start + count].copy_(tensor)
        self.count = start + count

    def add_field(self, name: str, like: torch.Tensor) -> None:
        """A new field shaped like `like` past the entry axis, zero-filled for the entries held."""
        capacity = max(self.capacity, self.count)
        self.tensors[name] = torch.zeros((like.shape[0], capacity, *like.shape[2:]), dtype=like.dtype,
                                         device=like.device, pin_memory=self.pin_memory)

    def _reserve(self, needed: int) -> None:
        if needed <= self.capacity:
            return
        capacity = max(needed, 2 * self.capacity, MIN_CAPACITY)
        if self.capacity_hint is not None:  # a bounded policy never holds more than budget + this append
            capacity = min(capacity, max(needed, self.capacity_hint + needed - self.count))
        for name, old in self.tensors.items():
            grown = torch.empty((old.shape[0], capacity, *old.shape[2:]), dtype=old.dtype, device=old.device,
                                pin_memory=self.pin_memory)
            grown[:, :self.count].copy_(old[:, :self.count])
            self.tensors[name] = grown

    def _append_out_of_place(self, new: dict[str, torch.Tensor], count: int) -> None:
        if not self.out_of_place:  # switch: from now on every tensor is exactly `count` wide
            self.tensors = {name: t[:, :self.count] for name, t in self.tensors.items()}
            self.out_of_place = True
        for name, tensor in new.items():
            old = self.tensors.get(name)
            self.tensors[name] = tensor if old is None else torch.cat([old, tensor], dim=1)
        for name, old in self.tensors.items():  # fields missing from `new`: unwritten rows, as in place
            if name not in new:
                self.tensors[name] = torch.cat([old, old.new_zeros((old.shape[0], count, *old.shape[2:]))], dim=1)
        self.count += count

    def keep(self, keep: torch.Tensor, first_moved: int | None = None) -> None:
        """Keep entries `keep` (kv_heads, k), strictly increasing per row, moved down in place.
        `first_moved`: the first index where any head's kept entry is not its own (computed here
        when not given; the rows of a batch that evict together compute theirs in one operation)."""
        kv_heads, kept = keep.shape
        if self.out_of_place:
            for name, tensor in self.tensors.items():
                self.tensors[name] = _take(tensor, keep, tensor.shape[1])
            self.count = kept
            return
        # Entries before the first hole (in any head) stay where they are; only the rest move.
        if first_moved is None:
            unchanged = keep == torch.arange(kept, device=keep.device)
            first_moved = int(unchanged.all(dim=0).long().cumprod(0).sum())
        if first_moved < kept:
            # Every field has the same capacity: one flat index serves them all (it is computed once
            # per eviction, not once per field; each decode step of every row evicts).
            rows = _flat_rows(keep[:, first_moved:], self.capacity)
            for tensor in self.tensors.values():
                tensor[:, first_moved:kept].copy_(_select_rows(tensor, rows, kv_heads))
        self.count = kept

    def row_bytes(self, names) -> int:
        """Bytes of one entry (all KV heads) over the fields `names`."""
        total = 0
        for name in names:  # from the shape (no tensor op: it is read for every layer of every step)
            tensor = self.tensors[name]
            if tensor.shape[1]:
                total += tensor.shape[0] * math.prod(tensor.shape[2:]) * tensor.element_size()
        return total


def _take(tensor: torch.Tensor, index: torch.Tensor, width: int) -> torch.Tensor:
    """tensor (kv_heads, width, ...) -> (kv_heads, k, ...) at index (kv_heads, k).

    One flat index into (kv_heads * width) rows: a contiguous index_select is ~3x faster than
    gather with an expanded index."""
    return _select_rows(tensor, _flat_rows(index, width), index.shape[0])


def _flat_rows(index: torch.Tensor, width: int) -> torch.Tensor:
    """index (kv_heads, k) into rows of (kv_heads * width): the flat index _take selects."""
    kv_heads = index.shape[0]
    return (index + torch.arange(kv_heads, device=index.device)[:, None] * width).reshape(-1)


def _select_rows(tensor: torch.Tensor, rows: torch.Tensor, kv_heads: int) -> torch.Tensor:
    width = tensor.shape[1]
    return tensor.reshape(kv_heads * width, -1).index_select(0, rows).view(kv_heads, rows.shape[0] // kv_heads,
                                                                           *tensor.shape[2:])
