"""Compare: one prompt under several policies; outputs, speed, memory, token maps side by side.

The policies run as the rows of one batched pass (compare_batch.py: each row its own cache and policy,
the weights read once per step for all), the live views following one row at a time (the row chooser)
and the table filling as each row ends; where a batch cannot run, or "one batched pass" is off, they
run one after the other, as single runs.

Laid out to be read at 1280x800 as at 1920x1080: the policy chooser is a drop-down on one row with
Compare and the progress ("running 2 of 3: h2o"), so the maps get the width; a short table of
figures and parameters; then one column per policy, each its token map (the height left) above its
whole output. The maps scroll together, and the columns scroll sideways when they do not fit.
"""

from __future__ import annotations

import uuid
from functools import partial

from PySide6.QtCore import Qt, Signal, Slot
from PySide6.QtGui import QFont
from PySide6.QtWidgets import (QCheckBox, QComboBox, QHBoxLayout, QHeaderView, QLabel, QListWidget, QMenu, QPlainTextEdit,
                               QPushButton, QScrollArea, QSplitter, QTableWidget, QTableWidgetItem,
                               QToolButton, QVBoxLayout, QWidget, QWidgetAction)

from kvstudio.core.policies import available_policies, policy_class
from kvstudio.core.recording.events import Recorder
from kvstudio.core.storage import STORAGE_KEY, merge_in_name, split_cache_name
from kvstudio.core.spec import build_policy
from kvstudio.gui.widgets import policy_checklist
from kvstudio.gui.feature import Feature
from kvstudio.gui.widgets.form_words import in_form_words
from kvstudio.gui.features.compare_batch import CompareBatch, compare_batch_task, row_label, why_serial
from kvstudio.gui.features.run_summary import budget_text, parameters_text, plural
from kvstudio.gui.features.run_task import RunOutcome, RunRequest
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
    row_chosen = Signal(int)  # the row of a batched pass the live views follow

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
        self.start.setToolTip("Run the prompt under each checked policy, with the budget and generation "
                              "settings from the Set-up column")
        self.batched = QCheckBox("one batched pass")  # named so in the status and its tooltip
        self.batched.setChecked(True)
        self.batched.setToolTip("Run the policies together, one row each, reading the model's weights once per "
                                "step for all rows (each row equals its single run). Off: one after the other, "
                                "so each row's tokens/s is the policy's own speed, not its rate beside the others")
        self.rows = QComboBox()
        self.rows.setToolTip("the row of the batch the live views (token map, attention, occupancy, ...) follow")
        self.rows.hide()  # a batched pass shows it
        self.rows.currentIndexChanged.connect(lambda index: index >= 0 and self.row_chosen.emit(index))
        self.status = QLabel("Choose policies, then Compare: they run the prompt together, one row each.")
        self.status.setWordWrap(True)
        controls = QHBoxLayout()
        controls.addWidget(self.choose)
        controls.addWidget(self.start)
        controls.addWidget(self.batched)
        controls.addStretch(1)
        progress = QHBoxLayout()  # a line of its own: beside the chooser it was squeezed off a 1280-px window
        progress.addWidget(self.rows)
        progress.addWidget(self.status, 1)

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
        layout.addLayout(progress)
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
        self.show_rows([])
        for column in self.columns:
            self.maps.removeWidget(column)
            column.deleteLater()
        self.columns = []

    def show_progress(self, text: str) -> None:
        self.status.setText(text)

    def show_rows(self, labels: list[str]) -> None:
        """The row chooser's rows ('row 2: h2o@128'), the first chosen; hidden without a batch."""
        self.rows.blockSignals(True)
        self.rows.clear()
        self.rows.addItems(labels)
        self.rows.blockSignals(False)
        self.rows.setVisible(bool(labels))

    def start_policy(self, policy: str, recorder) -> PolicyColumn:
        """A column for the policy whose run starts now; its map follows the run live."""
        column = PolicyColumn(policy, recorder)
        self.maps.addWidget(column)
        self.columns.append(column)
        bar = column.map.text.verticalScrollBar()
        bar.valueChanged.connect(lambda _value, source=bar: self._scroll_together(source))
        return column

    def refresh_running(self) -> None:
        """The live columns' maps read what is new (the feature calls this at the views' rate): the last
        one of a serial comparison, every unfinished row of a batched pass."""
        if self.columns and on_screen(self):
            for column in self.columns:
                if not column.output.toPlainText():
                    column.refresh()

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
    """The Compare dock: run the prompt under each checked policy, as one batched pass (one row per
    policy) or, where a batch cannot run or the box is off, one after the other."""

    def __init__(self, window):
        super().__init__(window)
        self.view = CompareView()
        self.queue: list[str] = []  # policies still to run in this comparison (one after the other)
        self.total = 0  # policies in the comparison in progress (0: none)
        self.done = 0
        self.stopped = False  # Stop ended a run of it
        self.serial_note = ""  # why this comparison runs one after the other, when it cannot batch
        self.batch_outcomes: list[RunOutcome] = []  # the rows of the batched pass shown (the row chooser's)

    def install(self) -> None:
        window = self.window
        window.add_dock("Compare", self.view, "views")
        self.view.compare_requested.connect(self.request)
        self.view.row_chosen.connect(self.follow_row)
        window.run.run_ended.connect(self._run_ended)
        window.plugins_feature.policies_changed.connect(self.view.set_policies)
        window.views.timer.timeout.connect(self.view.refresh_running)

    @Slot(list)
    def request(self, policies: list[str]) -> None:
        window, state, form = self.window, self.window.state, self.window.form
        # Each refusal with the check that holds while it lasts, as Run's: its banner goes once it is fixed.
        if not policies:  # its banner goes once a policy is checked
            window.show_error("check at least one policy to compare", holds=lambda: not self.view.checked())
            return
        refusals = (
            ("load a model first", lambda: state.model_info is None),
            ("a run is in progress: stop it first", lambda: bool(state.busy)),
            ("the prompt is empty: type one or drop a document",
             lambda: not window.prompt_area.full_prompt().strip()),
            ("policy parameters: {}", lambda: form.policy.currentText() in policies and form.validate()),
        )
        for message, holds in refusals:
            if found := holds():
                window.show_error(message.format(found), holds=holds)
                return
        window.hide_error()
        self.view.clear()
        self.queue, self.total, self.done, self.stopped = list(policies), len(policies), 0, False
        self.batch_outcomes = []
        window.docks["Compare"].show()
        window.docks["Compare"].raise_()
        reason = why_serial(state.model_info, form.measure_loss.isChecked())
        self.serial_note = ""
        self.view.status.setToolTip("")
        if self.view.batched.isChecked() and reason is None:
            self._start_batch()
            return
        self.serial_note = f"one after the other: {reason}" if self.view.batched.isChecked() and reason else ""
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

    def _checked_parameters(self, policy: str) -> dict | None:
        """The policy's parameters, or None when the policy refuses them (its failure row says why)."""
        parameters = self.parameters_for(policy)
        try:
            build_policy(policy, dict(parameters))  # guarded, like every call into a policy
        except Exception as error:  # a bad combination for this policy: report it, go on
            self.done += 1
            self.view.add_failure(policy, in_form_words(str(error), self.window.form.labels()), parameters)
            return None
        return parameters

    # -- one batched pass -------------------------------------------------------------------------------

    def _start_batch(self) -> None:
        window = self.window
        accepted = [(policy, parameters) for policy in self.queue
                    if (parameters := self._checked_parameters(policy)) is not None]
        self.queue = []
        if not accepted:
            self._finished()
            return
        batch_id = uuid.uuid4().hex[:8]
        settings, prompt = window.form.generation_settings(), window.prompt_area.full_prompt()
        labels = [row_label(index, policy, parameters) for index, (policy, parameters) in enumerate(accepted)]
        for index, (policy, parameters) in enumerate(accepted):
            link = {"id": batch_id, "row": index + 1, "rows": len(accepted), "label": policy}
            request = RunRequest(prompt, policy, parameters, settings, Recorder(), "compare", batch=link)
            window.runs.record_start(request)  # each row its own run in the history, linked to the batch
            self.batch_outcomes.append(RunOutcome(request))
            self.view.start_policy(policy, request.recorder)
        self.view.show_rows(labels)
        self.follow_row(0)
        watched = self.batch_outcomes[0].request.recorder.watch_layers  # what the attention view asked for
        for outcome in self.batch_outcomes[1:]:
            outcome.request.recorder.watch_layers = watched
        task = window.runner.start(compare_batch_task(self.batch_outcomes))
        window.run.task = task  # Stop ends every row in flight
        task.status_changed.connect(window.statusBar().showMessage)
        task.partial_result.connect(self._row_ended)
        task.done.connect(self._batch_done)
        task.failed.connect(partial(self._batch_failed, list(self.batch_outcomes)))
        self.view.show_progress(f"running {len(accepted)} {'policy' if len(accepted) == 1 else 'policies'} "
                                "as one batch, one row each…")
        self.view.status.setToolTip("Each row is its single run (the same tokens and evictions). Its tokens/s and "
                                    "prefill s are measured as a single run's, over its own steps, and every step "
                                    "carries all the rows: untick 'one batched pass' for each policy's own speed.")
        window.statusBar().showMessage(f"comparing {len(accepted)} policies in one batched pass…")

    @Slot(int)
    def follow_row(self, index: int) -> None:
        """The live views follow row `index` of the batched pass (from its first event)."""
        if not 0 <= index < len(self.batch_outcomes):
            return
        recorder = self.batch_outcomes[index].request.recorder
        self.window.state.recorder = recorder
        self.window.views.follow_new_run(recorder)
        self.window.views.refresh(include_hidden=True)
        if self.view.rows.currentIndex() != index:
            self.view.rows.setCurrentIndex(index)

    def _row_ended(self, outcome: RunOutcome) -> None:
        """A row ended: its run in the history, its line in the table, its column's final state."""
        self.done += 1
        self.window.state.last_outcome = outcome  # the last run ended, as after a single run
        self._show_outcome(outcome)
        self.window.runs.record_finish(outcome)
        if outcome.request.recorder is self.window.state.recorder:
            self.window.views.refresh(include_hidden=True)
        self.view.show_progress(f"{self.done} of {self.total} done; the rest still running as one batch…")

    def _batch_done(self, batch: CompareBatch) -> None:
        figures = batch.batch
        self.stopped |= figures.cancelled
        self.window.statusBar().showMessage(f"compared {len(batch.outcomes)} policies in one batched pass: "
                                            f"{figures.steps} steps, {figures.seconds:.1f} s")
        self._finished(f" in one batched pass ({figures.steps} steps, {figures.seconds:.1f} s)")

    def _batch_failed(self, outcomes: list, message: str) -> None:
        """The whole batch failed (out of memory, a fault outside any row): every row not ended fails with it."""
        self.window.show_error(message)
        for outcome in outcomes:
            if outcome.result is None and outcome.error is None:
                outcome.error = message
                self._row_ended(outcome)
        self._finished()

    def _show_outcome(self, outcome: RunOutcome) -> None:
        request = outcome.request
        self.stopped |= outcome.result is not None and outcome.result.stop_reason == "cancelled"
        if outcome.error:
            self.view.add_failure(request.policy, outcome.error, request.parameters)
        else:
            self.view.add_result(request.policy, outcome.result, request.recorder, request.parameters)

    # -- one after the other ----------------------------------------------------------------------------

    def _next(self) -> None:
        if not self.queue:
            self._finished()
            return
        policy = self.queue.pop(0)
        parameters = self._checked_parameters(policy)
        if parameters is None:
            self._next()
            return
        position = f"{self.done + 1} of {self.total}"
        if self.window.run.start(policy, parameters, label="compare"):
            self.view.start_policy(policy, self.window.state.recorder)
            note = f" ({self.serial_note})" if self.serial_note else ""
            self.view.show_progress(f"running {position}: {policy}…{note}")
        else:
            self.queue = []
            self._finished()

    def _run_ended(self, outcome) -> None:
        request = outcome.request
        if request.label != "compare" or request.batch is not None:
            return
        self.done += 1
        self._show_outcome(outcome)
        self._next()

    def _finished(self, how: str = "") -> None:
        if not self.total:
            return
        note = f" ({self.serial_note})" if self.serial_note else ""
        if self.stopped or self.done < self.total:
            self.view.show_progress(f"stopped at {self.done} of {self.total}{how}{note}")
        else:
            self.view.show_progress(f"{self.done} of {self.total} done{how}{note}")
        self.total = self.done = 0

    def update_buttons(self) -> None:
        state = self.window.state
        self.view.start.setEnabled(not state.busy and state.model_info is not None)

    def closing(self) -> None:
        self.queue = []
