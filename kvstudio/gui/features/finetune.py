"""The studio's fine-tuning: the Fine-tune panel, its live views, and the adapter row of the model panel.

`FinetuneFeature` adds everything: a "Fine-tune" dock (data, LoRA and training settings, output
folder, Start/Stop), a "Fine-tune curves" dock (finetune_plots.py), an adapter row in the model
panel (apply a saved adapter to generation runs, or go back to the base model), and opens stored
sessions from the Runs view. Training runs under the policy chosen in the Set-up panel, on the
model's thread (finetune_task.py), with the same Stop as generation.
"""

from __future__ import annotations

import os
from pathlib import Path

from functools import partial

from PySide6.QtCore import Qt, QTimer, Signal, Slot
from PySide6.QtWidgets import (QCheckBox, QComboBox, QDoubleSpinBox, QFileDialog, QFormLayout,
                               QHBoxLayout, QLabel, QLineEdit, QPushButton, QSpinBox, QVBoxLayout,
                               QWidget)

from kvstudio.core.errors import KVStudioError
from kvstudio.core.models.loading import model_identity
from kvstudio.core.spec import CacheSpec
from kvstudio.core.train import records
from kvstudio.core.train.data import SYNTHETIC_PASSKEY
from kvstudio.core.train.log import TrainingLog
from kvstudio.core.train.lora import LoraSettings
from kvstudio.core.train.session import FinetuneSettings
from kvstudio.core.train.through_cache import GRAD_MODES, check_trainable_storage
from kvstudio.gui.features.finetune_plots import FinetuneCurves
from kvstudio.gui.feature import Feature
from kvstudio.gui.features.finetune_task import (FinetuneOutcome, FinetuneRequest, apply_adapter_task,
                                                 finetune_task, remove_adapter_task)
from kvstudio.gui.features.live_views import REFRESH_HZ
from kvstudio.gui.views.base import on_screen
from kvstudio.gui.widgets.scrolling import scrolling
from kvstudio.gui.task_runner import RunningTask

DATA_SOURCES = {"synthetic pass key": SYNTHETIC_PASSKEY, "checked documents": "documents", "a file…": "file"}


class FinetunePanel(QWidget):
    """The settings of a session. `request_values()` reads them; nothing here touches the model."""

    start_requested = Signal()
    stop_requested = Signal()

    def __init__(self, parent=None):
        super().__init__(parent)
        self.source = QComboBox()
        self.source.addItems(list(DATA_SOURCES))
        self.file = QLineEdit(placeholderText=".json .jsonl .csv .parquet .txt")
        self.browse = QPushButton("…")
        self.text_field = QLineEdit(placeholderText="text (default)")
        self.prompt_field = QLineEdit(placeholderText="optional: with an answer field, loss on the answer")
        self.answer_field = QLineEdit()
        self.seq_len = QSpinBox(minimum=2, maximum=1_000_000, value=512)
        self.examples = QSpinBox(minimum=2, maximum=100_000, value=64)
        self.steps = QSpinBox(minimum=1, maximum=1_000_000, value=20)
        self.lr = QDoubleSpinBox(minimum=1e-7, maximum=1.0, decimals=6, singleStep=1e-4, value=2e-4)
        self.warmup = QSpinBox(minimum=0, maximum=1_000_000, value=0)
        self.accumulation = QSpinBox(minimum=1, maximum=1024, value=1)
        # Of a step's examples, how many are fed together (core/train/micro_batch.py); never more than the step has.
        self.micro_batch = QSpinBox(minimum=1, maximum=1, value=1)
        self.micro_batch.setToolTip("examples of a step fed through the model together, each with its own cache "
                                    "and policy: the same losses and gradients in fewer passes (at most the "
                                    "gradient accumulation; with LoRA dropout above 0 the dropout masks differ)")
        self.accumulation.valueChanged.connect(self.micro_batch.setMaximum)
        self.rank = QSpinBox(minimum=1, maximum=1024, value=8)
        self.alpha = QDoubleSpinBox(minimum=0.01, maximum=4096, value=16.0)
        self.dropout = QDoubleSpinBox(minimum=0.0, maximum=0.95, singleStep=0.05, value=0.0)
        self.targets = QLineEdit(placeholderText="attention projections (default)")
        self.grad_mode = QComboBox()
        self.grad_mode.addItems(list(GRAD_MODES))
        self.grad_mode.setToolTip("through: gradients cross chunks through the entries the policy kept (memory grows "
                                  "with the sequence); truncated: they stop at chunk boundaries (memory flat)")
        self.chunk_size = QSpinBox(minimum=1, maximum=65536, value=128)
        self.eval_every = QSpinBox(minimum=0, maximum=1_000_000, value=10)
        self.save_every = QSpinBox(minimum=0, maximum=1_000_000, value=10)
        self.seed = QSpinBox(minimum=0, maximum=2**31 - 1, value=0)
        self.out_dir = QLineEdit(placeholderText="folder for the adapter checkpoints")
        self.out_browse = QPushButton("…")
        self.resume = QCheckBox("resume from the newest checkpoint in the folder")
        self.snapshot = QCheckBox("record a memory snapshot of step 1")
        self.start = QPushButton("Start fine-tuning")
        self.start.setStyleSheet("font-weight: bold;")
        self.stop = QPushButton("Stop")
        self.stop.setEnabled(False)
        self.status = QLabel("Trains a LoRA adapter with the Set-up panel's policy in the loop.")
        self.status.setWordWrap(True)

        form = QFormLayout()
        form.addRow("data", self.source)
        form.addRow("file", _row(self.file, self.browse))
        form.addRow("text field", self.text_field)
        form.addRow("prompt field", self.prompt_field)
        form.addRow("answer field", self.answer_field)
        form.addRow("sequence length", self.seq_len)
        form.addRow("synthetic examples", self.examples)
        form.addRow("steps", self.steps)
        form.addRow("learning rate", self.lr)
        form.addRow("warm-up steps", self.warmup)
        form.addRow("gradient accumulation", self.accumulation)
        form.addRow("micro-batch", self.micro_batch)
        form.addRow("LoRA rank", self.rank)
        form.addRow("LoRA alpha", self.alpha)
        form.addRow("LoRA dropout", self.dropout)
        form.addRow("target modules", self.targets)
        form.addRow("gradient mode", self.grad_mode)
        form.addRow("chunk size", self.chunk_size)
        form.addRow("validate every", self.eval_every)
        form.addRow("save every", self.save_every)
        form.addRow("seed", self.seed)
        form.addRow("output folder", _row(self.out_dir, self.out_browse))
        form.addRow(self.resume)
        form.addRow(self.snapshot)
        inner = QWidget()
        inner_layout = QVBoxLayout(inner)
        inner_layout.addLayout(form)
        inner_layout.addLayout(_row_layout(self.start, self.stop))
        inner_layout.addWidget(self.status)
        inner_layout.addStretch(1)
        layout = QVBoxLayout(self)
        layout.setContentsMargins(0, 0, 0, 0)
        layout.addWidget(scrolling(inner, sideways=False))  # down only, as wide as the fields need: nothing cut off
        self.browse.clicked.connect(self._pick_file)
        self.out_browse.clicked.connect(self._pick_folder)
        self.source.currentTextChanged.connect(self._source_chosen)
        self.start.clicked.connect(self.start_requested.emit)
        self.stop.clicked.connect(self.stop_requested.emit)
        self._source_chosen(self.source.currentText())

    def _source_chosen(self, label: str) -> None:
        source = DATA_SOURCES[label]
        for widget in (self.file, self.browse, self.text_field, self.prompt_field, self.answer_field):
            widget.setEnabled(source == "file")
        self.examples.setEnabled(source == SYNTHETIC_PASSKEY)

    def _pick_file(self) -> None:
        path, _ = QFileDialog.getOpenFileName(self, "Training data", "",
                                              "Data (*.json *.jsonl *.csv *.parquet *.txt *.md)")
        if path:
            self.file.setText(path)

    def _pick_folder(self) -> None:
        folder = QFileDialog.getExistingDirectory(self, "Folder for the adapter checkpoints")
        if folder:
            self.out_dir.setText(folder)

    def data_source(self) -> str:
        source = DATA_SOURCES[self.source.currentText()]
        return self.file.text().strip() if source == "file" else source

    def settings(self) -> FinetuneSettings:
        targets = tuple(t.strip() for t in self.targets.text().split(",") if t.strip())
        return FinetuneSettings(
            steps=self.steps.value(), learning_rate=self.lr.value(), warmup_steps=self.warmup.value(),
            grad_accumulation=self.accumulation.value(), micro_batch=self.micro_batch.value(), seed=self.seed.value(),
            chunk_size=self.chunk_size.value(),
            grad_mode=self.grad_mode.currentText(), eval_every=self.eval_every.value(),
            save_every=self.save_every.value(), snapshot_step=1 if self.snapshot.isChecked() else 0,
            lora=LoraSettings(rank=self.rank.value(), alpha=self.alpha.value(), dropout=self.dropout.value(),
                              target_modules=targets))

    def set_running(self, running: bool) -> None:
        self.start.setEnabled(not running)
        self.stop.setEnabled(running)


class AdapterRow(QWidget):
    """In the model panel: which adapter generation runs use, apply one, or go back to the base model."""

    apply_requested = Signal(str)
    remove_requested = Signal()

    def __init__(self, parent=None):
        super().__init__(parent)
        self.label = QLabel("none (base model)")
        self.label.setWordWrap(True)
        self.apply = QPushButton("Apply…")
        self.apply.setToolTip("apply a LoRA adapter saved by a fine-tune session (its output folder or one "
                              "step-NNNNNN checkpoint) to the next runs")
        self.remove = QPushButton("Remove")
        self.remove.setEnabled(False)
        layout = QHBoxLayout(self)
        layout.setContentsMargins(0, 0, 0, 0)
        layout.addWidget(self.label, 1)
        layout.addWidget(self.apply)
        layout.addWidget(self.remove)
        self.apply.clicked.connect(self._choose)
        self.remove.clicked.connect(self.remove_requested.emit)

    def _choose(self) -> None:
        folder = QFileDialog.getExistingDirectory(self, "Adapter folder (a fine-tune session's output)")
        if folder:
            self.apply_requested.emit(folder)

    def show_adapter(self, folder: str) -> None:
        self.label.setText(folder or "none (base model)")
        self.label.setToolTip(folder)
        self.remove.setEnabled(bool(folder))


class FinetuneFeature(Feature):
    """Connects the panel, the views and the session's task on the model thread; talks to the window."""

    def __init__(self, window):
        super().__init__(window)
        self.panel = FinetunePanel()
        self.curves = FinetuneCurves()
        self.adapter_row = AdapterRow()
        self.task: RunningTask | None = None  # the session in progress, or the last one
        self.last_outcome: FinetuneOutcome | None = None
        # Its own timer, at the window's rate: the curves read what is new, as the other live views do.
        self.timer = QTimer(self, interval=1000 // REFRESH_HZ)

    def install(self) -> None:
        window = self.window
        window.add_dock("Fine-tune", self.panel, "side", object_name="finetune", scrolls=False)  # it scrolls itself
        window.add_dock("Fine-tune curves", self.curves, "views", object_name="finetune_curves")
        window.loading.add_row("adapter", self.adapter_row)
        self.timer.timeout.connect(self.refresh)
        self.timer.start()
        window.runs.add_opener(records.KIND, self.open_stored)  # stored sessions open here
        self.panel.start_requested.connect(self.start)
        self.panel.stop_requested.connect(self.stop)
        self.adapter_row.apply_requested.connect(self.request_adapter)
        self.adapter_row.remove_requested.connect(self.request_base_model)
        window.state.model_changed.connect(lambda _info: self.adapter_row.show_adapter(""))  # a new model: no adapter
        # The Set-up panel's Stop stops a session too (the window enables it while anything runs).
        window.form.stop_button.clicked.connect(lambda: self.running and self.stop())

    @property
    def running(self) -> bool:
        """Whether a session is in progress."""
        return self.task is not None and self.task.running

    def _name_adapter(self, folder: str) -> None:
        """Runs name the adapter they use in the history, as the CLI's do (ModelInfo.identity)."""
        if self.window.state.model_info is not None:
            self.window.state.model_info.adapter_folder = str(folder or "")

    # -- sessions ---------------------------------------------------------------------------------

    def _missing(self) -> str | None:
        """What the panel and the window still lack for a session (no side effects: the refusal's banner
        asks it again, and goes once it is None)."""
        window, panel = self.window, self.panel
        source = panel.data_source()
        if window.state.model_info is None:
            return "load a model first"
        if window.state.busy:
            return "a run is in progress: stop it first"
        if not panel.out_dir.text().strip():
            return "choose an output folder for the adapter checkpoints"
        if not source:
            return "choose a data file, or another data source"
        if source == "documents" and not _checked_documents(window.prompt_area.documents):
            return "no checked documents to train on: add documents or choose another data source"
        if invalid := window.form.problem():  # asked again by the banner: nothing on screen changes
            return f"policy parameters: {invalid}"
        return None

    @Slot()
    def start(self) -> bool:
        window, panel = self.window, self.panel
        out_dir = panel.out_dir.text().strip()
        source = panel.data_source()
        documents = [d.text for d in _checked_documents(window.prompt_area.documents)]
        problem = self._missing()
        if problem:
            window.show_error(problem, holds=lambda: self._missing() == problem)
            return False
        try:
            settings = panel.settings()
            settings.validate()
            # The storage the Set-up column sets, where training can carry it; refused in words otherwise.
            check_trainable_storage(CacheSpec.parse(window.form.policy.currentText(),
                                                    window.form.parameters()).storage)
            prepare_output_folder(out_dir)
        except KVStudioError as error:  # the message names the setting or the folder
            window.show_error(str(error))
            return False
        window.hide_error()
        policy, parameters = window.form.policy.currentText(), window.form.parameters()
        log = TrainingLog()
        request = FinetuneRequest(policy, parameters, settings, source, panel.seq_len.value(), out_dir, log,
                                  examples=panel.examples.value(), documents=documents,
                                  text_field=panel.text_field.text().strip() or None,
                                  prompt_field=panel.prompt_field.text().strip() or None,
                                  answer_field=panel.answer_field.text().strip() or None,
                                  resume=panel.resume.isChecked(),
                                  snapshot_path=str(Path(out_dir) / "step-1-memory.pickle")
                                  if panel.snapshot.isChecked() else None)
        self._history_start(request)
        panel.status.setText(f"starting under {policy}: preparing the data…")  # not the last session's line
        self.curves.follow(log, f"{window.state.model_info.spec}, {policy}, {settings.grad_mode}")
        outcome = FinetuneOutcome(request)
        self.task = window.runner.start(finetune_task(outcome))
        self.task.done.connect(self.on_finished)
        self.task.failed.connect(partial(self._failed, outcome))
        self.adapter_row.show_adapter("")  # a session starts from the base model and leaves it so
        self._name_adapter("")
        self.panel.set_running(True)
        window.docks["Fine-tune curves"].raise_()
        window.statusBar().showMessage(f"fine-tuning under {policy}…")
        return True

    @Slot()
    def stop(self) -> None:
        if self.task is not None:
            self.task.request_interruption()
        self.panel.status.setText("stopping: the step in progress is dropped, the last saved adapter stays")

    def _failed(self, outcome: FinetuneOutcome, message: str) -> None:
        outcome.error = message
        self.on_finished(outcome)

    @Slot(object)
    def on_finished(self, outcome: FinetuneOutcome) -> None:
        self.last_outcome = outcome
        self.panel.set_running(False)
        self.curves.refresh()
        self._history_finish(outcome)
        if outcome.error:
            self.window.show_error(outcome.error)
            self.panel.status.setText(f"failed: {outcome.error}")
            return
        result = outcome.result
        text = f"{result.status}: {len(result.steps)} steps, {validation_words(result)}; adapter " \
               f"{result.adapter or 'not saved'}"
        self.panel.status.setText(text)
        self.window.statusBar().showMessage(text)
        if outcome.snapshot is not None:
            self.window.snapshots.show_written(outcome.snapshot, outcome.request.snapshot_path)

    def _history_start(self, request: FinetuneRequest) -> None:
        try:
            cache = CacheSpec.parse(request.policy, request.parameters)
        except KVStudioError:  # bad storage settings: the runner reports them when it builds the policy
            return
        # A session trains from the base model (the runner takes any applied adapter off first).
        request.book = records.book(self.window.history, model_identity(self.window.state.model_info.spec), cache,
                                    request.data, request.settings.as_dict(), request.out_dir,
                                    on_warning=self.window.show_error)
        request.history_id = request.book.start()

    def _history_finish(self, outcome: FinetuneOutcome) -> None:
        book = outcome.request.book
        if book is None:
            return
        if outcome.result is not None:
            records.finish(book, outcome.result, outcome.request.log)
        else:
            book.fail(outcome.error or "failed")
        self.window.runs.history_changed()

    # -- stored sessions --------------------------------------------------------------------------

    @Slot(int)
    def open_stored(self, run_id: int) -> None:
        """The Runs view's "Open views" on a fine-tune session: its curves, as they were recorded."""
        record = self.window.history.get(run_id)
        if self.running:
            self.window.show_error("a fine-tune session is in progress: stop it first, then open the stored one")
            return
        self.curves.follow(records.log_from_record(record),
                           f"stored session {run_id} ({record.status}): {record.model}, {record.policy}")
        self.curves.refresh()
        self.window.docks["Fine-tune curves"].show()
        self.window.docks["Fine-tune curves"].raise_()
        self.window.statusBar().showMessage(f"showing fine-tune session {run_id} from the history")

    # -- adapters ---------------------------------------------------------------------------------

    @Slot(str)
    def request_adapter(self, folder: str) -> None:
        state = self.window.state
        if state.model_info is None or state.busy:
            self.window.show_error("load a model first" if state.model_info is None
                                   else "a run is in progress: stop it first")
            return
        self._change_adapter(apply_adapter_task(folder))

    @Slot()
    def request_base_model(self) -> None:
        if self.window.state.busy:
            self.window.show_error("a run is in progress: stop it first")
            return
        self._change_adapter(remove_adapter_task())

    def _change_adapter(self, task) -> None:
        changing = self.window.runner.start(task)
        changing.done.connect(self.adapter_row.show_adapter)  # the folder applied; "" for the base model
        changing.done.connect(self._name_adapter)
        changing.failed.connect(self.window.show_error)

    def refresh(self) -> None:
        if on_screen(self.curves) or self.running:
            self.curves.refresh()


def _checked_documents(documents) -> list:
    checked = []
    for row in range(documents.list.count()):
        item = documents.list.item(row)
        if item.checkState() == Qt.Checked:
            checked.append(documents.documents[item.data(Qt.UserRole)])
    return checked


def _row(*widgets) -> QWidget:
    holder = QWidget()
    holder.setLayout(_row_layout(*widgets))
    holder.layout().setContentsMargins(0, 0, 0, 0)
    return holder


def _row_layout(*widgets) -> QHBoxLayout:
    layout = QHBoxLayout()
    for index, widget in enumerate(widgets):
        layout.addWidget(widget, 1 if index == 0 else 0)
    return layout


def validation_words(result) -> str:
    """The validation losses a session ended with, or what kept them from being measured (a Stop
    before the first validation ended), never "- → -"."""
    first, last = result.initial_val_loss_policy, result.final_val_loss_policy
    if first is None:
        return "no validation finished before it ended"
    if len(result.val) < 2:
        return f"validation loss under the policy {first:.4f} at the start (no later validation finished)"
    return f"validation loss under the policy {first:.4f} → {last:.4f}"


def prepare_output_folder(folder: str) -> Path:
    """The adapter's folder, made now if it is missing, so a session never starts towards a folder that
    cannot be written (refused with the reason before any work)."""
    path = Path(folder).expanduser()
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise KVStudioError(f"cannot create the output folder {path}: {error.strerror or error}; choose another "
                            "folder") from None
    if not path.is_dir() or not os.access(path, os.W_OK):
        raise KVStudioError(f"the output folder {path} is not a writable folder: choose another folder")
    return path
