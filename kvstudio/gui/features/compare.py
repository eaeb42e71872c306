"""Compare: one prompt under several policies in turn; outputs, speed, memory, token maps side by side.

Laid out to be read at 1280x800 as at 1920x1080: the policy chooser is a drop-down on one row with
Compare and the progress ("running 2 of 3: h2o"), so the maps get the width; a short table of
figures and parameters; then one column per policy, each its token map (the height left) above its
whole output. The maps scroll together, and the columns scroll sideways when they do not fit.
"""

from __future__ import annotations

from PySide6.QtCore import Qt, Signal, Slot
from PySide6.QtGui import QFont
from PySide6.QtWidgets import (QHBoxLayout, QHeaderView, QLabel, QListWidget, QMenu, QPlainTextEdit,
                               QPushButton, QScrollArea, QSplitter, QTableWidget, QTableWidgetItem,
                               QToolButton, QVBoxLayout, QWidget, QWidgetAction)

from kvstudio.core.policies import available_policies, policy_class
from kvstudio.core.storage import STORAGE_KEY, merge_in_name, split_cache_name
from kvstudio.core.spec import build_policy
from kvstudio.gui.widgets import policy_checklist
from kvstudio.gui.feature import Feature
from kvstudio.gui.widgets.form_words import in_form_words
from kvstudio.gui.features.run_summary import budget_text, parameters_text, plural
from kvstudio.gui.views.base import on_screen
from kvstudio.gui.views.token_map import TokenMapView

COLUMNS = ("policy", "budget", "parameters", "tokens/s", "prefill s", "peak cache MiB", "evictions")
STORAGE_VARIANTS = ("fp", "int8", "int4")
MERGE_VARIANTS = ("full+minicache", "h2o+minicache")  # cross-layer merging, with the form's merge settings
MAP_MIN_WIDTH = 170  # three maps fit a 1280-px window; more than fit scroll sideways


class PolicyColumn(QWidget):
    """One policy of a comparison: its name and figures, its token map, its output in full."""

    def __init__(self, policy: str, recorder, parent=None):
        super().__init__(parent)
        self.policy = policy
        self.header = QLabel(f"<b>{policy}</b> · running…")
        self.header.setWordWrap(True)
        self.map = TokenMapView(compact=True)
        self.map.summary.hide()  # the header says it, with the policy's name
        small = QFont(self.map.text.font())
        small.setPointSizeF(max(small.pointSizeF() - 1, 7))
        self.map.text.setFont(small)
        self.map.label = policy  # its summary (the header's text, and a tooltip) names the policy
        self.map.follow(recorder)
        self.output = QPlainTextEdit(readOnly=True)
        self.output.setPlaceholderText("output appears when this policy's run ends")
        self.output.setMaximumHeight(110)
        layout = QVBoxLayout(self)
        layout.setContentsMargins(2, 2, 2, 2)
        layout.addWidget(self.header)
        layout.addWidget(self.map, 1)
        layout.addWidget(QLabel("output"))
        layout.addWidget(self.output)
        self.setMinimumWidth(MAP_MIN_WIDTH)

    def refresh(self) -> None:
        self.map.refresh()

    def finish(self, result) -> None:
        self.refresh()
        self.map.flush()  # the recording is complete: its final state now, not after the throttle
        self.output.setPlainText(result.text.strip() or "(no text)")
        summary = self.map.summary.text().removeprefix(f"{self.policy}: ")
        self.header.setText(f"<b>{self.policy}</b> · {summary}")

    def fail(self, message: str) -> None:
        self.output.setPlainText(f"failed: {message}")
        self.header.setText(f"<b>{self.policy}</b> · <span style='color:#e66'>failed</span>")


class CompareView(QWidget):
    compare_requested = Signal(list)  # policy names, in order

    def __init__(self, parent=None):
        super().__init__(parent)
        self.choices = QListWidget()
        self.choices.setMinimumHeight(260)
        self.choose = QToolButton()
        self.choose.setPopupMode(QToolButton.InstantPopup)
        self.choose.setToolTip("the policies to compare, in order")
        menu = QMenu(self.choose)
        holder = QWidgetAction(menu)
        holder.setDefaultWidget(self.choices)
        menu.addAction(holder)
        self.choose.setMenu(menu)
        self.set_policies(list(available_policies()))
        self.choices.itemChanged.connect(lambda _: self._show_choice())
        self.start = QPushButton("Compare")
        self.start.setToolTip("Run the prompt under each checked policy in turn, with the budget and "
                              "generation settings from the Set-up column")
        self.status = QLabel("Choose policies, then Compare: each runs the prompt in turn.")
        self.status.setWordWrap(True)
        controls = QHBoxLayout()
        controls.addWidget(self.choose)
        controls.addWidget(self.start)
        controls.addWidget(self.status, 1)

        self.table = QTableWidget(0, len(COLUMNS))
        self.table.setHorizontalHeaderLabels(COLUMNS)
        self.table.horizontalHeader().setSectionResizeMode(QHeaderView.ResizeToContents)  # headers whole, always
        self.table.verticalHeader().hide()
        self.table.setMinimumHeight(60)
        self.maps = QHBoxLayout()
        self.maps.setContentsMargins(0, 0, 0, 0)
        maps_holder = QWidget()
        maps_holder.setLayout(self.maps)
        self.maps_scroll = QScrollArea(widgetResizable=True)
        self.maps_scroll.setVerticalScrollBarPolicy(Qt.ScrollBarAlwaysOff)  # each map scrolls, all together
        self.maps_scroll.setWidget(maps_holder)
        self.splitter = QSplitter(Qt.Vertical)
        self.splitter.addWidget(self.table)
        self.splitter.addWidget(self.maps_scroll)
        self.splitter.setStretchFactor(0, 0)
        self.splitter.setStretchFactor(1, 1)
        self.splitter.setSizes([110, 600])
        layout = QVBoxLayout(self)
        layout.setContentsMargins(4, 4, 4, 4)
        layout.addLayout(controls)
        layout.addWidget(self.splitter, 1)
        self.columns: list[PolicyColumn] = []
        self._syncing = False
        self.start.clicked.connect(lambda: self.compare_requested.emit(self.checked()))

    @property
    def map_views(self) -> list[TokenMapView]:
        return [column.map for column in self.columns]

    # -- choosing -----------------------------------------------------------------------------------

    def set_policies(self, names: list[str]) -> None:
        """The policies offered (after a plugin reload), keeping what was checked; h2o also stored
        in fp and in int4, to compare codecs directly (the form's group size and residual apply)."""
        names = list(names) + [f"h2o-{codec}" for codec in STORAGE_VARIANTS if "h2o" in names] \
            + [name for name in MERGE_VARIANTS if name.partition("+")[0] in names]
        policy_checklist.offer(self.choices, names)
        self._show_choice()

    def checked(self) -> list[str]:
        return policy_checklist.checked_names(self.choices)

    def _show_choice(self) -> None:
        checked = self.checked()
        shown = ", ".join(checked[:3]) + (f" +{len(checked) - 3}" if len(checked) > 3 else "")
        self.choose.setText(f"Policies: {shown or 'none'} ▾")

    # -- a comparison -------------------------------------------------------------------------------

    def clear(self) -> None:
        self.table.setRowCount(0)
        for column in self.columns:
            self.maps.removeWidget(column)
            column.deleteLater()
        self.columns = []

    def show_progress(self, text: str) -> None:
        self.status.setText(text)

    def start_policy(self, policy: str, recorder) -> PolicyColumn:
        """A column for the policy whose run starts now; its map follows the run live."""
        column = PolicyColumn(policy, recorder)
        self.maps.addWidget(column)
        self.columns.append(column)
        bar = column.map.text.verticalScrollBar()
        bar.valueChanged.connect(lambda _value, source=bar: self._scroll_together(source))
        return column

    def refresh_running(self) -> None:
        """The live column's map reads what is new (the feature calls this at the views' rate)."""
        if self.columns and on_screen(self):
            self.columns[-1].refresh()

    def add_result(self, policy: str, result, recorder, parameters: dict | None = None) -> None:
        row = self._add_row(policy, parameters)
        for name, value in (("tokens/s", f"{result.tokens_per_second:.1f}" if len(result.token_ids) >= 2 else "–"),
                            ("prefill s", f"{result.prefill_seconds:.2f}"),
                            ("peak cache MiB", f"{result.peak_cache_bytes / 2**20:.2f}"),
                            ("evictions", str(result.evictions))):
            self.table.setItem(row, COLUMNS.index(name), QTableWidgetItem(value))
        self.table.item(row, 0).setToolTip(f"{result.stop_reason} · {plural(len(result.token_ids), 'token')}")
        column = self._column_for(policy) or self.start_policy(policy, recorder)
        column.finish(result)

    def add_failure(self, policy: str, message: str, parameters: dict | None = None) -> None:
        row = self._add_row(policy, parameters)
        failure = QTableWidgetItem(f"failed: {message}")
        failure.setToolTip(message)
        self.table.setItem(row, COLUMNS.index("tokens/s"), failure)
        self.table.setSpan(row, COLUMNS.index("tokens/s"), 1, len(COLUMNS) - COLUMNS.index("tokens/s"))
        column = self._column_for(policy)
        if column is not None:
            column.fail(message)

    def _add_row(self, policy: str, parameters: dict | None) -> int:
        row = self.table.rowCount()
        self.table.insertRow(row)
        self.table.setItem(row, 0, QTableWidgetItem(policy))
        if parameters is not None:
            self.table.setItem(row, 1, QTableWidgetItem(budget_text(parameters)))
            self.table.setItem(row, 2, QTableWidgetItem(parameters_text(parameters) or "defaults"))
        return row

    def _column_for(self, policy: str) -> PolicyColumn | None:
        unfinished = [c for c in self.columns if c.policy == policy and not c.output.toPlainText()]
        return unfinished[0] if unfinished else None

    def _scroll_together(self, source) -> None:
        """Every map shows the same part of its text (by fraction: generated text differs in length)."""
        if self._syncing:
            return
        self._syncing = True
        try:
            fraction = source.value() / source.maximum() if source.maximum() else 0.0
            for column in self.columns:
                bar = column.map.text.verticalScrollBar()
                if bar is not source:
                    bar.setValue(round(fraction * bar.maximum()))
        finally:
            self._syncing = False


class CompareFeature(Feature):
    """The Compare dock: run the prompt under each checked policy in turn, one after the other."""

    def __init__(self, window):
        super().__init__(window)
        self.view = CompareView()
        self.queue: list[str] = []  # policies still to run in this comparison
        self.total = 0  # policies in the comparison in progress (0: none)
        self.done = 0
        self.stopped = False  # Stop ended a run of it

    def install(self) -> None:
        window = self.window
        window.add_dock("Compare", self.view, "views")
        self.view.compare_requested.connect(self.request)
        window.run.run_ended.connect(self._run_ended)
        window.plugins_feature.policies_changed.connect(self.view.set_policies)
        window.views.timer.timeout.connect(self.view.refresh_running)

    @Slot(list)
    def request(self, policies: list[str]) -> None:
        window = self.window
        if not policies:
            window.show_error("check at least one policy to compare")
            return
        if window.state.model_info is None or window.state.busy:
            window.show_error("load a model first" if window.state.model_info is None
                              else "a run is in progress: stop it first")
            return
        self.view.clear()
        self.queue, self.total, self.done, self.stopped = list(policies), len(policies), 0, False
        window.docks["Compare"].show()
        window.docks["Compare"].raise_()
        self._next()

    def drop_queue(self) -> None:
        """Stop after the run in progress (Stop, or a single run started)."""
        self.queue = []

    def parameters_for(self, policy: str) -> dict:
        """The policy's defaults, with the budget and shared parameters from the form where they apply."""
        base, _ = split_cache_name(policy)  # 'h2o-int4': the codec in the name wins over the form's
        accepted = {spec.name for spec in policy_class(base).Config.parameters()} | {STORAGE_KEY}
        shared = {k: v for k, v in self.window.form.parameters().items() if k in accepted and k != "rerotate"}
        if base == "full":
            shared.pop("budget", None)
        if merge_in_name(policy):  # 'h2o+minicache' merges with the form's merge settings, merge on or off there
            storage = shared.get(STORAGE_KEY, {}) | self.window.form.storage_form.merge_fields()
            shared[STORAGE_KEY] = storage
        return shared

    def _next(self) -> None:
        if not self.queue:
            self._finished()
            return
        policy = self.queue.pop(0)
        parameters = self.parameters_for(policy)
        try:
            build_policy(policy, dict(parameters))  # guarded, like every call into a policy
        except Exception as error:  # a bad combination for this policy: report it, go on
            self.done += 1
            self.view.add_failure(policy, in_form_words(str(error), self.window.form.labels()), parameters)
            self._next()
            return
        position = f"{self.done + 1} of {self.total}"
        if self.window.run.start(policy, parameters, label="compare"):
            self.view.start_policy(policy, self.window.state.recorder)
            self.view.show_progress(f"running {position}: {policy}…")
        else:
            self.queue = []
            self._finished()

    def _run_ended(self, outcome) -> None:
        request = outcome.request
        if request.label != "compare":
            return
        self.done += 1
        self.stopped |= outcome.result is not None and outcome.result.stop_reason == "cancelled"
        if outcome.error:
            self.view.add_failure(request.policy, outcome.error, request.parameters)
        else:
            self.view.add_result(request.policy, outcome.result, request.recorder, request.parameters)
        self._next()

    def _finished(self) -> None:
        if not self.total:
            return
        if self.stopped or self.done < self.total:
            self.view.show_progress(f"stopped at {self.done} of {self.total}")
        else:
            self.view.show_progress(f"{self.done} of {self.total} done")
        self.total = self.done = 0

    def update_buttons(self) -> None:
        state = self.window.state
        self.view.start.setEnabled(not state.busy and state.model_info is not None)

    def closing(self) -> None:
        self.queue = []
