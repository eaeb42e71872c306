"""The Fine-tune views: what a session reports, drawn live (or from the history afterwards).

Four plots, created once and updated with setData at the window's refresh rate from what is new
in the session's TrainingLog: the loss (training, and validation under the policy and under
`full`), gradient norm and learning rate, speed (tokens/s) and evictions per step, and the memory
timeline with bands for forward chunks, backward passes, optimizer steps and validation.
"""

from __future__ import annotations

import numpy as np
import pyqtgraph as pg
from PySide6.QtWidgets import QLabel, QVBoxLayout, QWidget

from kvstudio.core.train.log import TrainingLog
from kvstudio.core.units import MIB, format_bytes

PHASE_COLOURS = {"forward": (80, 140, 220, 60), "backward": (230, 120, 60, 70), "optimizer": (120, 200, 90, 90),
                 "validation": (170, 110, 210, 50)}


class FinetuneCurves(QWidget):
    def __init__(self, parent=None):
        super().__init__(parent)
        self.summary = QLabel("no fine-tune session yet: start one in the Fine-tune panel")
        self.summary.setWordWrap(True)
        self.plots = pg.GraphicsLayoutWidget()
        self.loss_plot = self.plots.addPlot(row=0, col=0, title="loss per target token")
        self.loss_plot.addLegend(offset=(-10, 10))
        self.loss_plot.setLabel("bottom", "step")
        self.train_curve = self.loss_plot.plot(pen=pg.mkPen((80, 140, 220), width=1), name="training")
        self.val_policy_curve = self.loss_plot.plot(pen=pg.mkPen((230, 80, 60), width=2), symbol="o", symbolSize=6,
                                                    symbolBrush=(230, 80, 60), name="validation, policy")
        self.val_full_curve = self.loss_plot.plot(pen=pg.mkPen((120, 200, 90), width=2, style=pg.QtCore.Qt.DashLine),
                                                  symbol="t", symbolSize=6, symbolBrush=(120, 200, 90),
                                                  name="validation, full cache")
        self.grad_plot = self.plots.addPlot(row=0, col=1, title="grad norm · lr as a fraction of its peak")
        self.grad_plot.setLabel("bottom", "step")
        self.grad_curve = self.grad_plot.plot(pen=pg.mkPen((80, 140, 220), width=2))
        self.lr_curve = self.grad_plot.plot(pen=pg.mkPen((230, 150, 60), width=1))
        self.speed_plot = self.plots.addPlot(row=1, col=0, title="tokens/s · evicted ÷1000")
        self.speed_plot.setLabel("bottom", "step")
        self.speed_curve = self.speed_plot.plot(pen=pg.mkPen((80, 140, 220), width=2))
        self.evictions_curve = self.speed_plot.plot(pen=pg.mkPen((230, 80, 60), width=1))
        self.memory_plot = self.plots.addPlot(row=1, col=1, title="memory (MiB)")
        self.memory_plot.setLabel("bottom", "seconds")
        self.band_curves = {phase: self.memory_plot.plot(pen=None, fillLevel=0, brush=colour)
                            for phase, colour in PHASE_COLOURS.items()}
        self.process_curve = self.memory_plot.plot(pen=pg.mkPen((80, 140, 220), width=2))
        self.autograd_curve = self.memory_plot.plot(pen=pg.mkPen((230, 150, 60), width=2))
        self.cuda_curve = self.memory_plot.plot(pen=pg.mkPen((120, 200, 90), width=2))
        for curve in (self.train_curve, self.process_curve, self.autograd_curve, self.cuda_curve):
            curve.setDownsampling(auto=True, method="peak")
            curve.setClipToView(True)
        legend = QLabel("grad norm, tokens/s, process memory: blue · learning rate, autograd held: orange · "
                        "evictions: red · CUDA allocated: green · bands: " + " · ".join(
            f"<span style='background: rgba{colour[:3] + (0.6,)}'>&nbsp;{phase}&nbsp;</span>"
            for phase, colour in PHASE_COLOURS.items()))
        legend.setWordWrap(True)
        layout = QVBoxLayout(self)
        layout.setContentsMargins(4, 4, 4, 4)
        layout.addWidget(self.summary)
        layout.addWidget(self.plots, 1)
        layout.addWidget(legend)
        self.log: TrainingLog | None = None
        self.clear()

    def clear(self) -> None:
        self._cursors = {"steps": 0, "val": 0, "memory": 0, "phases": 0, "status": 0}
        self.steps, self.val, self.memory, self.phases = [], [], [], []
        self.last_status = ""
        for curve in (self.train_curve, self.val_policy_curve, self.val_full_curve, self.grad_curve, self.lr_curve,
                      self.speed_curve, self.evictions_curve, self.process_curve, self.autograd_curve,
                      self.cuda_curve, *self.band_curves.values()):
            curve.setData([], [])
        for plot in (self.loss_plot, self.grad_plot, self.speed_plot, self.memory_plot):
            plot.setRange(xRange=(0, 1), yRange=(0, 1), padding=0)  # not the last session's axes
            plot.enableAutoRange()  # ... and they fit the new session's data as it comes

    def follow(self, log: TrainingLog, title: str = "") -> None:
        self.log = log
        self.title = title
        self.clear()

    def refresh(self) -> None:
        """Read what is new in the log and redraw what changed."""
        if self.log is None:
            return
        new = {}
        for kind in self._cursors:
            new[kind], self._cursors[kind] = self.log.since(kind, self._cursors[kind])
        if not any(new.values()):
            return
        self.steps += new["steps"]
        self.val += new["val"]
        self.memory += new["memory"]
        self.phases += new["phases"]
        if new["status"]:
            self.last_status = new["status"][-1].message
        if new["steps"]:
            x = np.array([s.step for s in self.steps], dtype=float)
            self.train_curve.setData(x, [s.loss for s in self.steps])
            self.grad_curve.setData(x, [s.grad_norm for s in self.steps])
            peak_lr = max(s.lr for s in self.steps) or 1.0  # the shape of the schedule, on the norm's scale
            self.lr_curve.setData(x, [s.lr / peak_lr for s in self.steps])
            self.speed_curve.setData(x, [s.tokens_per_second for s in self.steps])
            self.evictions_curve.setData(x, [s.evictions / 1000 for s in self.steps])
        if new["val"]:
            x = [v.step for v in self.val]
            self.val_policy_curve.setData(x, [v.loss_policy for v in self.val])
            self.val_full_curve.setData(x, [v.loss_full for v in self.val])
        if new["memory"] or new["phases"]:
            self._draw_memory()
        self._summarise()

    def _draw_memory(self) -> None:
        if not self.memory:
            return
        seconds = np.array([m.seconds for m in self.memory])
        process = np.array([m.process_bytes for m in self.memory]) / MIB
        self.process_curve.setData(seconds, process)
        self.autograd_curve.setData(seconds, np.array([m.autograd_bytes for m in self.memory]) / MIB)
        if any(m.cuda_allocated for m in self.memory):
            self.cuda_curve.setData(seconds, np.array([m.cuda_allocated for m in self.memory]) / MIB)
        top = float(process.max()) * 1.05
        end = float(seconds[-1])
        # One filled outline per phase: a band is [start, next mark) drawn from 0 to the top.
        outlines = {phase: ([], []) for phase in PHASE_COLOURS}
        for mark, following in zip(self.phases, self.phases[1:] + [None]):
            if mark.phase not in outlines:
                continue
            stop = following.seconds if following is not None else end
            xs, ys = outlines[mark.phase]
            xs += [mark.seconds, mark.seconds, stop, stop]
            ys += [0, top, top, 0]
        for phase, (xs, ys) in outlines.items():
            self.band_curves[phase].setData(xs, ys)

    def _summarise(self) -> None:
        parts = [self.title] if getattr(self, "title", "") else []
        if self.steps:
            last = self.steps[-1]
            parts.append(f"step {last.step}: loss {last.loss:.4f}, grad norm {last.grad_norm:.3f}, lr {last.lr:.2e}, "
                         f"{last.tokens_per_second:.0f} tokens/s, peak {format_bytes(last.peak_bytes)}, "
                         f"{last.evictions} evicted")
        if self.val:
            first, last = self.val[0], self.val[-1]
            parts.append(f"validation under the policy {first.loss_policy:.4f} → {last.loss_policy:.4f}, "
                         f"under full {first.loss_full:.4f} → {last.loss_full:.4f}")
        if self.last_status:
            parts.append(self.last_status)
        self.summary.setText(" · ".join(parts))
