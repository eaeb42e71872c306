"""Start the studio: `kvstudio` (or `python main.py`)."""

from __future__ import annotations

import ctypes.util
import os
import sys

from kvstudio.core.errors import KVStudioError
from kvstudio.gui.tasks import banner_text


def check_display() -> None:
    """Say plainly what is missing, instead of letting Qt abort the process."""
    platform = os.environ.get("QT_QPA_PLATFORM", "")
    if platform in ("offscreen", "minimal", "vnc") or sys.platform != "linux":
        return
    if not (os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY")):
        raise KVStudioError("no display to open the studio on (DISPLAY is not set); "
                            "use `kvstudio run ...` for headless work")
    if platform in ("", "xcb") and ctypes.util.find_library("xcb-cursor") is None:
        raise KVStudioError("Qt needs the xcb-cursor library to open windows on X11: "
                            "sudo apt install libxcb-cursor0 (Debian/Ubuntu)")


def configure_plots() -> None:
    """pyqtgraph's global options for the studio (the tests' windows use the same, so they see what
    users see): images indexed [row, column] as numpy shows them, no antialiasing (faster redraws)."""
    import pyqtgraph as pg

    pg.setConfigOptions(imageAxisOrder="row-major", antialias=False)


def install_last_net(window) -> None:
    """The studio's last net: an exception that escapes a slot (a click, a file opened, a drop) and
    that nothing caught becomes the banner's one line ("internal error: ...; details in FILE", or a
    KVStudioError's own message), and the window carries on. Qt hands such exceptions to
    sys.excepthook; the default one prints a traceback to a terminal the user may not have."""

    def hook(kind, error, trace):
        if not isinstance(error, Exception):  # Ctrl-C in the terminal, a real exit: as Python does
            sys.__excepthook__(kind, error, trace)
            return
        window.show_error(banner_text(error.with_traceback(trace), stage="studio"))

    sys.excepthook = hook


def run_studio(model: str | None = "default") -> int:
    check_display()
    from PySide6.QtCore import QTimer
    from PySide6.QtWidgets import QApplication

    from kvstudio.gui.main_window import MainWindow

    from kvstudio.core.models.loading import prepare_load

    if model:  # imports and tokenizer now, before the window: loading them later froze it
        prepare_load(model)
    configure_plots()
    app = QApplication.instance() or QApplication(sys.argv[:1])
    app.setApplicationName("KV Studio")
    window = MainWindow()
    install_last_net(window)
    window.show()
    if model:
        window.loading.panel.spec.setCurrentText(model)
        # After the first paint: painting and laying out the window holds the GIL for tens of
        # milliseconds, and the load started beside it held it in the other direction.
        QTimer.singleShot(0, lambda: window.loading.request_load(model, "auto", "auto"))
    return app.exec()
