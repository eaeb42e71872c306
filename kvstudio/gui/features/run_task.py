"""A run of the prompt under a policy, as a task on the model's thread: what is asked
(`RunRequest`), what came of it (`RunOutcome`), and the work itself (`run_task`).

The outcome is made on the GUI thread and filled in by the work, so what a failed run did before it
failed (its events, its memory snapshot, what it restored) is kept with the banner's line.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

from kvstudio.core.persist.saved_cache import SavedCacheError, load_saved_cache
from kvstudio.core.recording.events import Recorder
from kvstudio.core.recording.packing import pack_events
from kvstudio.core.recording.snapshots import MemorySnapshotRecording, SnapshotError
from kvstudio.core.runtime.engine import GenerationSettings
from kvstudio.core.spec import build_policy
from kvstudio.gui.features.caches import in_studio_words
from kvstudio.gui.task_runner import Task


@dataclass
class RunRequest:
    prompt: str
    policy: str
    parameters: dict
    settings: GenerationSettings
    recorder: Recorder | None  # None once the run is stored and another is shown (RunOutcome.forget_recording)
    label: str = ""  # e.g. which run of a comparison
    history_id: int | None = None  # its row in the run history, when history is on
    book: object = None  # the RunBook keeping that row (gui/features/runs.py)
    snapshot_path: str | None = None  # record a memory snapshot of the run into this file
    start_from: str | None = None  # a saved cache (.kvcache) to restore and continue from
    follow_up: str = ""  # with start_from: text fed after the restored state (`cache load --then`); "" goes on
    batch: dict | None = None  # a row of a batched Compare: {"id", "row", "rows", "label"}, kept in its settings


@dataclass
class RunOutcome:
    request: RunRequest
    result: object = None  # GenerationResult
    error: str | None = None  # the banner's line when the run failed
    snapshot: dict | None = None  # the memory snapshot, when one was asked for and written
    events: bytes | None = None  # the run's events packed for the history (to reopen its views)
    snapshot_error: str | None = None
    restore: dict | None = None  # with start_from: tokens restored, seconds, and the prefill they saved

    def stored(self) -> bool:
        """Whether the run's row, events included, is in the history (its RunBook has ended)."""
        book = self.request.book
        return book is not None and book.ended and self.events is not None

    def forget_recording(self) -> None:
        """Another run is on screen: this one's recording (every event, and the same packed) leaves memory;
        the history holds it and Runs > Open reads it back. The result stays: its final state is what
        "Save cache of the last run" saves."""
        self.request.recorder = None
        self.request.book = None
        self.events = None


def run_task(outcome: RunOutcome) -> Task:
    request = outcome.request

    def work(engine, state):
        try:
            # guarded (a plugin fault is a PolicyError); 'h2o-int4' and parameters["storage"] too
            policy = build_policy(request.policy, request.parameters)
            recording = (MemorySnapshotRecording(engine.loaded.device) if request.snapshot_path
                         else contextlib.nullcontext())
            try:
                start = _restore(engine, request, policy, outcome) if request.start_from else None
                prompt, resume = request.prompt, start is not None
                if start is not None and request.follow_up.strip():
                    # A follow-up typed in the Prompt box is fed after the restored state (`cache load --then`).
                    prompt = start.followed_by(engine.tokenizer(request.follow_up, add_special_tokens=False)["input_ids"])
                    resume = False
                with recording:
                    # keep_state: the run's final state stays on its result, for "Save cache" after it.
                    outcome.result = engine.generate(prompt, policy, request.settings,
                                                     recorder=request.recorder, cancel=state.cancel,
                                                     start=start, resume=resume, keep_state=True)
                    if request.snapshot_path:  # leaving the block takes seconds on CPU: say so
                        state.set_status("building the memory snapshot from the recorded allocations…")
            finally:  # a failed run's snapshot is the one that shows why
                if request.snapshot_path:
                    _save_snapshot(recording, outcome, request.snapshot_path)
        finally:  # a failed run's events too: the history keeps what it did
            outcome.events = pack_events(request.recorder)  # here, not on the GUI thread: it compresses
        return outcome

    return Task("run", work, explain={"chunk_size": request.settings.chunk_size, "policy": f"'{request.policy}'"})


def _restore(engine, request: RunRequest, policy, outcome: RunOutcome):
    try:
        header, state, seconds = load_saved_cache(request.start_from, engine.loaded, policy)
    except SavedCacheError as error:  # nothing is computed again here: say what the user can do
        raise SavedCacheError(in_studio_words(error), error.problem) from error
    outcome.restore = {"path": request.start_from, "tokens": len(state.token_ids), "seconds": seconds,
                       "prefill_seconds": state.prefill_seconds}
    return state


def _save_snapshot(recording, outcome: RunOutcome, path: str) -> None:
    try:
        recording.save(path, outcome.result)
        outcome.snapshot = recording.snapshot
    except (SnapshotError, OSError) as error:
        outcome.snapshot_error = f"the memory snapshot was not saved: {error}"
