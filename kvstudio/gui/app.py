"""Start the studio: `kvstudio` (or `python main.py`)."""

from __future__ import annotations

import sys


def run_studio(model: str | None = "default") -> int:
    import pyqtgraph as pg
    from PySide6.QtWidgets import QApplication

    from .main_window import MainWindow

    pg.setConfigOptions(imageAxisOrder="row-major", antialias=False)
    app = QApplication.instance() or QApplication(sys.argv[:1])
    app.setApplicationName("KV Studio")
    window = MainWindow()
    window.show()
    if model:
        window.model_panel.spec.setCurrentText(model)
        window.request_load(model, "auto", "auto")
    return app.exec()
