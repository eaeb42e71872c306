"""Attention map: for one layer, each step's newest query over the context, by key position.

Rows are steps (prefill chunks, then decode steps), columns are token positions. A cell is the
attention weight of that step's newest query to the token at that position (one head, or the mean
over heads); tokens that were already evicted show red, tokens not yet seen near-white (never the
dark low end of the colour ramp, which is a low weight). "scale" colours by weight or by log weight;
"top" sets the weight the ramp tops out at (a percentile of the drawn weights: a few sink tokens
otherwise leave everything else dark). Hovering a cell tells the step, the key token and its weight.

Rows exist only for the layers recorded while the run ran: "this layer" records the chosen one
(changing it mid-run follows from then on); "every layer" records all of them at the cost shown.
A layer that was not recorded says so instead of drawing empty axes.
"""

from __future__ import annotations

import numpy as np
import pyqtgraph as pg
from PySide6.QtCore import QRectF
from PySide6.QtWidgets import QComboBox, QLabel, QSpinBox, QToolTip, QVBoxLayout

from kvstudio.core.figures.data import (EVICTED, LOG_DECADES, UNSEEN, attention_row, attention_row_bytes,
                                scale_attention, stack_rows)
from kvstudio.core.units import format_bytes
from kvstudio.gui.widgets.flow_layout import FlowLayout, labelled
from kvstudio.gui.views.base import LiveView
from kvstudio.gui.views.colors import attention_lut
from kvstudio.gui.views.plot_message import PlotMessage

MAX_ROWS = 1500  # the newest steps kept on screen
MAX_COLUMNS = 1600  # wider contexts are max-pooled into this many columns
RECORD_CHOICES = ("this layer", "every layer")
READOUT_HINT = "red: evicted · white: not yet seen · hover a cell for its token and weight"
NOTHING_YET = "no attention rows yet:\nthey appear with the run's first step"


def to_lut_indices(scaled: np.ndarray) -> np.ndarray:
    """Scaled weights in [0, 1] with EVICTED / UNSEEN markers -> uint8 indices into attention_lut()."""
    indices = np.where(scaled == EVICTED, 0, np.where(scaled == UNSEEN, 1, 2 + np.clip(scaled, 0, 1) * 253))
    return indices.astype(np.ubyte)


class AttentionMapView(LiveView):
    kinds = ("attention", "tokens")

    def __init__(self, parent=None):
        super().__init__(parent)
        self.layer = QSpinBox(minimum=0, maximum=0)
        self.head = QComboBox()
        self.head.addItem("mean over heads")
        self.record = QComboBox()
        self.record.addItems(RECORD_CHOICES)
        self.record.setToolTip("which layers' rows the next run records (each step's newest query)")
        self.scale = QComboBox()
        self.scale.addItems(("linear", "log"))
        self.top = QSpinBox(minimum=50, maximum=100, value=99, suffix=" pct")
        self.top.setToolTip("the colour ramp tops out at this percentile of the drawn weights (100: the largest)")
        controls = FlowLayout()  # wraps when the dock is narrow (1280 px), instead of widening the view
        for text, widget in (("layer", self.layer), ("head", self.head), ("record", self.record),
                             ("scale", self.scale), ("top", self.top)):
            controls.addWidget(labelled(text, widget))
        self.cost = QLabel("")
        self.cost.setStyleSheet("color: #777;")
        self.readout = QLabel(READOUT_HINT)
        for label in (self.cost, self.readout):  # long lines wrap: unwrapped, they widened the view past its dock
            label.setWordWrap(True)
        self.plot = pg.PlotWidget()
        self.plot.setLabel("bottom", "key position")
        self.plot.setLabel("left", "step")
        self.plot.invertY(True)
        for axis in ("left", "bottom"):
            self.plot.getAxis(axis).enableAutoSIPrefix(False)  # positions and steps are counts: no "(x0.001)"
        self.image = pg.ImageItem(axisOrder="row-major")
        self.image.setLookupTable(attention_lut())
        self.plot.addItem(self.image)
        self.colorbar = pg.ColorBarItem(values=(0, 1), colorMap=pg.colormap.get("viridis"), interactive=False)
        self.colorbar.axis.enableAutoSIPrefix(False)  # weights as they are, never "(x0.001)"
        self.colorbar.axis.setLabel("attention weight")
        self.colorbar.axis.setWidth(None)  # ColorBarItem fixes 45 px, which the label then overlapped the ticks in
        self.plot.getPlotItem().layout.addItem(self.colorbar, 2, 5)
        self.message = PlotMessage(self.plot, NOTHING_YET)
        layout = QVBoxLayout(self)
        layout.setContentsMargins(4, 4, 4, 4)
        layout.addLayout(controls)
        layout.addWidget(self.cost)
        layout.addWidget(self.plot)
        layout.addWidget(self.readout)
        self.events: list = []
        self.rows: list[np.ndarray] = []  # one image row per event, for the current head choice
        self.image_values = np.zeros((0, 0), dtype=np.float32)  # what is drawn, before colouring
        self.token_texts: list[str] = []
        self.n_layers, self.n_heads, self.n_kv_heads, self.entries = 1, 1, 1, 0
        self.recorded: set[int] = set()  # layers with rows in the recorder followed
        self.following_live = False
        self.layer.valueChanged.connect(self._watch_layer)
        self.head.currentIndexChanged.connect(lambda _: self._recompute_rows())
        self.record.currentIndexChanged.connect(lambda _: self._set_watched())
        self.scale.currentIndexChanged.connect(lambda _: self._redraw())
        self.top.valueChanged.connect(lambda _: self._redraw())
        self.plot.scene().sigMouseMoved.connect(self._hover)
        self._show_cost()

    def set_model(self, n_layers: int, n_heads: int) -> None:
        self.n_layers, self.n_heads = n_layers, n_heads
        self.layer.setMaximum(n_layers - 1)
        self.layer.setValue(n_layers // 2)
        self.head.blockSignals(True)
        self.head.clear()
        self.head.addItem("mean over heads")
        self.head.addItems([f"head {h}" for h in range(n_heads)])
        self.head.blockSignals(False)
        self._show_cost()

    def follow(self, recorder):
        super().follow(recorder)
        self.events, self.rows, self.token_texts, self.recorded = [], [], [], set()
        self.readout.setText(READOUT_HINT)  # the last run's hovered cell is not this run's
        QToolTip.hideText()
        # A recorder that has not started is a run about to go: it records what the user chose. A
        # stored run's recording is complete: what it recorded is what there is.
        self.following_live = not recorder.all("runs")
        self._set_watched()
        self._redraw()

    def records_every_layer(self) -> bool:
        return self.record.currentText() == "every layer"

    def _set_watched(self) -> None:
        """Tell the recorder which layers' rows to record (the engine reads it at its next step)."""
        if self.recorder is not None and self.following_live:
            layers = range(self.n_layers) if self.records_every_layer() else (self.layer.value(),)
            self.recorder.watch_layers = frozenset(layers)
        self._show_cost()

    def _watch_layer(self, layer: int) -> None:
        if self.recorder is not None:
            self._set_watched()
            # Read the recorder again from the start: rows this layer already has (it was watched
            # before, or the run is a stored one) come back; the consume filters by layer.
            self._cursors["attention"] = 0
            self._cursors["tokens"] = 0
            self.token_texts = list(self.run.prompt_tokens) if self.run is not None else []
        self.events, self.rows = [], []
        self._redraw()

    def _show_cost(self) -> None:
        """What recording every layer costs: each step's newest row, per layer, per held entry."""
        entries = self.entries or 1000
        per_step = self.n_layers * attention_row_bytes(self.n_heads, self.n_kv_heads, entries)
        self.cost.setText(f"recording every layer: {format_bytes(per_step)} per step at {entries:,} held entries "
                          f"({self.n_layers} layers × {self.n_heads} query heads × 4 B + {self.n_kv_heads} KV heads "
                          "× 8 B per entry); this layer alone: "
                          f"{format_bytes(per_step // max(self.n_layers, 1))}")

    def start(self, run):
        self.events, self.rows = [], []
        self.token_texts = list(run.prompt_tokens)
        self.n_layers, self.n_kv_heads = run.n_layers, run.n_kv_heads
        self.n_heads = run.n_heads or run.n_kv_heads
        budgets = [b for b in run.budgets if b is not None]
        self.entries = max(budgets) if budgets else len(run.prompt_tokens)
        self._show_cost()

    def _head(self) -> int | None:
        return None if self.head.currentIndex() <= 0 else self.head.currentIndex() - 1

    def consume(self, events):
        self.token_texts.extend(token.text for token in events.get("tokens", ()))
        self.recorded.update(e.layer for e in events["attention"])
        new = [e for e in events["attention"] if e.layer == self.layer.value()]
        self.events = (self.events + new)[-MAX_ROWS:]
        # Each row is computed once, at its own width; rows are padded when drawn.
        self.rows = (self.rows + [attention_row(e, self._head(), int(e.positions.max()) + 1) for e in new])
        self.rows = self.rows[-MAX_ROWS:]
        self._redraw()

    def _recompute_rows(self) -> None:
        self.rows = [attention_row(e, self._head(), int(e.positions.max()) + 1) for e in self.events]
        self._redraw()

    def _empty_reason(self) -> str:
        layer = self.layer.value()
        if self.run is None or not self.recorded:
            return NOTHING_YET
        shown = ", ".join(map(str, sorted(self.recorded)[:12])) + (" …" if len(self.recorded) > 12 else "")
        return (f"layer {layer} was not recorded in this run\n(recorded: layer {shown}).\n"
                "Choose record: every layer before a run to see any layer.")

    def _redraw(self) -> None:
        self.colorbar.setVisible(bool(self.rows))  # no scale beside nothing
        if not self.rows:
            self.image.clear()
            self.image_values = np.zeros((0, 0), dtype=np.float32)
            self.message.show(self._empty_reason())
            return
        self.message.hide()
        self.image_values = rows = stack_rows(self.rows)
        width = covered = rows.shape[1]
        if width > MAX_COLUMNS:  # max-pool columns: a strong weight stays visible
            bins = -(-width // MAX_COLUMNS)
            columns = -(-width // bins)  # only as many pooled columns as the context fills (not MAX_COLUMNS)
            covered = bins * columns  # under one bin of padding: position p stays at x = p
            padded = np.pad(rows, ((0, 0), (0, covered - width)), constant_values=UNSEEN)
            rows = padded.reshape(rows.shape[0], columns, bins).max(axis=2)
        top = self.top_weight()
        log = self.scale.currentText() == "log"
        self.image.setImage(to_lut_indices(scale_attention(rows, top, log)), levels=(0, 255), autoLevels=False)
        self.image.setRect(QRectF(0, 0, covered, rows.shape[0]))
        if log:  # the bar's axis is linear: label it in decades of weight, as the image is coloured
            self.colorbar.setLevels((np.log10(max(top, 1e-12)) - LOG_DECADES, np.log10(max(top, 1e-12))))
            self.colorbar.axis.setLabel("attention, log10 of weight")
        else:
            self.colorbar.setLevels((0, top))
            self.colorbar.axis.setLabel("attention weight")

    def top_weight(self) -> float:
        held = self.image_values[self.image_values >= 0]
        return float(np.percentile(held, self.top.value())) if held.size else 1.0

    # -- hover -------------------------------------------------------------------------------------

    def describe_cell(self, row: int, position: int) -> str:
        """A cell in words: the step, the key token and what the newest query gave it."""
        value = float(self.image_values[row, position])
        token = self.token_texts[position] if position < len(self.token_texts) else ""
        step = self.events[row].step if row < len(self.events) else row
        if value == EVICTED:
            what = "evicted before this step"
        elif value == UNSEEN:
            what = "not yet seen at this step"
        else:
            what = f"weight {value:.4g}"
        return f"step {step} · key position {position} {token!r} · {what}"

    def _hover(self, scene_position) -> None:
        if not self.image_values.size or not self.plot.getPlotItem().vb.sceneBoundingRect().contains(scene_position):
            return
        point = self.plot.getPlotItem().vb.mapSceneToView(scene_position)
        row, position = int(np.floor(point.y())), int(np.floor(point.x()))
        if 0 <= row < self.image_values.shape[0] and 0 <= position < self.image_values.shape[1]:
            text = self.describe_cell(row, position)
            self.readout.setText(text)
            QToolTip.showText(self.plot.mapToGlobal(self.plot.mapFromScene(scene_position)), text, self.plot)
