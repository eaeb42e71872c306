"""Compare: one prompt under several policies in turn; outputs, speed, memory, token maps side by side."""

from __future__ import annotations

from PySide6.QtCore import Qt, Signal, Slot
from PySide6.QtWidgets import (QHBoxLayout, QLabel, QListWidget, QListWidgetItem, QPushButton, QScrollArea,
                               QSplitter, QTableWidget, QTableWidgetItem, QVBoxLayout, QWidget)

from ..core.policies import available_policies, policy_class
from ..core.storage import STORAGE_KEY, build_policy, split_cache_name
from .feature import Feature
from .views.token_map import TokenMapView

COLUMNS = ("policy", "tokens/s", "prefill s", "peak cache MiB", "evictions", "output")
STORAGE_VARIANTS = ("fp", "int8", "int4")


class CompareView(QWidget):
    compare_requested = Signal(list)  # policy names, in order

    def __init__(self, parent=None):
        super().__init__(parent)
        self.choices = QListWidget()
        self.set_policies(list(available_policies()))
        self.start = QPushButton("Compare")
        self.start.setToolTip("Run the prompt under each checked policy in turn, with the budget and "
                              "generation settings from the left panel")
        left = QVBoxLayout()
        left.addWidget(QLabel("policies"))
        left.addWidget(self.choices)
        left.addWidget(self.start)
        self.table = QTableWidget(0, len(COLUMNS))
        self.table.setHorizontalHeaderLabels(COLUMNS)
        self.table.horizontalHeader().setStretchLastSection(True)
        self.maps = QHBoxLayout()
        maps_holder = QWidget()
        maps_holder.setLayout(self.maps)
        scroll = QScrollArea(widgetResizable=True)
        scroll.setWidget(maps_holder)
        right = QSplitter(Qt.Vertical)
        right.addWidget(self.table)
        right.addWidget(scroll)
        layout = QHBoxLayout(self)
        side = QWidget()
        side.setLayout(left)
        side.setMaximumWidth(180)
        layout.addWidget(side)
        layout.addWidget(right, 1)
        self.map_views: list[TokenMapView] = []
        self.start.clicked.connect(lambda: self.compare_requested.emit(self.checked()))

    def set_policies(self, names: list[str]) -> None:
        """The policies offered (after a plugin reload), keeping what was checked; h2o also stored
        in fp and in int4, to compare codecs directly (the form's group size and residual apply)."""
        names = list(names) + [f"h2o-{codec}" for codec in STORAGE_VARIANTS if "h2o" in names]
        checked = set(self.checked()) if self.choices.count() else {"full", "streaming_llm", "h2o"}
        self.choices.clear()
        for name in names:
            item = QListWidgetItem(name)
            item.setFlags(item.flags() | Qt.ItemIsUserCheckable)
            item.setCheckState(Qt.Checked if name in checked else Qt.Unchecked)
            self.choices.addItem(item)

    def checked(self) -> list[str]:
        return [self.choices.item(i).text() for i in range(self.choices.count())
                if self.choices.item(i).checkState() == Qt.Checked]

    def clear(self) -> None:
        self.table.setRowCount(0)
        for view in self.map_views:
            self.maps.removeWidget(view)
            view.deleteLater()
        self.map_views = []

    def add_result(self, policy: str, result, recorder) -> None:
        row = self.table.rowCount()
        self.table.insertRow(row)
        cells = (policy, f"{result.tokens_per_second:.1f}", f"{result.prefill_seconds:.2f}",
                 f"{result.peak_cache_bytes / 2**20:.2f}", str(result.evictions), result.text.strip())
        for column, value in enumerate(cells):
            self.table.setItem(row, column, QTableWidgetItem(value))
        view = TokenMapView(compact=True)
        view.setMinimumWidth(260)
        view.follow(recorder)
        view.refresh()
        view.summary.setText(f"{policy}: " + view.summary.text())
        self.maps.addWidget(view)
        self.map_views.append(view)

    def add_failure(self, policy: str, message: str) -> None:
        row = self.table.rowCount()
        self.table.insertRow(row)
        self.table.setItem(row, 0, QTableWidgetItem(policy))
        self.table.setItem(row, len(COLUMNS) - 1, QTableWidgetItem(f"failed: {message}"))


class CompareFeature(Feature):
    """The Compare dock: run the prompt under each checked policy in turn, one after the other."""

    def __init__(self, window):
        super().__init__(window)
        self.view = CompareView()
        self.queue: list[str] = []  # policies still to run in this comparison

    def install(self) -> None:
        window = self.window
        window.add_dock("Compare", self.view, "views")
        self.view.compare_requested.connect(self.request)
        window.run.run_ended.connect(self._run_ended)
        window.plugins_feature.policies_changed.connect(self.view.set_policies)

    @Slot(list)
    def request(self, policies: list[str]) -> None:
        window = self.window
        if not policies:
            window.show_error("check at least one policy to compare")
            return
        if window.model_info is None or window.running:
            window.show_error("load a model first" if window.model_info is None
                              else "a run is in progress: stop it first")
            return
        self.view.clear()
        self.queue = list(policies)
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
        return shared

    def _next(self) -> None:
        if not self.queue:
            return
        policy = self.queue.pop(0)
        try:
            build_policy(policy, self.parameters_for(policy))  # guarded, like every call into a policy
        except Exception as error:  # a bad combination for this policy: report it, go on
            self.view.add_failure(policy, str(error))
            self._next()
            return
        if not self.window.run.start(policy, self.parameters_for(policy), label="compare"):
            self.queue = []

    def _run_ended(self, outcome) -> None:
        request = outcome.request
        if request.label == "compare":
            if outcome.error:
                self.view.add_failure(request.policy, outcome.error)
            else:
                self.view.add_result(request.policy, outcome.result, request.recorder)
        self._next()

    def update_buttons(self) -> None:
        self.view.start.setEnabled(not self.window.running and self.window.model_info is not None)

    def closing(self) -> None:
        self.queue = []
