"""A long session in the studio, driven as a user would: runs in a row under every built-in policy
and each codec, Compare every few runs, a stored run reopened in the views and exported now and
then. Process memory (RSS), live Qt objects and Python objects are read along the way.

Used by tests/test_soak.py (200 runs, bounds asserted) and benchmarks/soak.py (1,000 runs,
figures printed). Needs a shown MainWindow with a model loaded, and something that waits for a
condition while Qt's event loop runs (pytest-qt's qtbot.waitUntil, or the benchmark's own).
"""

from __future__ import annotations

import gc
import time
from dataclasses import dataclass, field
from pathlib import Path

import psutil
from PySide6.QtCore import QEvent, QObject, QTimer
from PySide6.QtWidgets import QApplication, QGraphicsView

from kvstudio.core.persist.exports import export_run
from kvstudio.core.recording.packing import unpack_events

# (policy, parameters): every built-in that bounds the cache, and full; budgets small enough to evict
POLICIES = (("full", {}), ("window", {"budget": 12}), ("streaming_llm", {"budget": 12, "sink": 2}),
            ("h2o", {"budget": 12}), ("tova", {"budget": 12}), ("snapkv", {"budget": 12}),
            ("pyramidkv", {"budget": 12}), ("knorm", {"budget": 12}))
CODECS = ("fp", "int8", "int4")
COMPARE_EVERY = 10  # every 10th turn is a Compare of two policies (two runs)
REOPEN_EVERY = 7  # every 7th turn also reopens a stored run in the views and exports it
# Readings are taken at the start of every 40th turn: the same point of the policies' and Compare's
# cycles (8 and 10 turns), so the same form and the same Compare columns are showing each time, and
# what differs between two readings is what the session accumulated.
READ_EVERY_TURNS = 40
PROMPT = "the soak test feeds this prompt again and again "


@dataclass
class Reading:
    runs: int
    rss_mb: float
    qt_objects: int
    plot_items: int
    python_objects: int
    aligned: bool = True  # taken at the cycles' common point (the last reading, at the end, is not)


@dataclass
class SoakFigures:
    runs: int = 0
    readings: list[Reading] = field(default_factory=list)
    history_ids: list[int] = field(default_factory=list)  # every run's row, in order
    errors: list[str] = field(default_factory=list)
    seconds: float = 0.0
    respond_ms: float = 0.0  # how long the idle window took to handle an event at the end (median)

    def span(self, after_runs: int) -> tuple[Reading, Reading]:
        """The first aligned reading at or after `after_runs` (the warm-up) and the last aligned one."""
        aligned = [r for r in self.readings if r.aligned]
        return next(r for r in aligned if r.runs >= after_runs), aligned[-1]

    def growth(self, attribute: str, after_runs: int) -> float:
        start, end = self.span(after_runs)
        return getattr(end, attribute) - getattr(start, attribute)

    def rss_growth_per_100_runs(self, after_runs: int) -> float:
        start, end = self.span(after_runs)
        return (end.rss_mb - start.rss_mb) / max(end.runs - start.runs, 1) * 100


def qt_object_count(window) -> int:
    """QObjects under the window and top-level widgets (a widget left without a parent is one)."""
    return len(window.findChildren(QObject)) + len(QApplication.topLevelWidgets())


def plot_item_count(window) -> int:
    """Items in every plot's scene. Apart from QObjects: their number follows the run last shown (the
    memory view marks each phase it recorded, and how many depends on timing), so it moves a little
    from reading to reading without anything accumulating."""
    scenes = {view.scene() for view in window.findChildren(QGraphicsView) if view.scene() is not None}
    return sum(len(scene.items()) for scene in scenes)


def read(window, runs: int, aligned: bool = True) -> Reading:
    gc.collect()
    QApplication.sendPostedEvents(None, QEvent.DeferredDelete)  # what deleteLater() has given up goes first
    return Reading(runs, psutil.Process().memory_info().rss / 2**20, qt_object_count(window), plot_item_count(window),
                   len(gc.get_objects()), aligned)


def respond_ms(wait_until, probes: int = 21) -> float:
    """Milliseconds from posting a zero-delay timer to its callback running on the idle window: the
    median of `probes` (one probe measures the machine's scheduler as much as the window)."""
    delays = []
    for _ in range(probes):
        fired = []
        started = time.perf_counter()
        QTimer.singleShot(0, lambda: fired.append(time.perf_counter()))
        wait_until(lambda: bool(fired))
        delays.append((fired[0] - started) * 1000)
    return sorted(delays)[probes // 2]


def soak(window, wait_until, runs: int, folder: Path, max_new_tokens: int = 2, on_reading=None) -> SoakFigures:
    """`runs` runs in the window (Compares count their runs); `wait_until(predicate)` runs the event
    loop until predicate() is true. Exports go to `folder` (one file, overwritten). `on_reading`
    hears each reading as it is taken (a long benchmark prints them as it goes)."""
    figures = SoakFigures()
    form = window.form
    window.prompt_area.prompt.setPlainText(PROMPT)
    form.max_new_tokens.setValue(max_new_tokens)
    form.chunk_size.setValue(64)  # one prefill chunk: the budget of 12 still evicts after it and while decoding
    started = time.perf_counter()
    turn = 0
    while figures.runs < runs:
        if turn % READ_EVERY_TURNS == 0:
            figures.readings.append(read(window, figures.runs))
            if on_reading is not None:
                on_reading(figures.readings[-1])
        turn += 1
        policy, parameters = POLICIES[turn % len(POLICIES)]
        form.storage_form.codec.setCurrentText(CODECS[turn % len(CODECS)])
        if turn % COMPARE_EVERY == 0 and runs - figures.runs >= 2:
            form.policy.setCurrentText("h2o")
            form.policy_form.set_values({"budget": 12})
            before = len(window.history.list(limit=10**6))
            window.compare.request(["window", "h2o"])
            wait_until(lambda: window.compare.view.table.rowCount() == 2 and not window.state.busy)
            figures.runs += 2
            rows = window.history.list(limit=len(window.history.list(limit=10**6)) - before)
            figures.history_ids += sorted(r.id for r in rows)
        else:
            form.policy.setCurrentText(policy)
            form.policy_form.set_values(parameters)
            window.run.request_run()
            wait_until(lambda: not window.state.busy)
            outcome = window.state.last_outcome
            figures.runs += 1
            if outcome.error:
                figures.errors.append(outcome.error)
            if outcome.request.history_id is not None:
                figures.history_ids.append(outcome.request.history_id)
        if turn % REOPEN_EVERY == 0 and figures.history_ids:
            stored = figures.history_ids[-1]
            window.runs.reopen(stored)
            record, blob = window.history.get(stored), window.history.events(stored)
            # What the Runs view's Export does with a stored run, without its file dialog.
            window.exports.report(export_run, record, folder / "soak-run.json",
                                  unpack_events(blob) if blob is not None else None)
        window.views.refresh()
    figures.seconds = time.perf_counter() - started
    figures.readings.append(read(window, figures.runs, aligned=False))
    figures.respond_ms = respond_ms(wait_until)
    return figures
