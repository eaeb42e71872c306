"""Output: the streamed text, decode speed, and prefill progress for long prompts."""

from __future__ import annotations

from PySide6.QtGui import QTextCursor
from PySide6.QtWidgets import QHBoxLayout, QLabel, QPlainTextEdit, QProgressBar, QVBoxLayout

from kvstudio.gui.views.base import LiveView


class OutputView(LiveView):
    kinds = ("tokens", "steps", "prefill")

    def __init__(self, parent=None):
        super().__init__(parent)
        self.text = QPlainTextEdit(readOnly=True)
        self.text.setPlaceholderText("Generated text streams here.")
        self.speed = QLabel("")
        self.prefill = QProgressBar()
        self.prefill.setFormat("prefill %v / %m tokens")
        self.prefill.setMaximum(1)
        self.prefill.hide()  # shown once a run starts: an empty bar before that says nothing
        row = QHBoxLayout()
        row.addWidget(self.prefill, 1)
        row.addWidget(self.speed)
        layout = QVBoxLayout(self)
        layout.setContentsMargins(4, 4, 4, 4)
        layout.addLayout(row)
        layout.addWidget(self.text)
        self.decode_seconds = 0.0
        self.decode_tokens = 0

    def start(self, run):
        self.prefill.show()
        self.text.clear()
        self.speed.setText("")
        self.prefill.setMaximum(max(len(run.prompt_tokens), 1))
        self.prefill.setValue(0)
        self.decode_seconds, self.decode_tokens = 0.0, 0

    def run_ended(self) -> None:
        """The run is over (or a stored one is shown): its bar, full or stopped part-way, says no more."""
        self.prefill.hide()

    def consume(self, events):
        pieces = "".join(token.text for token in events["tokens"])
        if pieces:
            self.text.moveCursor(QTextCursor.End)
            self.text.insertPlainText(pieces)
            self.text.moveCursor(QTextCursor.End)
        for progress in events["prefill"]:
            self.show_prefill(progress)
        for step in events["steps"]:
            if step.phase == "decode":
                self.decode_seconds += step.seconds
                self.decode_tokens += 1
        if self.decode_seconds > 0:
            self.speed.setText(f"{self.decode_tokens / self.decode_seconds:.1f} tokens/s")

    def show_prefill(self, progress) -> None:
        """Tokens through every layer, plus the share of the chunk in progress that its layers have
        done (a long chunk moves the bar layer by layer, core/runtime/layer_hooks.py)."""
        within = progress.chunk_tokens * progress.layers_done // progress.layers_total if progress.layers_total else 0
        self.prefill.setMaximum(progress.tokens_total)
        self.prefill.setValue(progress.tokens_done + within)
        self.prefill.setFormat(f"prefill {progress.tokens_done:,} / {progress.tokens_total:,} tokens"
                               + (f" · layer {progress.layers_done}/{progress.layers_total}" if progress.layers_total
                                  else ""))

    @property
    def tokens_per_second(self) -> float:
        return self.decode_tokens / self.decode_seconds if self.decode_seconds else 0.0
