"""Cache occupancy: entries held per layer against its budget, and the total over steps.

The bars follow the memory readings too, which carry the entries held per layer as the layers fill:
during a long first chunk they move with the cache (as the Memory view's bytes do) instead of
waiting at zero for the chunk's end. The total curve has one point per finished step.
"""

from __future__ import annotations

import numpy as np
import pyqtgraph as pg
from PySide6.QtWidgets import QVBoxLayout

from ...core.plots.data import padded_range
from .base import LiveView
from .plot_message import PlotMessage


class OccupancyView(LiveView):
    kinds = ("steps", "memory", "merges")

    def __init__(self, parent=None):
        super().__init__(parent)
        self.per_layer = pg.PlotWidget(title="entries held per layer (bars) and budget (line)")
        self.per_layer.setLabel("bottom", "layer")
        self.bars = pg.BarGraphItem(x=[], height=[], width=0.8, brush=(80, 140, 220))
        self.budget_line = pg.PlotDataItem(pen=pg.mkPen((230, 80, 60), width=2), stepMode="center")
        self.per_layer.addItem(self.bars)
        # Cross-layer merging (MiniCache): of the entries held, those held merged, per KV head.
        self.merged_bars = pg.BarGraphItem(x=[], height=[], width=0.5, brush=(40, 70, 140))
        self.per_layer.addItem(self.merged_bars)
        self.per_layer.addItem(self.budget_line)
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
        layout = QVBoxLayout(self)
        layout.setContentsMargins(4, 4, 4, 4)
        layout.addWidget(self.per_layer, 3)
        layout.addWidget(self.total, 2)
        self.kept_per_layer: list[int] = []
        self.totals: list[int] = []
        self.budgets: list[float] = []
        self.last_step = -1

    def start(self, run):
        self.kept_per_layer, self.totals, self.last_step = [0] * run.n_layers, [], -1
        layers = np.arange(run.n_layers)
        self.budgets = [b if b is not None else np.nan for b in run.budgets]
        self.budget_line.setData(np.append(layers - 0.5, layers[-1] + 0.5), self.budgets)
        self.bars.setOpts(x=layers, height=self.kept_per_layer)
        self.merged_bars.setOpts(x=layers, height=[0] * run.n_layers)
        self.total_curve.setData([], [])
        self.per_layer_message.hide()
        self.per_layer.setXRange(-0.6, run.n_layers - 0.4, padding=0)
        every = max(1, run.n_layers // 16)  # whole layer numbers only (no "0.5"), sparser for deep models
        self.per_layer.getAxis("bottom").setTicks([[(i, str(i)) for i in range(0, run.n_layers, every)]])
        self._range_per_layer()
        self.total_message.show("no steps yet")

    def consume(self, events):
        for step in events["steps"]:
            self.kept_per_layer = list(step.kept_per_layer)
            self.totals.append(sum(step.kept_per_layer))
            self.last_step = step.step
        for reading in events.get("memory", ()):  # a reading within a step later than the last one done
            if reading.kept_per_layer and reading.step > self.last_step:
                self.kept_per_layer = list(reading.kept_per_layer)
        self.bars.setOpts(height=self.kept_per_layer)
        for merge in events.get("merges", ()):  # narrow dark bars: entries held merged (per KV head)
            self.merged_bars.setOpts(height=[n / max(self.run.n_kv_heads, 1) for n in merge.merged_entries_per_layer])
            self.per_layer.setTitle("entries held per layer (bars; narrow dark bars: held merged with the paired "
                                    "layer) and budget (line)")
        self._range_per_layer()
        if self.totals:
            self.total_message.hide()
            self.total_curve.setData(np.arange(len(self.totals)), self.totals)
            self.total.setYRange(*padded_range(self.totals), padding=0)  # from zero: a flat line must look flat

    def _range_per_layer(self) -> None:
        self.per_layer.setYRange(*padded_range(list(self.kept_per_layer) + list(self.budgets)), padding=0)
