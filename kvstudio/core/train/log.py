"""What a fine-tune session reports while it runs: steps, validations, phases and memory.

The session records into a `TrainingLog` (thread-safe, append-only per kind); the CLI prints each
step as it comes, the studio's Fine-tune views read what is new at their own pace (`since`), like
the generation Recorder. A session is a few hundred steps: everything is kept, except memory
readings, which are thinned to every other one past a bound so a long session stays bounded.
"""

from __future__ import annotations

import bisect
import threading
import time
from dataclasses import dataclass

MAX_MEMORY_READINGS = 20_000


@dataclass(frozen=True)
class TrainStep:
    step: int  # 1-based: optimizer steps done
    loss: float  # mean NLL per target token over the step's examples
    grad_norm: float  # before clipping
    lr: float
    seconds: float
    peak_bytes: int  # CUDA allocator peak in the step; on CPU the peak bytes autograd held for backward
    tokens: int
    tokens_per_second: float
    evictions: int  # entries the policy evicted during the step's forward passes
    forward_seconds: float = 0.0
    backward_seconds: float = 0.0
    optimizer_seconds: float = 0.0


@dataclass(frozen=True)
class Validation:
    step: int  # optimizer steps done when it ran (0: before training)
    loss_policy: float  # mean NLL per target token under the session's policy
    loss_full: float  # ... under the full cache


@dataclass(frozen=True)
class PhaseMark:
    """A phase starts: forward, backward, optimizer, validation (the memory timeline's bands)."""

    seconds: float  # since the session started
    phase: str
    step: int


@dataclass(frozen=True)
class MemoryReading:
    seconds: float
    phase: str
    process_bytes: int
    cuda_allocated: int
    autograd_bytes: int  # what autograd holds for the backward pass now (the meter in through_cache)


@dataclass(frozen=True)
class Status:
    seconds: float
    message: str


KINDS = {TrainStep: "steps", Validation: "val", PhaseMark: "phases", MemoryReading: "memory", Status: "status"}


class TrainingLog:
    def __init__(self, listener=None):
        self.listener = listener  # called with each event as it is recorded (the CLI prints steps)
        self.started = time.perf_counter()
        self._lock = threading.Lock()
        self._events: dict[str, list] = {kind: [] for kind in KINDS.values()}  # (sequence, event)
        self._sequence = 0
        self.phase = "setup"
        self.step = 0

    def now(self) -> float:
        return time.perf_counter() - self.started

    def record(self, event) -> None:
        kind = KINDS[type(event)]
        with self._lock:
            self._sequence += 1
            events = self._events[kind]
            events.append((self._sequence, event))
            if kind == "memory" and len(events) > MAX_MEMORY_READINGS:
                # Every other reading goes: the curve keeps its shape at half the resolution.
                self._events[kind] = events[1::2]
        if self.listener is not None:
            self.listener(event)

    def enter(self, phase: str) -> None:
        if phase != self.phase:
            self.phase = phase
            self.record(PhaseMark(self.now(), phase, self.step))

    def status(self, message: str) -> None:
        self.record(Status(self.now(), message))

    def since(self, kind: str, cursor: int = 0) -> tuple[list, int]:
        """Events of `kind` recorded after sequence number `cursor`, and the cursor to ask with next."""
        with self._lock:
            events = self._events[kind]
            first = bisect.bisect_right(events, cursor, key=lambda pair: pair[0])
            return [event for _, event in events[first:]], self._sequence

    def all(self, kind: str) -> list:
        return self.since(kind, 0)[0]
