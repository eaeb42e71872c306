"""How a run ended, honestly: finished, cancelled by the user, interrupted, or failed.

  finished     it ran to its end (max tokens, end of text, a stop string)
  cancelled    the user stopped it: Ctrl-C (SIGINT) in a terminal, Stop in the studio, or the
               reader of its output went away (`kvstudio run ... | head -c 1`)
  interrupted  something else stopped it: SIGTERM (a shutdown, `kill`), or a crash that left the
               run unfinished in the history
  failed       an error: a policy fault, out of memory, a bad model

A run that is stopped keeps what it had produced: the text and figures come from the run's
Recorder, which the engine fills as it goes, so nothing depends on the loop returning.

SIGTERM, by default, ends Python without running any cleanup; `sigterm_raises()` turns it into a
`Terminated` exception for the duration of a run, so the run is recorded and the memory snapshot
written before the process exits with status 143 (128 + SIGTERM), as shells expect.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading

EXIT_TERMINATED = 128 + signal.SIGTERM
EXIT_BROKEN_PIPE = 128 + signal.SIGPIPE if hasattr(signal, "SIGPIPE") else 1


class Terminated(BaseException):
    """SIGTERM arrived during a run. A BaseException, like KeyboardInterrupt: no `except
    Exception` on the way out may swallow it."""


@contextlib.contextmanager
def sigterm_raises():
    """Within the block, SIGTERM raises Terminated in the main thread. Elsewhere: no change."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum, frame):
        raise Terminated()

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def end_status(error: BaseException) -> tuple[str, str]:
    """(status for the history, the message stored with it) for a run that ended by `error`."""
    if isinstance(error, KeyboardInterrupt):
        return "cancelled", "stopped by the user (SIGINT, Ctrl-C)"
    if isinstance(error, Terminated):
        return "interrupted", "interrupted by SIGTERM"
    return "failed", str(error) or type(error).__name__


def partial_output(recorder) -> tuple[str, dict]:
    """What a run that did not return had produced: its text and its figures so far, read from
    its Recorder (the newest 20,000 tokens at most: the Recorder's ring)."""
    tokens = recorder.all("tokens")
    steps = recorder.all("steps")
    progress = recorder.all("prefill")
    figures = {"generated_tokens": recorder.tokens_total, "evictions": recorder.evicted_total,
               "peak_cache_bytes": recorder.peak_cache_bytes, "steps": len(steps)}
    if progress:
        figures["prompt_tokens"] = progress[-1].tokens_total
        figures["prompt_tokens_done"] = progress[-1].tokens_done
    if steps:
        figures["kept_per_layer"] = list(steps[-1].kept_per_layer)
        figures["stopped_in"] = steps[-1].phase
    return "".join(token.text for token in tokens), figures


OUTPUT_CLOSED = "stopped: the reader of its output went away (broken pipe)"


def silence_stdout() -> None:
    """After a broken pipe: point stdout at /dev/null, so later prints and the flush at exit
    do not raise again (the pattern in Python's documentation on SIGPIPE)."""
    try:
        descriptor = sys.stdout.fileno()
    except (AttributeError, ValueError, OSError):  # not a real file (a test's capture): nothing to do
        return
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, descriptor)
    os.close(devnull)


class TextOutput:
    """Streams a run's text to stdout. When the reader goes away (broken pipe) it stops writing,
    silences stdout and cancels the run through its CancelToken: the run ends at the next step,
    keeps what it produced, and is recorded as cancelled."""

    def __init__(self, cancel):
        self.cancel = cancel
        self.closed = False

    def write(self, piece: str) -> None:
        if self.closed:
            return
        try:
            print(piece, end="", flush=True)
        except BrokenPipeError:
            self.closed = True
            silence_stdout()
            self.cancel.cancel()
