"""What every live view shares: a run to follow, a cursor per event kind, and a promise that a draw a
throttle held back still happens (a trailing flush), so a view always ends on the final state."""

from __future__ import annotations

import math
import time

from PySide6.QtCore import QTimer
from PySide6.QtWidgets import QWidget

from kvstudio.core.recording.events import Recorder, RunStartedEvent


def on_screen(widget: QWidget) -> bool:
    """Whether any of `widget` is on screen. A dock behind another dock's tab still says isVisible()
    (seen here: every view of the tab group redrew at 25 Hz, taking the worker's GIL for plots no one
    saw); its visible region is empty."""
    return widget.isVisible() and not widget.visibleRegion().isEmpty()


class LiveView(QWidget):
    """Subclasses implement `start(run)` (reset for a new run) and `consume(events)`."""

    kinds: tuple[str, ...] = ()  # the event kinds this view reads

    def __init__(self, parent=None):
        super().__init__(parent)
        self.recorder: Recorder | None = None
        self.run: RunStartedEvent | None = None
        self._cursors: dict[str, int] = {}
        self._flush_timer = QTimer(self, singleShot=True)
        self._flush_timer.timeout.connect(self.flush)
        self._drawn_at = -math.inf  # time.monotonic() of the last draw a throttle counts from

    def follow(self, recorder: Recorder) -> None:
        self.recorder = recorder
        self.run = None
        self._cursors = dict.fromkeys(self.kinds, 0)
        self._cursors["runs"] = 0

    def refresh(self) -> None:
        """Read what is new in the recorder and redraw; called by the window's timer."""
        if self.recorder is None:
            return
        if self.run is None:
            runs, self._cursors["runs"] = self.recorder.since("runs", 0)
            if not runs:
                return
            self.run = runs[-1]
            self.start(self.run)
        self.consume_new()

    def consume_new(self) -> None:
        """Hand `consume` what each kind has that this view has not seen, if anything."""
        new = {}
        for kind in self.kinds:
            new[kind], self._cursors[kind] = self.recorder.since(kind, self._cursors[kind])
        if any(new.values()):
            self.consume(new)

    def held_back(self, interval_s: float) -> bool:
        """True when the view drew less than `interval_s` ago: the caller skips this draw, and the
        trailing flush (scheduled here) draws it. Views with a throttle call `note_drawn` when they draw."""
        waited = time.monotonic() - self._drawn_at
        if waited < interval_s:
            self.schedule_flush(interval_s - waited)
            return True
        return False

    def note_drawn(self) -> None:
        self._drawn_at = time.monotonic()

    def schedule_flush(self, delay_s: float) -> None:
        """A throttled view skipped a draw: `flush` draws it after `delay_s`, even if no event follows
        (the last events of a run, a stored run just opened)."""
        if not self._flush_timer.isActive():
            self._flush_timer.start(max(int(delay_s * 1000), 0))

    def flush(self) -> None:
        """Draw whatever a throttle held back (views without a throttle have nothing to do)."""

    def showEvent(self, event) -> None:
        # A hidden view (a tab behind another) was not refreshed: catch up the moment it shows.
        super().showEvent(event)
        self.refresh()
        self.flush()

    def start(self, run: RunStartedEvent) -> None:
        raise NotImplementedError

    def consume(self, events: dict[str, list]) -> None:
        raise NotImplementedError
