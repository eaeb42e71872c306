"""Cache occupancy: entries (or bytes) held per layer against its budget, and the total over steps.

"show bytes" draws each layer's bytes instead of its entries: the layers' stores differ in what an
entry costs (a codec; a merged pair's later layer holding magnitudes, storage/linked.py), and the
narrow dark bars then show the bytes of directions a merged pair shares, in the layer that holds them
(the earlier one; under a codec, where the bytes are estimated, half in each).

The bars follow the memory readings too, which carry the entries held per layer as the layers fill:
during a long first chunk they move with the cache (as the Memory view's bytes do) instead of
waiting at zero for the chunk's end. The total curve has one point per finished step.
"""

from __future__ import annotations

import numpy as np
import pyqtgraph as pg
from PySide6.QtCore import Qt
from PySide6.QtWidgets import QCheckBox, QHBoxLayout, QLabel, QVBoxLayout

from kvstudio.core.figures.colours import TIER_COLOURS
from kvstudio.core.figures.data import layer_budgets, layer_windows, padded_range, state_layers_text
from kvstudio.core.units import MIB
from kvstudio.gui.views.base import LiveView
from kvstudio.gui.views.plot_message import PlotMessage


class OccupancyView(LiveView):
    kinds = ("steps", "memory", "merges")

    def __init__(self, parent=None):
        super().__init__(parent)
        # Short titles: a plot's title does not wrap, and a long one widened the plot past its view at
        # 1280 px (the last layers' bars were cut off); the explanation is the caption, which wraps.
        self.per_layer = pg.PlotWidget(title="entries held per layer")
        self.per_layer.setLabel("bottom", "layer")
        self.bars = pg.BarGraphItem(x=[], height=[], width=0.8, brush=(80, 140, 220))
        self.budget_line = pg.PlotDataItem(pen=pg.mkPen((230, 80, 60), width=2), stepMode="center")
        self.per_layer.addItem(self.bars)
        # Cross-layer merging (MiniCache): of the entries held, those held merged, per KV head.
        self.merged_bars = pg.BarGraphItem(x=[], height=[], width=0.5, brush=(40, 70, 140))
        self.per_layer.addItem(self.merged_bars)
        self.per_layer.addItem(self.budget_line)
        # A sliding layer's window (dashed): it never holds more than that, whatever the budget.
        self.window_line = pg.PlotDataItem(pen=pg.mkPen(TIER_COLOURS["window"], width=2, style=Qt.DashLine),
                                           stepMode="center")
        self.per_layer.addItem(self.window_line)
        self.total = pg.PlotWidget(title="entries held, all layers, per step")
        self.total.setLabel("bottom", "step")
        self.total_curve = self.total.plot(pen=pg.mkPen((80, 140, 220), width=2))
        self.total_curve.setDownsampling(auto=True, method="peak")
        self.total_curve.setClipToView(True)
        for plot in (self.per_layer, self.total):
            for axis in ("left", "bottom"):
                plot.getAxis(axis).enableAutoSIPrefix(False)
        self.per_layer_message = PlotMessage(self.per_layer, "no run yet")
        self.total_message = PlotMessage(self.total, "no steps yet")
        self.show_bytes = QCheckBox("show bytes (MiB) instead of entries")
        self.show_bytes.setToolTip("each layer's cache bytes as its store holds them; with merging, the narrow "
                                   "dark bars are the bytes of directions the pair shares")
        self.show_bytes.toggled.connect(self._draw_per_layer)
        controls = QHBoxLayout()
        controls.addWidget(self.show_bytes)
        controls.addStretch(1)
        self.caption = QLabel("")
        self.caption.setWordWrap(True)
        self.caption.setStyleSheet("color: #777;")
        layout = QVBoxLayout(self)
        layout.setContentsMargins(4, 4, 4, 4)
        layout.addLayout(controls)
        layout.addWidget(self.caption)
        layout.addWidget(self.per_layer, 3)
        layout.addWidget(self.total, 2)
        self.kept_per_layer: list[int] = []
        self.merged_per_layer: list[float] = []  # entries held merged, per KV head
        self.bytes_per_layer: list[int] = []
        self.shared_per_layer: list[int] = []  # bytes of shared directions (MiniCache)
        self.merging = False  # the run merges layers: the narrow bars mean something
        self.totals: list[int] = []
        self.budgets: list[float] = []
        self.windows: list[float] = []  # per layer: a sliding layer's window, NaN for global layers
        self.last_step = -1

    def start(self, run):
        self.kept_per_layer, self.totals, self.last_step = [0] * run.n_layers, [], -1
        self.merged_per_layer = [0.0] * run.n_layers
        self.bytes_per_layer, self.shared_per_layer = [0] * run.n_layers, [0] * run.n_layers
        self.merging = False
        layers = np.arange(run.n_layers)
        self.budgets = layer_budgets(run)
        self.budget_line.setData(np.append(layers - 0.5, layers[-1] + 0.5), self.budgets)
        self.windows = layer_windows(run)
        self.window_line.setData(np.append(layers - 0.5, layers[-1] + 0.5), self.windows)
        self.bars.setOpts(x=layers)
        self.merged_bars.setOpts(x=layers)
        self._draw_per_layer()
        self.total_curve.setData([], [])
        self.per_layer_message.hide()
        self.per_layer.setXRange(-0.6, run.n_layers - 0.4, padding=0)
        every = max(1, run.n_layers // 16)  # whole layer numbers only (no "0.5"), sparser for deep models
        self.per_layer.getAxis("bottom").setTicks([[(i, str(i)) for i in range(0, run.n_layers, every)]])
        self.total_message.show("no steps yet")

    def consume(self, events):
        for step in events["steps"]:
            self.kept_per_layer = list(step.kept_per_layer)
            self.totals.append(sum(step.kept_per_layer))
            self.last_step = step.step
        for reading in events.get("memory", ()):  # a reading within a step later than the last one done
            if reading.kept_per_layer and reading.step > self.last_step:
                self.kept_per_layer = list(reading.kept_per_layer)
            if reading.cache_bytes_per_layer:
                self.bytes_per_layer = list(reading.cache_bytes_per_layer)
        for merge in events.get("merges", ()):  # narrow dark bars: entries held merged (per KV head)
            self.merging = True
            self.merged_per_layer = [n / max(self.run.n_kv_heads, 1) for n in merge.merged_entries_per_layer]
            self.shared_per_layer = list(merge.shared_bytes_per_layer)
        self._draw_per_layer()
        if self.totals:
            self.total_message.hide()
            self.total_curve.setData(np.arange(len(self.totals)), self.totals)
            self.total.setYRange(*padded_range(self.totals), padding=0)  # from zero: a flat line must look flat

    def _draw_per_layer(self) -> None:
        if self.run is None:
            return
        merged = " Narrow dark bars: {}.".format(
            "directions shared with the paired layer, in the layer that holds them" if self.show_bytes.isChecked()
            else "entries held merged with the paired layer (per KV head)") if self.merging else ""
        if self.show_bytes.isChecked():
            heights = [b / MIB for b in self.bytes_per_layer]
            self.bars.setOpts(height=heights)
            self.merged_bars.setOpts(height=[b / MIB for b in self.shared_per_layer])
            self.budget_line.setVisible(False)
            self.window_line.setVisible(False)
            self.per_layer.setTitle("cache MiB held per layer")
            self.caption.setText(f"Bars: the bytes each layer's store holds.{merged}")
            self.per_layer.setYRange(*padded_range(heights), padding=0)
            return
        self.bars.setOpts(height=self.kept_per_layer)
        self.merged_bars.setOpts(height=self.merged_per_layer)
        self.budget_line.setVisible(True)
        has_windows = not np.all(np.isnan(self.windows)) if self.windows else False
        self.window_line.setVisible(has_windows)
        self.per_layer.setTitle("entries held per layer")
        windows = (" Dashed brown: a sliding layer's window (older entries leave it, whatever the budget)."
                   if has_windows else "")
        state = f" {state_layers_text(self.run)}" if state_layers_text(self.run) else ""
        self.caption.setText(f"Bars: entries each layer holds; red line: its budget.{windows}{merged}{state}")
        limits = [v for v in list(self.budgets) + list(self.windows) if v == v]
        self.per_layer.setYRange(*padded_range(list(self.kept_per_layer) + limits), padding=0)
