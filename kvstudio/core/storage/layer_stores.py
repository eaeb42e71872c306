"""One layer's storage: what PolicyLayer delegates appending, evicting and byte counting to.

`LayerStore` is the contract (an abstract class: what a store must do, and the buffers, counting
and saving every store shares); the stores are:

`FpStore` holds keys and values as the model produced them (the `fp` codec), in preallocated
buffers: bit-identical to concatenating tensors, without the per-step copy.

`QuantizedStore` holds them through a codec, with KIVI's layout (Liu et al. 2024,
arXiv:2402.02750). Each kind (key, value) has a full-precision *window* over token positions
[start, seen); entries leave it as soon as the codec can encode them:
  - a kind the codec quantizes per token (values in int8/int4, both kinds in bnb) has nothing to
    wait for: its entries are encoded the step they arrive, or when they leave the residual window
    (the newest `residual` positions) with `--residual N`;
  - a kind quantized over a group of entries (keys, per channel over G positions) waits until the
    whole group has left the residual window (seen - residual >= the group's end); the group is then
    encoded at once for every KV head, and its shared tensors (per-channel key scales and zero
    points) go to a slot of the group table. So with residual 0 the window holds at most G - 1 keys
    (the incomplete group) and no values.
The entries still held get their per-entry rows (codes, per-token scales). An evicted entry drops
its rows; a group no KV head holds any more frees its slot. Attention reads keys and values decoded
for the step (the policy scores those decoded keys); the decoded copy is released after the policy
has run, so between steps only the encoded form (and the windows) is held, and that is what
`byte_count` reports: codes, scales, zero points, the windows and the table of live groups.

`state()` / `load_state()` give a store's whole content as tensors plus JSON-safe numbers, so a
saved cache holds exactly what the store held (core.store.layer_tensors).
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import torch

from kvstudio.core.storage.base import Codec, CodecError, Encoded
from kvstudio.core.storage.buffers import EntryBuffers

KINDS = ("key", "value")


class LayerStore(ABC):
    """The per-layer store contract: what PolicyLayer (core/runtime/cache.py) asks of one layer's
    storage. A store holds, per KV head, the same number n of entries: keys and values
    (kv_heads, n, head_dim) and each entry's token position and rotation position (kv_heads, n).

    To write one, implement the abstract methods; the shared buffers (`entries`), counting and
    saving come with this class. `byte_count` must count every byte the store holds, whatever the
    encoding: the views and the memory targets report it as the cache's size.
    """

    # With cross-layer merging a codec encodes the merged states again, so the step's groups stay
    # available until the merge has run (QuantizedStore reads it; PolicyLayer sets it).
    keep_step_groups = False

    def __init__(self, capacity_hint: int | None):
        self.entries = EntryBuffers(capacity_hint)
        self._bytes = 0

    @abstractmethod
    def keys(self) -> torch.Tensor:
        """Every held key as attention reads it, (1, kv_heads, n, head_dim) in the model's dtype."""

    @abstractmethod
    def values(self) -> torch.Tensor:
        """Every held value, (1, kv_heads, n, head_dim)."""

    @abstractmethod
    def append(self, keys: torch.Tensor, values: torch.Tensor, positions: torch.Tensor,
               rope_positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Add n new entries (keys, values (kv_heads, n, head_dim); positions (kv_heads, n)); returns
        the whole layer's keys and values, (1, kv_heads, N, head_dim), for this step's attention."""

    @abstractmethod
    def keep(self, keep: torch.Tensor) -> None:
        """Keep only the entries at `keep` (kv_heads, m) indices, in that order; drop the rest."""

    @abstractmethod
    def overwrite(self, kind: str, index: torch.Tensor, rows: torch.Tensor, where: torch.Tensor) -> None:
        """Write rows (kv_heads, m, head_dim) of `kind` over the entries at `index` where `where`
        (cross-layer merging writes each layer's restored states; storage/minicache.py)."""

    @abstractmethod
    def set_keys(self, keys: torch.Tensor, rope_positions: torch.Tensor) -> None:
        """Replace every held key (after re-rotation), (1, kv_heads, n, head_dim)."""

    def mean_relative_error(self) -> dict[str, float | None]:
        """The codec's mean relative error of keys and values (None: not measured, or nothing encoded)."""
        return {kind: None for kind in KINDS}

    # -- what PolicyLayer reads --------------------------------------------------------------------

    def entry_count(self) -> int:
        return self.entries.count

    def positions(self) -> torch.Tensor:
        return self.entries.view("positions")

    def rope_positions(self) -> torch.Tensor:
        return self.entries.view("rope_positions")

    def byte_count(self) -> int:
        return self._bytes

    def release_step(self) -> None:
        """Drop anything held only for the current step."""

    def detach(self) -> None:
        """Cut every held tensor from the autograd graph (fine-tuning's truncated mode)."""
        self.entries.tensors = {name: tensor.detach() for name, tensor in self.entries.tensors.items()}

    # -- saving and restoring (core.store.layer_tensors) -------------------------------------------

    def state(self) -> tuple[dict[str, torch.Tensor], dict]:
        """(tensors, numbers): everything held, as exact CPU copies, and the counters beside them."""
        tensors = {f"entries.{name}": self.entries.view(name) for name in self.entries.tensors}
        return cpu_copies(tensors), {}

    def load_state(self, tensors: dict[str, torch.Tensor], numbers: dict, device) -> None:
        """The inverse of `state()`, into a fresh store."""
        fields = {name.split(".", 1)[1]: t.to(device) for name, t in tensors.items() if name.startswith("entries.")}
        if fields:
            with torch.no_grad():  # into preallocated buffers, as a run without autograd would have them
                self.entries.append(fields, next(iter(fields.values())).shape[1])


def cpu_copies(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {name: t.detach().to("cpu", copy=True).contiguous() for name, t in tensors.items()}


class FpStore(LayerStore):
    """Keys and values in the model's dtype, in preallocated buffers."""

    def keys(self) -> torch.Tensor:
        return self.entries.view("keys").unsqueeze(0)

    def values(self) -> torch.Tensor:
        return self.entries.view("values").unsqueeze(0)

    def append(self, keys, values, positions, rope_positions):
        """keys, values (kv_heads, n, head_dim); positions (kv_heads, n). Returns the whole layer's
        keys and values, (1, kv_heads, N, head_dim), for attention."""
        self.entries.append({"keys": keys, "values": values, "positions": positions,
                             "rope_positions": rope_positions}, keys.shape[1])
        self._count_bytes()
        return self.keys(), self.values()

    def keep(self, keep: torch.Tensor) -> None:
        self.entries.keep(keep)
        self._count_bytes()

    def load_state(self, tensors, numbers, device) -> None:
        super().load_state(tensors, numbers, device)
        self._count_bytes()

    def _count_bytes(self) -> None:
        self._bytes = self.entries.count * self.entries.row_bytes(("keys", "values")) if self.entries.count else 0

    def overwrite(self, kind: str, index: torch.Tensor, rows: torch.Tensor, where: torch.Tensor) -> None:
        """Write rows (kv_heads, m, head_dim) over the entries at `index` (kv_heads, m) where `where`
        (cross-layer merging writes each layer's restored states; storage/minicache.py)."""
        held = self.entries.view("keys" if kind == "key" else "values")
        index = index.unsqueeze(-1).expand(-1, -1, held.shape[-1])
        held.scatter_(1, index, torch.where(where.unsqueeze(-1), rows, held.gather(1, index)))

    def set_keys(self, keys: torch.Tensor, rope_positions: torch.Tensor) -> None:
        """Replace every held key (after re-rotation), (1, kv_heads, n, head_dim)."""
        if self.entries.out_of_place:
            self.entries.tensors["keys"] = keys[0]
            self.entries.tensors["rope_positions"] = rope_positions
        else:
            self.entries.view("keys").copy_(keys[0])
            self.entries.view("rope_positions").copy_(rope_positions)


class _GroupTable:
    """The per-group tensors (kv_heads, slots, ...) of encoded groups, and which slot holds which group."""

    def __init__(self, device):
        self.fields: dict[str, torch.Tensor] = {}
        self.slot_of = torch.zeros(0, dtype=torch.int32, device=device)  # group number -> slot
        self.owner: list[int | None] = []  # slot -> group number, None when free
        self.live = 0

    def store(self, group: int, per_group: dict[str, torch.Tensor]) -> None:
        if not per_group:
            return
        if group >= self.slot_of.numel():
            grown = torch.zeros(max(group + 1, 2 * self.slot_of.numel()), dtype=torch.int32,
                                device=self.slot_of.device)
            grown[:self.slot_of.numel()] = self.slot_of
            self.slot_of = grown
        own = int(self.slot_of[group])
        if own < len(self.owner) and self.owner[own] == group:  # encoded again (a merged step's rewrite)
            for name, tensor in per_group.items():
                self.fields[name][:, own] = tensor
            return
        free = [slot for slot, owner in enumerate(self.owner) if owner is None]
        if free:
            slot = free[0]
        else:
            slot = len(self.owner)
            self.owner.append(None)
            self._grow(per_group, len(self.owner))
        for name, tensor in per_group.items():
            self.fields[name][:, slot] = tensor
        self.owner[slot] = group
        self.slot_of[group] = slot
        self.live += 1

    def _grow(self, like: dict[str, torch.Tensor], needed: int) -> None:
        for name, tensor in like.items():
            old = self.fields.get(name)
            have = 0 if old is None else old.shape[1]
            if have >= needed:
                continue
            grown = torch.zeros((tensor.shape[0], max(needed, 2 * have), *tensor.shape[1:]), dtype=tensor.dtype,
                                device=tensor.device)
            if old is not None:
                grown[:, :have] = old
            self.fields[name] = grown

    def free_unused(self, held_groups: set[int]) -> None:
        for slot, owner in enumerate(self.owner):
            if owner is not None and owner not in held_groups:
                self.owner[slot] = None
                self.live -= 1

    def expanded(self, groups: torch.Tensor) -> dict[str, torch.Tensor]:
        """Each entry's group tensors: groups (kv_heads, n) -> {name: (kv_heads, n, ...)}."""
        slots = self.slot_of[groups].long()
        out = {}
        for name, table in self.fields.items():
            kv_heads, n = slots.shape
            rows = (slots + torch.arange(kv_heads, device=slots.device)[:, None] * table.shape[1]).reshape(-1)
            out[name] = table.reshape(kv_heads * table.shape[1], -1).index_select(0, rows).view(
                kv_heads, n, *table.shape[2:])
        return out

    def byte_count(self) -> int:
        """The live slots' tensors and the group -> slot index."""
        slot = sum(t[:, :1].numel() * t.element_size() for t in self.fields.values())
        return self.live * slot + self.slot_of.numel() * self.slot_of.element_size()

    def state(self) -> tuple[dict[str, torch.Tensor], dict]:
        slots = len(self.owner)
        tensors = {f"fields.{name}": t[:, :slots] for name, t in self.fields.items()}
        tensors["slot_of"] = self.slot_of
        return tensors, {"owner": list(self.owner), "live": self.live}

    def load_state(self, tensors: dict[str, torch.Tensor], numbers: dict, device) -> None:
        self.fields = {name.split(".", 1)[1]: t.to(device) for name, t in tensors.items()
                       if name.startswith("fields.")}
        self.slot_of = tensors["slot_of"].to(device)
        self.owner, self.live = list(numbers["owner"]), numbers["live"]


class _Window:
    """One kind's full-precision rows of token positions [start, start + length), newest last."""

    def __init__(self, like: torch.Tensor, start: int, rows: int):
        kv_heads, _, head_dim = like.shape
        self.rows = torch.zeros(kv_heads, rows, head_dim, dtype=like.dtype, device=like.device)
        self.start, self.length = start, 0

    def write(self, offset: int, tensor: torch.Tensor) -> None:
        needed = offset + tensor.shape[1]
        if needed > self.rows.shape[1]:
            grown = torch.zeros(self.rows.shape[0], max(needed, 2 * self.rows.shape[1]), self.rows.shape[2],
                                dtype=self.rows.dtype, device=self.rows.device)
            grown[:, :self.length] = self.rows[:, :self.length]
            self.rows = grown
        self.rows[:, offset:needed].copy_(tensor)
        self.length = needed

    def drop_oldest(self, count: int) -> None:
        """The oldest `count` rows were encoded: what remains slides to the front (the window's few rows)."""
        remaining = self.length - count
        self.rows[:, :remaining] = self.rows[:, count:self.length].clone()
        self.start += count
        self.length = remaining

    def byte_count(self) -> int:
        return self.rows[:, :self.length].numel() * self.rows.element_size()


class QuantizedStore(LayerStore):
    """Keys and values through a codec, with a full-precision window of the newest positions."""

    def __init__(self, codec: Codec, group_size: int, residual: int, capacity_hint: int | None,
                 measure_error: bool = False):
        super().__init__(capacity_hint)
        self.codec, self.group, self.residual = codec, group_size, residual
        # Kinds whose encoding spans G entries (KIVI's per-channel keys) wait for a whole group.
        self.grouped = {kind: kind in codec.grouped_kinds for kind in KINDS}
        self.window: dict[str, _Window] = {}
        self.tables: dict[str, _GroupTable | None] = {kind: None for kind in KINDS}
        self.measure_error = measure_error
        self.error_sums = {"key": 0.0, "value": 0.0}
        self.error_counts = {"key": 0, "value": 0}
        self._step: tuple[torch.Tensor, torch.Tensor] | None = None
        # Cross-layer merging rewrites a step's new entries after both layers of a pair attended
        # (storage/minicache.py): key groups encoded in the step keep their rows as they were before
        # encoding until the next append, so a rewrite encodes them again (merge, then quantize).
        self.keep_step_groups = False
        self._step_groups: dict[tuple[str, int], torch.Tensor] = {}  # (kind, group number) -> (kv_heads, G, d)

    def keys(self) -> torch.Tensor:
        return self._decoded()[0]

    def values(self) -> torch.Tensor:
        return self._decoded()[1]

    def release_step(self) -> None:
        self._step = None

    def mean_relative_error(self) -> dict[str, float | None]:
        return {kind: (self.error_sums[kind] / self.error_counts[kind] if self.error_counts[kind] else None)
                for kind in KINDS}

    def window_length(self, kind: str) -> int:
        """Full-precision rows of `kind` held (0 before the first append)."""
        return self.window[kind].length if kind in self.window else 0

    # -- appending -----------------------------------------------------------------------------------

    def append(self, keys, values, positions, rope_positions):
        if torch.is_grad_enabled() and (keys.requires_grad or values.requires_grad):
            raise CodecError(f"--codec {self.codec.name} cannot carry gradients (rounding has none); "
                             "fine-tuning through the cache needs --codec fp")
        self._step = None
        n = keys.shape[1]
        first = int(positions[0, 0])
        if not self.window:
            for kind, like in (("key", keys), ("value", values)):
                start = first - first % self.group if self.grouped[kind] else first
                self.window[kind] = _Window(like, start, self.residual + self.group + n)
                self.tables[kind] = _GroupTable(like.device) if self.grouped[kind] else None
        for kind, tensor in (("key", keys), ("value", values)):
            window = self.window[kind]
            if first != window.start + window.length:
                raise CodecError("a quantized cache takes tokens in order, one position after the other")
            window.write(window.length, tensor)
        self.entries.append({"positions": positions, "rope_positions": rope_positions}, n)
        self._step_groups = {}
        leaving = first + n - self.residual  # positions before this one are out of the residual window
        for kind in KINDS:
            window = self.window[kind]
            if self.grouped[kind]:
                while leaving - window.start >= self.group:
                    self._encode_oldest(kind, self.group)
            elif leaving > window.start:
                self._encode_oldest(kind, leaving - window.start)
        self._count_bytes()
        return self._decoded()

    def overwrite(self, kind: str, index: torch.Tensor, rows: torch.Tensor, where: torch.Tensor) -> None:
        """Write rows over entries fed in this step (see FpStore.overwrite): in the window as they are;
        encoded per token, encoded again; in a key group encoded in this step, that group encoded
        again from its rows with the new ones in."""
        window = self.window[kind]
        positions = self.positions().gather(1, index)
        in_window = where & (positions >= window.start)
        heads, entry = in_window.nonzero(as_tuple=True)
        window.rows[heads, positions[heads, entry] - window.start] = rows[heads, entry]
        heads, entry = (where & ~in_window).nonzero(as_tuple=True)
        if heads.numel() and not self.grouped[kind]:
            encoded = self.codec.encode(rows[heads, entry].unsqueeze(0), kind)  # each row on its own
            for name, codes in encoded.per_entry.items():
                self.entries.view(f"{kind}.{name}")[heads, index[heads, entry]] = codes[0]
        elif heads.numel():
            groups = positions[heads, entry] // self.group
            for group in groups.unique().tolist():
                if (kind, group) not in self._step_groups:
                    raise CodecError("an entry to overwrite was encoded before this step; only a step's own "
                                     "entries can be rewritten (set keep_step_groups)")
                mine = groups == group
                x = self._step_groups[kind, group]
                x[heads[mine], positions[heads[mine], entry[mine]] - group * self.group] = rows[heads[mine], entry[mine]]
                self._encode_rows(kind, group * self.group, x, note_error=False)
        self._step = None
        self._count_bytes()

    def _encode_oldest(self, kind: str, count: int) -> None:
        """Encode the window's oldest `count` rows: one group (grouped kinds) or that many entries."""
        window = self.window[kind]
        x = window.rows[:, :count]
        if self.keep_step_groups and self.grouped[kind]:
            x = x.clone()
            self._step_groups[kind, window.start // self.group] = x
        self._encode_rows(kind, window.start, x, note_error=self.measure_error)
        window.drop_oldest(count)

    def _encode_rows(self, kind: str, start: int, x: torch.Tensor, note_error: bool) -> None:
        """Encode the rows x (kv_heads, count, head_dim) of positions [start, start + count): a grouped
        kind's shared tensors go to its group table, the held entries get their per-entry rows."""
        count = x.shape[1]
        positions = self.positions()
        held = (positions >= start) & (positions < start + count)
        heads, index = held.nonzero(as_tuple=True)
        in_rows = positions[heads, index] - start
        encoded = self.codec.encode(x, kind)
        if self.grouped[kind]:
            self.tables[kind].store(start // self.group, encoded.per_group)
        elif encoded.per_group:
            raise CodecError(f"codec {self.codec.name} returned per-group tensors for {kind}s, which it declares "
                             "quantized per token (grouped_kinds)")
        for name, rows in encoded.per_entry.items():
            field = f"{kind}.{name}"
            if field not in self.entries:
                self.entries.add_field(field, rows)
            self.entries.view(field)[heads, index] = rows[heads, in_rows]
        if note_error:
            self._note_error(kind, x, encoded)

    def _note_error(self, kind: str, x: torch.Tensor, encoded: Encoded) -> None:
        per_group = {name: t[:, None].expand(t.shape[0], x.shape[1], *t.shape[1:])
                     for name, t in encoded.per_group.items()}
        decoded = self.codec.decode(encoded.per_entry, per_group, kind, torch.float32)
        reference = x.float()
        error = (decoded - reference).norm() / reference.norm().clamp_min(1e-12)
        self.error_sums[kind] += float(error)
        self.error_counts[kind] += 1

    # -- reading ---------------------------------------------------------------------------------------

    def _decoded(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(1, kv_heads, n, head_dim) keys and values as attention sees them, decoded once per step."""
        if self._step is None:
            self._step = (self._decode_kind("key").unsqueeze(0), self._decode_kind("value").unsqueeze(0))
        return self._step

    def _decode_kind(self, kind: str) -> torch.Tensor:
        """(kv_heads, n, head_dim): encoded entries decoded, window entries as they are."""
        positions = self.positions()
        window = self.window[kind]
        fields = {name.split(".", 1)[1]: self.entries.view(name) for name in self.entries.tensors
                  if name.startswith(kind + ".")}
        if not fields:  # nothing encoded yet: every entry is in the window
            index = (positions - window.start)[..., None].expand(-1, -1, window.rows.shape[-1])
            return window.rows.gather(1, index)
        per_group = {}
        table = self.tables[kind]
        if table is not None and table.fields:
            groups = torch.where(positions >= window.start, 0, positions // self.group)
            per_group = table.expanded(groups.clamp(max=max(table.slot_of.numel() - 1, 0)))
        decoded = self.codec.decode(fields, per_group, kind, window.rows.dtype)
        # Window entries are the newest, so they sit among the last `window.length` of each head's row
        # (positions increase along it): only that tail is looked up, not the whole layer.
        tail = min(window.length, positions.shape[1])
        if tail:
            tail_positions = positions[:, -tail:]
            index = (tail_positions - window.start).clamp_min(0)[..., None].expand(-1, -1, window.rows.shape[-1])
            in_window = (tail_positions >= window.start)[..., None]
            decoded[:, -tail:] = torch.where(in_window, window.rows.gather(1, index), decoded[:, -tail:])
        return decoded

    # -- evicting ----------------------------------------------------------------------------------------

    def keep(self, keep: torch.Tensor) -> None:
        self._step = None
        self.entries.keep(keep)
        positions = self.positions()
        for kind, table in self.tables.items():
            if table is not None:
                encoded = positions[positions < self.window[kind].start]
                table.free_unused(set((encoded // self.group).unique().tolist()))
        self._count_bytes()

    def detach(self) -> None:
        super().detach()
        for window in self.window.values():
            window.rows = window.rows.detach()
        for table in self.tables.values():
            if table is not None:
                table.fields = {name: tensor.detach() for name, tensor in table.fields.items()}
        self._step = None if self._step is None else tuple(t.detach() for t in self._step)

    def set_keys(self, keys, rope_positions):
        raise CodecError(f"--rerotate re-rotates stored keys and works with --codec fp only, not {self.codec.name}")

    def byte_parts(self) -> dict[str, int]:
        """What the bytes held are: encoded rows (codes, per-entry scales), full-precision windows, group tables."""
        positions = self.positions()
        kv_heads = positions.shape[0]
        parts = {"encoded": 0, "windows": 0, "group_tables": 0}
        for kind in KINDS:
            window = self.window[kind]
            code_fields = [name for name in self.entries.tensors if name.startswith(kind + ".")]
            if code_fields:
                encoded_entries = int((positions < window.start).sum())  # over KV heads
                parts["encoded"] += encoded_entries * (self.entries.row_bytes(code_fields) // kv_heads)
            parts["windows"] += window.byte_count()
            if self.tables[kind] is not None:
                parts["group_tables"] += self.tables[kind].byte_count()
        return parts

    def _count_bytes(self) -> int:
        self._bytes = sum(self.byte_parts().values())
        return self._bytes

    # -- saving and restoring ------------------------------------------------------------------------------

    def state(self) -> tuple[dict[str, torch.Tensor], dict]:
        tensors, numbers = super().state()
        for kind, window in self.window.items():
            tensors[f"window.{kind}"] = window.rows[:, :window.length]
            numbers[f"window.{kind}.start"] = window.start
            table = self.tables[kind]
            if table is not None:
                table_tensors, numbers[f"table.{kind}"] = table.state()
                tensors.update({f"table.{kind}.{name}": t for name, t in table_tensors.items()})
        numbers["error_sums"], numbers["error_counts"] = dict(self.error_sums), dict(self.error_counts)
        return cpu_copies(tensors), numbers

    def load_state(self, tensors, numbers, device) -> None:
        super().load_state(tensors, numbers, device)
        for kind in KINDS:
            if f"window.{kind}" not in tensors:
                continue
            rows = tensors[f"window.{kind}"].to(device)
            window = self.window[kind] = _Window(rows, numbers[f"window.{kind}.start"],
                                                 max(rows.shape[1], self.residual + self.group))
            window.write(0, rows)
            if self.grouped[kind]:
                table = self.tables[kind] = _GroupTable(device)
                prefix = f"table.{kind}."
                table.load_state({name[len(prefix):]: t for name, t in tensors.items() if name.startswith(prefix)},
                                 numbers[f"table.{kind}"], device)
        self.error_sums = dict(numbers.get("error_sums", self.error_sums))
        self.error_counts = dict(numbers.get("error_counts", self.error_counts))
        if self.window:
            self._count_bytes()


def make_store(codec: Codec | None, group_size: int, residual: int, capacity_hint: int | None,
               measure_error: bool = False):
    if codec is None:
        return FpStore(capacity_hint)
    return QuantizedStore(codec, group_size, residual, capacity_hint, measure_error)
