"""Closing the window while something holds the model's thread (a run, an evaluation, a fine-tune
session) asks first: stop it and close, or keep it running. The question is non-modal (a closing
window never blocks its own event loop) and goes away by itself if the work ends meanwhile.

`ask` is off for a window that must close at once (a test's teardown, a session's end)."""

from __future__ import annotations

from PySide6.QtWidgets import QMessageBox


class CloseGuard:
    def __init__(self, window):
        self.window = window
        self.ask = True
        self.confirmed = False
        self.question: QMessageBox | None = None

    def may_close(self) -> bool:
        """True when the window may close now; otherwise the question is shown and the close waits."""
        busy = self.window.state.busy
        if not busy or not self.ask or self.confirmed:
            return True
        if self.question is None:
            self.question = QMessageBox(QMessageBox.Question, "Close KV Studio",
                                        f"A {busy} is in progress. Stop it and close the window?",
                                        parent=self.window)
            self.stop_button = self.question.addButton("Stop and close", QMessageBox.AcceptRole)
            self.keep_button = self.question.addButton("Keep running", QMessageBox.RejectRole)
            self.question.buttonClicked.connect(self._answered)
            self.window.state.busy_changed.connect(self._busy_changed)
        self.question.open()
        return False

    def _answered(self, button) -> None:
        if button is self.stop_button:
            self.confirmed = True
            self.window.close()  # closeEvent stops what runs, as it always did

    def _busy_changed(self, busy: str) -> None:
        if not busy and self.question is not None and self.question.isVisible():
            self.question.hide()  # nothing left to stop: the next close goes straight through
