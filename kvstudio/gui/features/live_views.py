"""The live views of a run: output, token map, attention map, occupancy, evictions, memory, attention loss.

A 25 Hz timer asks every visible view to read what is new in the Recorder it follows; no signal is
sent per token or per layer. The same views show a stored run from the history, shaped as its model.
"""

from __future__ import annotations

from PySide6.QtCore import QTimer, Slot
from PySide6.QtWidgets import QGroupBox, QVBoxLayout

from kvstudio.core.recording.events import Recorder
from kvstudio.gui.feature import Feature
from kvstudio.gui.views.attention_loss import AttentionLossView
from kvstudio.gui.views.attention_map import AttentionMapView
from kvstudio.gui.views.base import on_screen
from kvstudio.gui.views.evictions import EvictionsView
from kvstudio.gui.views.memory import MemoryView
from kvstudio.gui.views.occupancy import OccupancyView
from kvstudio.gui.views.output import OutputView
from kvstudio.gui.views.token_map import TokenMapView

REFRESH_HZ = 25


class LiveViews(Feature):
    def __init__(self, window):
        super().__init__(window)
        self.output_view = OutputView()
        self.attention_view = AttentionMapView()
        self.token_view = TokenMapView()
        self.occupancy_view = OccupancyView()
        self.evictions_view = EvictionsView()
        self.memory_view = MemoryView()
        self.loss_view = AttentionLossView()  # runs that measure their attention loss
        self.live_views = [self.output_view, self.attention_view, self.token_view, self.occupancy_view,
                           self.evictions_view, self.memory_view, self.loss_view]
        self.showing_stored_run = False  # the views show a run from the history, shaped as its model
        self.timer = QTimer(self, interval=1000 // REFRESH_HZ)

    def install(self) -> None:
        window = self.window
        output = QGroupBox("Output")
        QVBoxLayout(output).addWidget(self.output_view)
        window.add_to_centre(output, 3)  # below the prompt: what is read gets the height
        for title, view in (("Token map", self.token_view), ("Attention map", self.attention_view),
                            ("Occupancy", self.occupancy_view), ("Evictions", self.evictions_view),
                            ("Memory", self.memory_view), ("Attention loss", self.loss_view)):
            window.add_dock(title, view, "views")
        window.state.model_changed.connect(self._model_loaded)
        self.timer.timeout.connect(self.refresh)
        self.timer.start()

    @Slot()
    def refresh(self, include_hidden: bool = False) -> None:
        """Views read what is new. Hidden ones (a tab behind another) wait: their cursors keep
        their place, so they catch up, losing nothing, at the first tick they are on screen."""
        for view in self.live_views:
            if include_hidden or on_screen(view):
                view.refresh()
                if include_hidden:  # a run's end or a stored run: draw now what a throttle held back
                    view.flush()

    def shape(self, n_layers: int, n_heads: int) -> None:
        for view in (self.attention_view, self.token_view, self.evictions_view):
            view.set_model(n_layers, n_heads)

    def follow_new_run(self, recorder: Recorder) -> None:
        """A run of the loaded model starts: back to its shape if a stored run was shown."""
        info = self.window.state.model_info
        if self.showing_stored_run:
            self.shape(info.n_layers, info.n_heads)
            self.showing_stored_run = False
        for view in self.live_views:
            view.follow(recorder)

    def follow_load(self, recorder: Recorder) -> None:
        """A model is loading: the memory timeline shows what it allocates (the run views keep the last run)."""
        self.memory_view.follow(recorder)

    def show_stored_run(self, recorder: Recorder, run) -> None:
        """Show a stored run's recorded events, shaped as the model it ran on (`run`: its start event)."""
        self.shape(run.n_layers, run.n_heads or run.n_kv_heads)
        if recorder.watch_layers:  # attention rows exist only for the layers watched during the run
            self.attention_view.layer.setValue(min(recorder.watch_layers))
        self.showing_stored_run = True
        self.memory_view.clear()  # its clock is another session's: no common timeline
        for view in self.live_views:
            view.follow(recorder)
        self.refresh(include_hidden=True)
        self.output_view.run_ended()

    def _model_loaded(self, info) -> None:
        shown = self.token_view.run
        if shown is not None and (shown.n_layers, shown.n_kv_heads) != (info.n_layers, info.n_kv_heads):
            # The last run was of a model of another shape: its maps cannot be read by this model's
            # layers and heads (choosing layer 20 of a 4-layer run failed), so the run views empty.
            empty = Recorder()
            for view in (self.token_view, self.attention_view, self.occupancy_view, self.evictions_view):
                view.follow(empty)
        self.shape(info.n_layers, info.n_heads)
        self.showing_stored_run = False

    def closing(self) -> None:
        self.timer.stop()
