"""The Runs view: the run history, to browse, filter, reopen a run's views, compare two runs, export
and delete."""

from __future__ import annotations

import html
from pathlib import Path

from PySide6.QtCore import Qt, Signal, Slot
from PySide6.QtGui import QColor
from PySide6.QtWidgets import (QAbstractItemView, QFileDialog, QLabel, QLineEdit, QPushButton,
                               QScrollArea, QTableWidget, QTableWidgetItem, QVBoxLayout, QWidget)

from kvstudio.core.errors import KVStudioError
from kvstudio.core.persist.exports import export_run
from kvstudio.core.persist.run_book import RunBook
from kvstudio.core.persist.provenance import environment, rerun_command
from kvstudio.core.recording.packing import unpack_events
from kvstudio.core.spec import CacheSpec
from kvstudio.gui.feature import Feature
from kvstudio.gui.widgets.flow_layout import FlowLayout
from kvstudio.gui.features.run_summary import budget_text, parameters_text

COLUMNS = ("id", "when (UTC)", "status", "model", "policy", "budget", "parameters", "tokens/s", "peak MiB",
           "evictions", "prompt", "output")
FIGURES = (("tokens/s", "tokens_per_second", "{:.1f}"), ("peak cache MiB", "peak_cache_bytes", None),
           ("evictions", "evictions", "{}"), ("left the window", "left_window", "{}"),
           ("prompt tokens", "prompt_tokens", "{}"),
           ("prefill s", "prefill_seconds", "{:.2f}"), ("stop", "stop_reason", "{}"))


class RunsView(QWidget):
    export_requested = Signal(int)  # run id
    open_requested = Signal(int)  # run id: show its stored events in the live views

    def __init__(self, parent=None):
        super().__init__(parent)
        self.history = None
        self.search = QLineEdit(placeholderText="filter: text in the prompt or output, or policy=NAME (h2o, h2o-int8)")
        self.refresh_button = QPushButton("Refresh")
        self.open_button = QPushButton("Open views")
        self.open_button.setToolTip("show the run in the token map, evictions, occupancy, memory and attention "
                                    "views, as it was recorded (double-click a row does the same)")
        self.compare_button = QPushButton("Compare two")
        self.export_button = QPushButton("Export…")
        self.delete_button = QPushButton("Delete")
        self.table = QTableWidget(0, len(COLUMNS))
        self.table.setHorizontalHeaderLabels(COLUMNS)
        self.table.setSelectionBehavior(QAbstractItemView.SelectRows)
        self.table.setEditTriggers(QAbstractItemView.NoEditTriggers)
        self.table.horizontalHeader().setStretchLastSection(True)
        self.table.verticalHeader().hide()  # the id column numbers the rows
        self.comparison = QLabel("")
        self.comparison.setTextFormat(Qt.RichText)
        self.comparison.setWordWrap(True)
        self.comparison.setAlignment(Qt.AlignTop | Qt.AlignLeft)
        self.comparison.setTextInteractionFlags(Qt.TextSelectableByMouse)
        comparison_scroll = QScrollArea(widgetResizable=True)  # two long outputs stay inside the view
        comparison_scroll.setWidget(self.comparison)
        self.status = QLabel("")
        self.status.setWordWrap(True)  # it names the history file: a long path wraps instead of widening the view
        controls = self.controls = FlowLayout()  # other features add row actions (figure export); wraps when narrow
        controls.addWidget(self.search)
        for button in (self.refresh_button, self.open_button, self.compare_button, self.export_button,
                       self.delete_button):
            controls.addWidget(button)
        layout = QVBoxLayout(self)
        layout.addLayout(controls)
        layout.addWidget(self.table, 3)
        layout.addWidget(comparison_scroll, 2)
        layout.addWidget(self.status)
        self.search.returnPressed.connect(self.refresh)
        self.refresh_button.clicked.connect(self.refresh)
        self.compare_button.clicked.connect(self.compare_selected)
        self.delete_button.clicked.connect(self.delete_selected)
        self.export_button.clicked.connect(lambda: [self.export_requested.emit(i) for i in self.selected_ids()[:1]])
        self.open_button.clicked.connect(lambda: [self.open_requested.emit(i) for i in self.selected_ids()[:1]])
        self.table.cellDoubleClicked.connect(lambda row, _: self.open_requested.emit(self._run_id(row)))

    def set_history(self, history) -> None:
        self.history = history
        self.refresh()

    def refresh(self) -> None:
        if self.history is None:
            self.table.setRowCount(0)
            self.status.setText("run history is off (see the message above)")
            return
        query = self.search.text().strip()
        policy = query.removeprefix("policy=") if query.startswith("policy=") else None
        records = self.history.list(policy=policy, text=None if policy else (query or None), limit=500)
        self.table.setRowCount(len(records))
        for row, record in enumerate(records):
            figures = record.figures
            cells = (str(record.id), record.created.replace("T", " ")[:19], record.shown_status, record.model,
                     record.cache, budget_text(record.parameters),
                     parameters_text(record.parameters) or "defaults",
                     _figure(figures, "tokens_per_second", "{:.1f}"),
                     _figure(figures, "peak_cache_bytes", None), _evictions_text(figures),
                     record.prompt_preview.replace("\n", " "), record.output.replace("\n", " "))
            for column, value in enumerate(cells):
                self.table.setItem(row, column, QTableWidgetItem(value))
            _mark_status(self.table.item(row, 2), record)
            self.table.item(row, 6).setToolTip(_settings_tip(record))
        self.table.resizeColumnsToContents()  # then the long text columns get what is left
        for column in (COLUMNS.index("prompt"), COLUMNS.index("output")):
            self.table.setColumnWidth(column, min(self.table.columnWidth(column), 320))
        self.status.setText(f"{len(records)} run(s) in {self.history.path}")

    def selected_ids(self) -> list[int]:
        rows = sorted({index.row() for index in self.table.selectionModel().selectedRows()})
        return [self._run_id(row) for row in rows]

    def _run_id(self, row: int) -> int:
        return int(self.table.item(row, 0).text())

    def compare_selected(self) -> None:
        ids = self.selected_ids()
        if len(ids) != 2:
            self.status.setText("select exactly two runs to compare")
            return
        first, second = (self.history.get(i) for i in ids)
        rows = [("model", first.model, second.model), ("status", first.shown_status, second.shown_status),
                ("budget", budget_text(first.parameters), budget_text(second.parameters)),
                ("parameters", parameters_text(first.parameters) or "defaults",
                 parameters_text(second.parameters) or "defaults"),
                *((label, _figure(first.figures, key, pattern), _figure(second.figures, key, pattern))
                  for label, key, pattern in FIGURES),
                ("output", first.output, second.output)]
        lines = [f"<tr><th></th><th align=left>run {first.id}: {first.cache}</th>"
                 f"<th align=left>run {second.id}: {second.cache}</th></tr>"]
        for label, a, b in rows:
            differs = " style='color:#e0b040'" if a != b and label != "output" else ""
            lines.append(f"<tr><td><b>{label}</b></td><td{differs}>{_html(a)}</td><td{differs}>{_html(b)}</td></tr>")
        same = "same prompt" if first.prompt_sha256 == second.prompt_sha256 else "different prompts"
        self.comparison.setText(f"<table cellspacing=6 width=100%>{''.join(lines)}</table><i>{same}</i>")

    def delete_selected(self) -> None:
        for run_id in self.selected_ids():
            self.history.delete(run_id)
        self.refresh()


# How a run ended (core/runtime/interruptions.py): the colour and the words a hover shows.
STATUS_MEANINGS = {
    "finished": (None, "ran to its end"),
    "cancelled": ("#b08800", "stopped by the user (Stop, Ctrl-C) or by the reader of its output; what it had "
                             "produced is kept"),
    "interrupted": ("#c05000", "stopped by the system (SIGTERM) or a crash before it could finish"),
    "failed": ("#d33", "ended by an error"),
}


def _mark_status(item: QTableWidgetItem, record) -> None:
    colour, meaning = STATUS_MEANINGS.get(record.shown_status, (None, ""))
    if colour:
        item.setForeground(QColor(colour))
    item.setToolTip(meaning + (f": {record.error}" if record.error else ""))


def _settings_tip(record) -> str:
    """Every parameter and generation setting of a run, for the hover on its parameters cell."""
    lines = [f"{name}: {value}" for name, value in record.parameters.items()]
    lines += [f"{name}: {value}" for name, value in record.settings.items() if value not in (None, [], ())]
    return "\n".join(lines)


def _html(text: str) -> str:
    return html.escape(text).replace("\n", "<br>")


def _evictions_text(figures: dict) -> str:
    """The policy's evictions, and apart from them the entries that left sliding windows."""
    text = _figure(figures, "evictions", "{}")
    return text + (f" (+{figures['left_window']} left the window)" if figures.get("left_window") else "")


def _figure(figures: dict, key: str, pattern: str | None) -> str:
    if key not in figures or figures[key] is None:
        return ""
    if pattern is None:  # bytes
        return f"{figures[key] / 2**20:.2f}"
    return pattern.format(figures[key])


class RunsFeature(Feature):
    """The Runs dock and the run history's side of a run: a row when it starts, its figures and
    events when it ends, and reopening a stored run in the live views."""

    def __init__(self, window):
        super().__init__(window)
        self.view = RunsView()
        self.openers: dict[str, object] = {}  # record kind -> how to open it (fine-tune sessions, ...)
        self.shown_run_title = ""  # "run 12" while a stored run is shown: figure captions name it
        self.shown_run_id: int | None = None  # ... and its row, which File > Export writes

    def install(self) -> None:
        window = self.window
        window.add_dock("Runs", self.view, "views")
        self.view.set_history(window.history)
        self.view.export_requested.connect(self._export_stored_run)
        self.view.open_requested.connect(self.open)
        window.run.run_ended.connect(self.record_finish)

    def add_button(self, button) -> None:
        """Another feature's button among the view's controls, before the last (figures of the selected runs)."""
        controls = self.view.controls
        controls.insertWidget(controls.count() - 1, button)

    def add_opener(self, kind: str, open_run) -> None:
        """Rows of this kind open with `open_run(run_id)` instead of in the live views."""
        self.openers[kind] = open_run

    def history_changed(self) -> None:
        """Rows were written to the history (a run ended, a sweep's cells, a fine-tune session): show them."""
        self.view.set_history(self.window.history)

    def record_start(self, request) -> None:
        """A row for the run starting now; its id goes into the request."""
        window = self.window
        if window.history is None:
            return
        info, cache = window.state.model_info, CacheSpec.parse(request.policy, request.parameters)
        settings = request.settings.record() | ({"batch": request.batch} if request.batch else {})
        # The studio has no command line: the row keeps the `kvstudio run` command that does the same.
        command = rerun_command(info.spec, *cache.record(), settings, request.prompt, adapter=info.adapter_folder or None)
        request.book = RunBook(window.history, model=info.identity, cache=cache, prompt=request.prompt,
                               settings=settings, recorder=request.recorder, on_warning=self._history_failed,
                               provenance=environment(info.device, info.dtype or None, command=command))
        request.history_id = request.book.start()

    def record_finish(self, outcome) -> None:
        book = outcome.request.book
        if book is None:
            return
        if outcome.result is not None:
            book.finish(outcome.result, error=outcome.error, events=outcome.events)
        else:
            book.fail(outcome.error or "failed", events=outcome.events)
        self.history_changed()

    def _history_failed(self, message: str) -> None:
        self.window.history = None
        self.window.show_error(message)

    @Slot(int)
    def open(self, run_id: int) -> None:
        """"Open views" on a row: by its kind's opener, else in the live views."""
        history = self.window.history
        record = history.get(run_id) if history is not None else None
        opener = self.openers.get(record.kind) if record is not None else None
        (opener or self.reopen)(run_id)

    def reopen(self, run_id: int) -> None:
        """Show a stored run in the live views, as its events were recorded."""
        window = self.window
        if window.state.busy:
            window.show_error("a run is in progress: stop it first, then open the stored run")
            return
        blob = window.history.events(run_id) if window.history is not None else None
        if blob is None:
            window.show_error(f"run {run_id} has no stored views: it ran before KV Studio kept them, or failed "
                              "before its first step")
            return
        try:
            recorder = unpack_events(blob)
        except KVStudioError as error:
            window.show_error(f"run {run_id}: {error}")
            return
        started = recorder.all("runs")
        if not started:
            window.show_error(f"run {run_id} has no stored views: it stopped before its first step")
            return
        run = started[-1]
        window.hide_error()
        window.state.recorder = recorder
        last = window.state.last_outcome
        if last is not None and last.stored():
            last.forget_recording()  # runs past the shown one live on disk: 35 runs once took 1.9 GiB
        self.shown_run_title = f"run {run_id}"
        self.shown_run_id = run_id
        window.views.show_stored_run(recorder, run)
        window.statusBar().showMessage(f"showing run {run_id} from the history: {run.model}, {run.policy}")

    def _export_stored_run(self, run_id: int) -> None:
        path, _ = QFileDialog.getSaveFileName(self.window, "Export run", f"run-{run_id}.json",
                                              "JSON or CSV (*.json *.csv)")
        if path:
            blob = self.window.history.events(run_id)  # JSON carries the recording: re-plot from the file alone
            self.window.exports.report(export_run, self.window.history.get(run_id), Path(path),
                                       unpack_events(blob) if blob is not None else None)
