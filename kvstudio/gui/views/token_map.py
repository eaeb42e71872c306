"""Token map: the prompt (and generated text), each token coloured by what the cache still holds.

"all layers": green when every layer holds the token, red when none does, in between by the number
of layers that hold it (a layer holds a token while at least one of its KV heads does).
One layer: green when all its KV heads hold the token, amber when some do, red when none does.
Grey: the model has not been fed the token yet (prefill not there yet, a Stop mid-prefill, or the
newest generated token). A blue bar marks where the prompt ends and generated text begins.
This is the view that shows what a policy threw away. Hovering a token tells its position, text,
the layers holding it and when it was evicted (kvstudio.core.figures.data.TokenMap, which the figure
export uses too).
"Where it lives" colours the chosen layer's tokens by storage tier: on the device (held by some KV
head), on the host (evicted under the host tier), recalled from the host at the latest step that
recalled, or evicted and gone; with cross-layer merging (MiniCache), "retained" marks the tokens the
retention rule kept unmerged in that layer. Under "all layers" each token shows the liveliest tier
any layer gives it (on the device if any layer holds it; gone only when every layer dropped it).
"""

from __future__ import annotations

import bisect

import numpy as np
from PySide6.QtCore import QEvent, Qt
from PySide6.QtGui import QColor, QTextCharFormat, QTextCursor
from PySide6.QtWidgets import QCheckBox, QComboBox, QHBoxLayout, QLabel, QTextEdit, QToolTip, QVBoxLayout

from kvstudio.core.figures import colours
from kvstudio.core.figures.data import TokenMap
from kvstudio.gui.views.base import LiveView

RENDER_INTERVAL_S = 0.1
TIER_COLOURS = {**colours.TIER_COLOURS, "unfed": colours.UNFED}
BOUNDARY_MARK = " ▍generated: "  # between the prompt and the generated text; not a token


class TokenMapView(LiveView):
    kinds = ("tokens", "evictions", "recalls", "steps", "merges")

    def __init__(self, parent=None, compact: bool = False):
        super().__init__(parent)
        # Children of the view even when compact leaves them out of its layout (hidden): a parentless
        # widget is a window of its own that outlives the view (the soak test found one pair per
        # Compare column).
        self.layer = QComboBox(self)
        self.layer.addItem("all layers")
        self.by_tier = QCheckBox("where it lives", self)
        self.by_tier.setToolTip("device, host tier, recalled this step, or evicted (the chosen layer; with all "
                                "layers, the liveliest tier any layer gives the token)")
        self.summary = QLabel("")
        self.key = QLabel("")
        self.key.setTextFormat(Qt.RichText)
        for label in (self.summary, self.key):  # long lines wrap: unwrapped, they widened the view past its dock
            label.setWordWrap(True)
        self.text = QTextEdit(readOnly=True)
        self.text.viewport().setMouseTracking(True)
        self.text.viewport().installEventFilter(self)
        controls = QHBoxLayout()
        if not compact:
            controls.addWidget(QLabel("colour by"))
            controls.addWidget(self.layer)
            controls.addWidget(self.by_tier)
        else:
            self.layer.hide()
            self.by_tier.hide()
        controls.addWidget(self.summary, 1)
        layout = QVBoxLayout(self)
        layout.setContentsMargins(4, 4, 4, 4)
        layout.addLayout(controls)
        layout.addWidget(self.key)
        self.key.setVisible(not compact)  # side by side (Compare) the key is the summary's hover instead
        layout.addWidget(self.text)
        self.map: TokenMap | None = None
        self.label = ""  # named in front of the summary (Compare: the policy)
        self._dirty = False
        self._starts: list[int] = []  # character offset where each shown token starts
        self._ends: list[int] = []  # ... and ends (the boundary mark sits between two of them)
        self._colours: list[str] = []  # colour each shown token has now
        self._formats: dict[str, QTextCharFormat] = {}
        self.layer.currentIndexChanged.connect(lambda _: self._render(force=True))
        self.by_tier.toggled.connect(lambda _: self._render(force=True))
        self._show_key()

    def follow(self, recorder) -> None:
        super().follow(recorder)
        self.map = None  # until the run it follows starts
        self._render(force=True)

    def set_model(self, n_layers: int, n_heads: int) -> None:
        self.layer.blockSignals(True)
        self.layer.clear()
        self.layer.addItem("all layers")
        self.layer.addItems([f"layer {i}" for i in range(n_layers)])
        self.layer.blockSignals(False)

    def start(self, run):
        self.map = TokenMap.for_run(run)
        self._render(force=True)

    def consume(self, events):
        self.map.add(events)
        self._dirty = True
        self._render()

    def flush(self) -> None:
        if self._dirty:
            self._render(force=False, throttle=False)

    # -- what is drawn (also read by tests) --------------------------------------------------------

    @property
    def tokens(self) -> list[str]:
        return self.map.tokens if self.map is not None else []

    @property
    def recalled(self) -> dict:
        return self.map.recalled if self.map is not None else {}

    def chosen_layer(self) -> int | None:
        return None if self.layer.currentIndex() <= 0 else self.layer.currentIndex() - 1

    def layers_holding(self) -> np.ndarray:
        """Per token: how many layers still hold it."""
        return self.map.layers_holding()

    def heads_holding(self, layer: int) -> np.ndarray:
        return self.map.heads_holding(layer)

    def held_fractions(self) -> np.ndarray:
        """Per token, in [0, 1] (NaN: not fed yet): the fraction that decides its colour now."""
        return self.map.held_fractions(self.chosen_layer())

    def tiers(self) -> list[str]:
        return self.map.tiers(self.chosen_layer())

    def expected_colours(self) -> list[str]:
        """The colour each token should have for what the recorder holds so far."""
        if self.map is None:
            return []
        if self.by_tier.isChecked():
            return [TIER_COLOURS[tier] for tier in self.tiers()]
        # A fraction is k of n layers (or heads): a handful of distinct values, each coloured once. A
        # colour call per token (1,700 a frame at 10 Hz) held the GIL the worker needs.
        fractions = self.held_fractions()
        values, inverse = np.unique(np.nan_to_num(fractions, nan=-1.0), return_inverse=True)
        palette = np.array([colours.UNFED if v < 0 else colours.held_colour(float(v)) for v in values], dtype=object)
        return palette[inverse.reshape(-1)].tolist()

    def drawn_colours(self) -> list[str]:
        """The background colour each token has in the document now: what the user sees."""
        cursor = QTextCursor(self.text.document())
        drawn = []
        for start in self._starts:
            cursor.setPosition(start + 1)  # the format of the character after start
            drawn.append(cursor.charFormat().background().color().name())
        return drawn

    def token_at(self, character: int) -> int | None:
        """The token drawn at a character offset, or None (the boundary mark, past the end)."""
        index = bisect.bisect_right(self._starts, character) - 1
        if 0 <= index < len(self._ends) and character < self._ends[index]:
            return index
        return None

    def hover_text(self, index: int) -> str:
        return self.map.describe(index, self.chosen_layer())

    def eventFilter(self, watched, event) -> bool:
        if watched is self.text.viewport() and event.type() == QEvent.MouseMove and self.map is not None:
            point = event.position().toPoint()
            cursor = self.text.cursorForPosition(point)  # the nearest gap between characters
            character = cursor.position() - (self.text.cursorRect(cursor).x() > point.x())  # the one under it
            index = self.token_at(character)
            if index is None:
                QToolTip.hideText()
            else:
                QToolTip.showText(event.globalPosition().toPoint(), self.hover_text(index), self.text)
        return super().eventFilter(watched, event)

    # -- drawing -----------------------------------------------------------------------------------

    def _show_key(self) -> None:
        if self.by_tier.isChecked():
            words = {"unfed": "not fed yet", "window": "left the window"}
            pairs = [(TIER_COLOURS[t], words.get(t, t)) for t in TIER_COLOURS]
            if self.chosen_layer() is None:
                pairs[-1] = (pairs[-1][0], pairs[-1][1] + " · all layers: the liveliest tier any layer gives a token")
        else:
            pairs = colours.held_key("layers" if self.chosen_layer() is None else "heads")
        swatches = "  ".join(f"<span style='background:{c}'>&nbsp;&nbsp;&nbsp;</span> {label}" for c, label in pairs)
        self.key.setText(f"<small>{swatches}  <b style='color:#1f3fbf'>▍</b> generated text begins</small>")
        self.summary.setToolTip(self.key.text())

    def _render(self, force: bool = False, throttle: bool = True) -> None:
        """Bring the text up to date: append new tokens, re-colour only tokens whose colour changed.

        The document is built once per run; later frames touch a handful of character ranges,
        so the GUI thread stays responsive however long the prompt is. A frame skipped by the
        throttle is drawn by the trailing flush: the last events of a run are never left undrawn.
        """
        if not force and not self._dirty:
            return
        if not force and throttle and self.held_back(RENDER_INTERVAL_S):
            return
        self._dirty = False
        self.note_drawn()
        if force:
            self._show_key()
        if self.map is None:
            self.text.clear()
            self._starts, self._ends, self._colours = [], [], []
            return
        if force:
            self.text.clear()
            self._starts, self._ends, self._colours = [], [], []
        cursor = QTextCursor(self.text.document())
        cursor.beginEditBlock()
        colours_now = self.expected_colours()
        for index in range(len(self._colours), len(self.tokens)):  # tokens not shown yet
            cursor.movePosition(QTextCursor.End)
            if index == self.map.prompt_count:
                cursor.insertText(BOUNDARY_MARK, self._boundary_format())
            self._starts.append(cursor.position())
            cursor.insertText(self.tokens[index].replace("\n", "↵\n") or "·", self._format(colours_now[index]))
            self._ends.append(cursor.position())
            self._colours.append(colours_now[index])
        # Re-colour runs of changed tokens that share a colour; the changed ones found in numpy, not a
        # Python scan of every token per frame.
        changed = np.flatnonzero(np.array(colours_now, dtype=object) != np.array(self._colours, dtype=object))
        for index in changed:
            if colours_now[index] == self._colours[index]:
                continue  # re-coloured already, within the run before it
            end = index
            while (end + 1 < len(colours_now) and end + 1 != self.map.prompt_count  # never across the mark
                   and colours_now[end + 1] == colours_now[index] != self._colours[end + 1]):
                end += 1
            cursor.setPosition(self._starts[index])
            cursor.setPosition(self._ends[end], QTextCursor.KeepAnchor)
            cursor.setCharFormat(self._format(colours_now[index]))
            self._colours[index:end + 1] = [colours_now[index]] * (end + 1 - index)
        cursor.endEditBlock()
        self.summary.setText(self.summary_text())

    def summary_text(self) -> str:
        token_map, layer = self.map, self.chosen_layer()
        n = len(token_map.tokens)
        text = (f"{n} tokens ({token_map.prompt_count} prompt, {n - token_map.prompt_count} generated) · "
                f"{token_map.gone_count(layer)} gone from {'every layer' if layer is None else 'this layer'}")
        # Only prompt tokens wait to be fed (prefill under way, a Stop mid-prefill): the newest generated
        # token is always sampled and never fed, which is how generation ends, not something pending.
        unfed = token_map.prompt_count - min(token_map.fed_count, token_map.prompt_count)
        text += f" · {unfed} prompt tokens not fed yet" if unfed else ""
        return f"{self.label}: {text}" if self.label else text

    def _format(self, colour: str) -> QTextCharFormat:
        if colour not in self._formats:
            text_format = QTextCharFormat()
            text_format.setBackground(QColor(colour))
            text_format.setForeground(QColor(colours.UNFED_TEXT if colour == colours.UNFED else "#111111"))
            self._formats[colour] = text_format
        return self._formats[colour]

    def _boundary_format(self) -> QTextCharFormat:
        text_format = QTextCharFormat()
        text_format.setForeground(QColor("#1f3fbf"))
        text_format.setFontWeight(700)
        return text_format
