"""The memory snapshot viewer: a snapshot's allocation timeline, drawn here, offline.

Top: bytes allocated over the recording, with the run's phases marked (each prefill chunk's end,
the first decode step). Below: the largest allocations as bars from when they were made to when
they were freed, one lane each, labelled with their size and the frame that made them. The table
lists them; choosing a row shows its whole stack.

A snapshot file is a pickle. It is opened only when the user asks, after a warning bar says so;
the loader itself (core.snapshots) refuses anything but plain data.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyqtgraph as pg
from PySide6.QtCore import Qt, Signal
from PySide6.QtWidgets import (QAbstractItemView, QComboBox, QFileDialog, QHBoxLayout, QLabel, QPlainTextEdit,
                               QPushButton, QSplitter, QTableWidget, QTableWidgetItem, QVBoxLayout, QWidget)

from kvstudio.core.io.atomic import check_writable_folder
from kvstudio.core.errors import KVStudioError
from kvstudio.core.recording.snapshots import SnapshotError, format_frame, load_snapshot, timelines
from kvstudio.core.units import format_bytes
from kvstudio.gui.widgets.bars import message_bar
from kvstudio.gui.feature import Feature

LARGEST = 15
BAR_COLOUR = (80, 140, 220, 170)
CHOSEN_COLOUR = (240, 180, 60, 230)
PICKLE_WARNING = ("Memory snapshots are Python pickle files. KV Studio reads them with a loader that refuses "
                  "anything but plain data, but open only files you trust.")


class SnapshotView(QWidget):
    record_requested = Signal()  # "record the next run": the window asks where and arms it

    def __init__(self, parent=None):
        super().__init__(parent)
        self.snapshot: dict | None = None
        self.timelines = []
        self.timeline = None
        self.shown = []  # the allocations drawn as bars, largest first
        self.source_name = ""

        self.open_button = QPushButton("Open snapshot…")
        self.record_button = QPushButton("Record the next run…")
        self.device = QComboBox()
        self.device.hide()
        self.summary = QLabel("No snapshot open. Record one here or with `kvstudio run … --memory-snapshot FILE`.")
        self.summary.setWordWrap(True)
        self.summary.setTextInteractionFlags(Qt.TextSelectableByMouse)

        self.warning_text = QLabel(PICKLE_WARNING)
        self.choose_button = QPushButton("I trust it: choose the file…")
        self.dismiss_button = QPushButton("Cancel")
        self.warning_bar = message_bar("warning", self.warning_text, self.choose_button, self.dismiss_button)

        self.total_plot = pg.PlotWidget(title="allocated (MiB)")
        self.total_curve = self.total_plot.plot(pen=pg.mkPen((80, 140, 220), width=2), stepMode=None)
        self.total_curve.setDownsampling(auto=True, method="peak")
        self.total_curve.setClipToView(True)
        self.bars_plot = pg.PlotWidget(title=f"the {LARGEST} largest allocations")
        self.bars_plot.setXLink(self.total_plot)
        self.bars_plot.getAxis("left").setTicks([[]])
        self.bars_plot.invertY(True)
        self.mark_lines: list = []
        self.bar_items: list = []
        self.bar_labels: list = []

        self.table = QTableWidget(0, 5)
        self.table.setHorizontalHeaderLabels(("size", "made at", "freed at", "lifetime", "made by"))
        self.table.setSelectionBehavior(QAbstractItemView.SelectRows)
        self.table.setSelectionMode(QAbstractItemView.SingleSelection)
        self.table.setEditTriggers(QAbstractItemView.NoEditTriggers)
        self.table.horizontalHeader().setStretchLastSection(True)
        self.stack = QPlainTextEdit(readOnly=True)
        self.stack.setPlaceholderText("choose an allocation to see the frames that made it")

        controls = QHBoxLayout()
        controls.addWidget(self.open_button)
        controls.addWidget(self.record_button)
        controls.addWidget(self.device)
        controls.addStretch(1)
        plots = QSplitter(Qt.Vertical)
        plots.addWidget(self.total_plot)
        plots.addWidget(self.bars_plot)
        details = QSplitter(Qt.Horizontal)
        details.addWidget(self.table)
        details.addWidget(self.stack)
        details.setSizes([600, 400])
        plots.addWidget(details)
        plots.setSizes([250, 350, 200])
        layout = QVBoxLayout(self)
        layout.setContentsMargins(4, 4, 4, 4)
        layout.addLayout(controls)
        layout.addWidget(self.warning_bar)
        layout.addWidget(self.summary)
        layout.addWidget(plots, 1)

        self.open_button.clicked.connect(self.warning_bar.show)
        self.dismiss_button.clicked.connect(self.warning_bar.hide)
        self.choose_button.clicked.connect(self._choose_file)
        self.record_button.clicked.connect(self.record_requested)
        self.device.currentIndexChanged.connect(self._device_chosen)
        self.table.itemSelectionChanged.connect(self._allocation_chosen)

    # -- opening -----------------------------------------------------------------------------------

    def _choose_file(self) -> None:
        self.warning_bar.hide()
        path, _ = QFileDialog.getOpenFileName(self, "Open memory snapshot", "",
                                              "Memory snapshots (*.pickle *.pkl);;All files (*)")
        if path:
            self.open_path(Path(path))

    def open_path(self, path: Path) -> bool:
        """Read a snapshot file the user chose; a file that is not one leaves the view as it was."""
        try:
            snapshot = load_snapshot(path)
        except SnapshotError as error:
            self.summary.setText(f"<span style='color:#e66'>{error}</span>")
            return False
        self.show_snapshot(snapshot, path.name)
        return True

    def show_snapshot(self, snapshot: dict, name: str) -> None:
        self.snapshot, self.source_name = snapshot, name
        self.timelines = timelines(snapshot)
        self.device.blockSignals(True)
        self.device.clear()
        for timeline in self.timelines:
            self.device.addItem(_device_name(snapshot, timeline.device))
        self.device.blockSignals(False)
        self.device.setVisible(len(self.timelines) > 1)
        if not self.timelines:
            self.timeline = None
            self._clear_drawing()
            self.summary.setText(f"{name}: a memory snapshot with no allocation events (was recording on?)")
            return
        self._device_chosen(0)

    # -- drawing -----------------------------------------------------------------------------------

    def _device_chosen(self, index: int) -> None:
        if not 0 <= index < len(self.timelines):
            return
        self.timeline = timeline = self.timelines[index]
        self._clear_drawing()
        unit = "s" if timeline.has_times else "event"
        x_label = "seconds since recording started" if timeline.has_times else "event number (no times recorded)"
        for plot in (self.total_plot, self.bars_plot):
            plot.setLabel("bottom", x_label)
        self.total_curve.setData(np.asarray(timeline.times), np.asarray(timeline.active_bytes) / 2**20)
        for index, (moment, label) in enumerate(timeline.marks):
            for plot in (self.total_plot, self.bars_plot):
                # Labels alternate between two heights: marks close in time stay readable.
                line = pg.InfiniteLine(moment, angle=90, pen=pg.mkPen((200, 200, 60), style=Qt.DotLine),
                                       label=label if plot is self.total_plot else None,
                                       labelOpts={"position": 0.92 if index % 2 == 0 else 0.78,
                                                  "color": (220, 220, 120)})
                plot.addItem(line)
                self.mark_lines.append((plot, line))
        self.shown = timeline.largest(LARGEST)
        end = timeline.duration
        for lane, allocation in enumerate(self.shown):
            finish = allocation.end if allocation.end is not None else end
            width = max(finish - allocation.start, end / 2000 or 1e-9)
            bar = pg.BarGraphItem(x0=[allocation.start], width=[width], y0=[lane + 0.1], height=[0.8],
                                  brush=pg.mkBrush(BAR_COLOUR), pen=pg.mkPen(None))
            text = pg.TextItem(f"{format_bytes(allocation.size)} · {allocation.label}", color=(230, 230, 230),
                               anchor=(0, 0.5))
            text.setPos(allocation.start, lane + 0.5)
            self.bars_plot.addItem(bar)
            self.bars_plot.addItem(text)
            self.bar_items.append(bar)
            self.bar_labels.append(text)
        self.bars_plot.setYRange(0, max(len(self.shown), 1), padding=0.02)
        self._fill_table(unit)
        freed = sum(1 for a in timeline.allocations if a.end is not None)
        self.summary.setText(
            f"<b>{self.source_name}</b> · {_device_name(self.snapshot, timeline.device)} · "
            f"{len(timeline.allocations):,} allocations ({freed:,} freed) · peak {format_bytes(timeline.peak_bytes)} "
            f"allocated · {timeline.duration:.3g} {unit}"
            + (f" · {format_bytes(timeline.baseline_bytes)} made before recording" if timeline.baseline_bytes else ""))

    def _fill_table(self, unit: str) -> None:
        self.table.setRowCount(len(self.shown))
        for row, allocation in enumerate(self.shown):
            freed = "still held" if allocation.end is None else f"{allocation.end:.4g} {unit}"
            lifetime = "" if allocation.end is None else f"{allocation.end - allocation.start:.4g} {unit}"
            for column, value in enumerate((format_bytes(allocation.size), f"{allocation.start:.4g} {unit}", freed,
                                            lifetime, allocation.label)):
                self.table.setItem(row, column, QTableWidgetItem(value))
        self.stack.clear()

    def _allocation_chosen(self) -> None:
        rows = self.table.selectionModel().selectedRows()
        chosen = rows[0].row() if rows else -1
        for lane, bar in enumerate(self.bar_items):
            bar.setOpts(brush=pg.mkBrush(CHOSEN_COLOUR if lane == chosen else BAR_COLOUR))
        if chosen < 0:
            return
        allocation = self.shown[chosen]
        frames = allocation.frames or [{"filename": "??", "name": "(no frames recorded)"}]
        self.stack.setPlainText(f"{allocation.size:,} bytes at 0x{allocation.address:x}, innermost frame first:\n"
                                + "\n".join(format_frame(frame) for frame in frames))

    def _clear_drawing(self) -> None:
        self.total_curve.setData([], [])
        for plot, line in self.mark_lines:
            plot.removeItem(line)
        for item in self.bar_items + self.bar_labels:
            self.bars_plot.removeItem(item)
        self.mark_lines, self.bar_items, self.bar_labels, self.shown = [], [], [], []
        self.table.setRowCount(0)
        self.stack.clear()


def _device_name(snapshot: dict, index: int) -> str:
    recorded = snapshot.get("kvstudio", {}).get("device")
    if recorded == "cpu":
        return "CPU (recorded by the profiler)"
    return f"cuda:{index}"


class SnapshotFeature(Feature):
    """The Memory snapshot dock and the Memory menu: arm a recording of the next run, open a file,
    show the snapshot a run (or a fine-tune session) wrote."""

    def __init__(self, window):
        super().__init__(window)
        self.view = SnapshotView()
        self.armed_path: str | None = None  # where the next run's memory snapshot goes, when armed

    def install(self) -> None:
        window = self.window
        window.add_dock("Memory snapshot", self.view, "views")
        self.view.record_requested.connect(lambda: self.arm())
        memory = window.menu("&Memory")
        memory.addAction("Record a memory snapshot of the next run…", lambda: self.arm())
        memory.addAction("Open memory snapshot…", self.offer_file)
        window.run.run_ended.connect(self._run_ended)

    def arm(self, path: str | None = None) -> None:
        """Record the next run's allocations into `path` (asked for when not given)."""
        window = self.window
        if path is None:
            path, _ = QFileDialog.getSaveFileName(window, "Record a memory snapshot of the next run",
                                                  "memory-snapshot.pickle", "Memory snapshots (*.pickle)")
            if not path:
                return
        try:
            check_writable_folder(path)
        except KVStudioError as error:
            window.show_error(f"no memory snapshot: {error}")
            return
        self.armed_path = path
        device = window.state.model_info.device if window.state.model_info is not None else ""
        slower = " (on CPU the profiler makes the run several times slower)" if "cpu" in device else ""
        window.statusBar().showMessage(f"the next run will be recorded into {path}{slower}")
        self.view.summary.setText(f"The next run will be recorded into {path}{slower}.")

    def take_armed_path(self) -> str | None:
        """The armed path for the run starting now; a snapshot is of one run."""
        path, self.armed_path = self.armed_path, None
        return path

    def offer_file(self) -> None:
        """Opening a snapshot starts with the view's warning bar: the file is a pickle."""
        dock = self.window.docks["Memory snapshot"]
        dock.show()
        dock.raise_()
        self.view.warning_bar.show()

    def show_written(self, snapshot: dict, path: str) -> None:
        """A snapshot a run or session wrote to `path`: show it and bring its dock forward."""
        self.view.show_snapshot(snapshot, Path(path).name)
        self.window.docks["Memory snapshot"].raise_()

    def _run_ended(self, outcome) -> None:
        window = self.window
        if outcome.snapshot_error:
            window.show_error(outcome.snapshot_error)
        if outcome.snapshot is not None:
            path = outcome.request.snapshot_path
            self.show_written(outcome.snapshot, path)
            window.statusBar().showMessage(f"{window.statusBar().currentMessage()} · memory snapshot saved to {path}")
