"""Exports from the File menu: the run on screen (the last one, or a stored run reopened from the Runs
view; JSON with its recording, per-step CSV), the attention map
(.npy), and any plot as it looks on screen (PNG, SVG, PDF: kvstudio.gui.widgets.plot_files). Figures of a run
for a paper are kvstudio.gui.features.figure_export's. Every export is written atomically: a failed one leaves
the previous file intact."""

from __future__ import annotations

from pathlib import Path

from PySide6.QtWidgets import QFileDialog

from kvstudio.core.io.atomic import atomic_produce
from kvstudio.core.errors import KVStudioError
from kvstudio.core.persist.exports import export_array, export_run
from kvstudio.core.persist.history import record_from_result
from kvstudio.gui.feature import Feature
from kvstudio.gui.widgets.plot_files import FORMATS, render_plot


class ExportsFeature(Feature):
    def install(self) -> None:
        menu = self.window.menu("&File")
        menu.addSeparator()
        menu.addAction("Export the shown run as JSON…", lambda: self._ask_path_then(self.export_run, "run.json",
                                                                                "JSON (*.json)"))
        menu.addAction("Export the shown run as CSV (per step)…", lambda: self._ask_path_then(self.export_run, "run.csv",
                                                                                          "CSV (*.csv)"))
        menu.addAction("Export attention map (.npy)…", lambda: self._ask_path_then(self.export_attention,
                                                                                    "attention.npy", "NumPy (*.npy)"))
        plots = menu.addMenu("Export plot")
        for title in self.plot_views():
            plots.addAction(f"{title} as PNG, SVG or PDF…", lambda t=title: self._ask_path_then(
                lambda path: self.export_plot(t, path), f"{t.lower().replace(' ', '_')}.png",
                "Images (*.png *.svg *.pdf)"))

    def plot_views(self) -> dict:
        """Views that draw plots, by title: their pyqtgraph PlotWidgets can be exported."""
        views, snapshot = self.window.views, self.window.snapshots.view
        return {"Attention map": views.attention_view.plot, "Occupancy": views.occupancy_view.per_layer,
                "Evictions": views.evictions_view.raster, "Memory (cache)": views.memory_view.cache_plot,
                "Memory (system)": views.memory_view.system_plot, "Memory snapshot": snapshot.total_plot,
                "Memory snapshot allocations": snapshot.bars_plot}

    def _ask_path_then(self, action, suggested: str, file_filter: str) -> None:
        path, _ = QFileDialog.getSaveFileName(self.window, "Export", suggested, file_filter)
        if path:
            action(Path(path))

    def report(self, action, *args) -> Path | None:
        """Run an export; say where it went, or why it failed (the previous file stays intact)."""
        try:
            path = action(*args)
        except (KVStudioError, OSError) as error:
            self.window.show_error(f"export failed: {error}")
            return None
        self.window.statusBar().showMessage(f"exported {path}")
        return path

    def export_run(self, path: Path) -> Path | None:
        """The run the views show: a stored run reopened from the Runs view, else the last run."""
        window = self.window
        stored = window.runs.shown_run_id if window.views.showing_stored_run else None
        if stored is not None and window.history is not None and window.history.get(stored) is not None:
            return self.report(export_run, window.history.get(stored), path, window.state.recorder)
        outcome = window.state.last_outcome
        if outcome is None or outcome.result is None:
            window.show_error("nothing to export yet: run something first")
            return None
        request = outcome.request
        if window.history is not None and request.history_id is not None:
            record = window.history.get(request.history_id)
        else:
            record = record_from_result(window.state.model_info.spec, request.policy, request.parameters,
                                        request.prompt, outcome.result)
        return self.report(export_run, record, path, request.recorder)  # JSON carries the recording

    def export_attention(self, path: Path) -> Path | None:
        attention = self.window.views.attention_view
        if attention.image_values.size == 0:
            self.window.show_error("the attention map is empty: run something first")
            return None
        return self.report(export_array, attention.image_values, path)

    def export_plot(self, title: str, path: Path, width_px: int | None = None) -> Path | None:
        if path.suffix.lower() not in FORMATS:
            self.window.show_error(f"a plot is exported as .png, .svg or .pdf, not '{path.suffix or path.name}'")
            return None
        widget = self.plot_views()[title]
        return self.report(atomic_produce, path, lambda temporary: render_plot(widget, temporary, width_px))
