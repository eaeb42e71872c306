"""A long session: 1,000 runs in a row in the real studio window, as tests/test_soak.py does for 200.

Tiny model (tiny-llama by default), every built-in policy in turn, the fp, int8 and int4 codecs,
Compare every 10th turn, a stored run reopened in the views and exported every 7th. Process memory
(RSS), live Qt objects (QObjects under the window, top-level widgets), plot items and Python objects
are read every 40 turns (the same point of the policies' and Compare's cycles: about 44 runs). The figures after a warm-up (the first 100 runs: caches of imports, fonts and
plots fill up then) end with:

  rss_growth_mb_per_100_runs=<x>  qt_object_growth=<n>  plot_item_growth=<n>  ...  idle_response_ms=<x>

usage: python benchmarks/soak.py [--runs 1000] [--model tiny-llama] [--warm-up 100]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the repository: tests/soak_session.py

from PySide6.QtCore import QEvent, QSettings  # noqa: E402
from PySide6.QtWidgets import QApplication  # noqa: E402

from kvstudio.gui.app import configure_plots  # noqa: E402
from kvstudio.gui.main_window import MainWindow  # noqa: E402
from tests.soak_session import soak  # noqa: E402


def wait_until(predicate, timeout_s: float = 120.0) -> None:
    deadline = time.perf_counter() + timeout_s
    while not predicate():
        if time.perf_counter() > deadline:
            raise TimeoutError("the studio did not finish a run in time")
        QApplication.processEvents()
        # What an event loop does when it goes round (app.exec, QTest.qWait): objects given to
        # deleteLater() are deleted. processEvents alone leaves them, which would read as a leak.
        QApplication.sendPostedEvents(None, QEvent.DeferredDelete)
        time.sleep(0.002)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=1000)
    parser.add_argument("--model", default="tiny-llama")
    parser.add_argument("--warm-up", type=int, default=100)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        os.environ["KVSTUDIO_DATA_DIR"] = str(Path(folder) / "data")  # a history of its own
        app = QApplication.instance() or QApplication([])
        configure_plots()
        window = MainWindow(QSettings(str(Path(folder) / "settings.ini"), QSettings.IniFormat))
        window.show()
        window.loading.request_load(args.model, "cpu", "auto")
        wait_until(lambda: window.state.model_info is not None and not window.state.busy)
        print(f"{'runs':>6} {'rss MB':>8} {'Qt objects':>11} {'plot items':>11} {'Python objects':>15}", flush=True)

        def show(reading) -> None:
            print(f"{reading.runs:>6} {reading.rss_mb:>8.1f} {reading.qt_objects:>11} {reading.plot_items:>11} "
                  f"{reading.python_objects:>15}"
                  + ("" if reading.aligned else "  (at the end)"), flush=True)

        figures = soak(window, wait_until, args.runs, Path(folder), on_reading=show)
        show(figures.readings[-1])
        stored = {record.id for record in window.history.list(limit=10**7)}
        missing = len(set(figures.history_ids) - stored)
        print(f"{figures.runs} runs in {figures.seconds:.1f} s ({figures.seconds / figures.runs * 1000:.0f} ms a run); "
              f"{len(figures.history_ids)} rows in the history, {missing} missing; {len(figures.errors)} failed")
        print(f"rss_growth_mb_per_100_runs={figures.rss_growth_per_100_runs(args.warm_up):.2f} "
              f"qt_object_growth={figures.growth('qt_objects', args.warm_up)} "
              f"plot_item_growth={figures.growth('plot_items', args.warm_up)} "
              f"python_object_growth={figures.growth('python_objects', args.warm_up)} "
              f"idle_response_ms={figures.respond_ms:.1f}")
        window.close()
        app.processEvents()
    return 0 if not figures.errors and not missing else 1


if __name__ == "__main__":
    sys.exit(main())
