"""Token map: the prompt (and generated text), each token coloured by what the cache still holds.

"all layers": green when every layer holds the token, red when none does, in between by the number
of layers that hold it (a layer holds a token while at least one of its KV heads does).
One layer: green when all its KV heads hold the token, amber when some do, red when none does.
This is the view that shows what a policy threw away.
"Where it lives" colours the chosen layer's tokens (layer 0 under "all layers") by storage tier:
on the device (held by some KV head), on the host (evicted under the host tier), recalled from the
host at the latest step that recalled, or evicted and gone; with cross-layer merging (MiniCache),
"retained" marks the tokens the retention rule kept unmerged in that layer.
"""

from __future__ import annotations

import time

import numpy as np
from PySide6.QtGui import QColor, QTextCharFormat, QTextCursor
from PySide6.QtWidgets import QCheckBox, QComboBox, QHBoxLayout, QLabel, QTextEdit, QVBoxLayout

from .base import LiveView
from .colors import held_colour

RENDER_INTERVAL_S = 0.1
TIER_COLOURS = {"device": "#5cc850", "host": "#6a9ae6", "recalled": "#b47ae6", "evicted": "#dc4632",
                "retained": "#e6c84a"}


class TokenMapView(LiveView):
    kinds = ("tokens", "evictions", "recalls", "merges")

    def __init__(self, parent=None, compact: bool = False):
        super().__init__(parent)
        self.layer = QComboBox()
        self.layer.addItem("all layers")
        self.by_tier = QCheckBox("where it lives")
        self.by_tier.setToolTip("device, host tier, recalled this step, or evicted (the chosen layer; layer 0 for "
                                "all layers)")
        self.summary = QLabel("")
        self.text = QTextEdit(readOnly=True)
        controls = QHBoxLayout()
        if not compact:
            controls.addWidget(QLabel("colour by"))
            controls.addWidget(self.layer)
            controls.addWidget(self.by_tier)
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
        self._offsets: list[int] = [0]  # character offset where each shown token starts (+ the end)
        self._colours: list[str] = []  # colour each shown token has now
        self._formats: dict[str, QTextCharFormat] = {}
        self.layer.currentIndexChanged.connect(lambda _: self._render(force=True))
        self.by_tier.toggled.connect(lambda _: self._render(force=True))
        self.storage_tier = "device"
        self.recalled: dict[int, np.ndarray] = {}  # layer -> positions recalled at its latest recall
        self.retained: dict[int, set[int]] = {}

    def set_model(self, n_layers: int, n_heads: int) -> None:
        self.layer.blockSignals(True)
        self.layer.clear()
        self.layer.addItem("all layers")
        self.layer.addItems([f"layer {i}" for i in range(n_layers)])
        self.layer.blockSignals(False)

    def start(self, run):
        self.tokens = list(run.prompt_tokens)
        self.kv_heads = run.n_kv_heads
        self.storage_tier = getattr(run, "storage_tier", "device")
        self.recalled = {}
        self.retained: dict[int, set[int]] = {}  # layer -> positions the merge retention rule kept unmerged
        self.evicted_heads = np.zeros((run.n_layers, max(len(self.tokens) * 2, 64)), dtype=np.int16)
        self._render(force=True)

    def consume(self, events):
        self.tokens.extend(token.text for token in events["tokens"])
        self._ensure_capacity(len(self.tokens))
        for eviction in events["evictions"]:
            if eviction.positions.size:
                self._ensure_capacity(int(eviction.positions.max()) + 1)
            self.evicted_heads[eviction.layer, eviction.positions] += 1
        for recall in events.get("recalls", ()):
            self.recalled[recall.layer] = np.unique(recall.positions)
        for merge in events.get("merges", ()):
            for layer, positions in enumerate(merge.retained):
                if len(positions):
                    self.retained.setdefault(layer, set()).update(positions.tolist())
        self._dirty = True
        self._render()

    def _ensure_capacity(self, positions: int) -> None:
        if positions > self.evicted_heads.shape[1]:
            grown = np.zeros((self.evicted_heads.shape[0], positions * 2), dtype=np.int16)
            grown[:, : self.evicted_heads.shape[1]] = self.evicted_heads
            self.evicted_heads = grown

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

    def tiers(self) -> list[str]:
        """Per token of the chosen layer: device, host, recalled or evicted."""
        layer = max(self.layer.currentIndex() - 1, 0)
        on_device = self.heads_holding(layer) > 0
        gone = "host" if self.storage_tier == "host" else "evicted"
        tiers = np.where(on_device, "device", gone).astype(object)
        recalled = self.recalled.get(layer)
        if recalled is not None and len(recalled):
            recalled = recalled[recalled < len(tiers)]
            tiers[recalled] = "recalled"
        retained = [p for p in self.retained.get(layer, ()) if p < len(tiers) and tiers[p] == "device"]
        tiers[retained] = "retained"
        return list(tiers)

    def _colours_now(self) -> list[str]:
        if self.by_tier.isChecked():
            return [TIER_COLOURS[tier] for tier in self.tiers()]
        return [held_colour(float(f)) for f in self.held_fractions()]

    def _render(self, force: bool = False) -> None:
        """Bring the text up to date: append new tokens, re-colour only tokens whose colour changed.

        The document is built once per run; later frames touch a handful of character ranges,
        so the GUI thread stays responsive however long the prompt is.
        """
        now = time.monotonic()
        if not force and (not self._dirty or now - self._rendered_at < RENDER_INTERVAL_S):
            return
        self._dirty, self._rendered_at = False, now
        if self.run is None:
            self.text.clear()
            return
        if force:
            self.text.clear()
            self._offsets, self._colours = [0], []
        cursor = QTextCursor(self.text.document())
        cursor.beginEditBlock()
        colours = self._colours_now()
        for index in range(len(self._colours), len(self.tokens)):  # tokens not shown yet
            cursor.movePosition(QTextCursor.End)
            cursor.insertText(self.tokens[index].replace("\n", "↵\n") or "·", self._format(colours[index]))
            self._offsets.append(cursor.position())
            self._colours.append(colours[index])
        index = 0
        while index < len(colours):  # re-colour runs of changed tokens that share a colour
            if colours[index] == self._colours[index]:
                index += 1
                continue
            end = index
            while end + 1 < len(colours) and colours[end + 1] == colours[index] != self._colours[end + 1]:
                end += 1
            cursor.setPosition(self._offsets[index])
            cursor.setPosition(self._offsets[end + 1], QTextCursor.KeepAnchor)
            cursor.setCharFormat(self._format(colours[index]))
            self._colours[index:end + 1] = [colours[index]] * (end + 1 - index)
            index = end + 1
        cursor.endEditBlock()
        fractions = self.held_fractions()
        self.summary.setText(f"{len(self.tokens)} tokens · {int((fractions == 0).sum())} gone from "
                             f"{'every layer' if self.layer.currentIndex() <= 0 else 'this layer'}")

    def _format(self, colour: str) -> QTextCharFormat:
        if colour not in self._formats:
            text_format = QTextCharFormat()
            text_format.setBackground(QColor(colour))
            text_format.setForeground(QColor("#111111"))
            self._formats[colour] = text_format
        return self._formats[colour]
