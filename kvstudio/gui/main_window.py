"""The studio window: set-up panels on the left, the prompt in the middle, live views in docks.

All model work goes to the worker thread through queued signals. A 25 Hz timer asks every view
to read what is new in the current run's Recorder; no signal is sent per token or per layer.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from PySide6.QtCore import QSettings, Qt, QThread, QTimer, Signal, Slot
from PySide6.QtWidgets import (QCheckBox, QComboBox, QDockWidget, QDoubleSpinBox, QFileDialog, QFormLayout,
                               QGroupBox,
                               QHBoxLayout, QLabel, QMainWindow, QPlainTextEdit, QPushButton, QSpinBox, QSplitter,
                               QToolButton, QVBoxLayout, QWidget)

from ..core.engine import GenerationSettings
from ..core.events import Recorder
from ..core.atomic import atomic_produce, check_writable_folder
from ..core.errors import KVStudioError
from ..core.exports import export_array, export_run
from ..core.history import HistoryError, RunHistory, record_from_result
from ..core.recordings import unpack_events
from ..core.plugins import PluginManager, user_plugin_dir
from ..core.policies import available_policies
from .bars import message_bar
from . import caches_view
from . import finetune_view
from .compare import CompareView
from .evaluate_view import install as install_evaluate_view
from .panels import DocumentList, ModelPanel
from .plugins_view import PluginsView
from .policy_form import PolicyForm
from .storage_form import StorageForm
from ..core.storage import available_codecs
from .runs_view import RunsView
from .snapshot_view import SnapshotView
from .views.attention_map import AttentionMapView
from .views.evictions import EvictionsView
from .views.memory import MemoryView
from .views.occupancy import OccupancyView
from .views.output import OutputView
from .views.token_map import TokenMapView
from .worker import RunOutcome, RunRequest, StudioWorker

REFRESH_HZ = 25
DEFAULT_BUDGET = 256  # what a policy's form starts with before the user sets one
RECENT_MODELS = 8


class MainWindow(QMainWindow):
    # Commands to the worker thread (queued: the worker lives there).
    load_model = Signal(str, str, str)
    start_run = Signal(object)
    count_tokens = Signal(object, str)

    def __init__(self, settings: QSettings | None = None, plugins: PluginManager | None = None):
        super().__init__()
        self.setWindowTitle("KV Studio")
        self.settings = settings or QSettings("KVStudio", "kvstudio")
        # Plugins load before the panels exist: their policies fill the choosers and forms.
        self.plugins = plugins or PluginManager(self._plugin_folders())
        self.plugins.load()
        self.history, history_problem = self._open_history()
        self.model_info = None
        self.recorder: Recorder | None = None
        self.running = False
        self.compare_queue: list[str] = []
        self.last_outcome: RunOutcome | None = None
        self.snapshot_path: str | None = None  # where the next run's memory snapshot goes, when armed
        self.showing_stored_run = False  # the views show a run from the history, shaped as its model

        self._build_worker()
        self._build_panels()
        self._build_views()
        self._build_menus()
        caches_view.install(self)
        install_evaluate_view(self)  # its dock and menu, before the saved layout is restored
        self.finetune = finetune_view.install(self)  # its docks exist before the saved layout is restored
        self._restore_settings()

        self.timer = QTimer(self, interval=1000 // REFRESH_HZ)
        self.timer.timeout.connect(self.refresh_views)
        self.timer.start()
        self.setAcceptDrops(True)
        self._update_buttons()
        if self.plugins.errors:
            self.statusBar().showMessage(f"{len(self.plugins.errors)} plugin(s) failed to load: see the Plugins view")
        if history_problem:
            self.show_error(history_problem)

    # -- construction -------------------------------------------------------------------------------

    def _build_worker(self) -> None:
        self.thread_ = QThread()
        self.thread_.setObjectName("kvstudio-model")
        self.worker = StudioWorker()  # no parent: it is moved to its thread
        self.worker.moveToThread(self.thread_)
        self.load_model.connect(self.worker.load)
        self.start_run.connect(self.worker.run)
        self.count_tokens.connect(self.worker.count_tokens)
        self.worker.load_progress.connect(self.on_load_progress)
        self.worker.loaded.connect(self.on_loaded)
        self.worker.load_failed.connect(self.on_load_failed)
        self.worker.run_finished.connect(self.on_run_finished)
        self.worker.run_status.connect(self.statusBar().showMessage)
        self.worker.tokens_counted.connect(self.on_tokens_counted)
        self.thread_.start()

    def _build_panels(self) -> None:
        self.model_panel = ModelPanel()
        self.model_panel.load_requested.connect(self.request_load)
        self.model_panel.cancel_requested.connect(self.worker.cancel_load)

        policy_box = QGroupBox("Policy")
        self.policy = QComboBox()
        self.policy.addItems(list(available_policies()))
        self.policy_help = QLabel("")
        self.policy_help.setWordWrap(True)
        self.policy_help.setStyleSheet("color: #888;")
        self.policy_form = PolicyForm()
        self.chunk_size = QSpinBox(minimum=1, maximum=65536, value=512)
        self.chunk_size.setToolTip("prefill chunk size: the policy evicts between chunks")
        policy_layout = QFormLayout(policy_box)
        policy_layout.addRow("policy", self.policy)
        policy_layout.addRow(self.policy_help)
        policy_layout.addRow(self.policy_form)
        self.storage_form = StorageForm()  # codec, group size, residual, tier, recall (kvstudio.core.storage)
        policy_layout.addRow(self.storage_form)
        policy_layout.addRow("chunk size", self.chunk_size)
        self.policy.currentTextChanged.connect(self._policy_chosen)

        generation_box = QGroupBox("Generation")
        self.max_new_tokens = QSpinBox(minimum=1, maximum=100_000, value=64)
        self.temperature = QDoubleSpinBox(minimum=0.0, maximum=5.0, singleStep=0.1, decimals=2, value=0.0)
        self.temperature.setToolTip("0 is greedy")
        self.seed = QSpinBox(minimum=0, maximum=2**31 - 1, value=0)
        self.chat = QCheckBox("use the chat template")
        self.run_button = QPushButton("Run")
        self.run_button.setStyleSheet("font-weight: bold;")
        self.stop_button = QPushButton("Stop")
        generation = QFormLayout(generation_box)
        generation.addRow("max new tokens", self.max_new_tokens)
        generation.addRow("temperature", self.temperature)
        generation.addRow("seed", self.seed)
        generation.addRow(self.chat)
        buttons = QHBoxLayout()
        buttons.addWidget(self.run_button)
        buttons.addWidget(self.stop_button)
        generation.addRow(buttons)
        self.run_button.clicked.connect(self.request_run)
        self.stop_button.clicked.connect(self.stop)

        side = QWidget()
        side_layout = QVBoxLayout(side)
        side_layout.addWidget(self.model_panel)
        side_layout.addWidget(policy_box)
        side_layout.addWidget(generation_box)
        side_layout.addStretch(1)
        setup = QDockWidget("Set-up", self, objectName="setup")
        setup.setWidget(side)
        setup.setFeatures(QDockWidget.DockWidgetMovable | QDockWidget.DockWidgetFloatable)
        self.addDockWidget(Qt.LeftDockWidgetArea, setup)

        self.documents = DocumentList()
        self.documents.added.connect(self._document_added)
        self.documents.refused.connect(self.show_error)
        self.prompt = QPlainTextEdit()
        self.prompt.setPlaceholderText("Type a prompt (it follows the checked documents), or drop files here.")
        prompt_box = QGroupBox("Prompt")
        QVBoxLayout(prompt_box).addWidget(self.prompt)
        splitter = QSplitter(Qt.Vertical)
        splitter.addWidget(self.documents)
        splitter.addWidget(prompt_box)

        self.error_text = QLabel("")
        self.error_text.setTextInteractionFlags(Qt.TextSelectableByMouse)
        close = QToolButton(text="✕")
        close.clicked.connect(lambda: self.error_banner.hide())
        self.error_banner = message_bar("error", self.error_text, close)
        self.offer_text = QLabel("")
        self.offer_install = QPushButton("Install as plugin")
        self.offer_document = QPushButton("Add as a document")
        self.offer_dismiss = QPushButton("Not now")
        self.offer_bar = message_bar("question", self.offer_text, self.offer_install, self.offer_document,
                                     self.offer_dismiss)
        self.offered_plugin: Path | None = None
        self.offer_install.clicked.connect(self.install_offered_plugin)
        self.offer_document.clicked.connect(self._offered_file_as_document)
        self.offer_dismiss.clicked.connect(self.offer_bar.hide)
        central = QWidget()
        central_layout = QVBoxLayout(central)
        central_layout.addWidget(self.error_banner)
        central_layout.addWidget(self.offer_bar)
        central_layout.addWidget(splitter)
        self.setCentralWidget(central)

    def _build_views(self) -> None:
        self.output_view = OutputView()
        self.attention_view = AttentionMapView()
        self.token_view = TokenMapView()
        self.occupancy_view = OccupancyView()
        self.evictions_view = EvictionsView()
        self.memory_view = MemoryView()
        self.snapshot_view = SnapshotView()
        self.snapshot_view.record_requested.connect(lambda: self.arm_snapshot())
        self.compare_view = CompareView()
        self.compare_view.compare_requested.connect(self.request_compare)
        self.runs_view = RunsView()
        self.runs_view.set_history(self.history)
        self.runs_view.export_requested.connect(self._export_stored_run)
        self.runs_view.open_requested.connect(self.reopen_run)
        self.plugins_view = PluginsView(self.plugins)
        self.plugins_view.reloaded.connect(self._policies_changed)
        self.plugins_view.folder_added.connect(self.add_plugin_folder)
        self.live_views = [self.output_view, self.attention_view, self.token_view, self.occupancy_view,
                           self.evictions_view, self.memory_view]
        docks = []
        for title, widget in (("Output", self.output_view), ("Token map", self.token_view),
                              ("Attention map", self.attention_view), ("Occupancy", self.occupancy_view),
                              ("Evictions", self.evictions_view), ("Memory", self.memory_view),
                              ("Memory snapshot", self.snapshot_view), ("Compare", self.compare_view),
                              ("Runs", self.runs_view), ("Plugins", self.plugins_view)):
            dock = QDockWidget(title, self, objectName=title.lower().replace(" ", "_"))
            dock.setWidget(widget)
            docks.append(dock)
        self.addDockWidget(Qt.RightDockWidgetArea, docks[0])
        self.addDockWidget(Qt.RightDockWidgetArea, docks[1])
        self.splitDockWidget(docks[0], docks[1], Qt.Vertical)
        for dock in docks[2:]:
            self.tabifyDockWidget(docks[1], dock)
        docks[1].raise_()
        self.docks = {dock.windowTitle(): dock for dock in docks}
        self.resize(1560, 960)

    @staticmethod
    def _open_history():
        """The run history, or (None, why) when it cannot be used: the studio runs on without it."""
        try:
            return RunHistory(), None
        except HistoryError as error:
            return None, str(error)

    def _history_start(self, request: RunRequest) -> None:
        if self.history is None:
            return
        try:
            request.history_id = self.history.start(self.model_info.spec, request.policy, request.parameters,
                                                    request.prompt, vars(request.settings) | {
                                                        "stop_strings": list(request.settings.stop_strings)})
        except HistoryError as error:
            self.history = None
            self.show_error(str(error))

    def _history_finish(self, outcome: RunOutcome) -> None:
        if self.history is None or outcome.request.history_id is None:
            return
        try:
            self.history.finish(outcome.request.history_id, outcome.result, error=outcome.error,
                                events=outcome.events)
        except HistoryError as error:
            self.history = None
            self.show_error(str(error))
        self.runs_view.set_history(self.history)

    def _build_menus(self) -> None:
        menu = self.menuBar().addMenu("&File")
        menu.addAction("Open documents…", self.documents._open_files)
        menu.addSeparator()
        menu.addAction("Export last run as JSON…", lambda: self._ask_path_then(self.export_run, "run.json",
                                                                                "JSON (*.json)"))
        menu.addAction("Export last run as CSV (per step)…", lambda: self._ask_path_then(self.export_run, "run.csv",
                                                                                          "CSV (*.csv)"))
        menu.addAction("Export attention map (.npy)…", lambda: self._ask_path_then(self.export_attention,
                                                                                    "attention.npy", "NumPy (*.npy)"))
        plots = menu.addMenu("Export plot")
        for title in self.plot_views():
            plots.addAction(f"{title} as PNG or SVG…", lambda t=title: self._ask_path_then(
                lambda path: self.export_plot(t, path), f"{t.lower().replace(' ', '_')}.png",
                "Images (*.png *.svg)"))
        menu.addSeparator()
        menu.addAction("Quit", self.close)
        memory = self.menuBar().addMenu("&Memory")
        memory.addAction("Record a memory snapshot of the next run…", lambda: self.arm_snapshot())
        memory.addAction("Open memory snapshot…", self.offer_snapshot_file)

    def plot_views(self) -> dict:
        """Views that draw plots, by title: their pyqtgraph PlotWidgets can be exported."""
        return {"Attention map": self.attention_view.plot, "Occupancy": self.occupancy_view.per_layer,
                "Evictions": self.evictions_view.raster, "Memory (cache)": self.memory_view.cache_plot,
                "Memory (system)": self.memory_view.system_plot, "Memory snapshot": self.snapshot_view.total_plot,
                "Memory snapshot allocations": self.snapshot_view.bars_plot}

    def _ask_path_then(self, action, suggested: str, file_filter: str) -> None:
        path, _ = QFileDialog.getSaveFileName(self, "Export", suggested, file_filter)
        if path:
            action(Path(path))

    def _reporting(self, action, *args) -> Path | None:
        """Run an export; say where it went, or why it failed (the previous file stays intact)."""
        try:
            path = action(*args)
        except (KVStudioError, OSError) as error:
            self.show_error(f"export failed: {error}")
            return None
        self.statusBar().showMessage(f"exported {path}")
        return path

    def export_run(self, path: Path) -> Path | None:
        outcome = self.last_outcome
        if outcome is None or outcome.result is None:
            self.show_error("nothing to export yet: run something first")
            return None
        request = outcome.request
        if self.history is not None and request.history_id is not None:
            record = self.history.get(request.history_id)
        else:
            record = record_from_result(self.model_info.spec, request.policy, request.parameters, request.prompt,
                                        outcome.result)
        return self._reporting(export_run, record, path)

    def _shape_views(self, n_layers: int, n_heads: int) -> None:
        for view in (self.attention_view, self.token_view, self.evictions_view):
            view.set_model(n_layers, n_heads)

    def reopen_run(self, run_id: int) -> None:
        """Show a stored run in the live views, as its events were recorded."""
        if self.running:
            self.show_error("a run is in progress: stop it first, then open the stored run")
            return
        blob = self.history.events(run_id) if self.history is not None else None
        if blob is None:
            self.show_error(f"run {run_id} has no stored views: it ran before KV Studio kept them, or failed "
                            "before its first step")
            return
        try:
            recorder = unpack_events(blob)
        except KVStudioError as error:
            self.show_error(f"run {run_id}: {error}")
            return
        started = recorder.all("runs")
        if not started:
            self.show_error(f"run {run_id} has no stored views: it stopped before its first step")
            return
        run = started[-1]
        self.hide_error()
        self._shape_views(run.n_layers, run.n_heads or run.n_kv_heads)
        if recorder.watch_layers:  # attention rows exist only for the layers watched during the run
            self.attention_view.layer.setValue(min(recorder.watch_layers))
        self.showing_stored_run = True
        self.recorder = recorder
        self.memory_view.clear()  # its clock is another session's: no common timeline
        for view in self.live_views:
            view.follow(recorder)
        self.refresh_views(include_hidden=True)
        self.statusBar().showMessage(f"showing run {run_id} from the history: {run.model}, {run.policy}")

    def _export_stored_run(self, run_id: int) -> None:
        path, _ = QFileDialog.getSaveFileName(self, "Export run", f"run-{run_id}.json", "JSON or CSV (*.json *.csv)")
        if path:
            self._reporting(export_run, self.history.get(run_id), Path(path))

    def export_attention(self, path: Path) -> Path | None:
        if self.attention_view.image_values.size == 0:
            self.show_error("the attention map is empty: run something first")
            return None
        return self._reporting(export_array, self.attention_view.image_values, path)

    def export_plot(self, title: str, path: Path) -> Path | None:
        import pyqtgraph.exporters as exporters

        if path.suffix not in (".png", ".svg"):
            self.show_error(f"a plot is exported as .png or .svg, not '{path.suffix or path.name}'")
            return None
        widget = self.plot_views()[title]
        if path.suffix == ".png":
            produce = lambda temporary: exporters.ImageExporter(widget.getPlotItem()).export(str(temporary))  # noqa: E731
        else:
            produce = lambda temporary: _render_svg(widget, temporary)  # noqa: E731
        return self._reporting(atomic_produce, path, produce)

    # -- model ------------------------------------------------------------------------------------

    @Slot(str, str, str)
    def request_load(self, spec: str, device: str, dtype: str) -> None:
        if not spec:
            self.show_error("give a model: default, a tiny model, a folder or a hub id")
            return
        if self.running:  # the load would wait for the run anyway; say so instead of queueing it
            self.show_error("a run is in progress: stop it or let it finish, then load another model")
            return
        self.hide_error()
        self.model_panel.set_loading(True)
        self.model_panel.status.setText(f"loading {spec}…")
        self.worker.reset_load_cancel()
        self.worker.load_recorder = Recorder()  # the memory timeline shows the load
        self.memory_view.follow(self.worker.load_recorder)
        self.load_model.emit(spec, device, dtype)

    @Slot(str, float)
    def on_load_progress(self, message: str, fraction: float) -> None:
        self.model_panel.show_progress(message, fraction)

    @Slot(object)
    def on_loaded(self, info) -> None:
        self.model_info = info
        self.model_panel.set_loading(False)
        self.model_panel.status.setText(info.description)
        self.chat.setEnabled(info.has_chat_template)
        if not info.has_chat_template:
            self.chat.setChecked(False)
        self._shape_views(info.n_layers, info.n_heads)
        self.showing_stored_run = False
        self._remember_model(info.spec)
        for key, document in self.documents.documents.items():
            self.count_tokens.emit(key, document.text)
        self._update_buttons()

    @Slot(str)
    def on_load_failed(self, message: str) -> None:
        self.model_panel.set_loading(False)
        self.model_panel.status.setText("no model loaded" if self.model_info is None else self.model_info.description)
        self.show_error(message)

    # -- runs -------------------------------------------------------------------------------------

    def _generation_settings(self) -> GenerationSettings:
        return GenerationSettings(
            max_new_tokens=self.max_new_tokens.value(), temperature=self.temperature.value(),
            seed=self.seed.value(), chunk_size=self.chunk_size.value(),
            chat_template=self.chat.isChecked() and self.chat.isEnabled(),
        )

    def full_prompt(self) -> str:
        parts = [self.documents.checked_text(), self.prompt.toPlainText()]
        return "\n\n".join(part for part in parts if part.strip())

    @Slot()
    def request_run(self) -> None:
        self.compare_queue = []
        self._start(self.policy.currentText(), self._policy_parameters(), label="")

    def _policy_parameters(self) -> dict:
        return {k: v for k, v in self.policy_form.values().items() if v is not None} | self.storage_form.parameters()

    def _start(self, policy: str, parameters: dict, label: str, start_from: str | None = None) -> bool:
        problem = None
        if self.model_info is None:
            problem = "load a model first"
        elif self.running:
            problem = "a run is in progress: stop it first"
        elif not self.full_prompt().strip() and start_from is None:
            problem = "the prompt is empty: type one or drop a document"
        elif policy == self.policy.currentText() and (invalid := self.policy_form.validate()
                                                      or self.storage_form.validate()):
            problem = f"policy parameters: {invalid}"
        if problem:
            self.show_error(problem)
            return False
        self.hide_error()
        if self.showing_stored_run:  # back to the loaded model's layers and heads
            self._shape_views(self.model_info.n_layers, self.model_info.n_heads)
            self.showing_stored_run = False
        self.recorder = Recorder()
        for view in self.live_views:
            view.follow(self.recorder)
        self.running = True
        self._update_buttons()
        self.worker.reset_cancel()
        request = RunRequest(self.full_prompt(), policy, parameters, self._generation_settings(), self.recorder, label,
                             snapshot_path=self.snapshot_path, start_from=start_from)
        self.snapshot_path = None  # a snapshot is of one run
        self._history_start(request)
        self.start_run.emit(request)
        self.statusBar().showMessage(f"running {policy}…")
        self._save_settings()
        return True

    @Slot()
    def stop(self) -> None:
        self.compare_queue = []
        self.worker.cancel_run()

    @Slot(object)
    def on_run_finished(self, outcome: RunOutcome) -> None:
        self.running = False
        self.last_outcome = outcome
        self._history_finish(outcome)
        self.refresh_views(include_hidden=True)
        request = outcome.request
        if outcome.error:
            self.show_error(f"{request.policy}: {outcome.error}")
            self.statusBar().showMessage("run failed")
            if request.label == "compare":
                self.compare_view.add_failure(request.policy, outcome.error)
        else:
            result = outcome.result
            self.statusBar().showMessage(
                f"{request.policy}: {result.stop_reason} · {len(result.token_ids)} tokens · "
                f"{result.tokens_per_second:.1f} tokens/s · peak cache {result.peak_cache_bytes / 2**20:.2f} MiB · "
                f"{result.evictions} evictions")
            if request.label == "compare":
                self.compare_view.add_result(request.policy, result, request.recorder)
        self._show_snapshot(outcome)
        self._update_buttons()
        self._next_comparison()

    # -- memory snapshots ---------------------------------------------------------------------------

    def arm_snapshot(self, path: str | None = None) -> None:
        """Record the next run's allocations into `path` (asked for when not given)."""
        if path is None:
            path, _ = QFileDialog.getSaveFileName(self, "Record a memory snapshot of the next run",
                                                  "memory-snapshot.pickle", "Memory snapshots (*.pickle)")
            if not path:
                return
        try:
            check_writable_folder(path)
        except KVStudioError as error:
            self.show_error(f"no memory snapshot: {error}")
            return
        self.snapshot_path = path
        slower = " (on CPU the profiler makes the run several times slower)" if "cpu" in self._device_text() else ""
        self.statusBar().showMessage(f"the next run will be recorded into {path}{slower}")
        self.snapshot_view.summary.setText(f"The next run will be recorded into {path}{slower}.")

    def _device_text(self) -> str:
        return self.model_info.device if self.model_info is not None else ""

    def offer_snapshot_file(self) -> None:
        """Opening a snapshot starts with the view's warning bar: the file is a pickle."""
        self.docks["Memory snapshot"].show()
        self.docks["Memory snapshot"].raise_()
        self.snapshot_view.warning_bar.show()

    def _show_snapshot(self, outcome: RunOutcome) -> None:
        if outcome.snapshot_error:
            self.show_error(outcome.snapshot_error)
        if outcome.snapshot is not None:
            path = outcome.request.snapshot_path
            self.snapshot_view.show_snapshot(outcome.snapshot, Path(path).name)
            self.docks["Memory snapshot"].raise_()
            self.statusBar().showMessage(f"{self.statusBar().currentMessage()} · memory snapshot saved to {path}")

    @Slot(list)
    def request_compare(self, policies: list[str]) -> None:
        if not policies:
            self.show_error("check at least one policy to compare")
            return
        if self.model_info is None or self.running:
            self.show_error("load a model first" if self.model_info is None else "a run is in progress: stop it first")
            return
        self.compare_view.clear()
        self.compare_queue = list(policies)
        self._next_comparison()

    def comparison_parameters(self, policy: str) -> dict:
        """The policy's defaults, with the budget and shared parameters from the form where they apply."""
        from ..core.policies import policy_class
        from ..core.storage import STORAGE_KEY, split_cache_name

        base, _ = split_cache_name(policy)  # 'h2o-int4': the codec in the name wins over the form's
        accepted = {spec.name for spec in policy_class(base).Config.parameters()} | {STORAGE_KEY}
        shared = {k: v for k, v in self._policy_parameters().items() if k in accepted and k != "rerotate"}
        if base == "full":
            shared.pop("budget", None)
        return shared

    def _next_comparison(self) -> None:
        if not self.compare_queue:
            return
        policy = self.compare_queue.pop(0)
        try:
            from ..core.storage import build_policy

            build_policy(policy, self.comparison_parameters(policy))  # guarded, like every call into a policy
        except Exception as error:  # a bad combination for this policy: report it, go on
            self.compare_view.add_failure(policy, str(error))
            self._next_comparison()
            return
        if not self._start(policy, self.comparison_parameters(policy), label="compare"):
            self.compare_queue = []

    @Slot()
    def refresh_views(self, include_hidden: bool = False) -> None:
        """Views read what is new. Hidden ones (a tab behind another) wait: their cursors keep
        their place, so they catch up, losing nothing, when shown."""
        for view in self.live_views:
            if include_hidden or view.isVisible():
                view.refresh()

    def _update_buttons(self) -> None:
        self.model_panel.load.setEnabled(not self.running and not self.model_panel.cancel.isEnabled())
        self.run_button.setEnabled(not self.running and self.model_info is not None)
        self.stop_button.setEnabled(self.running)
        self.compare_view.start.setEnabled(not self.running and self.model_info is not None)

    # -- policies ---------------------------------------------------------------------------------

    def _policy_chosen(self, name: str) -> None:
        policy = available_policies()[name]
        saved = self.settings.value(f"policy_parameters/{name}")
        if isinstance(saved, str):
            values = json.loads(saved)
        else:  # first use: a policy that needs a budget starts with one, so the form starts valid
            values = {"budget": DEFAULT_BUDGET} if policy.requires_budget else None
        self.policy_form.set_policy(name, values)
        self.policy_help.setText(policy.summary)

    def _policies_changed(self) -> None:
        """After a plugin reload: offer what is registered now, keeping the choice if it survived."""
        current = self.policy.currentText()
        names = list(available_policies())
        self.policy.blockSignals(True)
        self.policy.clear()
        self.policy.addItems(names)
        self.policy.blockSignals(False)
        self.policy.setCurrentText(current if current in names else "streaming_llm")
        self._policy_chosen(self.policy.currentText())
        self.compare_view.set_policies(names)
        self.storage_form.set_codecs(list(available_codecs()))  # plugins may add codecs too
        failed = len(self.plugins.errors)
        self.statusBar().showMessage(f"plugins reloaded: {len(names)} policies"
                                     + (f"; {failed} plugin(s) failed, see the Plugins view" if failed else ""))

    def _plugin_folders(self) -> list[str]:
        saved = self.settings.value("plugin_folders")
        return json.loads(saved) if isinstance(saved, str) else []

    def add_plugin_folder(self, folder: str) -> None:
        if folder not in self.plugins.extra_folders:
            self.plugins.extra_folders.append(folder)
            self.settings.setValue("plugin_folders", json.dumps(self.plugins.extra_folders))
        self.plugins_view.reload_plugins()

    def offer_plugin(self, path: Path) -> None:
        """A dropped .py file: ask (without blocking) whether to install it as a plugin."""
        self.offered_plugin = path
        target = user_plugin_dir() / path.name
        replace = " (replacing the file of that name)" if target.exists() else ""
        self.offer_text.setText(f"{path.name}: install it as a policy plugin in {target.parent}{replace}, or add "
                                "it as a document? Plugins are Python code and run with your rights: install "
                                "only code you trust.")
        self.offer_bar.show()

    @Slot()
    def _offered_file_as_document(self) -> None:
        path, self.offered_plugin = self.offered_plugin, None
        self.offer_bar.hide()
        if path is not None:
            self.documents.add_path(path)

    @Slot()
    def install_offered_plugin(self) -> None:
        path, self.offered_plugin = self.offered_plugin, None
        self.offer_bar.hide()
        if path is None:
            return
        folder = user_plugin_dir()
        try:
            folder.mkdir(parents=True, exist_ok=True)
            staging = folder / f".{path.name}.installing"
            shutil.copyfile(path, staging)
            os.replace(staging, folder / path.name)  # never a half-copied plugin in the folder
        except OSError as error:
            self.show_error(f"could not install {path.name} into {folder}: {error.strerror or error}")
            return
        self.plugins_view.reload_plugins()
        record = next((r for r in self.plugins.records if Path(r.source) == folder / path.name), None)
        if record is None or record.error:
            self.show_error(f"installed {path.name}, but it did not load: "
                            f"{record.error if record else 'not found after reload'}")
        elif record.policies:
            self.policy.setCurrentText(record.policies[0])
            self.statusBar().showMessage(f"installed {path.name}: {', '.join(record.policies)}")

    # -- documents and drops ----------------------------------------------------------------------

    def _document_added(self, key, document) -> None:
        if self.model_info is not None:
            self.count_tokens.emit(key, document.text)

    @Slot(object, int)
    def on_tokens_counted(self, key, count: int) -> None:
        self.documents.set_token_count(key, count)

    def dragEnterEvent(self, event) -> None:
        if event.mimeData().hasUrls() or event.mimeData().hasText():
            event.acceptProposedAction()

    def dropEvent(self, event) -> None:
        self.handle_drop(event.mimeData())
        event.acceptProposedAction()

    def handle_drop(self, mime) -> None:
        """Files become documents (or are refused with a reason); plain text becomes a document."""
        if mime.hasUrls():
            for url in mime.urls():
                if url.isLocalFile() and url.toLocalFile().endswith(".py") and Path(url.toLocalFile()).is_file():
                    self.offer_plugin(Path(url.toLocalFile()))
                elif url.isLocalFile():
                    self.documents.add_path(url.toLocalFile())
                else:
                    self.show_error(f"not added: {url.toString()} is not a local file")
        elif mime.hasText():
            self.documents.add_text(mime.text())

    # -- messages ---------------------------------------------------------------------------------

    def show_error(self, message: str) -> None:
        self.error_text.setText(message)
        self.error_banner.show()

    def hide_error(self) -> None:
        self.error_banner.hide()

    # -- settings ---------------------------------------------------------------------------------

    def _remember_model(self, spec: str) -> None:
        recent = [spec] + [m for m in self._recent_models() if m != spec]
        self.settings.setValue("recent_models", json.dumps(recent[:RECENT_MODELS]))
        self.model_panel.set_recent(recent[:RECENT_MODELS])

    def _recent_models(self) -> list[str]:
        saved = self.settings.value("recent_models")
        return json.loads(saved) if isinstance(saved, str) else []

    def _restore_settings(self) -> None:
        self.model_panel.set_recent(self._recent_models())
        if self._recent_models():
            self.model_panel.spec.setCurrentText(self._recent_models()[0])
        policy = self.settings.value("policy", "streaming_llm")
        self.policy.setCurrentText(policy if policy in available_policies() else "streaming_llm")
        self._policy_chosen(self.policy.currentText())
        for key, widget in (("chunk_size", self.chunk_size), ("max_new_tokens", self.max_new_tokens),
                            ("seed", self.seed)):
            value = self.settings.value(key)
            if value is not None:
                widget.setValue(int(value))
        if self.settings.value("temperature") is not None:
            self.temperature.setValue(float(self.settings.value("temperature")))
        if self.settings.value("geometry") is not None:
            self.restoreGeometry(self.settings.value("geometry"))
        if self.settings.value("window_state") is not None:
            self.restoreState(self.settings.value("window_state"))

    def _save_settings(self) -> None:
        name = self.policy.currentText()
        self.settings.setValue("policy", name)
        self.settings.setValue(f"policy_parameters/{name}", json.dumps(self.policy_form.values()))
        self.settings.setValue("chunk_size", self.chunk_size.value())
        self.settings.setValue("max_new_tokens", self.max_new_tokens.value())
        self.settings.setValue("temperature", self.temperature.value())
        self.settings.setValue("seed", self.seed.value())
        self.settings.setValue("geometry", self.saveGeometry())
        self.settings.setValue("window_state", self.saveState())

    # -- shutdown ---------------------------------------------------------------------------------

    def closeEvent(self, event) -> None:
        """Cancel whatever runs, let the worker finish its step, and stop its thread cleanly."""
        self._save_settings()
        self.timer.stop()
        self.compare_queue = []
        self.worker.cancel_run()
        self.worker.cancel_load()
        self.thread_.quit()
        self.thread_.wait()
        super().closeEvent(event)


def _render_svg(widget, path: Path) -> None:
    """A plot as SVG through Qt's own generator (pyqtgraph's SVG exporter fails on Qt 6 paths)."""
    from PySide6.QtCore import QRect, QSize
    from PySide6.QtGui import QPainter
    from PySide6.QtSvg import QSvgGenerator

    generator = QSvgGenerator()
    generator.setFileName(str(path))
    generator.setSize(QSize(widget.width(), widget.height()))
    generator.setViewBox(QRect(0, 0, widget.width(), widget.height()))
    generator.setTitle("KV Studio plot")
    painter = QPainter(generator)
    try:
        widget.render(painter)
    finally:
        painter.end()
