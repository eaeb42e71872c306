"""`kvstudio --model SPEC` as a user starts it: a real process opens the window and loads the model."""

from __future__ import annotations

import os
import subprocess
import sys

LAUNCH = """
import sys
from PySide6.QtCore import QTimer
from PySide6.QtWidgets import QApplication
from kvstudio.gui.app import run_studio

def loaded():
    windows = [w for w in QApplication.topLevelWidgets() if type(w).__name__ == "MainWindow"]
    if not windows or windows[0].state.model_info is None:
        QTimer.singleShot(50, loaded)
        return
    window = windows[0]
    print("loaded", window.state.model_info.description, "|", window.loading.panel.spec.currentText(), flush=True)
    window.close()
    QApplication.instance().quit()

QApplication(sys.argv[:1])
QTimer.singleShot(50, loaded)
sys.exit(run_studio("tiny-llama"))
"""


def test_the_studio_starts_and_loads_the_model_it_was_given(tmp_path):
    env = dict(os.environ, QT_QPA_PLATFORM="offscreen", KVSTUDIO_DATA_DIR=str(tmp_path / "data"),
               XDG_CONFIG_HOME=str(tmp_path / "config"), HOME=str(tmp_path))
    done = subprocess.run([sys.executable, "-c", LAUNCH], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "loaded tiny-llama" in done.stdout and "| tiny-llama" in done.stdout, done.stdout
