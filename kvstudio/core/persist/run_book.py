"""One run's row in the run history, from its start to how it ended: RunBook.

Everything that runs something (`kvstudio run`, evaluation sweeps, fine-tuning from the CLI or the
studio, the studio's runs) keeps its row through a RunBook, so the rows agree on what they say:

- the model under one name everywhere: `LoadedModel.identity`, the spec it was loaded from and the
  adapter applied to it (`runs list --model default` finds the CLI's runs and the studio's alike;
  base and adapted runs stay apart);
- the cache as its CacheSpec record: the policy, its parameters and its storage;
- the end status from what ended the run (Ctrl-C: cancelled, SIGTERM: interrupted, anything else:
  failed, with its message), keeping what the run had produced so far (its recorder's text, figures
  and events).

As a context manager it starts the row on entry and, when the block raises, ends it from the
exception; a block that returns calls `finish` (a generation result) or `finish_session` (plain
figures: a fine-tune session) itself. The studio, whose runs start and end in different handlers,
calls `start`, `finish` and `fail` directly. A history that cannot be written turns the book off
with one warning (`on_warning`); the run goes on without it.
"""

from __future__ import annotations

from typing import Callable

from kvstudio.core.persist.history import HistoryError, RunHistory
from kvstudio.core.persist.provenance import PROVENANCE_KEY, environment
from kvstudio.core.recording.packing import pack_events
from kvstudio.core.runtime.interruptions import end_status, partial_output
from kvstudio.core.spec import CacheSpec


class RunBook:
    def __init__(self, history: RunHistory | None, *, model: str, cache: CacheSpec, prompt: str,
                 settings: dict | None = None, kind: str = "generate", recorder=None,
                 on_warning: Callable[[str], None] | None = None, provenance: dict | None = None):
        """`model`: LoadedModel.identity. `prompt`: what the row previews (a fine-tune session's data
        description). `recorder`: the run's Recorder, whose events are stored with the row and whose
        text and figures a run that fails keeps. `provenance`: provenance.environment(...) of the run
        (by default the versions, git and command line of this process), kept in the row's settings."""
        self.history = history
        self.model, self.cache, self.prompt = model, cache, prompt
        self.settings, self.kind, self.recorder = settings or {}, kind, recorder
        if PROVENANCE_KEY not in self.settings:
            self.settings = self.settings | {PROVENANCE_KEY: provenance if provenance is not None else environment()}
        self.on_warning = on_warning
        self.run_id: int | None = None
        self.ended = False

    def __enter__(self) -> RunBook:
        self.start()
        return self

    def __exit__(self, kind, error, trace) -> bool:
        if error is not None and not self.ended:
            self.fail(error)
        return False

    @property
    def active(self) -> bool:
        """Whether the run has a row to complete."""
        return self.history is not None and self.run_id is not None and not self.ended

    def start(self) -> int | None:
        """Write the row (status running); its id, or None when history is off or unwritable."""
        if self.history is not None:
            policy, parameters = self.cache.record()
            self.run_id = self._write(lambda: self.history.start(self.model, policy, parameters, self.prompt,
                                                                 self.settings, kind=self.kind))
        return self.run_id

    def finish(self, result, *, error: str | None = None, events: bytes | None = None) -> None:
        """Complete the row with a GenerationResult (finished, or cancelled if it stopped so) and the
        recorder's events (or `events` packed already: the studio packs them on the model's thread).
        `error`: a note kept with a run that finished (e.g. stdout closed)."""
        if self.active:
            events = events if events is not None else self._events()
            self._write(lambda: self.history.finish(self.run_id, result, error=error, events=events))
        self.ended = True

    def finish_session(self, status: str, output: str, figures: dict, steps: list, memory: list,
                       error: str | None = None) -> None:
        """Complete a row that is not a generation run (a fine-tune session) from plain data."""
        if self.active:
            self._write(lambda: self.history.finish_figures(self.run_id, status, output, figures, steps, memory,
                                                            error=error))
        self.ended = True

    def fail(self, error: BaseException | str, status: str | None = None, events: bytes | None = None) -> None:
        """End the row from what stopped the run: an exception (its status and message, see
        interruptions.end_status) or a message (`status`, default failed); the partial output and
        events of the recorder are kept."""
        if self.active:
            if isinstance(error, BaseException):
                status, message = end_status(error)
            else:
                status, message = status or "failed", error
            events = events if events is not None else self._events()
            partial = partial_output(self.recorder) if self.recorder is not None else None
            self._write(lambda: self.history.finish(self.run_id, status=status, error=message, events=events,
                                                    partial=partial))
        self.ended = True

    def _events(self) -> bytes | None:
        return pack_events(self.recorder) if self.recorder is not None else None

    def _write(self, write: Callable[[], object]):
        """What `write` returned; None, with the book off and one warning, when the history failed."""
        try:
            return write()
        except HistoryError as error:
            self.history = None
            if self.on_warning is not None:
                self.on_warning(str(error))
            return None
