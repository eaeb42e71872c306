"""Cache occupancy: entries held per layer against its budget, and the total over steps."""

from __future__ import annotations

import numpy as np
import pyqtgraph as pg
from PySide6.QtWidgets import QVBoxLayout

from .base import LiveView


class OccupancyView(LiveView):
    kinds = ("steps", "merges")

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
        layout = QVBoxLayout(self)
        layout.setContentsMargins(4, 4, 4, 4)
        layout.addWidget(self.per_layer, 3)
        layout.addWidget(self.total, 2)
        self.kept_per_layer: list[int] = []
        self.totals: list[int] = []

    def start(self, run):
        self.kept_per_layer, self.totals = [0] * run.n_layers, []
        layers = np.arange(run.n_layers)
        budgets = [b if b is not None else np.nan for b in run.budgets]
        self.budget_line.setData(np.append(layers - 0.5, layers[-1] + 0.5), budgets)
        self.bars.setOpts(x=layers, height=self.kept_per_layer)
        self.merged_bars.setOpts(x=layers, height=[0] * run.n_layers)
        self.total_curve.setData([], [])

    def consume(self, events):
        for step in events["steps"]:
            self.kept_per_layer = list(step.kept_per_layer)
            self.totals.append(sum(step.kept_per_layer))
        self.bars.setOpts(height=self.kept_per_layer)
        for merge in events.get("merges", ()):  # narrow dark bars: entries held merged (per KV head)
            self.merged_bars.setOpts(height=[n / max(self.run.n_kv_heads, 1) for n in merge.merged_entries_per_layer])
            self.per_layer.setTitle("entries held per layer (bars; narrow dark bars: held merged with the paired "
                                    "layer) and budget (line)")
        self.total_curve.setData(np.arange(len(self.totals)), self.totals)
        self.total.setYRange(0, max(self.totals) * 1.1 or 1)  # from zero: a flat line must look flat
