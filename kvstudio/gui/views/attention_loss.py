"""What the policy loses, live: the attention mass on evicted entries per step and per layer.

Drawn from the steps' `attention_loss` (a run with "measure attention loss" checked, or
`kvstudio run --measure-loss`): the newest query's attention, against a shadow cache of every key,
that falls on entries the layer no longer holds (core/runtime/attention_loss.py). The curve is the
mean over layers per step; the bars, each layer's loss at the latest step. 0: nothing the query
would attend to is gone; 1: everything is.
"""

from __future__ import annotations

import numpy as np
import pyqtgraph as pg
from PySide6.QtWidgets import QLabel, QVBoxLayout

from kvstudio.gui.views.base import LiveView
from kvstudio.gui.views.plot_message import PlotMessage

NOT_MEASURED = "not measured: check \"measure attention loss\" in Generation and run again"


class AttentionLossView(LiveView):
    kinds = ("steps",)

    def __init__(self, parent=None):
        super().__init__(parent)
        self.over_steps = pg.PlotWidget(title="attention loss per step (mean over layers)")
        self.over_steps.setLabel("bottom", "step")
        self.curve = self.over_steps.plot(pen=pg.mkPen((220, 90, 60), width=2), symbol="o", symbolSize=4)
        self.curve.setClipToView(True)
        self.per_layer = pg.PlotWidget(title="attention loss per layer, latest step")
        self.per_layer.setLabel("bottom", "layer")
        self.bars = pg.BarGraphItem(x=[], height=[], width=0.8, brush=(220, 90, 60))
        self.per_layer.addItem(self.bars)
        for plot in (self.over_steps, self.per_layer):
            plot.setYRange(0, 1, padding=0.02)
        self.steps_message = PlotMessage(self.over_steps, "no run yet")
        self.layers_message = PlotMessage(self.per_layer, "no run yet")
        caption = QLabel("The mass of the newest query's attention (over every key the run computed) on entries "
                         "the policy evicted. Measuring keeps a full cache of keys beside the policy's.")
        caption.setWordWrap(True)
        caption.setStyleSheet("color: #777;")
        layout = QVBoxLayout(self)
        layout.setContentsMargins(4, 4, 4, 4)
        layout.addWidget(caption)
        layout.addWidget(self.over_steps, 3)
        layout.addWidget(self.per_layer, 2)
        self.steps: list[int] = []
        self.means: list[float] = []
        self.latest: list[float] = []

    def start(self, run):
        self.steps, self.means, self.latest = [], [], []
        self.curve.setData([], [])
        self.bars.setOpts(x=[], height=[])
        self.steps_message.show(NOT_MEASURED)
        self.layers_message.show(NOT_MEASURED)

    def consume(self, events):
        for step in events["steps"]:
            measured = [loss for loss in step.attention_loss if loss is not None]
            if not measured:
                continue
            self.steps.append(step.step)
            self.means.append(sum(measured) / len(measured))
            self.latest = [np.nan if loss is None else loss for loss in step.attention_loss]
        if not self.steps:
            return
        self.steps_message.hide()
        self.layers_message.hide()
        self.curve.setData(self.steps, self.means)
        self.bars.setOpts(x=np.arange(len(self.latest)), height=np.nan_to_num(self.latest))
        for plot in (self.over_steps, self.per_layer):  # a loss is a fraction: the whole 0..1 scale, bars from 0
            plot.setYRange(0, 1, padding=0.02)
