"""Python's cycle collector runs only on the GUI thread while a studio window is open."""

from __future__ import annotations

import gc
import threading

from kvstudio.gui import gui_thread_gc


class _Cycle:
    def __init__(self):
        self.me = self


def test_garbage_made_on_a_worker_thread_is_collected_by_the_gui_thread(qtbot, window):
    assert gui_thread_gc.collecting_on_gui_thread() and not gc.isenabled()
    collected_on = []

    class Noted(_Cycle):
        def __del__(self):
            collected_on.append(threading.current_thread() is threading.main_thread())

    def make_garbage():  # far more than a generation's threshold: the worker would have collected
        for _ in range(3 * gc.get_threshold()[0]):
            Noted()

    worker = threading.Thread(target=make_garbage)
    worker.start()
    worker.join()
    assert collected_on == []  # nothing collected on the worker
    qtbot.waitUntil(lambda: len(collected_on) > 0, timeout=5000)  # the GUI thread's timer did
    assert all(collected_on)


def test_closing_the_last_window_gives_collection_back(qtbot, tmp_path, studio_folders):
    from PySide6.QtCore import QSettings

    from kvstudio.gui.main_window import MainWindow

    was_enabled = gc.isenabled()
    first = MainWindow(QSettings(str(tmp_path / "a.ini"), QSettings.IniFormat))
    second = MainWindow(QSettings(str(tmp_path / "b.ini"), QSettings.IniFormat))
    try:
        first.close()
        first.close()  # twice: counted once
        assert not gc.isenabled()  # the second window is still open
    finally:
        second.close()
        first.plugins.unload()
        second.plugins.unload()
    assert gc.isenabled() == was_enabled and not gui_thread_gc.collecting_on_gui_thread()
