"""The one interface every part of the studio window implements.

A feature builds its widgets in its constructor, then `install()` puts them into the window: its
docks (`window.add_dock`), its menu actions (`window.menu`), its bars, and its connections to the
studio's state (`window.state`: what holds the model's thread, the loaded model), to other features
through their public methods and signals (reached as window attributes: `window.form`,
`window.views`, ...). Long work goes through `window.runner` (task_runner.py).
The window calls the other hooks at the right moments: `restore_settings` after every feature is
installed, `save_settings` before a run and on close, `update_buttons` whenever the state's
`busy_changed` or `model_changed` fires, and `closing` when the window closes, before it interrupts
the tasks still running and joins the model's thread.
"""

from __future__ import annotations

from PySide6.QtCore import QObject, QSettings


class Feature(QObject):
    def __init__(self, window):
        super().__init__(window)
        self.window = window

    def install(self) -> None:
        """Put this feature's docks, menus and connections into the window."""
        raise NotImplementedError

    def restore_settings(self, settings: QSettings) -> None:
        """Take back what `save_settings` wrote (nothing by default)."""

    def save_settings(self, settings: QSettings) -> None:
        """Remember what the user set, for the next launch (nothing by default)."""

    def update_buttons(self) -> None:
        """Enable what may start now (`window.state.busy` and `window.state.model_info` say what runs)."""

    def closing(self) -> None:
        """The window is closing: stop what this feature runs on the model's thread."""
