"""The model's thread. All model work (loading, tokenizing, generating) happens here.

`StudioWorker` is a QObject moved to its own QThread; the window sends it commands through queued
signals and hears back through its signals. Cancelling does not go through the event queue (the
worker is busy running): the window sets the worker's CancelToken directly, which the engine checks
before every step.
"""

from __future__ import annotations

import contextlib
import threading
import traceback
from dataclasses import dataclass, field

from PySide6.QtCore import QObject, Signal, Slot

from kvstudio.core.runtime.engine import CancelToken, Engine, GenerationSettings
from kvstudio.core.errors import KVStudioError
from kvstudio.core.recording.events import Recorder
from kvstudio.core.models.loading import load_model, model_identity
from kvstudio.core.runtime.oom import explain, is_out_of_memory
from kvstudio.gui.tasks import banner_text
from kvstudio.core.spec import build_policy
from kvstudio.core.recording.packing import pack_events
from kvstudio.core.recording.snapshots import MemorySnapshotRecording, SnapshotError


class LoadCancelled(Exception):
    pass


@dataclass
class RunRequest:
    prompt: str
    policy: str
    parameters: dict
    settings: GenerationSettings
    recorder: Recorder
    label: str = ""  # e.g. which run of a comparison
    history_id: int | None = None  # its row in the run history, when history is on
    book: object = None  # the RunBook keeping that row (gui/features/runs.py)
    snapshot_path: str | None = None  # record a memory snapshot of the run into this file
    start_from: str | None = None  # a saved cache (.kvcache) to restore and continue from


@dataclass
class ModelInfo:
    spec: str
    description: str
    n_layers: int
    n_heads: int
    n_kv_heads: int
    has_chat_template: bool
    device: str
    adapter: str = ""  # the LoRA adapter generation runs use (lora.adapter_name), "" for the base model

    @property
    def identity(self) -> str:
        """The model as the run history names it, the same way the CLI does (LoadedModel.identity)."""
        return model_identity(self.spec, self.adapter)


@dataclass
class RunOutcome:
    request: RunRequest
    result: object = None  # GenerationResult
    error: str | None = None
    thread_ids: set = field(default_factory=set)
    snapshot: dict | None = None  # the memory snapshot, when one was asked for and written
    events: bytes | None = None  # the run's events packed for the history (to reopen its views)
    snapshot_error: str | None = None
    restore: dict | None = None  # with start_from: tokens restored, seconds, and the prefill they saved


class StudioWorker(QObject):
    load_progress = Signal(str, float)  # message, fraction (-1: unknown)
    loaded = Signal(object)  # ModelInfo
    load_failed = Signal(str)
    run_finished = Signal(object)  # RunOutcome (error set when it failed)
    run_status = Signal(str)  # what a finished run is still doing (building its memory snapshot)
    tokens_counted = Signal(object, int)  # document key, token count

    def __init__(self):
        super().__init__()
        self.engine: Engine | None = None
        self.run_cancel = CancelToken()
        self._load_cancel = threading.Event()
        self.model_thread_ids: set[int] = set()  # threads that ran model code (the tests check)
        self.load_recorder: Recorder | None = None  # set by the window before it queues a load

    # -- commands (queued from the GUI thread) ----------------------------------------------------

    @Slot(str, str, str)
    def load(self, spec: str, device: str, dtype: str) -> None:
        def progress(message, fraction):
            if self._load_cancel.is_set():
                raise LoadCancelled()
            self.load_progress.emit(message, -1.0 if fraction is None else float(fraction))

        try:
            self.model_thread_ids.add(threading.get_ident())
            loaded = load_model(spec, device=device, dtype=dtype, progress=progress, recorder=self.load_recorder)
            if self._load_cancel.is_set():
                raise LoadCancelled()
            self.engine = None  # free the previous model before holding the new one
            self.engine = Engine(loaded)
        except LoadCancelled:
            self.load_failed.emit("loading cancelled")
            return
        except KVStudioError as error:
            self.load_failed.emit(str(error))
            return
        except Exception as error:  # a model that fails to load must not take the studio down
            if is_out_of_memory(error):
                self.load_failed.emit(explain(error, "load", model=spec, studio=True))
                return
            traceback.print_exc()
            self.load_failed.emit(f"could not load '{spec}': {type(error).__name__}: {error}")
            return
        self.loaded.emit(ModelInfo(spec, loaded.describe(), loaded.n_layers, loaded.n_heads, loaded.n_kv_heads,
                                   loaded.has_chat_template, str(loaded.device)))

    @Slot(object)
    def run(self, request: RunRequest) -> None:
        outcome = RunOutcome(request)
        try:
            if self.engine is None:
                raise KVStudioError("no model loaded: load one first")
            self.model_thread_ids.add(threading.get_ident())
            # guarded (a plugin fault is a PolicyError); 'h2o-int4' and parameters["storage"] too
            policy = build_policy(request.policy, request.parameters)
            recording = (MemorySnapshotRecording(self.engine.loaded.device) if request.snapshot_path
                         else contextlib.nullcontext())
            try:
                start = self._restore(request, policy, outcome) if request.start_from else None
                with recording:
                    # keep_state: the run's final state stays on its result, for "Save cache" after it.
                    outcome.result = self.engine.generate(request.prompt, policy, request.settings,
                                                          recorder=request.recorder, cancel=self.run_cancel,
                                                          start=start, resume=start is not None, keep_state=True)
                    if request.snapshot_path:  # leaving the block takes seconds on CPU: say so
                        self.run_status.emit("building the memory snapshot from the recorded allocations…")
            finally:  # a failed run's snapshot is the one that shows why
                if request.snapshot_path:
                    self._save_snapshot(recording, outcome, request.snapshot_path)
        except (Exception, SystemExit) as error:  # the studio stays usable whatever a run does
            outcome.error = banner_text(error, chunk_size=request.settings.chunk_size, policy=f"'{request.policy}'")
        outcome.events = pack_events(request.recorder)  # here, not on the GUI thread: it compresses
        self.run_finished.emit(outcome)

    def _restore(self, request: RunRequest, policy, outcome: RunOutcome):
        from kvstudio.core.persist.saved_cache import SavedCacheError, load_saved_cache
        from kvstudio.gui.features.caches import in_studio_words

        try:
            header, state, seconds = load_saved_cache(request.start_from, self.engine.loaded, policy)
        except SavedCacheError as error:  # nothing is computed again here: say what the user can do
            raise SavedCacheError(in_studio_words(error), error.problem) from error
        outcome.restore = {"path": request.start_from, "tokens": len(state.token_ids), "seconds": seconds,
                           "prefill_seconds": state.prefill_seconds}
        return state

    @staticmethod
    def _save_snapshot(recording, outcome: RunOutcome, path: str) -> None:
        try:
            recording.save(path, outcome.result)
            outcome.snapshot = recording.snapshot
        except (SnapshotError, OSError) as error:
            outcome.snapshot_error = f"the memory snapshot was not saved: {error}"

    @Slot(object, str)
    def count_tokens(self, key, text: str) -> None:
        if self.engine is None:
            return
        self.tokens_counted.emit(key, len(self.engine.tokenizer(text)["input_ids"]))

    # -- called directly from the GUI thread (thread-safe) -----------------------------------------

    def cancel_run(self) -> None:
        self.run_cancel.cancel()

    def cancel_load(self) -> None:
        self._load_cancel.set()

    def reset_load_cancel(self) -> None:
        """Called by the window before it queues a load, so a quick Cancel is never lost."""
        self._load_cancel.clear()

    def reset_cancel(self) -> None:
        """A fresh token for the next run; a run in progress keeps the one it started with."""
        self.run_cancel = CancelToken()
