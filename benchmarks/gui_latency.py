"""How responsive the studio stays while the model works: event-loop latency during a run.

Opens the real window (offscreen unless a display is set), loads the model on the worker thread,
runs a generation with every view live, and probes the GUI event loop with a 10 ms QTimer: each
tick records how late it fired. Prints p50 / p99 / max lateness while the window first shows
(its first paint, about a second, nothing loading), during the model load and during the run.
Target: p99 < 50 ms. Ends with load_p99_ms=<x> (the model load, after what `kvstudio` prepares
before its window opens: see core.models.prepare_load) and gui_event_loop_p99_ms=<x> (the run).
The first paint is measured apart from the load: it costs the same with no model at all.

usage: python benchmarks/gui_latency.py [--model SPEC] [--policy h2o] [--prompt-tokens 1000]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")
os.environ.setdefault("KVSTUDIO_DATA_DIR", tempfile.mkdtemp(prefix="kvstudio-latency-"))  # not the user's history
sys.path.insert(0, os.path.dirname(__file__))

import numpy as np  # noqa: E402
import pyqtgraph as pg  # noqa: E402
from PySide6.QtCore import QSettings, QTimer  # noqa: E402
from PySide6.QtWidgets import QApplication  # noqa: E402

from kvstudio.core.evaluate import passkey_prompt  # noqa: E402
from kvstudio.core.models.loading import prepare_load  # noqa: E402
from kvstudio.gui.main_window import MainWindow  # noqa: E402

PROBE_MS = 10
SHOW_S = 1  # the window's first paint and layout, before the load starts


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="default")
    parser.add_argument("--policy", default="h2o")
    parser.add_argument("--budget", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=40, help="filler repeats (40 ~ 1,000 tokens)")
    parser.add_argument("--new-tokens", type=int, default=64)
    args = parser.parse_args()

    pg.setConfigOptions(imageAxisOrder="row-major", antialias=False)
    prepare_load(args.model)  # what `kvstudio` does before its window opens
    app = QApplication([])
    settings = QSettings(os.path.join(os.environ.get("TMPDIR", "/tmp"), "kvstudio-latency.ini"), QSettings.IniFormat)
    window = MainWindow(settings)
    window.show()
    lateness: dict[str, list[float]] = {"show": [], "load": [], "run": []}
    phase = ["show"]
    last = [time.perf_counter()]

    def probe():
        now = time.perf_counter()
        lateness[phase[0]].append(max((now - last[0]) * 1000 - PROBE_MS, 0.0))
        last[0] = now

    timer = QTimer(interval=PROBE_MS)
    timer.timeout.connect(probe)
    timer.start()

    def start_run():
        if window.state.model_info is None or window.state.busy:  # loading holds the model's thread
            QTimer.singleShot(20, start_run)
            return
        phase[0] = "run"
        window.prompt_area.prompt.setPlainText(passkey_prompt("57314", args.repeats))
        window.form.policy.setCurrentText(args.policy)
        window.form.policy_form.set_values({"budget": args.budget})
        window.form.max_new_tokens.setValue(args.new_tokens)
        window.form.chunk_size.setValue(256)
        window.run.request_run()
        QTimer.singleShot(50, wait_for_end)

    def wait_for_end():
        if window.state.busy:
            QTimer.singleShot(50, wait_for_end)
            return
        app.quit()

    def start_load():
        phase[0] = "load"
        window.loading.request_load(args.model, "auto", "auto")
        QTimer.singleShot(20, start_run)

    QTimer.singleShot(SHOW_S * 1000, start_load)
    app.exec()
    timer.stop()
    outcome = window.state.last_outcome
    if outcome is None or outcome.result is None:
        print(f"the run failed: {outcome.error if outcome else 'it never started'}")
        return 1
    result = outcome.result
    window.close()
    print(f"model {window.state.model_info.description}; policy {args.policy} budget {args.budget}; "
          f"prompt {result.prompt_tokens} tokens, {len(result.token_ids)} generated, every view live")
    for name, values in lateness.items():
        if values:
            values = np.array(values)
            print(f"{name:<5} {len(values):5d} probes: lateness p50 {np.percentile(values, 50):6.1f} ms, "
                  f"p99 {np.percentile(values, 99):6.1f} ms, max {values.max():6.1f} ms")
    print(f"load_p99_ms={np.percentile(lateness['load'], 99):.1f}")
    print(f"gui_event_loop_p99_ms={np.percentile(lateness['run'], 99):.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
