"""While a studio window is open, Python's cycle collector runs on the GUI thread only.

The collector runs in whichever thread happens to allocate when a generation fills up. When that
is the model's worker thread and the garbage holds Qt wrappers (a closed dialog, a replaced view),
shiboken destroys those QObjects there: a destructor takes a Qt lock and then waits for the GIL,
while the GUI thread, holding the GIL, waits for the same lock to delete a widget. Both threads
stop for good (seen in the test suite: a memory-snapshot run froze the studio). So automatic
collection is switched off and the GUI thread collects on a timer instead (pyqtgraph's
GarbageCollector, made for this), and once more when the last window closes.
"""

from __future__ import annotations

import gc

from pyqtgraph.util.garbage_collector import GarbageCollector

INTERVAL_S = 0.5  # how often the GUI thread checks whether a generation needs collecting

_windows = 0
_collector: GarbageCollector | None = None
_was_enabled = True


def hold() -> None:
    """A window opens: from now on only the GUI thread collects."""
    global _windows, _collector, _was_enabled
    if _windows == 0:
        _was_enabled = gc.isenabled()
        _collector = GarbageCollector(interval=INTERVAL_S)
    _windows += 1


def release() -> None:
    """A window closed; after the last one, collect what is left here and give collection back."""
    global _windows, _collector
    if _windows == 0:
        return
    _windows -= 1
    if _windows == 0:
        _collector.timer.stop()
        _collector = None
        gc.collect()
        if _was_enabled:
            gc.enable()


def collecting_on_gui_thread() -> bool:
    return _collector is not None and not gc.isenabled()
