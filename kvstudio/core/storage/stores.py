"""One layer's storage: what PolicyLayer delegates appending, evicting and byte counting to.

`FpStore` holds keys and values as the model produced them (the `fp` codec), in preallocated
buffers: bit-identical to concatenating tensors, without the per-step copy.

`QuantizedStore` holds them through a codec, with KIVI's layout (Liu et al. 2024,
arXiv:2402.02750): the newest entries stay in full precision in a *window* over token positions
[window_start, seen); when a whole group of G positions has left the residual window (seen -
residual >= its end), the group is encoded at once for every KV head, the entries still held get
their per-entry rows (codes, per-token scales), and the group's shared tensors (per-channel key
scales and zero points) go to a slot of the group table. An evicted entry drops its rows; a group
no KV head holds any more frees its slot. Attention reads keys and values decoded for the step;
the decoded copy is released after the policy has run, so between steps only the encoded form
(and the window) is held, and that is what `byte_count` reports: codes, scales, zero points, the
window and the table of live groups.
"""

from __future__ import annotations

import torch

from .base import Codec, CodecError, Encoded
from .buffers import EntryBuffers

ENTRY_KEYS = "positions", "rope_positions"


class FpStore:
    """Keys and values in the model's dtype, in preallocated buffers."""

    def __init__(self, capacity_hint: int | None):
        self.entries = EntryBuffers(capacity_hint)
        self._bytes = 0

    # -- what PolicyLayer reads --------------------------------------------------------------------

    def entry_count(self) -> int:
        return self.entries.count

    def positions(self) -> torch.Tensor:
        return self.entries.view("positions")

    def rope_positions(self) -> torch.Tensor:
        return self.entries.view("rope_positions")

    def keys(self) -> torch.Tensor:
        return self.entries.view("keys").unsqueeze(0)

    def values(self) -> torch.Tensor:
        return self.entries.view("values").unsqueeze(0)

    def byte_count(self) -> int:
        return self._bytes

    def release_step(self) -> None:
        """Drop anything held only for the current step (nothing here)."""

    # -- what PolicyLayer does ---------------------------------------------------------------------

    def append(self, keys, values, positions, rope_positions):
        """keys, values (kv_heads, n, head_dim); positions (kv_heads, n). Returns the whole layer's
        keys and values, (1, kv_heads, N, head_dim), for attention."""
        self.entries.append({"keys": keys, "values": values, "positions": positions,
                             "rope_positions": rope_positions}, keys.shape[1])
        self._bytes = self.entries.count * self.entries.row_bytes(("keys", "values"))
        return self.keys(), self.values()

    def keep(self, keep: torch.Tensor) -> None:
        self.entries.keep(keep)
        self._bytes = self.entries.count * self.entries.row_bytes(("keys", "values"))

    def detach(self) -> None:
        """Cut every held tensor from the autograd graph (fine-tuning's truncated mode)."""
        self.entries.tensors = {name: tensor.detach() for name, tensor in self.entries.tensors.items()}

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

    def slot_bytes(self) -> int:
        return sum(t[:, :1].numel() * t.element_size() for t in self.fields.values())


class QuantizedStore:
    """Keys and values through a codec, with a full-precision window of the newest positions."""

    def __init__(self, codec: Codec, group_size: int, residual: int, capacity_hint: int | None,
                 measure_error: bool = False):
        self.codec, self.group, self.residual = codec, group_size, residual
        self.entries = EntryBuffers(capacity_hint)
        self.window: dict[str, torch.Tensor] = {}  # "key"/"value": (kv_heads, capacity, head_dim)
        self.window_start = 0  # token position of the window's first row; a multiple of the group size
        self.window_length = 0
        self.tables = {"key": None, "value": None}
        self.measure_error = measure_error
        self.error_sums = {"key": 0.0, "value": 0.0}
        self.error_counts = {"key": 0, "value": 0}
        self._step: tuple[torch.Tensor, torch.Tensor] | None = None
        self._bytes = 0
        # Cross-layer merging rewrites a step's new entries after both layers of a pair attended
        # (storage/minicache.py): the groups encoded in the step keep their rows as they were before
        # encoding until the next append, so a rewrite re-encodes them (merge, then quantize).
        self.keep_step_groups = False
        self._step_groups: dict[int, dict[str, torch.Tensor]] = {}  # group number -> kind -> (kv_heads, G, d)

    def entry_count(self) -> int:
        return self.entries.count

    def positions(self) -> torch.Tensor:
        return self.entries.view("positions")

    def rope_positions(self) -> torch.Tensor:
        return self.entries.view("rope_positions")

    def keys(self) -> torch.Tensor:
        return self._decoded()[0]

    def values(self) -> torch.Tensor:
        return self._decoded()[1]

    def byte_count(self) -> int:
        return self._bytes

    def release_step(self) -> None:
        self._step = None

    def mean_relative_error(self) -> dict[str, float | None]:
        return {kind: (self.error_sums[kind] / self.error_counts[kind] if self.error_counts[kind] else None)
                for kind in ("key", "value")}

    # -- appending -----------------------------------------------------------------------------------

    def append(self, keys, values, positions, rope_positions):
        if torch.is_grad_enabled() and (keys.requires_grad or values.requires_grad):
            raise CodecError(f"--codec {self.codec.name} cannot carry gradients (rounding has none); "
                             "fine-tuning through the cache needs --codec fp")
        self._step = None
        kv_heads, n, head_dim = keys.shape
        first = int(positions[0, 0])
        if not self.window:
            self.window_start = first - first % self.group
            for kind, like in (("key", keys), ("value", values)):
                self.window[kind] = torch.zeros(kv_heads, self.residual + self.group + n, head_dim, dtype=like.dtype,
                                                device=like.device)
                self.tables[kind] = _GroupTable(like.device)
        offset = first - self.window_start
        if offset != self.window_length:
            raise CodecError("a quantized cache takes tokens in order, one position after the other")
        for kind, tensor in (("key", keys), ("value", values)):
            self._window_reserve(kind, offset + n)
            self.window[kind][:, offset:offset + n].copy_(tensor)
        self.window_length = offset + n
        self.entries.append({"positions": positions, "rope_positions": rope_positions}, n)
        self._step_groups = {}
        seen = first + n
        while seen - self.residual - self.window_start >= self.group:
            self._encode_oldest_group()
        self._count_bytes()
        return self._decoded()

    def overwrite(self, kind: str, index: torch.Tensor, rows: torch.Tensor, where: torch.Tensor) -> None:
        """Write rows over entries fed in this step (see FpStore.overwrite): in the window, or in a group
        encoded in this step, which is encoded again from its rows with the new ones in."""
        window = self.window[kind]
        positions = self.positions().gather(1, index)
        in_window = where & (positions >= self.window_start)
        heads, entry = in_window.nonzero(as_tuple=True)
        window[heads, positions[heads, entry] - self.window_start] = rows[heads, entry]
        encoded = where & ~in_window
        heads, entry = encoded.nonzero(as_tuple=True)
        if heads.numel():
            groups = positions[heads, entry] // self.group
            for group in groups.unique().tolist():
                if group not in self._step_groups:
                    raise CodecError("an entry to overwrite was encoded before this step; only a step's own "
                                     "entries can be rewritten (set keep_step_groups)")
                mine = groups == group
                x = self._step_groups[group][kind]
                x[heads[mine], positions[heads[mine], entry[mine]] - group * self.group] = rows[heads[mine], entry[mine]]
                self._encode_group(group * self.group, kind, x, note_error=False)
        self._step = None
        self._count_bytes()

    def _window_reserve(self, kind: str, needed: int) -> None:
        window = self.window[kind]
        if needed > window.shape[1]:
            grown = torch.zeros(window.shape[0], max(needed, 2 * window.shape[1]), window.shape[2],
                                dtype=window.dtype, device=window.device)
            grown[:, :self.window_length] = window[:, :self.window_length]
            self.window[kind] = grown

    def _encode_oldest_group(self) -> None:
        start, size = self.window_start, self.group
        for kind in ("key", "value"):
            x = self.window[kind][:, :size]
            if self.keep_step_groups:
                x = x.clone()
                self._step_groups.setdefault(start // size, {})[kind] = x
            self._encode_group(start, kind, x, note_error=self.measure_error)
        # The window moves one group on: what remains slides to the front (a few rows, not the cache).
        remaining = self.window_length - size
        for kind in ("key", "value"):
            window = self.window[kind]
            window[:, :remaining] = window[:, size:self.window_length].clone()
        self.window_start += size
        self.window_length = remaining

    def _encode_group(self, start: int, kind: str, x: torch.Tensor, note_error: bool) -> None:
        """Encode the group starting at position `start` from its rows x (kv_heads, G, head_dim): its
        shared tensors go to the group table, the held entries get their per-entry rows."""
        positions = self.positions()
        held = (positions >= start) & (positions < start + self.group)
        heads, index = held.nonzero(as_tuple=True)
        in_group = positions[heads, index] - start
        encoded = self.codec.encode(x, kind)
        self.tables[kind].store(start // self.group, encoded.per_group)
        for name, rows in encoded.per_entry.items():
            field = f"{kind}.{name}"
            if field not in self.entries:
                self.entries.add_field(field, rows)
            self.entries.view(field)[heads, index] = rows[heads, in_group]
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
            positions = self.positions()
            in_window = positions >= self.window_start
            window_row = (positions - self.window_start).clamp_min(0)
            decoded = []
            for kind in ("key", "value"):
                window = self.window[kind]
                index = window_row[..., None].expand(-1, -1, window.shape[-1])
                from_window = window.gather(1, index)
                fields = {name.split(".", 1)[1]: self.entries.view(name) for name in self.entries.tensors
                          if name.startswith(kind + ".")}
                if fields:
                    table = self.tables[kind]
                    groups = torch.where(in_window, torch.zeros_like(positions), positions // self.group)
                    per_group = table.expanded(groups.clamp(max=max(table.slot_of.numel() - 1, 0))) \
                        if table.fields else {}
                    from_codes = self.codec.decode(fields, per_group, kind, window.dtype)
                    from_window = torch.where(in_window[..., None], from_window, from_codes)
                decoded.append(from_window.unsqueeze(0))
            self._step = (decoded[0], decoded[1])
        return self._step

    # -- evicting ----------------------------------------------------------------------------------------

    def keep(self, keep: torch.Tensor) -> None:
        self._step = None
        self.entries.keep(keep)
        positions = self.positions()
        encoded = positions[positions < self.window_start]
        held_groups = set((encoded // self.group).unique().tolist())
        for table in self.tables.values():
            if table is not None:
                table.free_unused(held_groups)
        self._count_bytes()

    def detach(self) -> None:
        """Cut every held tensor from the autograd graph (fine-tuning's truncated mode)."""
        self.entries.tensors = {name: tensor.detach() for name, tensor in self.entries.tensors.items()}
        self.window = {name: tensor.detach() for name, tensor in self.window.items()}
        for table in self.tables.values():
            if table is not None:
                table.fields = {name: tensor.detach() for name, tensor in table.fields.items()}
        self._step = None if self._step is None else tuple(t.detach() for t in self._step)

    def set_keys(self, keys, rope_positions):
        raise CodecError(f"--rerotate re-rotates stored keys and works with --codec fp only, not {self.codec.name}")

    def _count_bytes(self) -> int:
        positions = self.positions()
        encoded_entries = int((positions < self.window_start).sum())  # over KV heads
        kv_heads = positions.shape[0]
        code_fields = [name for name in self.entries.tensors if "." in name]
        row = self.entries.row_bytes(code_fields) // kv_heads if code_fields else 0
        total = encoded_entries * row
        for kind, window in self.window.items():
            total += kv_heads * self.window_length * window.shape[-1] * window.element_size()
            table = self.tables[kind]
            total += table.live * table.slot_bytes() + table.slot_of.numel() * table.slot_of.element_size()
        self._bytes = total
        return total


def make_store(codec: Codec | None, group_size: int, residual: int, capacity_hint: int | None,
               measure_error: bool = False):
    if codec is None:
        return FpStore(capacity_hint)
    return QuantizedStore(codec, group_size, residual, capacity_hint, measure_error)
