"""MiniCache: adjacent layers share one direction per token (cross-layer merging, `--merge minicache`).

Liu et al., "MiniCache: KV Cache Compression in Depth Dimension for Large Language Models",
NeurIPS 2024, arXiv:2405.14366. The rule:

- Pairs. From layer L on (`--merge-from`, default half depth, where the paper finds adjacent layers'
  states most alike), layers pair up as (L, L+1), (L+2, L+3), ...; an odd last layer stays alone.
- Merge. Each cached state x (one KV head's key, or value, of one token) is split into a magnitude
  ||x|| and a direction x/||x||. The pair keeps one shared direction per token and head, the SLERP of
  the two layers' directions, e = sin((1-t)W)/sin(W) * u_a + sin(tW)/sin(W) * u_b with
  W = arccos(u_a . u_b), u_a the earlier layer's and u_b the later one's; t = 0.6 (`--merge-t`), the
  paper's setting, a little closer to the later layer. Each layer keeps its own magnitude, so each
  restores its state as e * ||x|| (norms restored exactly; only the direction is shared).
- Retain. The angular distance of a token's two states is d = W / pi in [0, 1]. Tokens whose
  states point apart are kept unmerged in both layers: retained when d >= d_min + g * (d_max - d_min),
  g the retention threshold (`--merge-threshold`, default 0.05, the paper's), d_min and d_max the
  smallest and largest distances of that layer pair (keys and values apart). The paper takes d_min and
  d_max over the prompt it merges after prefill; a KV Studio cache is filled chunk by chunk and token
  by token, so they are the running extremes over everything the pair has merged so far (this chunk
  included). g = 0 retains every token (the run is bit-identical to no merging); g > 1 merges all.
- Attention in each layer reads its own restored states: e * its magnitude, or the retained
  original.

When merging happens. The later layer of a pair runs after the earlier one in every forward step,
so a step's new entries are merged once both layers have attended to them (the later layer's
`after_attention`, after its policy has run): attention in the step that adds a token sees its
original states, as after the paper's prefill; every later step sees the restored ones. With a
codec, the groups a step encoded keep their rows until the merge rewrites them and encodes them
again (`QuantizedStore.keep_step_groups`): merge, then quantize, and the step that adds a token sees
it through the codec as it would without merging.

Eviction policies compose. A policy may keep different positions in the two layers of a pair (and
per KV head). Only an entry both layers still hold when the step's merge runs can be merged; an
entry one of them has already evicted stays unmerged in the other. An entry evicted later from one
layer stays merged (restored) in its partner, which then holds the shared direction alone.

Storage. Under `fp` the pair holds the merge for real (storage/linked.py): the earlier layer keeps
a merged entry as its restored state e * |x_a| (direction and its magnitude in one row), the later
layer keeps only |x_b| and reads the direction from its partner's row; the later layer's unmerged
entries live in a pool of rows that merged entries give back. When the earlier layer's policy
evicts an entry its partner still reads, the partner first copies its restored state into its pool.
Every byte reported is held; the shared directions are counted once, in the earlier layer.

Under a quantizing codec (int8, int4, bnb, plugins) the codec's layout (keys grouped per channel
over positions) cannot be split per entry, so both layers hold the restored states through the
codec and `byte_count` reports what the merged representation would hold: a position merged in both
layers costs one direction (half to each layer) plus one magnitude per layer, a position merged in
one layer only its direction and magnitude, unmerged entries what the store holds per entry. That
figure is what MiniCache over a codec would hold; the buffers themselves do not shrink (the run's
summary says so: `merge_storage: "estimated"`, against `"held"` under fp).

Saved caches (core/store) hold each layer as its store holds it, plus the merged flags and the pair's
running distance range, so a restored run goes on merging exactly as it would have.

Refused: `--rerotate` (a pair's layers may re-rotate the same token to different positions, and a
shared direction would then hold for one of them only) and fine-tuning through the cache (the merge
writes the restored states in place, which autograd cannot follow).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from kvstudio.core.storage.base import CodecError
from kvstudio.core.storage.buffers import EntryBuffers
from kvstudio.core.storage.linked import LinkedStore

KINDS = ("key", "value")
DEFAULT_T = 0.6  # the paper's interpolation parameter (its implementation details)
DEFAULT_THRESHOLD = 0.05  # the paper's retention threshold gamma
_EPS = 1e-6


def slerp(u_a: torch.Tensor, u_b: torch.Tensor, t: float) -> torch.Tensor:
    """Spherical interpolation of unit vectors along the last axis: t = 0 gives u_a, t = 1 gives u_b.
    Nearly parallel pairs (where sin W vanishes) fall back to normalised linear interpolation, and so
    do opposite ones (no unique great circle); a zero vector stays zero."""
    cos = (u_a * u_b).sum(dim=-1, keepdim=True).clamp(-1.0, 1.0)
    omega = torch.arccos(cos)
    sin = torch.sin(omega)
    stable = sin > 1e-4
    safe_sin = torch.where(stable, sin, torch.ones_like(sin))
    spherical = (torch.sin((1 - t) * omega) * u_a + torch.sin(t * omega) * u_b) / safe_sin
    linear = (1 - t) * u_a + t * u_b
    norm = linear.norm(dim=-1, keepdim=True)
    linear = torch.where(norm > _EPS, linear / norm.clamp_min(_EPS), u_a)
    return torch.where(stable, spherical, linear)


def angular_distance(u_a: torch.Tensor, u_b: torch.Tensor) -> torch.Tensor:
    """d = arccos(u_a . u_b) / pi in [0, 1], over the last axis of unit vectors."""
    return torch.arccos((u_a * u_b).sum(dim=-1).clamp(-1.0, 1.0)) / math.pi


def split_magnitude(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x -> (||x||, x / ||x||) in float32 over the last axis; a zero vector has direction 0."""
    x = x.float()
    magnitude = x.norm(dim=-1)
    return magnitude, x / magnitude.clamp_min(_EPS).unsqueeze(-1)


@dataclass
class MergedStates:
    """One kind (keys or values) of a step's new tokens, merged: (kv_heads, n, head_dim) and masks (kv_heads, n)."""

    restored_a: torch.Tensor
    restored_b: torch.Tensor
    magnitude_b: torch.Tensor  # (kv_heads, n) float32: what a linked later layer keeps (storage/linked.py)
    merged: torch.Tensor  # bool: both layers now hold the restored form
    retained: torch.Tensor  # bool: both held it, but the two states point too far apart


class _Range:
    """Running smallest and largest angular distance of a layer pair, for one kind (tensors: no device sync)."""

    def __init__(self):
        self.low: torch.Tensor | None = None
        self.high: torch.Tensor | None = None

    def update(self, distance: torch.Tensor, valid: torch.Tensor) -> None:
        low = torch.where(valid, distance, torch.full_like(distance, math.inf)).amin()
        high = torch.where(valid, distance, torch.full_like(distance, -math.inf)).amax()
        self.low = low if self.low is None else torch.minimum(self.low, low)
        self.high = high if self.high is None else torch.maximum(self.high, high)

    def bound(self, threshold: float) -> torch.Tensor:
        return self.low + threshold * (self.high - self.low)

    def state(self) -> list[float] | None:
        """[low, high] as exact floats (a float32 value survives JSON as a float64), or None before any merge."""
        return None if self.low is None else [float(self.low), float(self.high)]

    def load_state(self, extremes: list[float] | None, device) -> None:
        if extremes is not None:
            self.low, self.high = (torch.tensor(value, dtype=torch.float32, device=device) for value in extremes)


def merge_states(x_a: torch.Tensor, x_b: torch.Tensor, both: torch.Tensor, t: float, threshold: float,
                 distances: _Range) -> MergedStates:
    """Merge two layers' states (kv_heads, n, head_dim) where `both` (kv_heads, n) holds them.
    Returns the restored states in x_a's dtype and which cells were merged or retained."""
    magnitude_a, u_a = split_magnitude(x_a)
    magnitude_b, u_b = split_magnitude(x_b)
    distance = angular_distance(u_a, u_b)
    distances.update(distance, both)
    retained = both & (distance >= distances.bound(threshold))
    merged = both & ~retained
    shared = slerp(u_a, u_b, t)
    return MergedStates((shared * magnitude_a.unsqueeze(-1)).to(x_a.dtype),
                        (shared * magnitude_b.unsqueeze(-1)).to(x_b.dtype), magnitude_b, merged, retained)


class MergedLayer:
    """One layer's side of a pair: which of its entries are merged (per kind), compacted with the layer."""

    def __init__(self, pair: MiniCachePair, layer_idx: int):
        self.pair = pair
        self.layer_idx = layer_idx
        self.flags = EntryBuffers()  # "key", "value": (kv_heads, n) bool, aligned with the layer's entries
        self.saved_bytes = 0  # what the layer would hold unmerged, minus what it holds (or would, estimated)
        self.estimated_bytes = 0  # under a codec: the saving the store cannot hold, subtracted from its bytes
        self.shared_bytes = 0  # bytes of directions shared with the partner that this layer holds (or, estimated, its half)
        self._partner_bytes = 0  # the partner's bytes before this layer's eviction

    @property
    def partner(self) -> int:
        a, b = self.pair.layers
        return b if self.layer_idx == a else a

    def appended(self, kv_heads: int, n_new: int, device) -> None:
        unmerged = torch.zeros(kv_heads, n_new, dtype=torch.bool, device=device)
        # "retained": the retention rule kept the entry unmerged (its two states point apart)
        self.flags.append({"key": unmerged, "value": unmerged, "retained": unmerged}, n_new)

    def before_keep(self, layer, keep: torch.Tensor) -> None:
        """The policy is about to evict from this layer. A linked partner first copies out the restored
        states it reads from entries that go (storage/linked.py)."""
        partner = layer.cache.layers[self.partner]
        self._partner_bytes = partner.byte_count()
        if isinstance(partner.store, LinkedStore) and self.layer_idx == self.pair.layers[0] and partner.is_initialized:
            partner.store.materialize(keep)

    def keep(self, layer, keep: torch.Tensor) -> None:
        """The policy evicted from this layer: compact the flags like the store and recount both layers'
        bytes. The evicting layer notes its own change; the partner's (a copy it had to make, or shared
        directions now its alone) is noted here."""
        self.flags.keep(keep)
        partner = layer.cache.layers[self.partner]
        self.pair.recount(layer.cache)
        layer.cache.note_bytes(partner.byte_count() - self._partner_bytes)

    def merged_mask(self, kind: str) -> torch.Tensor:
        return self.flags.view(kind)

    # -- saving and restoring (core.store.layer_tensors) -------------------------------------------

    def state(self) -> tuple[dict[str, torch.Tensor], dict]:
        """(the merged and retained flags as CPU copies; the pair's distance range)."""
        tensors = {name: self.flags.view(name).to("cpu", copy=True) for name in self.flags.tensors}
        numbers = {"distances": {kind: self.pair.distances[kind].state() for kind in KINDS}}
        return tensors, numbers

    def load_state(self, tensors: dict[str, torch.Tensor], numbers: dict, device) -> None:
        """The inverse of `state()`, into a fresh side (its layer's store restored first)."""
        if tensors:
            count = next(iter(tensors.values())).shape[1]
            with torch.no_grad():
                self.flags.append({name: t.to(device) for name, t in tensors.items()}, count)
        for kind, extremes in numbers.get("distances", {}).items():
            self.pair.distances[kind].load_state(extremes, device)


class MiniCachePair:
    """Layers (a, a + 1): the merge of each step's new entries, and the bytes of what they share."""

    def __init__(self, layer_a: int, t: float, threshold: float):
        self.layers = (layer_a, layer_a + 1)
        self.t, self.threshold = t, threshold
        self.sides = {index: MergedLayer(self, index) for index in self.layers}
        self.distances = {kind: _Range() for kind in KINDS}

    def merge_step(self, cache) -> torch.Tensor:
        """Merge the step's new entries both layers hold; returns which were retained unmerged,
        (kv_heads, n_new) bool over the step's new tokens, for the record."""
        a, b = (cache.layers[i] for i in self.layers)
        if torch.is_grad_enabled() and (a.keys.requires_grad or b.keys.requires_grad):
            raise CodecError("--merge minicache writes merged states in place and cannot carry gradients; "
                             "fine-tune through the cache without --merge")
        positions = cache.context.positions
        first, n_new = int(positions[0]), positions.shape[0]
        before = a.byte_count() + b.byte_count()
        grids = [_new_entry_grid(layer, first, n_new) for layer in (a, b)]
        both = grids[0].present & grids[1].present
        retained_any = torch.zeros_like(both)
        for kind in KINDS:
            merged = merge_states(grids[0].states(a, kind), grids[1].states(b, kind), both, self.t, self.threshold,
                                  self.distances[kind])
            retained_any |= merged.retained
            for layer, grid, restored in ((a, grids[0], merged.restored_a), (b, grids[1], merged.restored_b)):
                write = grid.entry_mask(merged.merged)
                if isinstance(layer.store, LinkedStore):  # fp: the later layer keeps its magnitude only
                    magnitude = grid.per_entry(merged.magnitude_b.unsqueeze(-1)).squeeze(-1)
                    layer.store.link(kind, grid.index, write, magnitude)
                else:
                    layer.store.overwrite(kind, grid.index, grid.per_entry(restored), write)
                flags = self.sides[layer.layer_idx].flags.view(kind)
                flags[:, grid.start:] |= write
        for layer, grid in ((a, grids[0]), (b, grids[1])):
            layer.store.settle()  # merged, then quantized (QuantizedStore.keep_step_groups)
            layer.store.release_step()
            self.sides[layer.layer_idx].flags.view("retained")[:, grid.start:] |= grid.entry_mask(retained_any)
        self.recount(cache)
        cache.note_bytes(a.byte_count() + b.byte_count() - before)
        return retained_any

    def recount(self, cache) -> None:
        """Recompute both layers' saved and shared bytes (the callers note the change in the cache's total)."""
        layers = [cache.layers[i] for i in self.layers]
        if isinstance(layers[1].store, LinkedStore):  # held for real: nothing to subtract
            a, b = layers
            shared = sum(b.store.linked_row_bytes().values()) if b.is_initialized else 0
            full = b.store.unmerged_byte_count() if b.is_initialized else 0
            for side in self.sides.values():
                side.estimated_bytes = 0
            # The shared directions are rows of the earlier layer: counted there, where they are held.
            self.sides[a.layer_idx].shared_bytes, self.sides[b.layer_idx].shared_bytes = shared, 0
            self.sides[a.layer_idx].saved_bytes = 0
            self.sides[b.layer_idx].saved_bytes = full - b.store.byte_count() if b.is_initialized else 0
            return
        shared = _shared_positions(layers, self.sides)
        for layer in layers:
            side = self.sides[layer.layer_idx]
            entries = layer.store.entry_count() * layer.positions.shape[0] if layer.is_initialized else 0
            per_entry = layer.store.byte_count() / (2 * entries) if entries else 0.0  # per kind
            magnitude = torch.empty((), dtype=layer.dtype).element_size() if layer.is_initialized else 0
            saved = shared_half = 0.0
            for kind in KINDS:
                merged = int(side.merged_mask(kind).sum()) if entries else 0
                saved += shared[kind] * per_entry / 2 - merged * magnitude
                shared_half += shared[kind] * per_entry / 2
            side.saved_bytes = side.estimated_bytes = int(saved)
            side.shared_bytes = int(shared_half)


def _shared_positions(layers, sides) -> dict[str, int]:
    """Per kind: (head, position) cells merged in both layers, i.e. directions the two share."""
    a, b = layers
    if not (a.is_initialized and b.is_initialized) or a.store.entry_count() == 0 or b.store.entry_count() == 0:
        return {kind: 0 for kind in KINDS}
    positions_a, positions_b = a.positions, b.positions
    size = int(max(positions_a.max(), positions_b.max())) + 1
    counts = {}
    for kind in KINDS:
        held_a = torch.zeros(positions_a.shape[0], size, dtype=torch.bool, device=positions_a.device)
        held_a.scatter_(1, positions_a, sides[a.layer_idx].merged_mask(kind))
        counts[kind] = int((held_a.gather(1, positions_b) & sides[b.layer_idx].merged_mask(kind)).sum())
    return counts


class _NewEntryGrid:
    """Where a step's new tokens sit in one layer: its last entries (the newest, in position order),
    laid on a dense (kv_heads, n_new) grid by position, with what the policy has already evicted absent."""

    def __init__(self, index: torch.Tensor, slot: torch.Tensor, is_new: torch.Tensor, n_new: int, start: int):
        self.index, self.slot, self.is_new, self.n_new, self.start = index, slot, is_new, n_new, start
        kv_heads = index.shape[0]
        self.present = torch.zeros(kv_heads, n_new + 1, dtype=torch.bool, device=index.device)
        self.present.scatter_(1, slot, is_new)
        self.present = self.present[:, :n_new]

    def states(self, layer, kind: str) -> torch.Tensor:
        """(kv_heads, n_new, head_dim) states of the new tokens (zeros where absent)."""
        held = (layer.keys if kind == "key" else layer.values)[0]
        rows = held.gather(1, self.index.unsqueeze(-1).expand(-1, -1, held.shape[-1]))
        grid = torch.zeros(held.shape[0], self.n_new + 1, held.shape[-1], dtype=held.dtype, device=held.device)
        grid.scatter_(1, self.slot.unsqueeze(-1).expand_as(rows), rows)
        return grid[:, :self.n_new]

    def per_entry(self, grid: torch.Tensor) -> torch.Tensor:
        """Dense (kv_heads, n_new, ...) back to this layer's entries (kv_heads, m, ...)."""
        padded = torch.cat([grid, torch.zeros_like(grid[:, :1])], dim=1)
        return padded.gather(1, self.slot.unsqueeze(-1).expand(-1, -1, grid.shape[-1]))

    def entry_mask(self, grid_mask: torch.Tensor) -> torch.Tensor:
        padded = torch.cat([grid_mask, torch.zeros_like(grid_mask[:, :1])], dim=1)
        return padded.gather(1, self.slot) & self.is_new


def _new_entry_grid(layer, first: int, n_new: int) -> _NewEntryGrid:
    count = layer.store.entry_count()
    m = min(n_new, count)
    start = count - m
    positions = layer.positions[:, start:]
    kv_heads = positions.shape[0]
    index = torch.arange(start, count, device=positions.device).unsqueeze(0).expand(kv_heads, m)
    is_new = positions >= first
    slot = torch.where(is_new, positions - first, torch.full_like(positions, n_new))  # n_new: a spare column
    return _NewEntryGrid(index, slot, is_new, n_new, start)


class MiniCacheMerging:
    """A cache's merging: the pairs, and what each layer's PolicyLayer asks of them."""

    def __init__(self, n_layers: int, merge_from: int | None, t: float, threshold: float):
        start = n_layers // 2 if merge_from is None else merge_from
        if not 0 <= start <= n_layers - 2:
            raise CodecError(f"--merge-from {start}: this model has {n_layers} layers, so merging starts at a layer "
                             f"from 0 to {n_layers - 2} (a pair needs the layer after it)")
        self.start = start
        self.pairs = [MiniCachePair(a, t, threshold) for a in range(start, n_layers - 1, 2)]
        self.by_layer = {index: pair for pair in self.pairs for index in pair.layers}
        self.retained_this_step: dict[int, torch.Tensor] = {}  # layer -> positions retained in this step

    def holds_links(self, layer_idx: int, codec) -> bool:
        """Whether this layer gets a LinkedStore: the later layer of a pair, under fp."""
        pair = self.by_layer.get(layer_idx)
        return codec is None and pair is not None and layer_idx == pair.layers[1]

    def connect(self, cache) -> None:
        """Give each linked later layer its partner (the layers exist now)."""
        for pair in self.pairs:
            a, b = (cache.layers[i] for i in pair.layers)
            if isinstance(b.store, LinkedStore):
                b.store.partner = a

    def side(self, layer_idx: int) -> MergedLayer | None:
        pair = self.by_layer.get(layer_idx)
        return None if pair is None else pair.sides[layer_idx]

    def after_attention(self, cache, layer_idx: int) -> None:
        """The later layer of a pair has attended and its policy has run: merge the step's entries."""
        pair = self.by_layer.get(layer_idx)
        if pair is None or layer_idx != pair.layers[1]:
            return
        retained = pair.merge_step(cache)  # (kv_heads, n_new) over the step's new tokens
        positions = cache.context.positions[retained.any(dim=0)]
        for index in pair.layers:
            self.retained_this_step[index] = positions

    def shared_bytes(self) -> int:
        return sum(side.shared_bytes for pair in self.pairs for side in pair.sides.values())

    def step_report(self, cache) -> dict:
        """MergeEvent's fields after a step: per layer, merged entries, shared bytes, positions retained."""
        empty = np.zeros(0, dtype=np.int64)
        retained = tuple(self.retained_this_step[i].cpu().numpy() if i in self.retained_this_step else empty
                         for i in range(cache.n_layers))
        self.retained_this_step = {}
        return {"merged_entries_per_layer": tuple(self._merged_entries(cache, i) for i in range(cache.n_layers)),
                "shared_bytes_per_layer": tuple(self.side(i).shared_bytes if i in self.by_layer else 0
                                                for i in range(cache.n_layers)),
                "retained": retained}

    def _retained_entries(self, cache, layer_idx: int) -> int:
        """Entries (over KV heads) a layer holds wholly unmerged because the retention rule kept their
        key or value apart (an entry with a merged key and a retained value counts as merged)."""
        side = self.side(layer_idx)
        if side is None or not cache.layers[layer_idx].is_initialized:
            return 0
        merged = side.merged_mask("key") | side.merged_mask("value")
        return int((side.flags.view("retained") & ~merged).sum())

    def _merged_entries(self, cache, layer_idx: int) -> int:
        """Entries (over KV heads) of a layer whose key or value is held merged."""
        side = self.side(layer_idx)
        if side is None or not cache.layers[layer_idx].is_initialized:
            return 0
        return int((side.merged_mask("key") | side.merged_mask("value")).sum())

    def summary(self, cache) -> dict:
        """What the run reports: the pairs, and per layer its saved, shared and retained figures."""
        return {
            "merge_from": self.start, "pairs": [list(pair.layers) for pair in self.pairs],
            # "held": the bytes are what the stores hold (fp, storage/linked.py); "estimated": what a merged
            # store would hold, the buffers holding the restored states through the codec.
            "merge_storage": "held" if cache.codec is None else "estimated",
            "saved_bytes_per_layer": [self.side(i).saved_bytes if i in self.by_layer else 0
                                      for i in range(cache.n_layers)],
            "shared_bytes_per_layer": [self.side(i).shared_bytes if i in self.by_layer else 0
                                       for i in range(cache.n_layers)],
            "retained_entries_per_layer": [self._retained_entries(cache, i) for i in range(cache.n_layers)],
            "held_entries_per_layer": [cache.layers[i].entry_count() * cache.layers[i].positions.shape[0]
                                       if i in self.by_layer and cache.layers[i].is_initialized else 0
                                       for i in range(cache.n_layers)],
            "merged_entries_per_layer": [self._merged_entries(cache, i) for i in range(cache.n_layers)],
        }


def create_merging(storage, n_layers: int) -> MiniCacheMerging | None:
    if storage.merge == "none":
        return None
    return MiniCacheMerging(n_layers, storage.merge_from, storage.merge_t, storage.merge_threshold)
