"""Attention map: for one layer, each step's newest query over the context, by key position.

Rows are steps (prefill chunks, then decode steps), columns are token positions. A cell is the
attention weight of that step's newest query to the token at that position (one head, or the mean
over heads); tokens that were already evicted show red, tokens not yet fed show dark.
"""

from __future__ import annotations

import numpy as np
import pyqtgraph as pg
from PySide6.QtCore import QRectF
from PySide6.QtWidgets import QComboBox, QHBoxLayout, QLabel, QSpinBox, QVBoxLayout

from .base import LiveView
from .colors import attention_lut

EVICTED, UNSEEN = -1.0, -2.0
MAX_ROWS = 1500  # the newest steps kept on screen
MAX_COLUMNS = 1600  # wider contexts are max-pooled into this many columns


def attention_by_position(event, head: int | None, width: int) -> np.ndarray:
    """One image row: weight per token position; EVICTED where seen but not held, UNSEEN beyond."""
    weights, positions = event.weights, event.positions  # (heads, n), (kv_heads, n)
    heads, kv_heads = weights.shape[0], positions.shape[0]
    group = heads // kv_heads
    row = np.full(width, UNSEEN, dtype=np.float32)
    seen = int(positions.max()) + 1 if positions.size else 0
    row[:seen] = EVICTED
    if head is not None:
        row[positions[head // group]] = weights[head]
        return row
    total = np.zeros(seen, dtype=np.float32)
    held = np.zeros(seen, dtype=bool)
    for h in range(heads):  # positions differ per KV head: place each head's weights, then average
        total[positions[h // group]] += weights[h]
        held[positions[h // group]] = True
    row[:seen][held] = total[held] / heads
    return row


def to_lut_indices(image: np.ndarray, top: float) -> np.ndarray:
    """Floats with EVICTED / UNSEEN markers -> uint8 indices into attention_lut()."""
    scaled = 2 + np.clip(image / max(top, 1e-9), 0, 1) * 253
    indices = np.where(image == EVICTED, 0, np.where(image == UNSEEN, 1, scaled))
    return indices.astype(np.ubyte)


class AttentionMapView(LiveView):
    kinds = ("attention",)

    def __init__(self, parent=None):
        super().__init__(parent)
        self.layer = QSpinBox(minimum=0, maximum=0)
        self.head = QComboBox()
        self.head.addItem("mean over heads")
        controls = QHBoxLayout()
        for widget in (QLabel("layer"), self.layer, QLabel("head"), self.head):
            controls.addWidget(widget)
        controls.addStretch(1)
        controls.addWidget(QLabel("red: evicted · dark: not yet seen"))
        self.plot = pg.PlotWidget()
        self.plot.setLabel("bottom", "key position")
        self.plot.setLabel("left", "step")
        self.plot.invertY(True)
        self.image = pg.ImageItem(axisOrder="row-major")
        self.image.setLookupTable(attention_lut())
        self.plot.addItem(self.image)
        self.colorbar = pg.ColorBarItem(values=(0, 1), colorMap=pg.colormap.get("viridis"), interactive=False,
                                        label="attention")
        self.plot.getPlotItem().layout.addItem(self.colorbar, 2, 5)
        layout = QVBoxLayout(self)
        layout.setContentsMargins(4, 4, 4, 4)
        layout.addLayout(controls)
        layout.addWidget(self.plot)
        self.events: list = []
        self.rows: list[np.ndarray] = []  # one image row per event, for the current head choice
        self.image_values = np.zeros((0, 0), dtype=np.float32)  # what is drawn, before colouring
        self.layer.valueChanged.connect(self._watch_layer)
        self.head.currentIndexChanged.connect(lambda _: self._recompute_rows())

    def set_model(self, n_layers: int, n_heads: int) -> None:
        self.layer.setMaximum(n_layers - 1)
        self.layer.setValue(n_layers // 2)
        self.head.blockSignals(True)
        self.head.clear()
        self.head.addItem("mean over heads")
        self.head.addItems([f"head {h}" for h in range(n_heads)])
        self.head.blockSignals(False)

    def follow(self, recorder):
        super().follow(recorder)
        self.events, self.rows = [], []
        recorder.watch_layers = frozenset({self.layer.value()})

    def _watch_layer(self, layer: int) -> None:
        if self.recorder is not None:
            self.recorder.watch_layers = frozenset({layer})  # the engine reads it at its next step
            # Read the recorder again from the start: rows this layer already has (it was watched
            # before, or the run is a stored one) come back; the consume filters by layer.
            self._cursors["attention"] = 0
        self.events, self.rows = [], []
        self._redraw()

    def start(self, run):
        self.events, self.rows = [], []

    def _head(self) -> int | None:
        return None if self.head.currentIndex() <= 0 else self.head.currentIndex() - 1

    def consume(self, events):
        new = [e for e in events["attention"] if e.layer == self.layer.value()]
        self.events = (self.events + new)[-MAX_ROWS:]
        # Each row is computed once, at its own width; rows are padded when drawn.
        self.rows = (self.rows + [attention_by_position(e, self._head(), int(e.positions.max()) + 1) for e in new])
        self.rows = self.rows[-MAX_ROWS:]
        self._redraw()

    def _recompute_rows(self) -> None:
        self.rows = [attention_by_position(e, self._head(), int(e.positions.max()) + 1) for e in self.events]
        self._redraw()

    def _redraw(self) -> None:
        if not self.rows:
            self.image.clear()
            self.image_values = np.zeros((0, 0), dtype=np.float32)
            return
        width = max(len(row) for row in self.rows)
        rows = np.full((len(self.rows), width), UNSEEN, dtype=np.float32)
        for index, row in enumerate(self.rows):
            rows[index, : len(row)] = row
        self.image_values = rows
        if width > MAX_COLUMNS:  # max-pool columns: a strong weight stays visible
            bins = -(-width // MAX_COLUMNS)
            padded = np.pad(rows, ((0, 0), (0, bins * MAX_COLUMNS - width)), constant_values=UNSEEN)
            rows = padded.reshape(rows.shape[0], MAX_COLUMNS, bins).max(axis=2)
        held = self.image_values[self.image_values >= 0]
        top = float(np.percentile(held, 99)) if held.size else 1.0
        self.image.setImage(to_lut_indices(rows, top), levels=(0, 255), autoLevels=False)
        self.image.setRect(QRectF(0, 0, width, rows.shape[0]))
        self.colorbar.setLevels((0, top))
