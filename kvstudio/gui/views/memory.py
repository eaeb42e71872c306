"""Memory over time: the cache's exact bytes on top; the process (CPU) or CUDA (GPU) below.

The cache gets its own plot: next to a process of a gigabyte, a few MiB of cache would be a flat
line at zero. A dotted line marks where prefill ends and decoding starts.
"""

from __future__ import annotations

import numpy as np
import pyqtgraph as pg
from PySide6.QtWidgets import QVBoxLayout

from .base import LiveView

MIB = 2**20


def _curve(plot, name, colour, width=2, style=None):
    pen = pg.mkPen(colour, width=width) if style is None else pg.mkPen(colour, width=width, style=style)
    curve = plot.plot(name=name, pen=pen)
    curve.setDownsampling(auto=True, method="peak")
    curve.setClipToView(True)
    return curve


class MemoryView(LiveView):
    kinds = ("memory",)

    def __init__(self, parent=None):
        super().__init__(parent)
        self.cache_plot = pg.PlotWidget(title="KV cache (MiB), exact, from the cache's tensors")
        self.system_plot = pg.PlotWidget(title="process resident memory (MiB)")
        self.system_plot.addLegend()
        self.system_plot.setXLink(self.cache_plot)
        self.system_plot.setLabel("bottom", "seconds since the run started")
        self.cache_curve = _curve(self.cache_plot, "KV cache", (80, 140, 220))
        self.process_curve = _curve(self.system_plot, "process (resident)", (170, 170, 170))
        self.cuda_curves = None  # created at the first CUDA sample
        self.decode_markers = []
        for plot in (self.cache_plot, self.system_plot):
            marker = pg.InfiniteLine(angle=90, pen=pg.mkPen((200, 200, 60), style=pg.QtCore.Qt.DotLine),
                                     label="decode", labelOpts={"position": 0.9})
            plot.addItem(marker)
            self.decode_markers.append(marker)
        layout = QVBoxLayout(self)
        layout.setContentsMargins(4, 4, 4, 4)
        layout.addWidget(self.cache_plot, 1)
        layout.addWidget(self.system_plot, 1)
        self.samples: list = []

    def start(self, run):
        self.samples = []
        for marker in self.decode_markers:
            marker.hide()
        self.cache_curve.setData([], [])
        self.process_curve.setData([], [])

    def consume(self, events):
        self.samples.extend(events["memory"])
        times = np.array([s.seconds for s in self.samples])
        self.cache_curve.setData(times, np.array([s.cache_bytes for s in self.samples]) / MIB)
        self.cache_plot.setYRange(0, max(s.cache_bytes for s in self.samples) / MIB * 1.15 or 1)
        self.process_curve.setData(times, np.array([s.process_bytes for s in self.samples]) / MIB)
        if any(s.cuda_reserved for s in self.samples):
            if self.cuda_curves is None:
                self.system_plot.setTitle("process and CUDA memory (MiB)")
                self.cuda_curves = (_curve(self.system_plot, "CUDA allocated", (90, 190, 90)),
                                    _curve(self.system_plot, "CUDA reserved", (90, 190, 90), 1, pg.QtCore.Qt.DashLine))
            self.cuda_curves[0].setData(times, np.array([s.cuda_allocated for s in self.samples]) / MIB)
            self.cuda_curves[1].setData(times, np.array([s.cuda_reserved for s in self.samples]) / MIB)
        first_decode = next((s.seconds for s in self.samples if s.phase == "decode"), None)
        if first_decode is not None:
            for marker in self.decode_markers:
                marker.setPos(first_decode)
                marker.show()
