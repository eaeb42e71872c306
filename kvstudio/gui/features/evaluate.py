"""The Evaluate view: choose a task, policies and budgets; run the sweep on the model's thread with
Stop; heatmaps and curves fill in as cells finish; double-click a cell to open it as an ordinary run.

The sweep is a task on the model's thread (task_runner.py; one model, one thread): each finished cell
is a partial result (cells take seconds), nothing is sent per token. Everything drawn comes from
the cell records the core stores, the same ones `kvstudio eval` prints and exports.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pyqtgraph as pg
from PySide6.QtCore import Signal, Slot
from PySide6.QtWidgets import (QAbstractItemView, QCheckBox, QComboBox, QFileDialog, QFormLayout, QGridLayout,
                               QHBoxLayout, QLabel, QLineEdit, QListWidget, QProgressBar, QPushButton, QSizePolicy,
                               QSpinBox, QTableWidget, QTableWidgetItem, QTabWidget, QVBoxLayout, QWidget)

from kvstudio.core.errors import KVStudioError
from kvstudio.core.evaluate.language import LanguageOptions
from kvstudio.core.evaluate.results import export_cells, needle_grid, running_mean, score_by_budget, score_by_bytes
from kvstudio.core.evaluate.cluster import ClusterTarget, open_cluster_sweep
from kvstudio.core.evaluate.sweep import Sweep, SweepSpec, default_store_path
from kvstudio.core.evaluate.protocols import DEFAULT_PROTOCOL, PROTOCOLS
from kvstudio.core.evaluate.tasks import GENERATION_TASKS, RULER_SUBTASKS, TASKS, TaskOptions
from kvstudio.core.persist.history import HistoryError, RunHistory
from kvstudio.core.policies import available_policies
from kvstudio.gui.features.evaluate_cluster import RunOnForm
from kvstudio.gui.widgets import policy_checklist
from kvstudio.gui.widgets.plot_grid import PlotGrid
from kvstudio.gui.feature import Feature
from kvstudio.gui.task_runner import RunningTask, Task
from kvstudio.core.evaluate.figures import save_figure

QA_SAMPLE = Path(__file__).resolve().parents[3] / "resources" / "qa_sample.jsonl"
# Depth and score next to the policy: at 1280 px the later columns are off to the right.
TABLE_COLUMNS = ("policy", "budget", "tokens", "depth", "score", "subtask", "peak MiB", "seconds", "run", "output")
NO_SWEEP_YET = "no sweep yet: choose a task, policies and budgets above, then Run sweep"
CURVE_WINDOW = 64
TITLE_SIZE = "9pt"  # a heatmap's title: its policy's name sets the narrowest the heatmap can be
COLOURS = ("#4e79a7", "#f28e2b", "#e15759", "#76b7b2", "#59a14f", "#edc948", "#b07aa1", "#ff9da7", "#9c755f")


def _needle_lookup_table() -> np.ndarray:
    """256 colours: index 0 is 'not run yet' (grey), 1..255 run red (lost) to yellow to green (found)."""
    table = np.zeros((256, 3), dtype=np.uint8)
    table[0] = (70, 70, 70)
    stops = np.array([(240, 73, 110), (235, 184, 57), (12, 215, 159)], dtype=np.float32)
    for index in range(1, 256):
        x = (index - 1) / 254 * 2
        low = min(int(x), 1)
        table[index] = stops[low] + (stops[low + 1] - stops[low]) * (x - low)
    return table


LOOKUP = _needle_lookup_table()


def sweep_task(spec: SweepSpec, history_path, fresh: bool, cluster: ClusterTarget | None = None) -> Task:
    """The sweep as a task: each finished cell a partial result, its progress as status and percent.
    `fresh`: forget the stored cells first. `cluster`: the cells run on its workers instead."""
    def work(engine, state):
        history = None
        if history_path is not None:
            try:  # its own connection: SQLite connections stay on the thread that made them
                history = RunHistory(history_path)
            except HistoryError:
                history = None
        store = default_store_path(spec)
        if fresh:
            store.unlink(missing_ok=True)

        def progress(step):
            state.set_progress_value(100 * step.done / step.total if step.total else 0)
            state.set_status(progress_text(step))

        try:
            if cluster is None:
                sweep = Sweep(engine, spec, store, history=history, cancel=state.cancel)
            else:
                state.set_status(f"starting the Ray workers ({cluster.address}); each loads {spec.model} once…")
                sweep = open_cluster_sweep(cluster, spec, store, history=history, cancel=state.cancel)
            return sweep.run(on_cell=state.set_partial_result, on_progress=progress)
        finally:
            if history is not None:
                history.close()

    return Task("evaluation", work, explain={"chunk_size": spec.chunk_size})


def progress_text(progress) -> str:
    """'3/8 (2 from the store): needle @ 128 · about 2 min left'."""
    left = "" if progress.seconds_left is None else f" · about {_duration(progress.seconds_left)} left"
    reused = f" ({progress.reused} from the store)" if progress.reused else ""
    return f"{progress.done}/{progress.total}{reused}: {progress.current}{left}"


class EvaluateView(QWidget):
    sweep_requested = Signal(bool)  # fresh: forget the stored cells first
    open_run_requested = Signal(int)

    def __init__(self, parent=None):
        super().__init__(parent)
        self.records: list[dict] = []
        self.spec: SweepSpec | None = None
        self._build_controls()
        self._build_results()
        layout = QHBoxLayout(self)
        side = QWidget()
        side.setLayout(self.controls)
        side.setMaximumWidth(300)
        layout.addWidget(side)
        layout.addWidget(self.results, 1)
        self._task_chosen(self.task.currentText())

    def heightForWidth(self, width: int) -> int:
        """As tall as the view must be, not as it would like: the dock's scroll area sized it by its preferred
        height (the lists and rows at their preferred sizes, 756 px) and scrolled the status line under Run
        sweep out of sight at 1280x800, where the minimum fits. Now the lists give way before it scrolls."""
        return self.minimumSizeHint().height()

    # -- construction -----------------------------------------------------------------------------

    def _build_controls(self) -> None:
        self.task = QComboBox()
        self.task.addItems(TASKS)
        self.task.setCurrentText("needle")
        self.policies = QListWidget()
        self.policies.setMaximumHeight(150)
        self.set_policies(list(available_policies()))
        self.budgets = QLineEdit("128,256")
        self.lengths = QLineEdit("1024,2048")
        self.depths = QLineEdit("0,0.25,0.5,0.75,1")
        self.samples = QSpinBox(minimum=0, maximum=10_000, value=1)
        self.samples.setToolTip("samples per grid point; qa: the first N records (0: all)")
        self.seed = QSpinBox(minimum=0, maximum=2**31 - 1, value=0)
        self.subtasks = QLineEdit(",".join(RULER_SUBTASKS))
        self.qa_file = QLineEdit(str(QA_SAMPLE))
        self.tokens = QSpinBox(minimum=16, maximum=1_000_000, value=2048)
        self.prefix_tokens = QSpinBox(minimum=1, maximum=1_000_000, value=256)
        self.stride = QSpinBox(minimum=1, maximum=4096, value=16)
        self.stride.setToolTip("tokens per step after the prefix (1: token by token, the StreamingLLM evaluation)")
        self.chunk_size = QSpinBox(minimum=1, maximum=65536, value=512)
        self.protocol = QComboBox()  # where the question is when the policy compresses (core/evaluate/protocols.py)
        self.protocol.addItems(PROTOCOLS)
        self.protocol.setCurrentText(DEFAULT_PROTOCOL)
        self.protocol.setToolTip("bounded: the prompt in chunks (memory bounded); question-aware: one chunk, the "
                                 "question in the observation window (KVCache-Factory); question-agnostic: the "
                                 "context compressed before the question (kvpress)")
        self.measure_loss = QCheckBox("measure attention loss")
        self.measure_loss.setToolTip("each cell's attention mass on evicted entries, against a shadow cache of every "
                                     "key (a full cache of keys per cell)")
        self.start = QPushButton("Run sweep")
        self.start.setStyleSheet("font-weight: bold;")
        self.stop = QPushButton("Stop")
        self.stop.setEnabled(False)
        self.fresh = QPushButton("Start over")
        self.fresh.setToolTip("forget this sweep's stored cells and compute them all again")
        self.progress_bar = QProgressBar()
        self.status = QLabel("")
        self.status.setWordWrap(True)
        form = QFormLayout()
        form.addRow("task", self.task)
        form.addRow("policies", self.policies)
        form.addRow("budgets", self.budgets)
        self.task_rows = {}
        for label, widget, tasks in (("lengths", self.lengths, ("passkey", "needle", "ruler")),
                                     ("depths", self.depths, ("passkey", "needle")),
                                     ("samples", self.samples, ("passkey", "needle", "ruler", "qa")),
                                     ("seed", self.seed, ("passkey", "needle", "ruler", "perplexity", "kl")),
                                     ("subtasks", self.subtasks, ("ruler",)),
                                     ("QA file", self.qa_file, ("qa",)),
                                     ("tokens", self.tokens, ("perplexity", "kl")),
                                     ("prefix", self.prefix_tokens, ("perplexity", "kl")),
                                     ("stride", self.stride, ("perplexity", "kl")),
                                     ("protocol", self.protocol, GENERATION_TASKS),
                                     ("", self.measure_loss, GENERATION_TASKS)):
            form.addRow(label, widget)
            self.task_rows[label] = (widget, tasks)
        form.addRow("chunk size", self.chunk_size)
        self.run_on = RunOnForm()
        form.addRow("run on", self.run_on)
        buttons = QHBoxLayout()
        for button in (self.start, self.stop, self.fresh):
            buttons.addWidget(button)
        self.controls = QVBoxLayout()
        self.controls.addLayout(form)
        self.controls.addLayout(buttons)
        self.controls.addWidget(self.progress_bar)
        self.controls.addWidget(self.status)
        self.controls.addStretch(1)
        self.task.currentTextChanged.connect(self._task_chosen)
        self.start.clicked.connect(lambda: self.request_sweep(fresh=False))
        self.fresh.clicked.connect(lambda: self.request_sweep(fresh=True))

    def _build_results(self) -> None:
        self.results = QTabWidget()
        self.heatmaps = pg.GraphicsLayoutWidget()
        self.heatmap_items: dict[str, pg.ImageItem] = {}
        self.by_budget = pg.PlotWidget(title="mean score vs budget")
        self.by_budget.setLabel("bottom", "budget")
        self.by_budget.setLogMode(x=True)
        self.by_bytes = pg.PlotWidget(title="mean score vs peak cache (MiB)")
        self.by_bytes.setLabel("bottom", "peak cache (MiB)")
        for plot in (self.by_budget, self.by_bytes):
            # Top left, above the scores' range: small budgets score low there, so no point hides under
            # it (top right covered `full`, the largest cache at the top score).
            plot.addLegend(offset=(10, 5))
            plot.setLabel("left", "mean score")
        self._no_sweep = self.heatmaps.addLabel(NO_SWEEP_YET, color="#bbbbbb")  # not a black panel before a run
        self.heatmap_hover = QLabel("hover a cell for its length, depth and score")
        self.heatmap_hover.setWordWrap(True)  # wrapped: unwrapped, a long cell's words widened the view
        self.heatmaps.scene().sigMouseMoved.connect(self._hover_heatmap)
        self.along = pg.GraphicsLayoutWidget()
        self.ppl_plot = self.along.addPlot(row=0, col=0, title=f"perplexity ({CURVE_WINDOW}-token window)")
        self.kl_plot = self.along.addPlot(row=1, col=0, title="KL(full || policy), nats")
        self.kl_plot.setXLink(self.ppl_plot)
        for plot in (self.ppl_plot, self.kl_plot):
            plot.addLegend(offset=(-10, 10))
            plot.setDownsampling(auto=True, mode="peak")
            plot.setClipToView(True)
        self.curves: dict[tuple[str, str], pg.PlotDataItem] = {}
        self.table = QTableWidget(0, len(TABLE_COLUMNS))
        self.table.setHorizontalHeaderLabels(TABLE_COLUMNS)
        self.table.setSelectionBehavior(QAbstractItemView.SelectRows)
        self.table.setEditTriggers(QAbstractItemView.NoEditTriggers)
        self.table.horizontalHeader().setStretchLastSection(True)
        self.table.cellDoubleClicked.connect(self._open_row)
        self.open_button = QPushButton("Open cell as a run")
        self.open_button.setToolTip("show the selected cell's run in the live views (token map, evictions, ...)")
        self.open_button.clicked.connect(lambda: [self._open_row(i.row(), 0)
                                                  for i in self.table.selectionModel().selectedRows()[:1]])
        self.export_csv = QPushButton("Export CSV…")
        self.export_json = QPushButton("Export JSON…")
        self.export_figure = QPushButton("Export figure (PNG/SVG)…")
        self.export_csv.clicked.connect(lambda: self.ask_then(self.export_cells_to, "evaluation.csv", "CSV (*.csv)"))
        self.export_json.clicked.connect(lambda: self.ask_then(self.export_cells_to, "evaluation.json",
                                                                "JSON (*.json)"))
        self.export_figure.clicked.connect(lambda: self.ask_then(self.export_figure_to, "evaluation.png",
                                                                  "Images (*.png *.svg)"))
        table_tab = QWidget()
        table_layout = QVBoxLayout(table_tab)
        table_layout.addWidget(self.table)
        buttons = QGridLayout()  # two by two: the view fits beside the other docks at 1280 px
        for index, button in enumerate((self.open_button, self.export_figure, self.export_csv, self.export_json)):
            # Narrower than their text when the dock is: a clipped label (the tooltip says it whole)
            # rather than a view that scrolls sideways.
            button.setSizePolicy(QSizePolicy.Ignored, QSizePolicy.Fixed)
            button.setMinimumWidth(60)
            button.setToolTip(button.toolTip() or button.text())
            buttons.addWidget(button, index // 2, index % 2)
        table_layout.addLayout(buttons)
        heatmap_tab = QWidget()
        heatmap_layout = QVBoxLayout(heatmap_tab)
        heatmap_layout.setContentsMargins(0, 0, 0, 0)
        # As many heatmaps a row as the pane's width holds (two at 1600 px, one at 1280), the page
        # scrolling down: two a row at any width cut the right-hand one off at 1280x800.
        self.heatmap_grid = PlotGrid(self.heatmaps)
        heatmap_layout.addWidget(self.heatmap_grid.page, 1)
        heatmap_layout.addWidget(self.heatmap_hover)
        self.heatmap_tab = heatmap_tab
        self.results.addTab(heatmap_tab, "Heatmaps")
        self.results.addTab(self.by_budget, "Score vs budget")
        self.results.addTab(self.by_bytes, "Score vs cache bytes")
        self.results.addTab(self.along, "Along the text")
        self.results.addTab(table_tab, "Cells")

    def set_policies(self, names: list[str]) -> None:
        policy_checklist.offer(self.policies, names)

    def checked_policies(self) -> list[str]:
        return policy_checklist.checked_names(self.policies)

    def _task_chosen(self, task: str) -> None:
        for widget, tasks in self.task_rows.values():
            widget.setEnabled(task in tasks)
        language = task in ("perplexity", "kl")
        self.results.setCurrentWidget(self.along if language else self.heatmap_tab if task in ("passkey", "needle")
                                      else self.by_budget)

    # -- starting ---------------------------------------------------------------------------------

    def build_spec(self, model: str) -> SweepSpec:
        """The sweep the form describes; KVStudioError naming the field that is wrong."""
        def numbers(widget: QLineEdit, kind, label):
            try:
                values = tuple(kind(part) for part in widget.text().split(",") if part.strip())
            except ValueError:
                raise KVStudioError(f"{label}: give comma-separated numbers, got '{widget.text()}'") from None
            return values

        task = self.task.currentText()
        task_options = TaskOptions(
            lengths=numbers(self.lengths, int, "lengths"), depths=numbers(self.depths, float, "depths"),
            samples=self.samples.value(), seed=self.seed.value(),
            subtasks=tuple(p.strip() for p in self.subtasks.text().split(",") if p.strip()),
            qa_file=self.qa_file.text().strip() or None)
        language = LanguageOptions(tokens=self.tokens.value(), prefix_tokens=self.prefix_tokens.value(),
                                   stride=self.stride.value(), seed=self.seed.value())
        budgets = numbers(self.budgets, int, "budgets")
        generating = task in GENERATION_TASKS
        spec = SweepSpec(task, model, tuple(self.checked_policies()), budgets, task_options, language,
                         chunk_size=self.chunk_size.value(),
                         protocol=self.protocol.currentText() if generating else DEFAULT_PROTOCOL,
                         measure_loss=generating and self.measure_loss.isChecked())
        spec.validate()
        return spec

    def request_sweep(self, fresh: bool = False) -> None:
        self.sweep_requested.emit(fresh)  # EvaluateFeature.start checks the window's state and starts the worker

    def begin(self, spec: SweepSpec) -> None:
        """A sweep starts: empty plots shaped for its series."""
        self.spec = spec
        self.records = []
        self.table.setRowCount(0)
        self.progress_bar.setRange(0, 0)
        self.status.setText("starting…")
        self.start.setEnabled(False)
        self.fresh.setEnabled(False)
        self.stop.setEnabled(True)
        self.heatmaps.clear()
        self.heatmap_items, self.heatmap_plots, self.heatmap_texts = {}, {}, {}
        if spec.task not in ("passkey", "needle"):
            self.heatmaps.addLabel(f"{spec.task} has no heatmap (pass key and needle sweeps do): see the other tabs",
                                   color="#bbbbbb")
        for plot in (self.by_budget, self.by_bytes, self.ppl_plot, self.kl_plot):
            plot.clear()
        self.curves = {}
        # Ticks at the swept budgets, as numbers: pyqtgraph's own log-axis ticks between them ran
        # together ("3·10¹4·10¹5·10¹...") in the narrow pane.
        budgets = sorted(set(spec.budgets or ()))
        self.by_budget.getAxis("bottom").setTicks([[(math.log10(b), str(b)) for b in budgets if b > 0]] if budgets
                                                  else None)
        if spec.task in ("passkey", "needle"):
            self._shape_heatmaps(spec)

    def _shape_heatmaps(self, spec: SweepSpec) -> None:
        lengths, depths = list(spec.task_options.lengths), list(spec.task_options.depths)
        labels = [_label(p, b) for p in spec.policies for b in spec.budgets_for(p)]
        self.heatmap_texts = {}
        self.heatmap_plots = {}
        for label in labels:
            plot = pg.PlotItem()
            plot.setTitle(_title(label, None), size=TITLE_SIZE)
            self.heatmap_plots[label] = plot
            # Rows are depths (y), columns lengths (x), whatever pyqtgraph's global axis order is: the
            # studio sets row-major, the library's default is column-major, and the labels assume this.
            image = pg.ImageItem(np.zeros((len(depths), len(lengths)), dtype=np.uint8), levels=(0, 255),
                                 lut=LOOKUP, axisOrder="row-major")
            plot.addItem(image)
            plot.invertY(True)
            plot.getAxis("bottom").setTicks([[(i + 0.5, f"{n}") for i, n in enumerate(lengths)]])
            plot.getAxis("left").setTicks([[(i + 0.5, f"{d:.0%}") for i, d in enumerate(depths)]])
            plot.setLabel("bottom", "context tokens")
            plot.setLabel("left", "needle depth")
            plot.setMouseEnabled(False, False)
            self.heatmap_items[label] = image
        bar = None
        if labels:  # one colour scale for all, as the CLI's figure has: the score each colour stands for
            # Below the heatmaps, across them: beside them it fell off the narrow pane's right edge.
            bar = pg.ColorBarItem(values=(0, 1), colorMap=pg.ColorMap(np.linspace(0, 1, 255), LOOKUP[1:]),
                                  interactive=False, label="score", orientation="horizontal")
        self.heatmap_grid.set_items(list(self.heatmap_plots.values()), footer=bar)

    # -- cells as they finish ---------------------------------------------------------------------

    @Slot(object)
    def add_cell(self, record: dict) -> None:
        self.records.append(record)
        row = self.table.rowCount()
        self.table.insertRow(row)
        depth = record.get("depth")
        score = record["score"]
        cells = {"policy": record["policy"], "budget": "" if record.get("budget") is None else str(record["budget"]),
                 "subtask": record.get("subtask") or "", "tokens": str(record["context_tokens"]),
                 "depth": "" if depth is None else f"{depth:.0%}", "score": f"{score:.3f}",
                 "peak MiB": f"{record['peak_cache_bytes'] / 2**20:.2f}", "seconds": f"{record['seconds']:.1f}",
                 "run": "" if record.get("run_id") is None else str(record["run_id"]),
                 "output": (record.get("output") or "").strip().replace("\n", " ")}
        for name, value in cells.items():
            self.table.setItem(row, TABLE_COLUMNS.index(name), QTableWidgetItem(value))
        self.table.resizeColumnsToContents() if row == 0 else None  # the short columns fit their values
        self.redraw()

    def redraw(self) -> None:
        if not self.records:
            return
        task = self.records[0]["task"]
        if task in ("passkey", "needle"):
            self._draw_heatmaps()
        if task in ("perplexity", "kl"):
            self._draw_along()
        self._draw_budget_and_bytes()

    def _draw_heatmaps(self) -> None:
        lengths, depths = list(self.spec.task_options.lengths), list(self.spec.task_options.depths)
        for label, image in self.heatmap_items.items():
            found_lengths, found_depths, grid = needle_grid(self.records, label)
            values = np.zeros((len(depths), len(lengths)), dtype=np.uint8)  # rows: depth (y), columns: length (x)
            for d_index, depth in enumerate(found_depths):
                for l_index, length in enumerate(found_lengths):
                    value = grid[d_index, l_index]
                    if np.isfinite(value) and length in lengths and depth in depths:
                        row, column = depths.index(depth), lengths.index(length)
                        values[row, column] = 1 + int(round(float(value) * 254))
                        self._cell_text(label, row, column, float(value))
            image.setImage(values, levels=(0, 255), lut=LOOKUP, autoLevels=False)
            mean = np.nanmean(grid) if np.isfinite(grid).any() else float("nan")
            self.heatmap_plots[label].setTitle(_title(label, mean), size=TITLE_SIZE)

    def _cell_text(self, label: str, row: int, column: int, value: float) -> None:
        """The score written in its cell, as the CLI's figure writes it."""
        key = (label, row, column)
        text = f"{value:.2f}".rstrip("0").rstrip(".") if value not in (0, 1) else f"{value:.0f}"
        if key not in self.heatmap_texts:
            item = pg.TextItem(text, color="#222222", anchor=(0.5, 0.5))
            self.heatmap_plots[label].addItem(item)
            item.setPos(column + 0.5, row + 0.5)
            self.heatmap_texts[key] = item
        self.heatmap_texts[key].setText(text)

    def heatmap_cell_text(self, label: str, row: int, column: int) -> str | None:
        """The value written in a heatmap's cell (tests), or None where none is."""
        item = self.heatmap_texts.get((label, row, column))
        return None if item is None else item.toPlainText()

    def describe_heatmap_cell(self, label: str, row: int, column: int) -> str:
        lengths, depths = list(self.spec.task_options.lengths), list(self.spec.task_options.depths)
        value = self.heatmap_items[label].image[row, column]
        score = "not run yet" if value == 0 else f"score {(int(value) - 1) / 254:.2f}"
        return f"{label} · {lengths[column]} context tokens · needle at {depths[row]:.0%} depth · {score}"

    def _hover_heatmap(self, scene_position) -> None:
        for label, plot in getattr(self, "heatmap_plots", {}).items():
            if plot.vb.sceneBoundingRect().contains(scene_position):
                point = plot.vb.mapSceneToView(scene_position)
                image = self.heatmap_items[label].image
                row, column = int(math.floor(point.y())), int(math.floor(point.x()))
                if 0 <= row < image.shape[0] and 0 <= column < image.shape[1]:
                    self.heatmap_hover.setText(self.describe_heatmap_cell(label, row, column))
                return

    def heatmap_values(self, label: str) -> np.ndarray:
        """What a heatmap shows (tests): 0 not run yet, 1 lost, 255 found; rows = depths, columns = lengths."""
        return self.heatmap_items[label].image

    def _draw_budget_and_bytes(self) -> None:
        for index, (name, (budgets, scores)) in enumerate(score_by_budget(self.records).items()):
            pairs = sorted((b, s) for b, s in zip(budgets, scores) if b is not None)
            if not pairs:
                pairs = [(b, scores[0]) for b in (self.spec.budgets or (1,))]  # no budget: a flat reference
            self._curve(self.by_budget, ("budget", name), name, index).setData([b for b, _ in pairs],
                                                                               [s for _, s in pairs])
        for index, (name, (sizes, scores)) in enumerate(score_by_bytes(self.records).items()):
            self._curve(self.by_bytes, ("bytes", name), name, index, scatter=True).setData(
                [s / 2**20 for s in sizes], scores)

    def _draw_along(self) -> None:
        for index, record in enumerate(self.records):
            name = _label(record["policy"], record.get("budget"))
            positions = record.get("positions") or []
            if not positions:
                continue
            ppl = np.exp(-running_mean(record["true_logprobs"], CURVE_WINDOW))
            self._curve(self.ppl_plot, ("ppl", name), name, index).setData(positions, ppl)
            self._curve(self.kl_plot, ("kl", name), name, index).setData(positions,
                                                                         running_mean(record["kl"], CURVE_WINDOW))

    def _curve(self, plot, key, name: str, index: int, scatter: bool = False):
        if key not in self.curves:  # created once, then only setData
            colour = COLOURS[index % len(COLOURS)]
            if scatter:
                self.curves[key] = plot.plot([], [], pen=None, symbol="o", symbolBrush=colour, name=name)
            else:
                self.curves[key] = plot.plot([], [], pen=pg.mkPen(colour, width=2), symbol="o", symbolSize=5,
                                             symbolBrush=colour, name=name)
        return self.curves[key]

    @Slot(float)
    def show_progress(self, percent: float) -> None:
        self.progress_bar.setRange(0, 100)
        self.progress_bar.setValue(round(percent))

    def end(self, outcome, error: str) -> None:
        self.start.setEnabled(True)
        self.fresh.setEnabled(True)
        self.stop.setEnabled(False)
        self.progress_bar.setRange(0, 1)
        self.progress_bar.setValue(1 if outcome is not None and not outcome.cancelled else 0)
        if error:
            self.status.setText(f"failed: {error}")
        elif outcome.cancelled:
            self.status.setText(f"stopped: {len(outcome.records)} cells stored; Run sweep resumes")
        elif outcome.failed:
            self.status.setText(f"done: {outcome.computed} cells computed, {len(outcome.failed)} failed (Run sweep "
                                f"tries them again): {next(iter(outcome.failed.values()))}")
        else:
            self.status.setText(f"done: {outcome.computed} cells computed, {outcome.reused} from the store "
                                f"({outcome.store})")

    # -- opening and exporting --------------------------------------------------------------------

    def _open_row(self, row: int, _column: int) -> None:
        item = self.table.item(row, TABLE_COLUMNS.index("run"))
        if item is None or not item.text():
            self.status.setText("this cell has no stored run (run history off, or it came from an older store)")
            return
        self.open_run_requested.emit(int(item.text()))

    def ask_then(self, action, suggested: str, file_filter: str) -> None:
        path, _ = QFileDialog.getSaveFileName(self, "Export", suggested, file_filter)
        if path:
            action(Path(path))

    def export_cells_to(self, path: Path) -> Path | None:
        return self._exporting(lambda: export_cells(self.records, path))

    def export_figure_to(self, path: Path) -> Path | None:
        return self._exporting(lambda: save_figure(self.records, path))

    def _exporting(self, action) -> Path | None:
        if not self.records:
            self.status.setText("nothing to export yet: run a sweep first")
            return None
        try:
            path = action()
        except (KVStudioError, OSError) as error:
            self.status.setText(f"export failed: {error}")
            return None
        self.status.setText(f"exported {path}")
        return path


def _label(policy: str, budget) -> str:
    return policy if budget is None else f"{policy} @ {budget}"


def _title(label: str, mean: float | None) -> str:
    # Two lines: on one, "streaming_llm @ 32 · mean 0.00" alone was wider than the pane at 1280 px.
    return label + ("" if mean is None else f"<br>mean {mean:.2f}")


def _duration(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds < 90 else f"{seconds / 60:.0f} min"


class EvaluateFeature(Feature):
    """The Evaluate dock (beside Runs), its sweep as a task on the model's thread, and the Evaluate menu."""

    def __init__(self, window):
        super().__init__(window)
        self.view = EvaluateView()
        self.task: RunningTask | None = None  # the sweep in progress, or the last one

    def install(self) -> None:
        window, view = self.window, self.view
        view.sweep_requested.connect(self.start)
        view.stop.clicked.connect(self.stop)
        view.open_run_requested.connect(window.runs.reopen)
        dock = window.add_dock("Evaluate", view, "views")
        menu = window.menu("E&valuate")
        menu.addAction("Show the Evaluate view", lambda: (dock.show(), dock.raise_()))
        menu.addAction("Export evaluation cells (CSV/JSON)…", lambda: view.ask_then(
            view.export_cells_to, "evaluation.csv", "CSV or JSON (*.csv *.json)"))
        menu.addAction("Export evaluation figure (PNG/SVG)…", lambda: view.ask_then(
            view.export_figure_to, "evaluation.png", "Images (*.png *.svg)"))
        window.plugins_feature.policies_changed.connect(view.set_policies)

    def start(self, fresh: bool) -> None:
        window, view, state = self.window, self.view, self.window.state
        if state.model_info is None or state.busy:
            window.show_error("load a model first" if state.model_info is None else
                              "a run is in progress: stop it first, then start the sweep")
            return
        try:
            spec = view.build_spec(state.model_info.spec)  # every option and policy checked here
        except KVStudioError as error:
            view.status.setText(str(error))
            window.show_error(f"evaluation: {error}")
            return
        window.hide_error()
        view.begin(spec)
        history_path = window.history.path if window.history is not None else None
        self.task = window.runner.start(sweep_task(spec, history_path, fresh, view.run_on.target()))
        self.task.partial_result.connect(view.add_cell)
        self.task.progress_changed.connect(view.show_progress)
        self.task.status_changed.connect(view.status.setText)
        self.task.done.connect(lambda outcome: self._finished(outcome, ""))
        self.task.failed.connect(lambda error: self._finished(None, error))

    @Slot()
    def stop(self) -> None:
        if self.task is not None:
            self.task.request_interruption()

    def update_buttons(self) -> None:
        # Stop is the sweep's own (begin/end set it); starting waits while anything holds the model.
        free = not self.window.state.busy
        self.view.start.setEnabled(free)
        self.view.fresh.setEnabled(free)

    def _finished(self, outcome, error: str) -> None:
        self.view.end(outcome, error)
        if error:
            self.window.show_error(f"evaluation: {error}")
        self.window.runs.history_changed()  # the sweep's cells were stored as runs
