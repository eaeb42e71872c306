"""The studio window: it only assembles the features (kvstudio.gui.feature) and holds what they share.

Shared: the settings, the plugin manager, the run history, the model's worker thread and the task
runner that queues long work on it, the studio's evented state (state.py: what holds the model's
thread, the loaded model, the current run's Recorder and last outcome), the error banner and the
status bar. Everything else (set-up panels, live views, compare, runs, exports, snapshots,
plugins, caches, evaluation, fine-tuning) is a feature module that owns its docks, menus and settings.
"""

from __future__ import annotations

from PySide6.QtCore import QEvent, QSettings, Qt, QThread, QTimer
from PySide6.QtWidgets import (QDockWidget, QLabel, QMainWindow, QMenu, QSplitter, QTabBar, QToolButton, QVBoxLayout,
                               QWidget)

from kvstudio.core.persist.history import HistoryError, RunHistory
from kvstudio.core.plugins.loader import PluginManager
from kvstudio.gui import gui_thread_gc
from kvstudio.gui.close_guard import CloseGuard
from kvstudio.gui.widgets.bars import message_bar
from kvstudio.gui.features.caches import CachesFeature
from kvstudio.gui.features.compare import CompareFeature
from kvstudio.gui.features.evaluate import EvaluateFeature
from kvstudio.gui.features.exports_menu import ExportsFeature
from kvstudio.gui.features.figure_export import FiguresFeature
from kvstudio.gui.features.finetune import FinetuneFeature
from kvstudio.gui.features.live_views import LiveViews
from kvstudio.gui.features.model_check import ModelCheckFeature
from kvstudio.gui.features.model_loading import ModelLoading
from kvstudio.gui.features.plugins import PluginsFeature, saved_plugin_folders
from kvstudio.gui.features.prompt_area import PromptArea
from kvstudio.gui.features.run_control import RunControl
from kvstudio.gui.features.run_form import RunForm
from kvstudio.gui.features.runs import RunsFeature
from kvstudio.gui.widgets.scrolling import scrolling
from kvstudio.gui.features.snapshot import SnapshotFeature
from kvstudio.gui.state import StudioState
from kvstudio.gui.task_runner import TaskRunner
from kvstudio.gui.worker import StudioWorker

# Where docks go: the set-up column on the left, the views as tabs on the right; within a place, in
# the order the features are installed. The centre (documents, prompt, output) takes what is left.
PLACES = ("side", "views")
SIDE_WIDTH = 300  # the set-up column's first width
VIEWS_SHARE = 0.45  # of the window's width, the views' first width: the token map reads like a page
PROBLEM_CHECK_MS = 250  # how often a refusal's banner checks whether its problem is fixed


class MainWindow(QMainWindow):
    def __init__(self, settings: QSettings | None = None, plugins: PluginManager | None = None):
        super().__init__()
        gui_thread_gc.hold()  # before any worker thread exists (gui_thread_gc.py says why)
        self._released_gc = False
        self.setWindowTitle("KV Studio")
        self.settings = settings or QSettings("KVStudio", "kvstudio")
        # Plugins load before the features exist: their policies fill the choosers and forms.
        self.plugins = plugins or PluginManager(saved_plugin_folders(self.settings))
        self.plugins.load()
        self.history, history_problem = _open_history()
        self.state = StudioState(self)
        self.docks: dict[str, QDockWidget] = {}
        self._shown_once = False
        self._placed: list[tuple[str, QDockWidget]] = []
        self._menus: dict[str, QMenu] = {}

        self.thread_ = QThread()
        self.thread_.setObjectName("kvstudio-model")
        self.worker = StudioWorker()  # no parent: it is moved to its thread
        self.worker.moveToThread(self.thread_)
        self.thread_.start()
        self.runner = TaskRunner(self.state, self.worker, self.thread_, parent=self)
        self.close_guard = CloseGuard(self)
        self._build_centre()
        self.menu("&File")  # first in the menu bar; features fill it

        # Built first, installed second: a feature may wire itself to any other while installing.
        self.loading = ModelLoading(self)
        self.form = RunForm(self)
        self.prompt_area = PromptArea(self)
        self.views = LiveViews(self)
        self.run = RunControl(self)
        self.snapshots = SnapshotFeature(self)
        self.compare = CompareFeature(self)
        self.runs = RunsFeature(self)
        self.exports = ExportsFeature(self)
        self.figures = FiguresFeature(self)  # figures of a run for papers (after runs and exports: it uses both)
        self.plugins_feature = PluginsFeature(self)
        self.caches = CachesFeature(self)
        self.evaluate = EvaluateFeature(self)
        self.finetune = FinetuneFeature(self)
        self.model_check = ModelCheckFeature(self)
        self.features = [self.loading, self.form, self.prompt_area, self.views, self.run, self.snapshots,
                         self.compare, self.runs, self.exports, self.figures, self.plugins_feature, self.caches,
                         self.evaluate, self.finetune, self.model_check]
        for feature in self.features:
            feature.install()
        self.menu("&File").addSeparator()
        self.menu("&File").addAction("Quit", self.close)
        self._arrange_docks()
        self.resize(1560, 960)
        self.restore_settings()

        # Connected after every feature's own handlers: buttons are set from what those handlers leave.
        self.state.busy_changed.connect(self.update_buttons)
        self.state.model_changed.connect(self.update_buttons)
        self.update_buttons()
        if self.plugins.errors:
            self.statusBar().showMessage(f"{len(self.plugins.errors)} plugin(s) failed to load: see the Plugins view")
        if history_problem:
            self.show_error(history_problem)

    # -- assembling ---------------------------------------------------------------------------------

    def _build_centre(self) -> None:
        self.error_text = QLabel("")
        self.error_text.setTextInteractionFlags(Qt.TextSelectableByMouse)
        close = QToolButton(text="✕")
        close.clicked.connect(lambda: self.error_banner.hide())
        self.error_banner = message_bar("error", self.error_text, close)
        # A refusal's banner goes once what it refused for is fixed (show_error's `holds`), not at the next run.
        self._problem_holds = None
        self._problem_timer = QTimer(self, interval=PROBLEM_CHECK_MS)
        self._problem_timer.timeout.connect(self._check_problem)
        central = QWidget()
        self.central_layout = QVBoxLayout(central)
        self.central_layout.addWidget(self.error_banner)
        self._bars = 0  # message bars below the error banner
        self.centre = QSplitter(Qt.Vertical)
        self.centre.setChildrenCollapsible(False)
        self.central_layout.addWidget(self.centre, 1)
        self.setCentralWidget(central)

    def add_to_centre(self, widget: QWidget, stretch: int) -> None:
        """A part of the centre column, below those already there; `stretch` is its share of the height."""
        self.centre.addWidget(widget)
        self.centre.setStretchFactor(self.centre.count() - 1, stretch)

    def add_bar(self, bar: QWidget) -> None:
        """A feature's message bar, with the error banner above the centre's content."""
        self._bars += 1
        self.central_layout.insertWidget(self._bars, bar)

    def add_dock(self, title: str, widget: QWidget, place: str, object_name: str | None = None,
                 scrolls: bool = True) -> QDockWidget:
        """A dock for a feature's widget; the window places it (PLACES) once every feature is in.
        `scrolls`: in a scroll area, so a view larger than its dock scrolls instead of growing the
        window past the screen (it must fit 1280x800); off for a widget that scrolls itself."""
        assert place in PLACES, place
        dock = QDockWidget(title, self, objectName=object_name or title.lower().replace(" ", "_"))
        dock.setWidget(scrolling(widget, sideways=place != "side") if scrolls else widget)
        self.docks[title] = dock
        self._placed.append((place, dock))
        return dock

    def menu(self, title: str) -> QMenu:
        """The menu of that title, made on first use (menus appear in the order first asked for)."""
        if title not in self._menus:
            self._menus[title] = self.menuBar().addMenu(title)
        return self._menus[title]

    def _arrange_docks(self) -> None:
        # Each dock goes straight into its tab group: added side by side first, they would stack and
        # stretch the window to the sum of their heights.
        side = [dock for place, dock in self._placed if place == "side"]
        views = [dock for place, dock in self._placed if place == "views"]
        for dock in side:
            dock.setFeatures(QDockWidget.DockWidgetMovable | QDockWidget.DockWidgetFloatable)
        for area, docks in ((Qt.LeftDockWidgetArea, side), (Qt.RightDockWidgetArea, views)):
            if docks:
                self.addDockWidget(area, docks[0])
            for dock in docks[1:]:
                self.tabifyDockWidget(docks[0], dock)
            if docks:
                docks[0].raise_()

    def _first_layout(self) -> None:
        """Without a saved layout: the set-up column and the views take their shares of the width."""
        side = [dock for place, dock in self._placed if place == "side"][:1]
        views = [dock for place, dock in self._placed if place == "views"][:1]
        self.resizeDocks(side + views, [SIDE_WIDTH, int(self.width() * VIEWS_SHARE)][:len(side + views)],
                         Qt.Horizontal)

    def event(self, event) -> bool:
        # Dock tabs are tab bars the window makes as docks are tabbed (and re-made as the user moves
        # them): whole labels, with scroll arrows when they do not fit, instead of "To…", "O…".
        if event.type() == QEvent.ChildPolished and isinstance(event.child(), QTabBar):
            event.child().setElideMode(Qt.ElideNone)
            event.child().setUsesScrollButtons(True)
        return super().event(event)

    def showEvent(self, event) -> None:
        super().showEvent(event)
        if not self._shown_once:
            self._shown_once = True
            if self.settings.value("window_state") is None:
                self._first_layout()

    # -- shared behaviour ---------------------------------------------------------------------------

    def update_buttons(self, *_changed) -> None:
        for feature in self.features:
            feature.update_buttons()

    def show_error(self, message: str, holds=None) -> None:
        """The banner, saying `message`. `holds`: for a refusal (the prompt is empty, no model yet), a
        check that is true while the problem lasts; the banner hides itself once it is false."""
        self.error_text.setText(message)
        self.error_banner.show()
        self._problem_holds = holds
        if holds is None:
            self._problem_timer.stop()
        else:
            self._problem_timer.start()

    def _check_problem(self) -> None:
        if self._problem_holds is not None and self.error_banner.isVisible() and self._problem_holds():
            return
        if self._problem_holds is not None and self.error_banner.isVisible():
            self.error_banner.hide()
        self._problem_holds = None
        self._problem_timer.stop()

    def hide_error(self) -> None:
        self.error_banner.hide()

    # Drops anywhere on the window go to the prompt area (documents; a .py file is offered as a plugin).
    def dragEnterEvent(self, event) -> None:
        self.prompt_area.drag_entered(event)

    def dropEvent(self, event) -> None:
        self.prompt_area.dropped(event)

    # -- settings -----------------------------------------------------------------------------------

    def restore_settings(self) -> None:
        for feature in self.features:
            feature.restore_settings(self.settings)
        if self.settings.value("geometry") is not None:
            self.restoreGeometry(self.settings.value("geometry"))
        if self.settings.value("window_state") is not None:
            self.restoreState(self.settings.value("window_state"))

    def save_settings(self) -> None:
        for feature in self.features:
            feature.save_settings(self.settings)
        self.settings.setValue("geometry", self.saveGeometry())
        self.settings.setValue("window_state", self.saveState())

    # -- shutdown -----------------------------------------------------------------------------------

    def closeEvent(self, event) -> None:
        """Stop whatever runs, let the worker finish its step, and stop its thread cleanly (asked first
        while something runs: close_guard.py)."""
        if not self.close_guard.may_close():
            event.ignore()
            return
        self.save_settings()
        for feature in self.features:
            feature.closing()
        self.runner.interrupt_all()
        self.thread_.quit()
        self.thread_.wait()
        if not self._released_gc:  # a window can be closed more than once
            self._released_gc = True
            gui_thread_gc.release()
        super().closeEvent(event)


def _open_history():
    """The run history, or (None, why) when it cannot be used: the studio runs on without it."""
    try:
        return RunHistory(), None
    except HistoryError as error:
        return None, str(error)
