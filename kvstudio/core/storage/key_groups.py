"""The key side of QuantizedStore's layout 2 (layer_stores.py says the whole layout): per KV head, the
shared per-channel tensors of each encoded group in a slot table, and the fewer than G keys that no
group holds yet in a tail."""

from __future__ import annotations

import torch

from kvstudio.core.storage.integer import Int8Codec


class SlotTable:
    """A grouped kind's per-group tensors (kv_heads, slots, ...): slot j of head h holds the shared
    tensors (per-channel scales and zero points) of the entries of head h whose `slot` field is j.
    Each KV head numbers its own slots (its groups are made of the entries it keeps) and a slot of a
    head is free again when none of its entries refers to it."""

    def __init__(self):
        self.fields: dict[str, torch.Tensor] = {}
        self.used: list[list[bool]] = []  # per head: slot -> held by one of its entries

    def add(self, head: int, per_group: dict[str, torch.Tensor], kv_heads: int) -> int:
        """Store head `head`'s tensors of one group (per_group: {name: (...)}) in a free slot of its own."""
        if not self.used:
            self.used = [[] for _ in range(kv_heads)]
        used = self.used[head]
        slot = next((slot for slot, taken in enumerate(used) if not taken), len(used))
        if slot == len(used):
            used.append(False)
        for name, tensor in per_group.items():
            old = self.fields.get(name)
            have = 0 if old is None else old.shape[1]
            if have <= slot:
                grown = torch.zeros((kv_heads, max(slot + 1, 2 * have), *tensor.shape), dtype=tensor.dtype,
                                    device=tensor.device)
                if old is not None:
                    grown[:, :have] = old
                self.fields[name] = grown
            self.fields[name][head, slot] = tensor
        used[slot] = True
        return slot

    @property
    def live(self) -> int:
        """Slots in use, over KV heads."""
        return sum(sum(used) for used in self.used)

    def free_unused(self, held_slots: torch.Tensor) -> None:
        """Free every slot no entry of its head refers to (held_slots: (kv_heads, n), -1 for none)."""
        for head, used in enumerate(self.used):
            row = held_slots[head]
            referenced = set(row[row >= 0].unique().tolist())
            self.used[head] = [taken and slot in referenced for slot, taken in enumerate(used)]

    def expanded(self, slots: torch.Tensor) -> dict[str, torch.Tensor]:
        """Each entry's group tensors: slots (kv_heads, n) -> {name: (kv_heads, n, ...)}."""
        out = {}
        kv_heads, n = slots.shape
        for name, table in self.fields.items():
            rows = (slots.long() + torch.arange(kv_heads, device=slots.device)[:, None] * table.shape[1]).reshape(-1)
            out[name] = table.reshape(kv_heads * table.shape[1], -1).index_select(0, rows).view(
                kv_heads, n, *table.shape[2:])
        return out

    def byte_count(self) -> int:
        """The slots in use: one head's group tensors each."""
        return self.live * sum(t[:1, :1].numel() * t.element_size() for t in self.fields.values())

    def state(self) -> tuple[dict[str, torch.Tensor], dict]:
        slots = max((len(used) for used in self.used), default=0)
        return {f"fields.{name}": t[:, :slots] for name, t in self.fields.items()}, {"used": [list(u) for u in self.used]}

    def load_state(self, tensors: dict[str, torch.Tensor], numbers: dict, device) -> None:
        self.fields = {name.split(".", 1)[1]: t.to(device) for name, t in tensors.items() if name.startswith("fields.")}
        self.used = [[bool(taken) for taken in used] for used in numbers["used"]]


# The entries of a grouped kind that do not fill a group yet are held per token in 8 bits, each
# channel first centred and scaled by the head's latest group (its per-channel midpoint and range), so
# outlier channels do not widen every other channel's step (why KIVI quantizes keys per channel), then
# an fp16 scale and zero point per TAIL_CHANNELS channels of the token (core/storage/integer.py's
# per-token rule): about a quarter of fp32 where KIVI keeps them in full precision (QuantizedStore).
TAIL_CHANNELS = 64


class KeyTail:
    """Per KV head, the newest settled entries of a grouped kind that no group holds yet (fewer than
    G), encoded per token in 8 bits after per-channel centring and scaling; `positions` says which
    entries they are (-1: unused row)."""

    def __init__(self, group: int, half: bool = False):
        self.group = group
        # With `half` the rows are held in fp16 as they are: under an 8-bit group codec an 8-bit tail
        # would round each key twice (per token, then per channel when its group fills), doubling the
        # error of a quarter of the keys at small budgets; fp16 costs 2 bytes a channel instead of ~1.06.
        self.half = half
        self.codec = Int8Codec(group_size=TAIL_CHANNELS)
        self.fields: dict[str, torch.Tensor] = {}  # (kv_heads, G, ...): the rows' codes, scales, zero points
        self.reference: dict[str, torch.Tensor] = {}  # "centre", "span": (kv_heads, head_dim) fp16, per head
        self.latest: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # head -> its latest group's (centre, span)
        self.positions: torch.Tensor | None = None  # (kv_heads, G) long
        self.lengths: list[int] = []

    def note_group(self, head: int, rows: torch.Tensor) -> None:
        """Head `head` encoded a group of `rows` (G, head_dim): a tail begun later is scaled by it."""
        low, high = rows.float().amin(dim=0), rows.float().amax(dim=0)
        self.latest[head] = ((low + high) / 2, high - low)

    def rows(self, head: int, like: torch.Tensor) -> torch.Tensor:
        """Head `head`'s tail decoded, (m, head_dim), in like's dtype and device."""
        m = self.lengths[head] if self.lengths else 0
        if not m:
            return like.new_zeros(0, like.shape[-1])
        if self.half:
            return self.fields["rows"][head, :m].to(like.dtype)
        fields = {name: t[head:head + 1, :m] for name, t in self.fields.items()}
        normalised = self.codec.decode(fields, {}, "value", torch.float32)[0]
        centre, span = (self.reference[name][head].float() for name in ("centre", "span"))
        return (normalised * span + centre).to(like.dtype)

    def add(self, head: int, positions: torch.Tensor, rows: torch.Tensor, kv_heads: int, restart: bool) -> None:
        """Append rows (m, head_dim) of entries at `positions` (m,) to head `head`'s tail; with
        `restart`, the tail's rows went into a group: they are replaced, scaled by that group."""
        if self.positions is None:
            self.positions = torch.full((kv_heads, self.group), -1, dtype=torch.long, device=rows.device)
            self.lengths = [0] * kv_heads
            head_dim = rows.shape[-1]
            self.reference = {name: torch.zeros(kv_heads, head_dim, dtype=torch.float16, device=rows.device)
                              for name in ("centre", "span")}
        if restart or not self.lengths[head]:
            self.positions[head] = -1
            self.lengths[head] = 0
            if not self.half:
                self._set_reference(head, rows)
        m, have = rows.shape[0], self.lengths[head]
        if not m:
            return
        if self.half:
            encoded = {"rows": rows.to(torch.float16)[None]}
        else:
            centre, span = (self.reference[name][head].float() for name in ("centre", "span"))
            encoded = self.codec.encode(((rows.float() - centre) / span)[None], "value").per_entry
        for name, tensor in encoded.items():
            if name not in self.fields:
                self.fields[name] = torch.zeros((kv_heads, self.group, *tensor.shape[2:]), dtype=tensor.dtype,
                                                device=tensor.device)
            self.fields[name][head, have:have + m] = tensor[0]
        self.positions[head, have:have + m] = positions
        self.lengths[head] = have + m

    def _set_reference(self, head: int, rows: torch.Tensor) -> None:
        """The head's latest group's per-channel midpoint and range; before its first group, the rows'
        own when there are two or more (else none: centre 0, range 1)."""
        if head in self.latest:
            centre, span = self.latest[head]
        elif rows.shape[0] >= 2:
            low, high = rows.float().amin(dim=0), rows.float().amax(dim=0)
            centre, span = (low + high) / 2, high - low
        else:
            centre, span = torch.zeros(rows.shape[-1], device=rows.device), torch.ones(rows.shape[-1], device=rows.device)
        span = span.clamp_min(float(span.max()) * 1e-3 + 1e-6)  # a flat channel still divides
        self.reference["centre"][head] = centre.to(torch.float16)
        self.reference["span"][head] = span.to(torch.float16)

    def keep(self, held: torch.Tensor) -> None:
        """Drop the rows of entries no longer held (held: (kv_heads, n) positions)."""
        if self.positions is None:
            return
        for head, m in enumerate(self.lengths):
            if not m:
                continue
            alive = torch.isin(self.positions[head, :m], held[head])
            if bool(alive.all()):
                continue
            index = alive.nonzero().squeeze(1)
            for tensor in (*self.fields.values(), self.positions):
                tensor[head, :index.numel()] = tensor[head, index].clone()
            self.positions[head, index.numel():] = -1
            self.lengths[head] = index.numel()

    def indices(self, head: int, held: torch.Tensor) -> torch.Tensor:
        """Where head `head`'s tail entries sit in its row of held positions (sorted)."""
        m = self.lengths[head] if self.lengths else 0
        return torch.searchsorted(held, self.positions[head, :m]) if m else held.new_zeros(0)

    def row_bytes(self, head_dim: int) -> int:
        """One head's tail row: fp16 channels, or 8-bit codes with an fp16 scale and zero point per
        TAIL_CHANNELS channels."""
        if self.half:
            return 2 * head_dim
        return head_dim + 4 * (head_dim // self.codec.value_group(head_dim))

    def byte_count(self) -> int:
        """The rows held, and the centre and range of each head that holds some."""
        row = sum(t[:1, :1].numel() * t.element_size() for t in self.fields.values())
        reference = 0 if self.half else sum(t[:1].numel() * t.element_size() for t in self.reference.values())
        return sum(self.lengths) * row + sum(1 for m in self.lengths if m) * reference

    def state(self) -> tuple[dict[str, torch.Tensor], dict]:
        tensors = {f"fields.{name}": t for name, t in self.fields.items()}
        tensors.update({f"reference.{name}": t for name, t in self.reference.items()})
        if self.positions is not None:
            tensors["positions"] = self.positions
        latest = {str(head): [c.tolist(), s.tolist()] for head, (c, s) in self.latest.items()}
        return tensors, {"lengths": list(self.lengths), "latest": latest}

    def load_state(self, tensors: dict[str, torch.Tensor], numbers: dict, device) -> None:
        def named(prefix):
            return {name[len(prefix):]: t.to(device) for name, t in tensors.items() if name.startswith(prefix)}

        self.fields, self.reference = named("fields."), named("reference.")
        self.half = "rows" in self.fields  # the file says how its tail was held
        self.positions = tensors["positions"].to(device) if "positions" in tensors else None
        self.lengths = list(numbers["lengths"])
        self.latest = {int(head): (torch.tensor(c, device=device), torch.tensor(s, device=device))
                       for head, (c, s) in numbers.get("latest", {}).items()}
