"""Figures for papers from the studio: any view of the shown run (live or reopened) or of any stored run,
as PNG (a chosen width and DPI), SVG, PDF, or the token map as HTML, each with its caption line.

The figure is drawn by kvstudio.core.figures from the run's recording, the same code as
`kvstudio runs plot`, so the studio and the command line give the same figure for the same run.
The dialog starts from what the views show now (layer, head, scale).
"""

from __future__ import annotations

from pathlib import Path

from PySide6.QtWidgets import (QCheckBox, QComboBox, QDialog, QDialogButtonBox, QFileDialog, QFormLayout,
                               QPushButton, QSpinBox)

from kvstudio.core.errors import KVStudioError
from kvstudio.core.figures.render import DEFAULT_DPI, VIEWS, FigureRequest, save_view
from kvstudio.core.recording.packing import unpack_events
from kvstudio.gui.feature import Feature

FILE_FILTER = "Figures (*.png *.svg *.pdf *.html)"


class FigureDialog(QDialog):
    """What to draw: the view, its layer and head, log scale, and the PNG's width and DPI."""

    def __init__(self, parent, n_layers: int, n_heads: int, defaults: FigureRequest):
        super().__init__(parent)
        self.setWindowTitle("Export figure")
        self.view = QComboBox()
        self.view.addItems(VIEWS)
        self.view.setCurrentText(defaults.view)
        self.layer = QComboBox()
        self.layer.addItem("all layers (token map) / first recorded")
        self.layer.addItems([f"layer {i}" for i in range(n_layers)])
        self.layer.setCurrentIndex(0 if defaults.layer is None else defaults.layer + 1)
        self.head = QComboBox()
        self.head.addItem("mean over heads")
        self.head.addItems([f"head {h}" for h in range(n_heads)])
        self.head.setCurrentIndex(0 if defaults.head is None else defaults.head + 1)
        self.log = QCheckBox("attention by log weight")
        self.log.setChecked(defaults.log_scale)
        self.width = QSpinBox(minimum=0, maximum=20_000, value=defaults.width_px or 0, suffix=" px",
                              specialValueText="default (8 in at the DPI)")
        self.dpi = QSpinBox(minimum=20, maximum=1200, value=defaults.dpi)
        form = QFormLayout(self)
        for label, widget in (("view", self.view), ("layer", self.layer), ("head", self.head), ("", self.log),
                              ("PNG width", self.width), ("DPI", self.dpi)):
            form.addRow(label, widget)
        buttons = QDialogButtonBox(QDialogButtonBox.Ok | QDialogButtonBox.Cancel)
        buttons.accepted.connect(self.accept)
        buttons.rejected.connect(self.reject)
        form.addRow(buttons)

    def request(self, title: str) -> FigureRequest:
        layer = self.layer.currentIndex() - 1
        head = self.head.currentIndex() - 1
        return FigureRequest(self.view.currentText(), layer if layer >= 0 else None, head if head >= 0 else None,
                             self.width.value() or None, self.dpi.value(), self.log.isChecked(), title)


class FiguresFeature(Feature):
    def install(self) -> None:
        window = self.window
        window.menu("&File").addAction("Export figure of the shown run (PNG, SVG, PDF, HTML)…",
                                       self.ask_for_shown_run)
        self.runs_button = QPushButton("Figure…")
        self.runs_button.setToolTip("export a view of the selected run as PNG, SVG, PDF (token map: HTML too), "
                                    "with a caption; the same figure `kvstudio runs plot` draws")
        window.runs.add_button(self.runs_button)
        self.runs_button.clicked.connect(self.ask_for_selected_run)

    # -- what the views show now: the dialog's defaults ---------------------------------------------------

    def current_request(self, view: str = "token-map") -> FigureRequest:
        views = self.window.views
        attention = views.attention_view
        layer = {"token-map": views.token_view.chosen_layer(), "attention": attention.layer.value(),
                 "evictions": views.evictions_view.layer.value()}.get(view)
        head = attention.head.currentIndex() - 1
        return FigureRequest(view, layer, head if head >= 0 and view == "attention" else None,
                             log_scale=attention.scale.currentText() == "log", dpi=DEFAULT_DPI)

    def shown_title(self) -> str:
        outcome = self.window.state.last_outcome
        current = outcome is not None and outcome.request.recorder is self.window.state.recorder
        if current and outcome.request.history_id:
            return f"run {outcome.request.history_id}"
        return self.window.runs.shown_run_title if self.window.views.showing_stored_run else ""

    # -- exporting ------------------------------------------------------------------------------------------

    def export_figure(self, recorder, request: FigureRequest, path: Path) -> Path | None:
        """Write the figure, or say why not (a view without data, a layer not recorded) in the banner."""
        return self.window.exports.report(save_view, recorder, request, Path(path))

    def ask_for_shown_run(self) -> None:
        recorder = self.window.state.recorder
        if recorder is None or not recorder.all("runs"):
            self.window.show_error("no run is shown: run something, or open one from the Runs view")
            return
        self._ask(recorder, self.shown_title())

    def ask_for_selected_run(self) -> None:
        window = self.window
        ids = window.runs.view.selected_ids()
        if not ids or window.history is None:
            window.show_error("select a run in the Runs view first")
            return
        blob = window.history.events(ids[0])
        try:
            if blob is None:
                raise KVStudioError("it has no recorded views (it ran before KV Studio kept them, or failed early)")
            recorder = unpack_events(blob)
        except KVStudioError as error:
            window.show_error(f"no figure of run {ids[0]}: {error}")
            return
        self._ask(recorder, f"run {ids[0]}")

    def _ask(self, recorder, title: str) -> None:
        run = recorder.all("runs")[-1]
        dialog = FigureDialog(self.window, run.n_layers, run.n_heads or run.n_kv_heads, self.current_request())
        if dialog.exec() != QDialog.Accepted:
            return
        request = dialog.request(title)
        suggested = f"{title.replace(' ', '-') or 'run'}-{request.view}.png"
        path, _ = QFileDialog.getSaveFileName(self.window, "Export figure", suggested, FILE_FILTER)
        if path:
            self.export_figure(recorder, request, Path(path))
