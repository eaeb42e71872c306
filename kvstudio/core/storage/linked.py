"""The later layer of a MiniCache pair under `fp`: merged entries held as a magnitude and a link.

MiniCache (storage/minicache.py) has a pair of adjacent layers (a, b) keep one direction per merged
token and each layer its own magnitude. Under `fp` this store makes that real for layer b:

- Layer a holds, for a merged entry, its restored state e * |x_a| in its ordinary store: the shared
  direction and a's magnitude in one row (the same information as the paper's separate direction
  and magnitude, one element less).
- Layer b holds, for the same entry, only its own magnitude |x_b| and reads the direction from a's
  row at the same KV head and token position: restored = a_row / |a_row| * |x_b|.
- Layer b's unmerged entries (retained by the rule, not yet merged, or held by b alone) live in a
  pool of full rows. A merged entry gives its row back to the pool; the pool grows geometrically like
  EntryBuffers when a chunk arrives, and when the chunk's merge leaves most of it free it moves its
  live rows into a smaller allocation (live + one step's entries), so between steps it holds about
  the unmerged entries, not the whole layer or the last chunk.

Per-layer eviction. The two layers' policies choose independently. When b evicts, its rows and
magnitudes go. When a is about to evict an entry b still links to, b first copies its restored state
into its pool (`materialize`, called from the pair before a compacts): b keeps reading exactly what
it read before, and from then on pays a full row for it.

What is counted (`byte_count`): the pool's live rows and the magnitudes of merged entries. Token
positions are bookkeeping, uncounted, as in every store.

Reading. `keys()` / `values()` assemble b's (1, kv_heads, n, head_dim) for attention and the policy:
its pool rows, and its links resolved through a's positions. The assembled copy is kept until b or
the pair changes (an append, an eviction, a merge, a materialization), so a step reads it once.
With a quantizing codec the pair does not use this store (see minicache.py): b's rows would have to
hold the codec's grouped layout per token, which a pool of rows cannot.
"""

from __future__ import annotations

import torch

from kvstudio.core.storage.base import CodecError
from kvstudio.core.storage.layer_stores import KINDS, cpu_copies, LayerStore


class RowPool:
    """Rows (capacity, head_dim) handed out by slot and given back; grows x2 when full."""

    def __init__(self):
        self.rows: torch.Tensor | None = None
        self.free: torch.Tensor | None = None  # bool (capacity,)
        self.live = 0

    def alloc(self, like: torch.Tensor) -> torch.Tensor:
        """Slots for the rows `like` (m, head_dim), written there; returns the slots (m,)."""
        count = like.shape[0]
        if self.rows is None:
            self.rows = like.new_empty((max(count, 1), like.shape[-1]))
            self.free = torch.ones(max(count, 1), dtype=torch.bool, device=like.device)
        slots = self.free.nonzero().squeeze(1)  # the free slots: one read from the device
        if slots.numel() < count:
            self._grow(self.rows.shape[0] + count - slots.numel())
            slots = self.free.nonzero().squeeze(1)
        slots = slots[:count]
        self.rows[slots] = like
        self.free[slots] = False
        self.live += count
        return slots

    def release(self, slots: torch.Tensor) -> None:
        """Give back slots (k,), each held; -1 (a merged entry's) is skipped."""
        slots = slots[slots >= 0]
        self.free[slots] = True
        self.live -= slots.numel()

    def compact(self, headroom: int) -> torch.Tensor | None:
        """When most of the pool is free (after a chunk's entries merged), move the live rows to the
        front of a smaller allocation: live + `headroom` rows. Returns old slot -> new slot (-1: free),
        or None when the pool was left as it is."""
        capacity = self.rows.shape[0]
        if capacity <= 2 * (self.live + headroom):
            return None
        held = (~self.free).nonzero().squeeze(1)  # old slots, in order
        remap = torch.full((capacity,), -1, dtype=torch.long, device=self.free.device)
        remap[held] = torch.arange(held.numel(), device=held.device)
        rows = self.rows.new_empty((self.live + headroom, self.rows.shape[1]))
        rows[:self.live] = self.rows[held]
        free = torch.ones(rows.shape[0], dtype=torch.bool, device=self.free.device)
        free[:self.live] = False
        self.rows, self.free = rows, free
        return remap

    def _grow(self, needed: int) -> None:
        capacity = max(needed, 2 * self.rows.shape[0])
        rows = self.rows.new_empty((capacity, self.rows.shape[1]))
        rows[:self.rows.shape[0]] = self.rows
        free = torch.ones(capacity, dtype=torch.bool, device=self.free.device)
        free[:self.free.shape[0]] = self.free
        self.rows, self.free = rows, free


class LinkedStore(LayerStore):
    """Layer b of a pair under fp: pool rows for its own entries, a magnitude and a link for merged ones."""

    def __init__(self, capacity_hint: int | None):
        super().__init__(capacity_hint)
        self.pools = {kind: RowPool() for kind in KINDS}
        self.partner = None  # layer a's PolicyLayer, connected by MiniCacheMerging once the layers exist
        self.keep_step_groups = False  # asked of every store by PolicyLayer; nothing to keep here
        self._assembled: dict[str, torch.Tensor] = {}
        self._row_bytes = 0  # one pool row (one KV head's key or value)
        self._magnitude_bytes = 0

    # -- what PolicyLayer reads ------------------------------------------------------------------------

    def keys(self) -> torch.Tensor:
        return self._read("key").unsqueeze(0)

    def values(self) -> torch.Tensor:
        return self._read("value").unsqueeze(0)

    def linked(self, kind: str) -> torch.Tensor:
        """(kv_heads, n) bool: entries that read their direction from the partner."""
        return self.entries.view(f"{kind}_slot") < 0

    def release_step(self) -> None:
        self._assembled = {}

    # -- writing ---------------------------------------------------------------------------------------

    def append(self, keys, values, positions, rope_positions):
        kv_heads, n, head_dim = keys.shape
        fields = {"positions": positions, "rope_positions": rope_positions}
        for kind, x in (("key", keys), ("value", values)):
            slots = self.pools[kind].alloc(x.reshape(kv_heads * n, head_dim)).view(kv_heads, n)
            fields[f"{kind}_slot"] = slots
            fields[f"{kind}_magnitude"] = torch.zeros(kv_heads, n, dtype=x.dtype, device=x.device)
        self.entries.append(fields, n)
        self._row_bytes = head_dim * keys.element_size()
        self._magnitude_bytes = keys.element_size()
        self._changed()
        return self.keys(), self.values()

    def keep(self, keep: torch.Tensor) -> None:
        kept = torch.zeros_like(self.entries.view("positions"), dtype=torch.bool)
        kept.scatter_(1, keep, True)
        for kind in KINDS:
            self.pools[kind].release(self.entries.view(f"{kind}_slot")[~kept])
        self.entries.keep(keep)
        self._changed()

    def link(self, kind: str, index: torch.Tensor, where: torch.Tensor, magnitude: torch.Tensor) -> None:
        """The entries at `index` (kv_heads, m) where `where` are merged: they give their rows back and
        hold `magnitude` (kv_heads, m), reading their direction from the partner from now on."""
        slot = self.entries.view(f"{kind}_slot")
        held = slot.gather(1, index)
        self.pools[kind].release(held[where])
        slot.scatter_(1, index, torch.where(where, torch.full_like(held, -1), held))
        stored = self.entries.view(f"{kind}_magnitude")
        stored.scatter_(1, index, torch.where(where, magnitude.to(stored.dtype), stored.gather(1, index)))
        # The rows the step's merged entries gave back: returned to the allocator when they are most
        # of the pool, so between steps the pool holds about its live rows, not the last chunk's.
        remap = self.pools[kind].compact(headroom=index.numel())
        if remap is not None:
            slot.copy_(torch.where(slot >= 0, remap[slot.clamp_min(0)], slot))
        self._changed()

    def materialize(self, partner_keep: torch.Tensor) -> None:
        """The partner is about to keep only its entries `partner_keep` (kv_heads, k): linked entries
        whose partner row goes get their restored state copied into the pool first."""
        if not self.entries.count:
            return
        partner_positions = self.partner.positions
        kept_positions = partner_positions.gather(1, partner_keep)
        positions = self.entries.view("positions")
        still_there = _holds(kept_positions, positions)
        for kind in KINDS:
            orphaned = self.linked(kind) & ~still_there
            if not bool(orphaned.any()):
                continue
            restored = self._read(kind)[orphaned]
            slot = self.entries.view(f"{kind}_slot")
            slot[orphaned] = self.pools[kind].alloc(restored)
            self.entries.view(f"{kind}_magnitude")[orphaned] = 0
        self._changed()

    def set_keys(self, keys, rope_positions):
        raise CodecError("--merge minicache does not re-rotate keys (refused with --rerotate at the start)")

    def overwrite(self, kind, index, rows, where):
        raise CodecError("a merged layer's later side links to its partner; it is never rewritten")

    # -- saving and restoring (core.store.layer_tensors) -------------------------------------------

    def state(self) -> tuple[dict[str, torch.Tensor], dict]:
        """Per entry: positions, and per kind whether it is linked, its magnitude, and its own row (zeros
        where linked: the direction is the partner's, saved with the partner)."""
        tensors = {f"entries.{name}": self.entries.view(name) for name in ("positions", "rope_positions")}
        for kind in KINDS:
            linked = self.linked(kind)
            rows = self.pools[kind].rows[self.entries.view(f"{kind}_slot").clamp_min(0)]
            tensors[f"entries.{kind}_linked"] = linked
            tensors[f"entries.{kind}_magnitude"] = self.entries.view(f"{kind}_magnitude")
            tensors[f"entries.{kind}_rows"] = torch.where(linked.unsqueeze(-1), torch.zeros_like(rows), rows)
        return cpu_copies(tensors), {}

    def load_state(self, tensors: dict[str, torch.Tensor], numbers: dict, device) -> None:
        """The inverse of `state()`, into a fresh store: own rows go back into the pools."""
        fields = {name.split(".", 1)[1]: t.to(device) for name, t in tensors.items() if name.startswith("entries.")}
        positions = fields["positions"]
        new = {"positions": positions, "rope_positions": fields["rope_positions"]}
        for kind in KINDS:
            linked, rows = fields[f"{kind}_linked"], fields[f"{kind}_rows"]
            slots = torch.full_like(positions, -1)
            slots[~linked] = self.pools[kind].alloc(rows[~linked])
            new[f"{kind}_slot"] = slots
            new[f"{kind}_magnitude"] = fields[f"{kind}_magnitude"]
        self._row_bytes = rows.shape[-1] * rows.element_size()
        self._magnitude_bytes = rows.element_size()
        with torch.no_grad():  # into preallocated buffers, as a run without autograd would have them
            self.entries.append(new, positions.shape[1])
        self._changed()

    # -- bytes -----------------------------------------------------------------------------------------

    def byte_count(self) -> int:
        return self._bytes  # counted at each change: the memory sampler's thread reads it mid-step

    def unmerged_byte_count(self) -> int:
        """What an FpStore would hold for the same entries: a full key and value row each."""
        return self.entries.count * self.entries.view("positions").shape[0] * 2 * self._row_bytes

    def linked_row_bytes(self) -> dict[str, int]:
        """Per kind: bytes of the partner's rows this layer reads its directions from (held once, in a)."""
        if not self.entries.count:
            return {kind: 0 for kind in KINDS}
        return {kind: int(self.linked(kind).sum()) * self._row_bytes for kind in KINDS}

    # -- reading ---------------------------------------------------------------------------------------

    def _changed(self) -> None:
        self._assembled = {}
        linked = sum(int(self.linked(kind).sum()) for kind in KINDS) if self.entries.count else 0
        self._bytes = sum(pool.live for pool in self.pools.values()) * self._row_bytes + linked * self._magnitude_bytes

    def _read(self, kind: str) -> torch.Tensor:
        if kind in self._assembled:
            return self._assembled[kind]
        slot = self.entries.view(f"{kind}_slot")
        pool = self.pools[kind].rows
        out = pool[slot.clamp_min(0)]  # (kv_heads, n, head_dim): own rows, junk where linked
        linked = slot < 0
        if bool(linked.any()):
            partner = (self.partner.keys if kind == "key" else self.partner.values)[0].float()
            index = _index_of(self.partner.positions, self.entries.view("positions"))
            rows = partner.gather(1, index.clamp_min(0).unsqueeze(-1).expand(-1, -1, partner.shape[-1]))
            direction = rows / rows.norm(dim=-1, keepdim=True).clamp_min(1e-6)
            restored = direction * self.entries.view(f"{kind}_magnitude").float().unsqueeze(-1)
            out = torch.where(linked.unsqueeze(-1), restored.to(out.dtype), out)
        self._assembled[kind] = out
        return out


def _position_table(positions: torch.Tensor, size: int, values: torch.Tensor, fill) -> torch.Tensor:
    table = torch.full((positions.shape[0], size), fill, dtype=values.dtype, device=positions.device)
    return table.scatter_(1, positions, values)


def _index_of(partner_positions: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """(kv_heads, n): where each of `positions` sits among the partner's entries of the same head, -1 if absent."""
    size = int(max(partner_positions.max(), positions.max())) + 1
    index = torch.arange(partner_positions.shape[1], device=positions.device).expand_as(partner_positions)
    return _position_table(partner_positions, size, index, -1).gather(1, positions)


def _holds(held_positions: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """(kv_heads, n) bool: whether each of `positions` is among `held_positions` of the same head."""
    size = int(max(held_positions.max(), positions.max())) + 1
    present = torch.ones_like(held_positions, dtype=torch.bool)
    return _position_table(held_positions, size, present, False).gather(1, positions)
