"""The append-only log of every event of one run: what the history, exports and figures store.

The live views read a bounded window of it (Recorder.since); the log itself never drops an event, so
a stored or reopened run is complete however long it ran.

Memory. The numerous events are stored columnar, not one Python object each:
- evictions: one row (sequence, step, layer, kv_head, start, count: 32 bytes) and the evicted
  positions (int64, 8 bytes each) in a chunked array;
- recalls and attention rows: one row each and their arrays' values in chunked arrays (attention
  weights float32, positions int64).
The chunked arrays grow by new chunks (never by copying what is held); the rows table grows by
doubling. Measured on a tiny-llama `window` run of 3,000 steps (budget 8: 24,000 eviction events, nearly
all of one position; benchmarks/event_log.py): 40 bytes used per eviction event (32 for its row, 8 for
its position), 54 allocated with the tables' free room - 1.3 MB for the whole run, against about 260
bytes per event as a Python EvictionEvent with its own NumPy array (what the ring buffers held). A
default-model run (90 eviction events a step) thus holds about 4-5 kB of evictions per step, under
50 MB over 10,000 steps; attention rows, when recorded, are their float32/int64 values plus 48 bytes.
The few small events (run started, tokens, steps, memory readings, prefill progress, merges) are
kept as the event objects themselves, in lists.

Reading gives back the same typed events (EvictionEvent, ...) in recorded order; the arrays of
columnar events are read-only views into the log (no copy), so readers must not write into them.
Thread-safe: the engine appends while viewers and the memory sampler read and write from other threads.
"""

from __future__ import annotations

import bisect
import threading

import numpy as np

from kvstudio.core.recording.event_types import EVENT_KINDS, AttentionEvent, EvictionEvent, RecallEvent

_FIRST_CHUNK = 1024  # values; chunks double from here ...
_LARGEST_CHUNK = 1 << 20  # ... up to this many values (8 MB of int64), so a short run holds little


class ChunkedValues:
    """An append-only 1-D array of one dtype, held in chunks: growing never copies what is held, and
    a value range read back is a view whenever it lies in one chunk (nearly always)."""

    def __init__(self, dtype):
        self.dtype = np.dtype(dtype)
        self._chunks: list[np.ndarray] = []
        self._starts: list[int] = []  # the global offset of each chunk's first value
        self.size = 0  # values held
        self._room = 0  # free values at the end of the last chunk

    def append(self, values: np.ndarray) -> int:
        """Adds `values` (flattened) at the end; returns the offset of the first one."""
        values = np.asarray(values).ravel()
        start = self.size
        written = 0
        while written < values.size:
            if self._room == 0:
                self._new_chunk(values.size - written)
            chunk = self._chunks[-1]
            at = chunk.size - self._room
            n = min(self._room, values.size - written)
            chunk[at:at + n] = values[written:written + n]
            written += n
            self._room -= n
        self.size += values.size
        return start

    def read(self, start: int, count: int) -> np.ndarray:
        """Values [start, start + count): a read-only view when they lie in one chunk, else a copy."""
        if count == 0:
            return np.zeros(0, dtype=self.dtype)
        index = bisect.bisect_right(self._starts, start) - 1
        offset = start - self._starts[index]
        chunk = self._chunks[index]
        if offset + count <= chunk.size:
            view = chunk[offset:offset + count]
            view.flags.writeable = False
            return view
        return self.concatenated()[start:start + count].copy()  # spans chunks: rare

    def concatenated(self) -> np.ndarray:
        """Every value held, in order, as one array (a copy)."""
        if not self._chunks:
            return np.zeros(0, dtype=self.dtype)
        used = self._chunks[:-1] + [self._chunks[-1][:self._chunks[-1].size - self._room]]
        return np.concatenate(used)

    @property
    def nbytes(self) -> int:
        """Bytes allocated (held values and the last chunk's free room)."""
        return sum(chunk.nbytes for chunk in self._chunks)

    def _new_chunk(self, wanted: int) -> None:
        previous = self._chunks[-1].size if self._chunks else _FIRST_CHUNK // 2
        # Double up to the largest size; a large write gets a chunk of its own size (up to the
        # largest: a larger one continues in the next chunk).
        size = max(min(2 * previous, _LARGEST_CHUNK), min(wanted, _LARGEST_CHUNK))
        # A new chunk opens only when the last one is full: its first value follows all held so far.
        self._starts.append(self._starts[-1] + self._chunks[-1].size if self._chunks else 0)
        self._chunks.append(np.empty(size, dtype=self.dtype))
        self._room = size


class RowTable:
    """An append-only table of fixed-width rows (a NumPy structured array) that grows by doubling."""

    def __init__(self, fields: list[tuple[str, str]]):
        self._rows = np.zeros(64, dtype=fields)
        self.size = 0

    def append(self, row: tuple) -> None:
        if self.size == len(self._rows):
            grown = np.zeros(2 * len(self._rows), dtype=self._rows.dtype)
            grown[:self.size] = self._rows
            self._rows = grown
        self._rows[self.size] = row
        self.size += 1

    def column(self, name: str) -> np.ndarray:
        """The held rows' `name` field (a view: valid until the table next grows)."""
        return self._rows[name][:self.size]

    def rows(self, start: int = 0, stop: int | None = None) -> np.ndarray:
        """A copy of rows [start, stop)."""
        return self._rows[start:self.size if stop is None else stop].copy()

    @property
    def nbytes(self) -> int:
        return self._rows.nbytes


class _ListKind:
    """A kind of small events: the event objects and their sequence numbers."""

    def __init__(self):
        self.events: list = []
        self.sequences: list[int] = []

    def append(self, sequence: int, event) -> None:
        self.events.append(event)
        self.sequences.append(sequence)

    def __len__(self) -> int:
        return len(self.events)

    def first_after(self, sequence: int) -> int:
        return bisect.bisect_right(self.sequences, sequence)

    def read(self, start: int, stop: int) -> list:
        return self.events[start:stop]

    @property
    def nbytes(self) -> int:
        return 0  # counted only for the columnar kinds: these are few (see the module's docstring)


class _ColumnarKind:
    """A kind of numerous events, columnar: one fixed-width row each (FIELDS, starting with the
    sequence number) in a RowTable, and their arrays' values in named ChunkedValues."""

    FIELDS: list[tuple[str, str]]
    VALUES: dict[str, type]  # name -> dtype of each chunked value array

    def __init__(self):
        self.table = RowTable(self.FIELDS)
        self.values = {name: ChunkedValues(dtype) for name, dtype in self.VALUES.items()}

    def __len__(self) -> int:
        return self.table.size

    def first_after(self, sequence: int) -> int:
        return int(np.searchsorted(self.table.column("sequence"), sequence, side="right"))

    @property
    def nbytes(self) -> int:
        return self.table.nbytes + sum(values.nbytes for values in self.values.values())


class _EvictionKind(_ColumnarKind):
    """Eviction events: a row each and their positions in one chunked int64 array."""

    FIELDS = [("sequence", "i8"), ("step", "i4"), ("layer", "i4"), ("kv_head", "i4"), ("count", "i4"),
              ("start", "i8"), ("window", "i1")]  # window: 1 when the entries left a sliding window
    VALUES = {"positions": np.int64}

    def append(self, sequence: int, event: EvictionEvent) -> None:
        positions = np.asarray(event.positions, dtype=np.int64)
        start = self.values["positions"].append(positions)
        self.table.append((sequence, event.step, event.layer, event.kv_head, positions.size, start,
                           event.reason == "window"))

    def read(self, start: int, stop: int) -> list:
        rows, positions = self.table.rows(start, stop), self.values["positions"]
        return [EvictionEvent(step, layer, head, positions.read(at, count), "window" if window else "policy")
                for step, layer, head, count, at, window in zip(
                    rows["step"].tolist(), rows["layer"].tolist(), rows["kv_head"].tolist(), rows["count"].tolist(),
                    rows["start"].tolist(), rows["window"].tolist())]


class _RecallKind(_ColumnarKind):
    """Host-tier recalls: a row each, their (kv_heads, count) positions in a chunked array."""

    FIELDS = [("sequence", "i8"), ("step", "i4"), ("layer", "i4"), ("kv_heads", "i4"), ("count", "i4"),
              ("start", "i8")]
    VALUES = {"positions": np.int64}

    def append(self, sequence: int, event: RecallEvent) -> None:
        positions = np.asarray(event.positions, dtype=np.int64)
        if positions.ndim != 2:
            positions = positions.reshape(-1, positions.shape[-1] if positions.ndim else 0)
        start = self.values["positions"].append(positions)
        self.table.append((sequence, event.step, event.layer, *positions.shape, start))

    def read(self, start: int, stop: int) -> list:
        rows, positions = self.table.rows(start, stop), self.values["positions"]
        return [RecallEvent(step, layer, positions.read(at, heads * count).reshape(heads, count))
                for step, layer, heads, count, at in zip(rows["step"].tolist(), rows["layer"].tolist(),
                                                        rows["kv_heads"].tolist(), rows["count"].tolist(),
                                                        rows["start"].tolist())]


class _AttentionKind(_ColumnarKind):
    """Attention rows: a row each, float32 weights (query_heads, n) and int64 positions
    (kv_heads, held) in two chunked arrays."""

    FIELDS = [("sequence", "i8"), ("step", "i4"), ("layer", "i4"), ("query_heads", "i4"), ("n", "i4"),
              ("kv_heads", "i4"), ("held", "i4"), ("weights_start", "i8"), ("positions_start", "i8")]
    VALUES = {"weights": np.float32, "positions": np.int64}

    def append(self, sequence: int, event: AttentionEvent) -> None:
        weights = np.asarray(event.weights, dtype=np.float32)
        positions = np.asarray(event.positions, dtype=np.int64)
        weights_at = self.values["weights"].append(weights)
        positions_at = self.values["positions"].append(positions)
        self.table.append((sequence, event.step, event.layer, *weights.shape, *positions.shape, weights_at,
                           positions_at))

    def read(self, start: int, stop: int) -> list:
        rows, weights, positions = self.table.rows(start, stop), self.values["weights"], self.values["positions"]
        return [AttentionEvent(step, layer, weights.read(w_at, q * n).reshape(q, n),
                               positions.read(p_at, kv * held).reshape(kv, held))
                for step, layer, q, n, kv, held, w_at, p_at in zip(
                    *(rows[name].tolist() for name in ("step", "layer", "query_heads", "n", "kv_heads", "held",
                                                       "weights_start", "positions_start")))]


_COLUMNAR = {"evictions": _EvictionKind, "recalls": _RecallKind, "attention": _AttentionKind}


class EventLog:
    """Every event of one run, in recorded order within each kind; one global sequence numbers them."""

    def __init__(self):
        self._lock = threading.Lock()
        self._kinds = {kind: _COLUMNAR.get(kind, _ListKind)() for kind in EVENT_KINDS.values()}
        self.sequence = 0  # of the last event appended

    def append(self, event) -> int:
        """Adds `event`; returns its sequence number."""
        kind = EVENT_KINDS[type(event)]
        with self._lock:
            self.sequence += 1
            self._kinds[kind].append(self.sequence, event)
            return self.sequence

    def count(self, kind: str) -> int:
        with self._lock:
            return len(self._kinds[kind])

    def all(self, kind: str) -> list:
        """Every event of `kind`, in recorded order."""
        return self.since(kind, 0)[0]

    def since(self, kind: str, sequence: int = 0, limit: int | None = None) -> tuple[list, int]:
        """Events of `kind` appended after `sequence` - only the newest `limit` of them when more are
        new - and the sequence number to ask with next. The cost is what is returned, not the log's size."""
        with self._lock:
            events = self._kinds[kind]
            end = len(events)
            first = events.first_after(sequence)
            if limit is not None:
                first = max(first, end - limit)
            return events.read(first, end), self.sequence

    def columns(self, kind: str) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        """A columnar kind as arrays, as stored (recording/packing.py): a copy of its rows (a structured
        array; fields as in the kind's FIELDS) and each value array whole, in recorded order."""
        with self._lock:
            store = self._kinds[kind]
            return store.table.rows(), {name: values.concatenated() for name, values in store.values.items()}

    def nbytes_of(self, kind: str) -> int:
        """Bytes a columnar kind holds allocated (its rows and values, free room included); 0 for a small kind."""
        with self._lock:
            return self._kinds[kind].nbytes

    @property
    def nbytes(self) -> int:
        """Bytes the columnar kinds hold allocated (rows and values); the small kinds' objects are not counted."""
        with self._lock:
            return sum(store.nbytes for store in self._kinds.values())
