"""Saved caches in the studio: "Save cache" after a run, "Continue from a saved cache", and the
Caches view (a folder of saved caches: restore and continue, delete, reveal the file), with the
restore time shown beside the prefill time it saved.

`CachesFeature` adds the dock and the Cache menu; a save is a task on the model's thread
(fingerprinting the model reads its weights: that stays off the GUI thread). It does not claim the
studio's busy state: it only reads a finished run's state, and Run stays available meanwhile (a
run asked for waits in the thread's queue). Continuing runs through the window's ordinary run path
(`RunRequest.start_from`), so every live view follows it.
"""

from __future__ import annotations

import time
from functools import partial
from pathlib import Path

from PySide6.QtCore import QUrl, Signal, Slot
from PySide6.QtGui import QDesktopServices
from PySide6.QtWidgets import (QAbstractItemView, QFileDialog, QHBoxLayout, QLabel, QLineEdit, QPushButton,
                               QTableWidget, QTableWidgetItem, QVBoxLayout, QWidget)

from kvstudio.core.persist import saved_cache
from kvstudio.core.spec import build_policy
from kvstudio.core.units import format_bytes
from kvstudio.gui.feature import Feature
from kvstudio.gui.task_runner import Task
from kvstudio.gui.widgets.flow_layout import FlowLayout
from kvstudio.core.persist.saved_cache import (MAGIC, PREVIEW_CHARS, SUFFIX, SavedCacheError, header_storage, read_header,
                                               what_to_do)
from kvstudio.core.plugins.loader import user_data_dir
from kvstudio.core.policies import available_policies
from kvstudio.core.runtime.layer_tensors import storage_key, unsaveable_reason
from kvstudio.core.storage import STORAGE_KEY, StorageConfig, split_cache_name

COLUMNS = ("file", "saved (UTC)", "model", "policy", "tokens", "on disk", "in memory", "prefill s", "prompt")


def default_folder() -> Path:
    return user_data_dir() / "caches"


def save_task(outcome, path: str) -> Task:
    """Writing a finished run's state to `path`, as a task (not exclusive: see the module's docstring)."""
    request = outcome.request

    def work(engine, _state):
        policy = build_policy(request.policy, request.parameters)  # with its storage ("storage" parameters)
        saved_cache.write_saved_cache(path, outcome.result.state, engine.loaded, policy, request.settings,
                                      request.prompt or None)

    return Task("cache save", work, exclusive=False)


def in_studio_words(error) -> str:
    """A saved cache's refusal, with what a user of the studio can do about the file."""
    return what_to_do(error, "delete it (select it in the Caches view, then Delete)",
                      "save a run's cache again (Save last run…)")


def _unsaveable(request) -> str | None:
    """Why a run's cache was not kept for saving (its storage, or a row of a batch), or None."""
    if getattr(request, "batch", None):
        return "it ran as a row of Compare's batched pass, which keeps no state to save: run it alone to save it"
    fields = dict(request.parameters.get(STORAGE_KEY) or {})
    codec = split_cache_name(request.policy)[1]  # 'h2o-bnb-int4' (Compare) names its codec
    if codec is not None:
        fields["codec"] = codec
    try:
        return unsaveable_reason(StorageConfig(**fields))
    except TypeError:  # not storage fields: nothing to say about them
        return None


def follow_up_text(header: dict, full_prompt: str, prompt_box: str) -> str:
    """What Continue feeds after a saved cache: the Prompt box, unless it still holds the prompt the cache
    was made from (then the run goes on with its answer, bit-identical to never having stopped)."""
    if not prompt_box.strip():
        return ""
    preview = header.get("prompt_preview") or ""
    return "" if preview and full_prompt[:PREVIEW_CHARS] == preview else prompt_box


class CachesView(QWidget):
    restore_requested = Signal(str)  # path of a saved cache to continue from
    question_requested = Signal(str, str)  # path of a saved cache, a follow-up question to ask it
    save_requested = Signal()

    def __init__(self, folder: Path, parent=None):
        super().__init__(parent)
        self.folder = Path(folder)
        self.folder_label = QLabel("")
        self.folder_label.setWordWrap(True)  # a long path wraps instead of widening the view
        self.choose_button = QPushButton("Folder…")
        self.save_button = QPushButton("Save last run…")
        self.save_button.setToolTip("save the last run's cache, policy state and sampler state, to continue later")
        self.restore_button = QPushButton("Continue from selected")
        self.restore_button.setToolTip("restore the selected cache and go on generating (bit-identical to never "
                                       "having stopped); a follow-up typed in the Prompt box is fed after it first "
                                       "(as `kvstudio cache load --then`); double-click a row does the same")
        # Several questions about one context: each restores the selected cache and prefills only itself.
        self.question = QLineEdit()
        self.question.setPlaceholderText("a follow-up question about the selected cache's context")
        self.ask_button = QPushButton("Ask")
        self.ask_button.setToolTip("restore the selected cache and feed this question after its tokens: the "
                                   "context is not computed again (kvstudio cache load FILE --then TEXT)")
        self.delete_button = QPushButton("Delete")
        self.reveal_button = QPushButton("Reveal file")
        self.refresh_button = QPushButton("Refresh")
        self.table = QTableWidget(0, len(COLUMNS))
        self.table.setHorizontalHeaderLabels(COLUMNS)
        self.table.setSelectionBehavior(QAbstractItemView.SelectRows)
        self.table.setEditTriggers(QAbstractItemView.NoEditTriggers)
        self.table.horizontalHeader().setStretchLastSection(True)
        self.status = QLabel("")
        self.status.setWordWrap(True)
        top = QHBoxLayout()
        top.addWidget(self.folder_label, 1)
        top.addWidget(self.choose_button)
        buttons = FlowLayout()  # wraps when the dock is narrow
        for button in (self.save_button, self.restore_button, self.delete_button, self.reveal_button,
                       self.refresh_button):
            buttons.addWidget(button)
        asking = QHBoxLayout()
        asking.addWidget(self.question, 1)
        asking.addWidget(self.ask_button)
        layout = QVBoxLayout(self)
        layout.addLayout(top)
        layout.addLayout(buttons)
        layout.addWidget(self.table, 1)
        layout.addLayout(asking)
        layout.addWidget(self.status)
        self.paths: list[Path] = []
        self.headers: dict[Path, dict] = {}
        self.choose_button.clicked.connect(self._choose_folder)
        self.save_button.clicked.connect(self.save_requested)
        self.restore_button.clicked.connect(lambda: [self.restore_requested.emit(str(p)) for p in self.selected()[:1]])
        self.table.cellDoubleClicked.connect(lambda row, _: self.restore_requested.emit(str(self.paths[row])))
        self.ask_button.clicked.connect(self.ask_selected)
        self.question.returnPressed.connect(self.ask_selected)
        self.delete_button.clicked.connect(self.delete_selected)
        self.reveal_button.clicked.connect(self.reveal_selected)
        self.refresh_button.clicked.connect(self.refresh)
        self.refresh()

    def set_folder(self, folder: Path) -> None:
        self.folder = Path(folder)
        self.refresh()

    def refresh(self) -> None:
        self.folder_label.setText(f"Saved caches in {self.folder}")
        files = sorted(self.folder.glob(f"*{SUFFIX}"), key=lambda p: p.stat().st_mtime, reverse=True) \
            if self.folder.is_dir() else []
        self.paths, self.headers = files, {}
        self.table.setRowCount(len(files))
        for row, path in enumerate(files):
            try:
                header = read_header(path)
            except SavedCacheError as error:
                cells = (path.name, "", "", "", "", format_bytes(path.stat().st_size), "", "", f"unreadable: {error}")
            else:
                self.headers[path] = header
                cells = (path.name, header["created"][:19].replace("T", " "), header["model"]["name"],
                         header["policy"]["describe"], str(header["tokens"]["fed"]),
                         format_bytes(path.stat().st_size), format_bytes(header["cache_bytes"]),
                         f"{header.get('prefill_seconds', 0):.2f}", header.get("prompt_preview", "").replace("\n", " "))
            for column, value in enumerate(cells):
                item = QTableWidgetItem(value)
                item.setToolTip(value)
                self.table.setItem(row, column, item)
        self.table.resizeColumnsToContents()

    def selected(self) -> list[Path]:
        rows = sorted({index.row() for index in self.table.selectionModel().selectedRows()})
        return [self.paths[row] for row in rows]

    def ask_selected(self) -> None:
        question = self.question.text()  # as typed: a leading space is a token of its own
        if not question.strip():
            self.status.setText("type a question to ask the selected cache")
            return
        for path in self.selected()[:1]:
            self.question_requested.emit(str(path), question)
            return
        self.status.setText("select a saved cache to ask it a question")

    def delete_selected(self) -> None:
        for path in self.selected():
            try:
                with open(path, "rb") as stream:
                    if not MAGIC.startswith(stream.read(len(MAGIC))[:len(MAGIC)]):
                        self.status.setText(f"not deleted: {path.name} is not a saved cache")
                        continue
                path.unlink()
            except OSError as error:
                self.status.setText(f"could not delete {path.name}: {error.strerror or error}")
                continue
            self.status.setText(f"deleted {path.name}")
        self.refresh()

    def reveal_selected(self) -> bool:
        selected = self.selected()
        folder = selected[0].parent if selected else self.folder
        return QDesktopServices.openUrl(QUrl.fromLocalFile(str(folder)))

    def _choose_folder(self) -> None:
        folder = QFileDialog.getExistingDirectory(self, "Saved caches folder", str(self.folder))
        if folder:
            self.set_folder(Path(folder))


class CachesFeature(Feature):
    """The Caches dock (tabbed with Runs) and the Cache menu: what each button does."""

    def __init__(self, window):
        super().__init__(window)
        self.view = CachesView(default_folder())

    def install(self) -> None:
        window, view = self.window, self.view
        dock = window.add_dock("Caches", view, "views")
        menu = window.menu("&Cache")
        menu.addAction("Save cache of the last run…", lambda: self.save_last_run())
        menu.addAction("Continue from a saved cache…", self.ask_continue)
        menu.addAction("Show saved caches", lambda: (dock.show(), dock.raise_()))
        view.save_requested.connect(lambda: self.save_last_run())
        view.restore_requested.connect(self.continue_from)
        view.question_requested.connect(self.ask)
        window.run.run_ended.connect(self.on_run_finished)
        window.state.model_changed.connect(self.on_model_changed)
        self.model_spec = None  # the model the last run's state was computed with
        self.dropped = ""  # why the last run's cache is no longer kept, once a model change dropped it

    @Slot(object)
    def on_model_changed(self, info) -> None:
        """A saved cache is written under the model loaded when it is saved: the last run's state, made
        with the previous model, would be filed under the new one's identity. So it goes (its tensors too)."""
        outcome, previous = self.window.state.last_outcome, self.model_spec
        self.model_spec = info.spec
        if outcome is not None and outcome.result is not None and outcome.result.state is not None:
            outcome.result.state = None
            self.dropped = (f"the last run was made with {previous}, and {info.spec} is loaded now: "
                            "run again to save a cache of this model")

    def save_last_run(self, path: str | None = None) -> bool:
        outcome = self.window.state.last_outcome
        if self.dropped and outcome is not None and (outcome.result is None or outcome.result.state is None):
            self.window.show_error(f"the last run's cache cannot be saved: {self.dropped}")
            return False
        if outcome is None or outcome.result is None or outcome.result.state is None:
            reason = None if outcome is None else _unsaveable(outcome.request)
            self.window.show_error(f"the last run's cache cannot be saved: {reason}" if reason else
                                   "nothing to save yet: run something first (a run cancelled before its prompt "
                                   "was in has no cache)")
            return False
        try:
            self.view.folder.mkdir(parents=True, exist_ok=True)  # the view's folder exists once used
        except OSError as error:
            self.view.status.setText(f"cannot create {self.view.folder}: {error.strerror or error}")
        if path is None:
            suggested = self.view.folder / f"{outcome.request.policy}-{time.strftime('%Y%m%d-%H%M%S')}.kvcache"
            path, _ = QFileDialog.getSaveFileName(self.window, "Save cache", str(suggested),
                                                  "Saved caches (*.kvcache)")
            if not path:
                return False
        self.view.status.setText(f"saving {Path(path).name}…")
        saving = self.window.runner.start(save_task(outcome, str(path)))
        saving.done.connect(lambda _: self.on_saved(str(path), ""))
        saving.failed.connect(partial(self.on_saved, str(path)))
        return True

    def on_saved(self, path: str, error: str) -> None:
        if error:
            self.window.show_error(f"the cache was not saved: {error}")
            self.view.status.setText("not saved")
            return
        self.view.status.setText(f"saved {path}")
        self.window.statusBar().showMessage(f"saved the cache to {path}")
        if Path(path).parent == self.view.folder:
            self.view.refresh()

    def ask_continue(self) -> None:
        path, _ = QFileDialog.getOpenFileName(self.window, "Continue from a saved cache", str(self.view.folder),
                                              "Saved caches (*.kvcache)")
        if path:
            self.continue_from(path)

    @Slot(str, str)
    def ask(self, path: str, question: str) -> bool:
        """A follow-up question to a saved cache: restored, the question fed after its tokens."""
        return self.continue_from(path, question)

    @Slot(str)
    def continue_from(self, path: str, follow_up: str | None = None) -> bool:
        """Set the policy and sampling the cache was made with, then run from it (or ask it `follow_up`)."""
        window = self.window
        try:
            header = read_header(path)
        except SavedCacheError as error:
            window.show_error(in_studio_words(error))
            self.view.status.setText(f"{Path(path).name} was not restored: {error.problem or error}")
            return False
        policy = header["policy"]["name"]
        if policy not in available_policies():
            window.show_error(f"the cache was computed under policy '{policy}', which is not loaded: install or "
                              "load its plugin (Plugins view), then try again")
            return False
        form = window.form
        form.policy.setCurrentText(policy)
        form.policy_form.set_policy(policy, header["policy"]["parameters"])
        generation = header.get("generation") or {}
        if header.get("chunk_size"):
            form.chunk_size.setValue(int(header["chunk_size"]))
        form.temperature.setValue(float(generation.get("temperature", 0.0)))
        form.seed.setValue(int(generation.get("seed") or 0))
        parameters = {k: v for k, v in header["policy"]["parameters"].items() if v is not None}
        storage = header_storage(header)  # the codec and tier it was stored with: a restore needs the same
        form.storage_form.set_parameters(storage)
        if storage != storage_key(StorageConfig()):
            parameters[STORAGE_KEY] = storage
        asked = follow_up is not None  # the Ask box's question; else Continue, with the Prompt box's follow-up
        if not asked:
            follow_up = follow_up_text(header, window.prompt_area.full_prompt(), window.prompt_area.prompt.toPlainText())
        started = window.run.start(policy, parameters, label="ask" if asked else "continue", start_from=str(path),
                                   follow_up=follow_up)
        if started:
            then = f", then feeding the prompt ({len(follow_up)} characters)" if follow_up else ""
            self.view.status.setText(f"restoring {Path(path).name}{then}…")
        return started

    @Slot(object)
    def on_run_finished(self, outcome) -> None:
        self.dropped = ""  # a run with the loaded model: its own state is what Save saves
        restore, path = outcome.restore, outcome.request.start_from
        if path is None:
            return
        if restore is None:  # the restore itself failed (the banner shows the whole message)
            self.view.status.setText(f"{Path(path).name} was not restored: {outcome.error or 'the run stopped'}")
            return
        if outcome.error:
            self.view.status.setText(f"restored {restore['tokens']} tokens from {Path(path).name}, then the run "
                                     f"failed: {outcome.error}")
            return
        done = "answered the question in" if outcome.request.follow_up else "continued"
        text = (f"restored {restore['tokens']} tokens in {restore['seconds']:.3f} s "
                f"(their prefill took {restore['prefill_seconds']:.2f} s) and {done} "
                f"{len(outcome.result.token_ids)} tokens")
        self.view.status.setText(text)
        self.window.statusBar().showMessage(f"{self.window.statusBar().currentMessage()} · {text}")
