"""Token map: the prompt (and generated text), each token coloured by what the cache still holds.

"all layers": green when every layer holds the token, red when none does, in between by the number
of layers that hold it (a layer holds a token while at least one of its KV heads does).
One layer: green when all its KV heads hold the token, amber when some do, red when none does.
This is the view that shows what a policy threw away.
"""

from __future__ import annotations

import html
import time

import numpy as np
from PySide6.QtWidgets import QComboBox, QHBoxLayout, QLabel, QTextEdit, QVBoxLayout

from .base import LiveView
from .colors import held_colour

RENDER_INTERVAL_S = 0.25  # rebuilding the text for thousands of tokens is not free


class TokenMapView(LiveView):
    kinds = ("tokens", "evictions")

    def __init__(self, parent=None, compact: bool = False):
        super().__init__(parent)
        self.layer = QComboBox()
        self.layer.addItem("all layers")
        self.summary = QLabel("")
        self.text = QTextEdit(readOnly=True)
        controls = QHBoxLayout()
        if not compact:
            controls.addWidget(QLabel("colour by"))
            controls.addWidget(self.layer)
        controls.addWidget(self.summary, 1)
        layout = QVBoxLayout(self)
        layout.setContentsMargins(4, 4, 4, 4)
        layout.addLayout(controls)
        layout.addWidget(self.text)
        self.tokens: list[str] = []
        self.evicted_heads = np.zeros((0, 0), dtype=np.int16)  # (layers, positions): heads that evicted it
        self.kv_heads = 1
        self._dirty = False
        self._rendered_at = 0.0
        self.layer.currentIndexChanged.connect(lambda _: self._render(force=True))

    def set_model(self, n_layers: int, n_heads: int) -> None:
        self.layer.blockSignals(True)
        self.layer.clear()
        self.layer.addItem("all layers")
        self.layer.addItems([f"layer {i}" for i in range(n_layers)])
        self.layer.blockSignals(False)

    def start(self, run):
        self.tokens = list(run.prompt_tokens)
        self.kv_heads = run.n_kv_heads
        self.evicted_heads = np.zeros((run.n_layers, max(len(self.tokens) * 2, 64)), dtype=np.int16)
        self._render(force=True)

    def consume(self, events):
        self.tokens.extend(token.text for token in events["tokens"])
        for eviction in events["evictions"]:
            needed = int(eviction.positions.max()) + 1 if eviction.positions.size else 0
            if needed > self.evicted_heads.shape[1]:
                grown = np.zeros((self.evicted_heads.shape[0], needed * 2), dtype=np.int16)
                grown[:, : self.evicted_heads.shape[1]] = self.evicted_heads
                self.evicted_heads = grown
            self.evicted_heads[eviction.layer, eviction.positions] += 1
        self._dirty = True
        self._render()

    # -- what is drawn (also read by tests) --------------------------------------------------------

    def layers_holding(self) -> np.ndarray:
        """Per token: how many layers still hold it."""
        n = len(self.tokens)
        return (self.evicted_heads[:, :n] < self.kv_heads).sum(axis=0)

    def heads_holding(self, layer: int) -> np.ndarray:
        """Per token: how many KV heads of `layer` still hold it."""
        return self.kv_heads - self.evicted_heads[layer, : len(self.tokens)]

    def held_fractions(self) -> np.ndarray:
        """Per token, in [0, 1]: the fraction that decides its colour under the current choice."""
        if self.layer.currentIndex() <= 0:
            return self.layers_holding() / max(self.evicted_heads.shape[0], 1)
        return self.heads_holding(self.layer.currentIndex() - 1) / self.kv_heads

    def _render(self, force: bool = False) -> None:
        now = time.monotonic()
        if not force and (not self._dirty or now - self._rendered_at < RENDER_INTERVAL_S):
            return
        self._dirty, self._rendered_at = False, now
        if self.run is None:
            self.text.clear()
            return
        fractions = self.held_fractions()
        spans = []
        for token, fraction in zip(self.tokens, fractions):
            shown = html.escape(token).replace("\n", "↵<br>") or "·"
            spans.append(f'<span style="background-color:{held_colour(float(fraction))}">{shown}</span>')
        scroll = self.text.verticalScrollBar().value()
        self.text.setHtml('<div style="white-space:pre-wrap; color:#111">' + "".join(spans) + "</div>")
        self.text.verticalScrollBar().setValue(scroll)
        evicted_everywhere = int((fractions == 0).sum())
        self.summary.setText(f"{len(self.tokens)} tokens · {evicted_everywhere} gone from "
                             f"{'every layer' if self.layer.currentIndex() <= 0 else 'this layer'}")
