"""What every live view shares: a run to follow and a cursor per event kind."""

from __future__ import annotations

from PySide6.QtWidgets import QWidget

from ...core.events import Recorder, RunStartedEvent


class LiveView(QWidget):
    """Subclasses implement `start(run)` (reset for a new run) and `consume(events)`."""

    kinds: tuple[str, ...] = ()  # the event kinds this view reads

    def __init__(self, parent=None):
        super().__init__(parent)
        self.recorder: Recorder | None = None
        self.run: RunStartedEvent | None = None
        self._cursors: dict[str, int] = {}

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

    def start(self, run: RunStartedEvent) -> None:
        raise NotImplementedError

    def consume(self, events: dict[str, list]) -> None:
        raise NotImplementedError
