"""Memory over the session: the cache's exact bytes on top; the process, CUDA and the GPU below.

Unlike the other views this one does not start afresh with each run: it keeps one timeline for
the session (model loads and runs, in order) so a user sees what a load took and how runs
compare. Readings come after every step and from the engine's sampler between steps. Shaded
bands mark the phases: a model load, each prefill chunk (alternating shades), decoding; red
triangles mark eviction bursts (a step that evicted more than two tokens' worth, e.g. a prefill
chunk or a SnapKV compression). "Follow the latest" keeps the newest load or run in view.

The cache gets its own plot: next to a process of a gigabyte, a few MiB of cache would be a flat
line at zero.
"""

from __future__ import annotations

import math

import numpy as np
import pyqtgraph as pg
from PySide6.QtWidgets import QCheckBox, QHBoxLayout, QLabel, QPushButton, QVBoxLayout

from kvstudio.core.units import MIB, format_bytes
from kvstudio.gui.views.base import LiveView
from kvstudio.gui.widgets.wheel_scrolls import wheel_scrolls_page
from kvstudio.gui.views.plot_message import PlotMessage

# Readings come 20 times a second; redrawing the timeline for each (curves, the followed range, the
# linked axes) held the GUI thread 10-40 ms at a time during a model load. Five times a second is
# plenty for a timeline, and the trailing flush draws the last readings.
REDRAW_INTERVAL_S = 0.2

PHASE_BRUSHES = {"load": (150, 90, 200, 60), "prefill": ((70, 120, 200, 80), (70, 120, 200, 35)),
                 "decode": (80, 180, 90, 40)}
LEGEND = ("<span style='color:#a070d0'>■</span> load  <span style='color:#5080d0'>■</span> prefill chunks  "
          "<span style='color:#60b070'>■</span> decode  <span style='color:#e64646'>▼</span> eviction burst")
SERIES = (  # (field, legend, colour, width, style): the system plot's curves, CUDA ones only once seen
    ("process_bytes", "process (resident)", (170, 170, 170), 2, None),
    ("cuda_allocated", "CUDA allocated", (90, 190, 90), 2, None),
    ("cuda_reserved", "CUDA reserved", (90, 190, 90), 1, pg.QtCore.Qt.DashLine),
    ("cuda_peak", "CUDA peak (this run)", (220, 160, 60), 1, pg.QtCore.Qt.DotLine),
    ("device_used", "GPU used (all processes)", (200, 90, 90), 1, None),
)


def _curve(plot, name, colour, width=2, style=None):
    pen = pg.mkPen(colour, width=width) if style is None else pg.mkPen(colour, width=width, style=style)
    curve = plot.plot(name=name, pen=pen, connect="finite")  # NaN breaks the line between runs
    curve.setDownsampling(auto=True, method="peak")
    curve.setClipToView(True)
    return curve


class _Columns:
    """Growable float64 columns (amortised doubling): a session's readings are drawn at 25 Hz, and
    converting ever longer Python lists each frame would cost more as the session goes on."""

    def __init__(self, names: tuple[str, ...]):
        self.names = names
        self.length = 0
        self._data = np.empty((len(names), 1024))

    def append(self, values) -> None:
        if self.length == self._data.shape[1]:
            self._data = np.concatenate([self._data, np.empty_like(self._data)], axis=1)
        self._data[:, self.length] = values
        self.length += 1

    def __getitem__(self, name: str) -> np.ndarray:
        return self._data[self.names.index(name), :self.length]


class _Segment:
    """One load or one run on the timeline: its readings' phases become shaded bands."""

    def __init__(self, start: float):
        self.start = start
        self.end = start
        self.bands: list = []  # (phase, start, end, item)
        self.chunks = 0
        self.max_cache_bytes = 0


class MemoryView(LiveView):
    kinds = ("memory", "steps")

    def __init__(self, parent=None):
        super().__init__(parent)
        self.cache_plot = pg.PlotWidget(title="KV cache (MiB), exact, from the cache's tensors")
        self.system_plot = pg.PlotWidget(title="process memory (MiB)")
        self.system_plot.addLegend()
        self.system_plot.setXLink(self.cache_plot)
        self.system_plot.getViewBox().setAutoVisible(y=True)  # fit what is in view, not the whole session
        self.system_plot.setLabel("bottom", "seconds since the session's first reading")
        self.cache_curve = _curve(self.cache_plot, "KV cache", (80, 140, 220))
        # The host tier's bytes (kvstudio.core.storage.host): drawn once a run has any.
        self.host_curve = _curve(self.cache_plot, "host tier", (230, 150, 40), 2, pg.QtCore.Qt.DashLine)
        # Of the cache's bytes, the directions merged layers share (MiniCache): drawn once a run has any.
        self.shared_curve = _curve(self.cache_plot, "shared by merged layers", (40, 70, 140), 2, pg.QtCore.Qt.DotLine)
        # Its own legend: the cache curve always; the host tier and shared bytes while a run has them.
        self.cache_legend = self.cache_plot.addLegend()
        self.cache_legend.addItem(self.cache_curve, "KV cache")
        self.bursts = pg.ScatterPlotItem(symbol="t", size=11, brush=pg.mkBrush(230, 70, 70), pen=None,
                                         hoverable=True, tip="{data}".format)  # "step 12: 4,096 entries evicted"
        self.cache_plot.addItem(self.bursts)
        self.curves = {"process_bytes": _curve(self.system_plot, *SERIES[0][1:])}
        self.follow_latest = QCheckBox("follow the latest load or run")
        self.follow_latest.setChecked(True)
        self.clear_button = QPushButton("Clear")
        self.readout = QLabel("")
        self.readout.setWordWrap(True)  # its own line, wrapped: beside the controls it was cut at 1280 px
        controls = QHBoxLayout()
        controls.addWidget(self.follow_latest)
        controls.addWidget(self.clear_button)
        controls.addStretch(1)
        layout = QVBoxLayout(self)
        layout.setContentsMargins(4, 4, 4, 4)
        layout.addLayout(controls)
        layout.addWidget(self.readout)
        layout.addWidget(QLabel(LEGEND))
        layout.addWidget(self.cache_plot, 1)
        layout.addWidget(self.system_plot, 1)
        for plot in (self.cache_plot, self.system_plot):
            wheel_scrolls_page(plot)  # two plots fill the dock: the wheel over them must still scroll it
        self.clear_button.clicked.connect(self.clear)
        self.follow_latest.toggled.connect(lambda _: self._place_view())
        self.origin: float | None = None  # perf_counter of the session's first reading
        self.messages = [PlotMessage(plot) for plot in (self.cache_plot, self.system_plot)]
        self._redraw_pending = False
        self.clear()

    # -- following recorders: a run's, or a model load's ---------------------------------------------

    def follow(self, recorder) -> None:
        """A new run or load: keep what is drawn, start a new segment at its first reading."""
        super().follow(recorder)
        self.segment = None
        self.run_step_readings = []
        self.steps_evicted: dict[int, int] = {}
        self.burst_threshold = math.inf

    def refresh(self) -> None:
        # Loads have no RunStartedEvent; this view only needs readings and steps.
        if self.recorder is None:
            return
        runs, self._cursors["runs"] = self.recorder.since("runs", self._cursors["runs"])
        if runs:  # eviction bursts: more than two tokens' worth of entries (every layer and KV head)
            self.burst_threshold = 2 * runs[-1].n_layers * runs[-1].n_kv_heads
        self.consume_new()

    def clear(self) -> None:
        for item in getattr(self, "band_items", []):
            self.cache_plot.removeItem(item)
        self.band_items: list = []
        self.columns = _Columns(("x", "cache_bytes", "run_step", "host_cache_bytes", "shared_cache_bytes")
                                + tuple(field for field, *_ in SERIES))
        # Readings themselves are not kept (a session has tens of thousands): only the columns
        # drawn, the readings after each step of the current run (the tests compare them with its
        # steps), and the latest.
        self.run_step_readings: list = []
        self.last_reading = None
        self.burst_points: list[dict] = []
        self.segment = None
        self.steps_evicted = {}
        self.origin = None
        self.bursts.setData([])
        self._redraw()

    # -- reading -----------------------------------------------------------------------------------

    def consume(self, events) -> None:
        for step in events["steps"]:
            self.steps_evicted[step.step] = step.evicted
        for reading in events["memory"]:
            if self.origin is None:
                self.origin = reading.clock
            x = reading.clock - self.origin
            if self.segment is None:
                self._break_line()
                self.segment = _Segment(x)
            self._add(reading, x)
            self.segment.max_cache_bytes = max(self.segment.max_cache_bytes, reading.cache_bytes,
                                               reading.host_cache_bytes)
            self._mark_phase(reading, x)
            evicted = self.steps_evicted.get(reading.step, 0) if reading.source == "step" else 0
            if evicted > self.burst_threshold:
                self.burst_points.append({"pos": (x, reading.cache_bytes / MIB),
                                          "data": f"step {reading.step}: {evicted:,} entries evicted"})
        self._redraw_soon()

    def _redraw_soon(self) -> None:
        if self.held_back(REDRAW_INTERVAL_S):
            self._redraw_pending = True
        else:
            self._redraw()

    def flush(self) -> None:
        if self._redraw_pending:
            self._redraw()

    def _add(self, reading, x: float) -> None:
        self.last_reading = reading
        if reading.source == "step" and reading.phase != "load":
            self.run_step_readings.append(reading)
        run_step = float(reading.source == "step" and reading.phase != "load")
        self.columns.append([x, reading.cache_bytes, run_step, reading.host_cache_bytes, reading.shared_cache_bytes]
                            + [getattr(reading, field) for field, *_ in SERIES])

    def _break_line(self) -> None:
        if self.columns.length:
            self.columns.append([math.nan] * len(self.columns.names))

    def _mark_phase(self, reading, x: float) -> None:
        """Grow the current band, or start the next: a load, a prefill chunk, decoding."""
        segment = self.segment
        segment.end = x
        bands = segment.bands
        if reading.phase == "prefill":
            if not bands or bands[-1][0] != "prefill" or bands[-1][3]:
                segment.chunks += 1
                self._new_band(segment, "prefill", bands[-1][2] if bands else segment.start)
            bands[-1][2] = x
            if reading.source == "step":  # this chunk is done: the next reading starts the next one
                bands[-1][3] = True
        else:
            if not bands or bands[-1][0] != reading.phase:
                self._new_band(segment, reading.phase, bands[-1][2] if bands else segment.start)
            bands[-1][2] = x
        band = bands[-1]
        band[4].setRegion((band[1], band[2]))

    def _new_band(self, segment: _Segment, phase: str, start: float) -> None:
        brush = PHASE_BRUSHES[phase]
        if phase == "prefill":
            brush = brush[(segment.chunks - 1) % 2]
        item = pg.LinearRegionItem((start, start), movable=False, brush=pg.mkBrush(brush), pen=pg.mkPen(None))
        item.setZValue(-10)
        item.setToolTip(f"prefill chunk {segment.chunks}" if phase == "prefill" else phase)
        self.cache_plot.addItem(item)
        self.band_items.append(item)
        segment.bands.append([phase, start, start, False, item])

    # -- drawing -----------------------------------------------------------------------------------

    def _redraw(self) -> None:
        self._redraw_pending = False
        self.note_drawn()
        for message in self.messages:  # nothing read yet: words, not axes around nothing
            if self.columns.length:
                message.hide()
            else:
                message.show("no memory readings yet:\nthey start with a model load or a run")
        x = self.columns["x"]
        self.cache_curve.setData(x, self.columns["cache_bytes"] / MIB)
        host = self.columns["host_cache_bytes"]
        self.host_curve.setData(x if np.nansum(host) else [], host / MIB if np.nansum(host) else [])
        shared = self.columns["shared_cache_bytes"]
        self.shared_curve.setData(x if np.nansum(shared) else [], shared / MIB if np.nansum(shared) else [])
        for curve, values in ((self.host_curve, host), (self.shared_curve, shared)):
            _in_legend(self.cache_legend, curve, bool(np.nansum(values)))
        for field, name, colour, width, style in SERIES:
            values = self.columns[field]
            if field not in self.curves:
                if not np.nansum(values):
                    continue  # no CUDA: no CUDA curves
                self.curves[field] = _curve(self.system_plot, name, colour, width, style)
                self.system_plot.setTitle("process, CUDA and GPU memory (MiB)")
            self.curves[field].setData(x, values / MIB)
        self.bursts.setData(self.burst_points)
        self._place_view()
        self._show_readout()

    def _place_view(self) -> None:
        if self.follow_latest.isChecked() and self.segment is not None:
            segment = self.segment
            self.cache_plot.setXRange(segment.start, max(segment.end, segment.start + 1e-3), padding=0.02)
            self.cache_plot.setYRange(0, segment.max_cache_bytes / MIB * 1.15 or 1, padding=0)

    def _show_readout(self) -> None:
        last = self.last_reading
        if last is None:
            self.readout.setText("")
            return
        parts = [f"cache {format_bytes(last.cache_bytes)}", f"process {format_bytes(last.process_bytes)}"]
        if last.host_cache_bytes:
            parts.insert(1, f"host tier {format_bytes(last.host_cache_bytes)}")
        if last.shared_cache_bytes:  # the dotted curve: directions merged layers share (MiniCache)
            parts.insert(1, f"of which shared by merged layers (dotted) {format_bytes(last.shared_cache_bytes)}")
        if last.device_total:
            parts += [f"CUDA {format_bytes(last.cuda_allocated)} (peak {format_bytes(last.cuda_peak)})",
                      f"GPU {format_bytes(last.device_used)} of {format_bytes(last.device_total)}"]
        self.readout.setText(" · ".join(parts))

    def step_readings(self) -> list:
        """The readings right after each step of the run followed (the tests compare them with its steps)."""
        return self.run_step_readings


def _in_legend(legend, curve, shown: bool) -> None:
    """Show `curve` in `legend` (under its name) exactly while it is drawn."""
    listed = any(sample.item is curve for sample, _ in legend.items)
    if shown and not listed:
        legend.addItem(curve, curve.name())
    elif listed and not shown:
        legend.removeItem(curve)
