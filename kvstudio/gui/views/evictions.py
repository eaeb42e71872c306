"""Evictions: a raster of (step, token position) evicted from one layer, and counts per step.

Before the first step, and for a layer with no evictions, the plots say so instead of drawing empty
axes; the counts axis starts at zero and is padded, so a flat run of equal counts reads as flat
(not as a sliver 34559.6..34560.4 around it)."""

from __future__ import annotations

import numpy as np
import pyqtgraph as pg
from PySide6.QtWidgets import QHBoxLayout, QLabel, QSpinBox, QVBoxLayout

from kvstudio.core.figures.data import padded_range
from kvstudio.gui.views.base import LiveView
from kvstudio.gui.views.plot_message import PlotMessage

MAX_POINTS = 200_000  # beyond this the raster keeps the newest


class EvictionsView(LiveView):
    kinds = ("evictions", "steps")

    def __init__(self, parent=None):
        super().__init__(parent)
        self.layer = QSpinBox(minimum=0, maximum=0)
        controls = QHBoxLayout()
        controls.addWidget(QLabel("layer"))
        controls.addWidget(self.layer)
        controls.addStretch(1)
        self.raster = pg.PlotWidget(title="evicted token positions")
        self.raster.setLabel("bottom", "step")
        self.raster.setLabel("left", "token position")
        self.points = pg.ScatterPlotItem(size=3, pen=None, brush=(214, 39, 40, 160))
        self.raster.addItem(self.points)
        self.counts = pg.PlotWidget(title="entries evicted per step (all layers and heads)")
        self.counts.setLabel("bottom", "step")
        self.count_curve = self.counts.plot(pen=pg.mkPen((214, 39, 40), width=2), stepMode="center")
        for plot in (self.raster, self.counts):
            for axis in ("left", "bottom"):
                plot.getAxis(axis).enableAutoSIPrefix(False)  # steps, positions and counts are whole numbers
        self.raster_message = PlotMessage(self.raster, "no evictions yet")
        self.counts_message = PlotMessage(self.counts, "no steps yet")
        layout = QVBoxLayout(self)
        layout.setContentsMargins(4, 4, 4, 4)
        layout.addLayout(controls)
        layout.addWidget(self.raster, 3)
        layout.addWidget(self.counts, 2)
        self.by_layer: dict[int, list[tuple[np.ndarray, np.ndarray]]] = {}
        self.per_step: list[int] = []
        self.layer.valueChanged.connect(lambda _: self._draw_raster())

    def set_model(self, n_layers: int, n_heads: int) -> None:
        self.layer.setMaximum(n_layers - 1)

    def start(self, run):
        self.by_layer, self.per_step = {}, []
        self.points.clear()
        self.count_curve.setData([], [])
        self._show_messages()

    def consume(self, events):
        chosen, new_steps, new_positions = self.layer.value(), [], []
        for eviction in events["evictions"]:
            steps = np.full(eviction.positions.shape, eviction.step)
            self.by_layer.setdefault(eviction.layer, []).append((steps, eviction.positions))
            if eviction.layer == chosen:
                new_steps.append(steps)
                new_positions.append(eviction.positions)
        for step in events["steps"]:
            self.per_step.append(step.evicted)
        if new_steps:  # append: re-sending every point each frame costs more as the run grows
            self.points.addPoints(np.concatenate(new_steps), np.concatenate(new_positions))
        if self.per_step:
            self.count_curve.setData(np.arange(len(self.per_step) + 1), self.per_step)
            self.counts.setYRange(*padded_range(self.per_step), padding=0)
        self._show_messages()

    def _show_messages(self) -> None:
        if self.per_step:
            self.counts_message.hide()
        else:
            self.counts_message.show("no steps yet")
        if self.by_layer.get(self.layer.value()):
            self.raster_message.hide()
        else:
            self.raster_message.show(f"no evictions in layer {self.layer.value()}" if self.per_step
                                     else "no evictions yet")

    def raster_points(self) -> tuple[np.ndarray, np.ndarray]:
        """(steps, positions) of every eviction in the chosen layer, newest MAX_POINTS."""
        chunks = self.by_layer.get(self.layer.value(), [])
        if not chunks:
            return np.zeros(0), np.zeros(0)
        steps = np.concatenate([c[0] for c in chunks])[-MAX_POINTS:]
        positions = np.concatenate([c[1] for c in chunks])[-MAX_POINTS:]
        return steps, positions

    def _draw_raster(self) -> None:
        steps, positions = self.raster_points()
        self.points.setData(steps, positions)
        self._show_messages()
