"""One layer's storage: what PolicyLayer delegates appending, evicting and byte counting to.

`LayerStore` is the contract (an abstract class: what a store must do, and the buffers, counting
and saving every store shares); the stores are:

`FpStore` holds keys and values as the model produced them (the `fp` codec), in preallocated
buffers: bit-identical to concatenating tensors, without the per-step copy.

`QuantizedStore` holds them through a codec, with KIVI's quantization (Liu et al. 2024,
arXiv:2402.02750: keys per channel over a group of G entries, values per token) in a layout made for
caches that evict. Each kind (key, value) has a full-precision *window* of the newest `residual`
positions (empty with the default residual 0); entries leave it as they leave that window:
  - a kind the codec quantizes per token (values in int8/int4, both kinds in bnb) is encoded the
    step its entries leave it;
  - a kind quantized over a group of entries (keys) is encoded once the policy has run in the step
    (`settle()`, from `release_step()`): until then the step's new entries are held as the model
    computed them, so attention and the policy see them exact and the policy evicts before
    anything is grouped. Then, per KV head, the head's *tail* and its newly settled entries that it
    still holds, oldest first, fill groups of G: each group is encoded per channel and its shared
    tensors (per-channel scales and zero points, per head) take a *slot* of the group table, whose
    number each entry keeps (`key.slot`, int16). What is left over, fewer than G entries, is the
    head's new tail, held per token in 8 bits (each channel centred and scaled by the head's latest
    group, then an fp16 scale and zero point per token) under codecs below 8 bits, in fp16 under
    int8 (where 8 bits would round the keys twice at the codec's own precision); when later entries
    complete its group, the group is encoded per channel from the tail's decoded rows.
Where this departs from KIVI: KIVI groups G consecutive *token positions* and keeps the incomplete
group (and its residual of R tokens) in full precision. Under a policy that evicts, a position group
keeps a few scattered survivors that pay a whole group's scales, and the full-precision incomplete
group costs up to G - 1 keys a layer at fp32: at budget 256 on SmolLM2 those two held 0.36/0.26 of
fp32 for int8/int4. Here groups are made of the entries a head keeps (so a group's keys are not
consecutive tokens, and each KV head's groups differ), and the incomplete group costs about a quarter
of fp32 under int4 (half under int8); int4's tail keys are rounded twice (8 bits per token, then per
channel), and a step's own new
keys are exact in that step (KIVI's would be in its residual too).
An evicted entry drops its rows; a slot no KV head's entry refers to any more is free again.
Attention reads keys and values decoded for the step (the policy scores those decoded keys); the
decoded copy is released after the policy has run, so between steps only the encoded form (and the
windows) is held, and that is what `byte_count` reports: codes, scales, zero points, slot numbers, the
windows, the tails and the used slots of the group tables. The step's grouped entries held as
computed count as the encoded rows they become.

Saved states say their `layout` (LAYOUT); a state without one is of the first layout (position
groups, a full-precision incomplete group), which `load_state` converts: its encoded entries keep
their codes and scales exactly, and its window settles into groups and the tail.

`state()` / `load_state()` give a store's whole content as tensors plus JSON-safe numbers, so a
saved cache holds exactly what the store held (core.store.layer_tensors).
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import torch

from kvstudio.core.storage.base import Codec, CodecError, Encoded
from kvstudio.core.storage.buffers import EntryBuffers
from kvstudio.core.storage.key_groups import KeyTail, SlotTable

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

    def settle(self) -> None:
        """Encode what the step left as computed (QuantizedStore: its grouped entries)."""

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

    def keep(self, keep: torch.Tensor, first_moved: int | None = None) -> None:
        self.entries.keep(keep, first_moved)
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

    def byte_count(self, rows: int | None = None) -> int:
        rows = self.length if rows is None else rows
        return self.rows[:, :rows].numel() * self.rows.element_size()


LAYOUT = 2  # QuantizedStore.state()'s layout; 1 (no number): full-precision incomplete groups, groups by position


class QuantizedStore(LayerStore):
    """Keys and values through a codec, with a full-precision window of the newest positions."""

    def __init__(self, codec: Codec, group_size: int, residual: int, capacity_hint: int | None,
                 measure_error: bool = False):
        super().__init__(capacity_hint)
        self.codec, self.group, self.residual = codec, group_size, residual
        # Kinds whose encoding spans G entries (KIVI's per-channel keys) are grouped over held entries.
        self.grouped = {kind: kind in codec.grouped_kinds for kind in KINDS}
        self.window: dict[str, _Window] = {}
        self.tables: dict[str, SlotTable | None] = {kind: None for kind in KINDS}
        self.tails: dict[str, KeyTail | None] = {kind: None for kind in KINDS}
        self.measure_error = measure_error
        self.error_sums = {"key": 0.0, "value": 0.0}
        self.error_counts = {"key": 0, "value": 0}
        self._step: tuple[torch.Tensor, torch.Tensor] | None = None
        # The first position of the step's entries of grouped kinds not settled yet (None: all settled).
        self._unsettled_from: int | None = None
        # Cross-layer merging rewrites a step's new entries after both layers of a pair attended
        # (storage/minicache.py): the step's grouped entries then stay in the window, as computed, until
        # the merge has rewritten them and calls settle() (merge, then quantize).
        self.keep_step_groups = False

    def _half_tail(self) -> bool:
        """Tails in fp16 under codecs of 8 bits or more (see KeyTail); 8-bit tails below that."""
        return getattr(self.codec, "bits", 8) >= 8

    def keys(self) -> torch.Tensor:
        return self._decoded()[0]

    def values(self) -> torch.Tensor:
        return self._decoded()[1]

    def release_step(self) -> None:
        """The policy has run: the step's grouped entries that left the residual window are encoded
        (unless a merge will rewrite them first), and the decoded copy is dropped."""
        self._step = None
        if not self.keep_step_groups:
            self.settle()

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
        self.settle()  # a step whose policy did not run (or a merge that did not rewrite it)
        self._step = None
        n = keys.shape[1]
        first = int(positions[0, 0])
        if not self.window:
            for kind, like in (("key", keys), ("value", values)):
                self.window[kind] = _Window(like, first, self.residual + n)
                if self.grouped[kind]:
                    self.tables[kind], self.tails[kind] = SlotTable(), KeyTail(self.group, half=self._half_tail())
        for kind, tensor in (("key", keys), ("value", values)):
            window = self.window[kind]
            if first != window.start + window.length:
                raise CodecError("a quantized cache takes tokens in order, one position after the other")
            window.write(window.length, tensor)
        fresh = {"positions": positions, "rope_positions": rope_positions}
        for kind, tensor in (("key", keys), ("value", values)):
            if self.grouped[kind]:
                if f"{kind}.slot" not in self.entries:  # the code fields, shaped by one encoded entry
                    for name, rows in self.codec.encode(tensor[:, :1], kind).per_entry.items():
                        self.entries.add_field(f"{kind}.{name}", rows[:, :0])
                fresh[f"{kind}.slot"] = torch.full(positions.shape, -1, dtype=torch.int16, device=positions.device)
        self.entries.append(fresh, n)
        if any(self.grouped.values()):
            self._unsettled_from = first
        leaving = first + n - self.residual  # positions before this one are out of the residual window
        for kind in KINDS:
            window = self.window[kind]
            if not self.grouped[kind] and leaving > window.start:
                self._encode_oldest(kind, leaving - window.start)
        self._count_bytes()
        return self._decoded()

    def settle(self) -> None:
        """Encode the grouped kinds' entries that left the residual window: per KV head, the tail and
        the newly settled entries it still holds, in position order, fill groups of G (encoded per
        channel, each in a slot); what is left over (< G) becomes the head's tail."""
        if self._unsettled_from is None:
            return
        self._unsettled_from = None
        for kind in KINDS:
            if self.grouped[kind]:
                self._settle(kind)
        self._step = None
        self._count_bytes()

    def _settle(self, kind: str) -> None:
        window, tail, table = self.window[kind], self.tails[kind], self.tables[kind]
        leaving = window.start + window.length - self.residual
        if leaving <= window.start:
            return
        positions = self.positions()
        kv_heads = positions.shape[0]
        members, rows = [], []  # per head: entry indices and their rows, oldest first
        tail_lengths = list(tail.lengths) or [0] * kv_heads
        for head in range(kv_heads):
            row = positions[head]
            fresh = ((row >= window.start) & (row < leaving)).nonzero().squeeze(1)
            members.append(torch.cat([tail.indices(head, row), fresh]))
            rows.append(torch.cat([tail.rows(head, window.rows), window.rows[head, row[fresh] - window.start]]))
        full = [len(m) // self.group for m in members]
        slot_field = self.entries.view(f"{kind}.slot")
        for j in range(max(full, default=0)):
            x = window.rows.new_zeros(kv_heads, self.group, window.rows.shape[-1])
            heads = [head for head in range(kv_heads) if full[head] > j]
            for head in heads:
                x[head] = rows[head][j * self.group:(j + 1) * self.group]
            encoded = self.codec.encode(x, kind)
            for head in heads:
                index = members[head][j * self.group:(j + 1) * self.group]
                for name, codes in encoded.per_entry.items():
                    self.entries.view(f"{kind}.{name}")[head, index] = codes[head]
                slot_field[head, index] = table.add(head, {name: t[head] for name, t in encoded.per_group.items()},
                                                    kv_heads)
                tail.note_group(head, x[head])
            if self.measure_error:
                self._note_error(kind, x[heads], Encoded({name: t[heads] for name, t in encoded.per_entry.items()},
                                                         {name: t[heads] for name, t in encoded.per_group.items()}))
        for head in range(kv_heads):
            # Without a new group the tail's rows stay as encoded and the fresh ones join them; with
            # one, the tail's rows are in it and the rest begins a new tail.
            begin = full[head] * self.group if full[head] else tail_lengths[head]
            tail.add(head, positions[head, members[head][begin:]], rows[head][begin:], kv_heads,
                     restart=bool(full[head]))
        window.drop_oldest(leaving - window.start)

    def overwrite(self, kind: str, index: torch.Tensor, rows: torch.Tensor, where: torch.Tensor) -> None:
        """Write rows over entries fed in this step (see FpStore.overwrite): in the window as they are
        (a grouped kind's step entries stay there until settle()); encoded per token, encoded again."""
        window = self.window[kind]
        positions = self.positions().gather(1, index)
        in_window = where & (positions >= window.start)
        heads, entry = in_window.nonzero(as_tuple=True)
        window.rows[heads, positions[heads, entry] - window.start] = rows[heads, entry]
        heads, entry = (where & ~in_window).nonzero(as_tuple=True)
        if heads.numel() and self.grouped[kind]:
            raise CodecError("an entry to overwrite was encoded before this step; only a step's own entries can "
                             "be rewritten (set keep_step_groups)")
        if heads.numel():
            encoded = self.codec.encode(rows[heads, entry].unsqueeze(0), kind)  # each row on its own
            for name, codes in encoded.per_entry.items():
                self.entries.view(f"{kind}.{name}")[heads, index[heads, entry]] = codes[0]
        self._step = None
        self._count_bytes()

    def _encode_oldest(self, kind: str, count: int) -> None:
        """Encode the window's oldest `count` rows of a kind quantized per token, for the entries held."""
        window = self.window[kind]
        x = window.rows[:, :count]
        start = window.start
        positions = self.positions()
        held = (positions >= start) & (positions < start + count)
        heads, index = held.nonzero(as_tuple=True)
        in_rows = positions[heads, index] - start
        encoded = self.codec.encode(x, kind)
        if encoded.per_group:
            raise CodecError(f"codec {self.codec.name} returned per-group tensors for {kind}s, which it declares "
                             "quantized per token (grouped_kinds)")
        for name, rows in encoded.per_entry.items():
            field = f"{kind}.{name}"
            if field not in self.entries:
                self.entries.add_field(field, rows)
            self.entries.view(field)[heads, index] = rows[heads, in_rows]
        if self.measure_error:
            self._note_error(kind, x, encoded)
        window.drop_oldest(count)

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

    def _code_fields(self, kind: str) -> dict[str, torch.Tensor]:
        return {name.split(".", 1)[1]: self.entries.view(name) for name in self.entries.tensors
                if name.startswith(kind + ".") and name != f"{kind}.slot"}

    def _decode_kind(self, kind: str) -> torch.Tensor:
        """(kv_heads, n, head_dim): encoded entries decoded, tail and window entries as they are held."""
        positions = self.positions()
        window = self.window[kind]
        fields = self._code_fields(kind)
        head_dim = window.rows.shape[-1]
        if self.grouped[kind]:
            table = self.tables[kind]
            if table.live:  # (a codec may share no tensors within a group: then the table has no fields)
                slots = self.entries.view(f"{kind}.slot").clamp_min(0)
                decoded = self.codec.decode(fields, table.expanded(slots), kind, window.rows.dtype)
            else:
                decoded = window.rows.new_zeros(*positions.shape, head_dim)
            tail = self.tails[kind]
            for head in range(positions.shape[0]):
                index = tail.indices(head, positions[head])
                if index.numel():
                    decoded[head, index] = tail.rows(head, window.rows)
        elif not fields:  # nothing encoded yet: every entry is in the window
            index = (positions - window.start)[..., None].expand(-1, -1, head_dim)
            return window.rows.gather(1, index)
        else:
            decoded = self.codec.decode(fields, {}, kind, window.rows.dtype)
        # Window entries are the newest, so they sit among the last `window.length` of each head's row
        # (positions increase along it): only that tail is looked up, not the whole layer.
        last = min(window.length, positions.shape[1])
        if last:
            last_positions = positions[:, -last:]
            index = (last_positions - window.start).clamp_min(0)[..., None].expand(-1, -1, head_dim)
            in_window = (last_positions >= window.start)[..., None]
            decoded[:, -last:] = torch.where(in_window, window.rows.gather(1, index), decoded[:, -last:])
        return decoded

    # -- evicting ----------------------------------------------------------------------------------------

    def keep(self, keep: torch.Tensor) -> None:
        self._step = None
        self.entries.keep(keep)
        positions = self.positions()
        for kind in KINDS:
            if self.grouped[kind]:
                self.tails[kind].keep(positions)
                self.tables[kind].free_unused(self.entries.view(f"{kind}.slot"))
        self._count_bytes()

    def detach(self) -> None:
        super().detach()
        for window in self.window.values():
            window.rows = window.rows.detach()
        self._step = None if self._step is None else tuple(t.detach() for t in self._step)

    def set_keys(self, keys, rope_positions):
        raise CodecError(f"--rerotate re-rotates stored keys and works with --codec fp only, not {self.codec.name}")

    def byte_parts(self) -> dict[str, int]:
        """What the bytes held are: encoded rows (codes, per-entry scales, a grouped kind's slot
        number) of the entries they hold, full-precision windows, tails (8-bit incomplete groups), group
        tables. A step's grouped entries, held as the model computed them until the policy has run, count
        as tail rows (settle() makes them those or encoded rows, which cost less). A tail
        entry's row of the grouped kind's codes is unused (its key is in the tail), as a window entry's
        rows are: neither is counted."""
        positions = self.positions()
        kv_heads = positions.shape[0]
        parts = {"encoded": 0, "windows": 0, "tails": 0, "group_tables": 0}
        for kind in KINDS:
            window = self.window[kind]
            code_fields = [name for name in self.entries.tensors if name.startswith(kind + ".")]
            encoded_below, fp_rows = window.start, window.length
            if self.grouped[kind] and self._unsettled_from is not None:  # counted as what settle() makes them
                encoded_below = max(window.start + window.length - self.residual, window.start)
                fp_rows = window.length - (encoded_below - window.start)
            if code_fields:
                encoded = positions < encoded_below
                row = self.entries.row_bytes(code_fields) // kv_heads
                if self.grouped[kind]:  # a tail entry's key is held in the tail: its code row is unused
                    # The step's entries that wait for settle() count as tail rows, the most they can
                    # cost once settled (a tail row costs more than an encoded one under both codecs),
                    # so a peak taken before settling is not below the settled bytes.
                    waiting = encoded & (positions >= window.start)
                    encoded = self.entries.view(f"{kind}.slot") >= 0
                    parts["tails"] += int(waiting.sum()) * self.tails[kind].row_bytes(window.rows.shape[-1])
                parts["encoded"] += int(encoded.sum()) * row
            parts["windows"] += window.byte_count(fp_rows)
            if self.grouped[kind]:
                parts["tails"] += self.tails[kind].byte_count()
                parts["group_tables"] += self.tables[kind].byte_count()
        return parts

    def _count_bytes(self) -> int:
        self._bytes = sum(self.byte_parts().values())
        return self._bytes

    # -- saving and restoring ------------------------------------------------------------------------------

    def state(self) -> tuple[dict[str, torch.Tensor], dict]:
        self.settle()
        tensors, numbers = super().state()
        numbers["layout"] = LAYOUT
        for kind, window in self.window.items():
            tensors[f"window.{kind}"] = window.rows[:, :window.length]
            numbers[f"window.{kind}.start"] = window.start
            if self.grouped[kind]:
                for part in ("table", "tail"):
                    held = self.tables[kind] if part == "table" else self.tails[kind]
                    part_tensors, numbers[f"{part}.{kind}"] = held.state()
                    tensors.update({f"{part}.{kind}.{name}": t for name, t in part_tensors.items()})
        numbers["error_sums"], numbers["error_counts"] = dict(self.error_sums), dict(self.error_counts)
        return cpu_copies(tensors), numbers

    def load_state(self, tensors, numbers, device) -> None:
        numbers = dict(numbers)
        layout = numbers.get("layout", 1)
        if layout == 1:
            tensors = self._from_first_layout(tensors, numbers)
        super().load_state(tensors, numbers, device)
        for kind in KINDS:
            if f"window.{kind}" not in tensors:
                continue
            rows = tensors[f"window.{kind}"].to(device)
            window = self.window[kind] = _Window(rows, numbers[f"window.{kind}.start"],
                                                 max(rows.shape[1], self.residual + self.group))
            window.write(0, rows)
            if self.grouped[kind]:
                self.tables[kind], self.tails[kind] = SlotTable(), KeyTail(self.group, half=self._half_tail())
                for part, held in (("table", self.tables[kind]), ("tail", self.tails[kind])):
                    prefix = f"{part}.{kind}."
                    if layout == 1 and part == "tail":
                        continue  # no tail: the first layout's incomplete group is in the window
                    held.load_state({name[len(prefix):]: t for name, t in tensors.items() if name.startswith(prefix)},
                                    numbers[f"{part}.{kind}"], device)
        self.error_sums = dict(numbers.get("error_sums", self.error_sums))
        self.error_counts = dict(numbers.get("error_counts", self.error_counts))
        if layout == 1 and self.window:
            # The first layout's full-precision incomplete group: what had left the residual window
            # settles now, into groups and the 8-bit tail, as a run of this layout would hold it.
            self._unsettled_from = self.window["key"].start
            self.settle()
            for kind in KINDS:
                if self.grouped[kind]:
                    self.tables[kind].free_unused(self.entries.view(f"{kind}.slot"))
        if self.window:
            self._count_bytes()

    def _from_first_layout(self, tensors: dict[str, torch.Tensor], numbers: dict) -> dict[str, torch.Tensor]:
        """A saved state of the first layout (groups numbered by position, group -> slot in
        `slot_of`, per-slot owners in the header) in this one's terms: each encoded entry's slot."""
        tensors = dict(tensors)
        positions = tensors["entries.positions"]
        for kind in KINDS:
            if not self.grouped[kind] or f"window.{kind}" not in tensors:
                continue
            slot_of = tensors.pop(f"table.{kind}.slot_of").long()
            owners = numbers[f"table.{kind}"]["owner"]
            encoded = positions < numbers[f"window.{kind}.start"]
            groups = (positions // self.group).clamp(max=max(slot_of.numel() - 1, 0))
            slots = torch.where(encoded, slot_of[groups] if slot_of.numel() else -1, -1)
            tensors[f"entries.{kind}.slot"] = slots.to(torch.int16)
            numbers[f"table.{kind}"] = {"used": [[owner is not None for owner in owners]] * positions.shape[0]}
        return tensors


def make_store(codec: Codec | None, group_size: int, residual: int, capacity_hint: int | None,
               measure_error: bool = False):
    if codec is None:
        return FpStore(capacity_hint)
    return QuantizedStore(codec, group_size, residual, capacity_hint, measure_error)
