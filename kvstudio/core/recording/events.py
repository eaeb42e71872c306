"""The Recorder a run records into and the GUI and the CLI read from; the event types (event_types.py),
re-exported here where their callers have always imported them.

The Recorder is a thin live front of the run's EventLog (`recorder.log`, event_log.py), which keeps
every event: `all(kind)`, packing (the history, exports, figures) and reopened runs read the whole
log. Live readers ask for what is new since the sequence number they last saw (`since`), at their
own pace (the GUI at 20-30 Hz); that read is a bounded ring over the log's newest events: at most
`capacity` per kind. A reader that falls more than `capacity` events of a kind behind skips the
older ones (the live view may skip; the stored copy never does). Running aggregates (peaks,
totals) count every event.
"""

from __future__ import annotations

import threading

from kvstudio.core.recording.event_log import EventLog
from kvstudio.core.recording.event_types import (EVENT_KINDS, AttentionEvent, EvictionEvent, MemoryEvent, MergeEvent,
                                                 Phase, PrefillProgressEvent, RecallEvent, RunStartedEvent, StepEvent,
                                                 TokenEvent)

__all__ = ["EVENT_KINDS", "AttentionEvent", "EvictionEvent", "MemoryEvent", "MergeEvent", "Phase",
           "PrefillProgressEvent", "RecallEvent", "Recorder", "RunStartedEvent", "StepEvent", "TokenEvent"]


class Recorder:
    """Thread-safe store of a run's events. One Recorder per run.

    `capacity`: the most events of one kind a `since` read hands back (the live ring); None for no
    bound (a reopened run's views read it whole). The log behind it is never bounded.
    """

    def __init__(self, capacity: int | None = 20_000, watch_layers: tuple[int, ...] | frozenset[int] = (),
                 log: EventLog | None = None):
        # Read by the engine at every step, so a viewer may change it mid-run (one assignment of
        # an immutable frozenset: safe across threads).
        self.watch_layers = frozenset(watch_layers)
        self.capacity = capacity
        self.log = log if log is not None else EventLog()
        self._lock = threading.Lock()  # the aggregates: steps and memory readings come from two threads
        self.peak_cache_bytes = 0
        self.evicted_total = 0
        self.left_window_total = 0  # entries that left sliding windows (not evictions)
        self.tokens_total = 0

    def record(self, event) -> None:
        with self._lock:
            self.log.append(event)
            if isinstance(event, StepEvent):
                self.peak_cache_bytes = max(self.peak_cache_bytes, event.peak_cache_bytes)
                self.evicted_total += event.evicted
                self.left_window_total += event.left_window
            elif isinstance(event, TokenEvent):
                self.tokens_total += 1

    def since(self, kind: str, sequence: int = 0) -> tuple[list, int]:
        """Events of `kind` recorded after `sequence` (the newest `capacity` of them at most), and the
        sequence number to ask with next. The cost is what is new, not the log's size (the engine
        waits on the log's lock, and viewers ask at 25 Hz for every kind)."""
        return self.log.since(kind, sequence, limit=self.capacity)

    def all(self, kind: str) -> list:
        """Every event of `kind` the run recorded, in order (the whole log, not the live ring)."""
        return self.log.all(kind)
