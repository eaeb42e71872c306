"""The studio at 1280x800 and what it holds in memory (issue 26, the items left open): the Evaluate
view's heatmaps and a document's name fit their panes; runs past the shown one live on disk; an
unloaded model is freed; the prefill bar goes when the run ends; the banner's check changes nothing.
pytest-qt, offscreen, tiny-llama."""

from __future__ import annotations

import pytest
from PySide6.QtCore import Qt

from .test_evaluate_view import _choose

pytest.importorskip("pytestqt")

pytestmark = pytest.mark.studio_model("tiny-llama")

SIZES = [(1280, 800), (1600, 1000)]


@pytest.mark.parametrize("size", SIZES)
def test_every_heatmap_of_a_sweep_fits_the_evaluate_pane(qtbot, window, size):
    window.resize(*size)
    dock = window.docks["Evaluate"]
    dock.show()
    dock.raise_()
    view = window.evaluate.view
    _choose(view, policies=("full", "h2o", "streaming_llm"), budgets="32", lengths="400", depths="0")
    view.start.click()
    qtbot.waitUntil(lambda: not window.state.busy, timeout=120_000)
    qtbot.wait(100)
    assert len(view.records) == 3, view.status.text()
    heatmaps = view.heatmaps
    width = heatmaps.viewport().width()
    assert heatmaps.ci.effectiveSizeHint(Qt.MinimumSize).width() <= width  # the scene does not spill sideways
    drawn = [*view.heatmap_plots.values(), *(item for item in heatmaps.ci.items if item not in
                                              view.heatmap_plots.values())]  # and the colour bar
    assert len(drawn) == 4
    for item in drawn:
        box = item.sceneBoundingRect()
        assert box.left() >= 0 and box.right() <= width, (item, box, width)
        assert box.bottom() <= heatmaps.height()  # below the pane's bottom, the page scrolls to it
    # Two a row where two fit, one where they do not.
    widest = max(plot.effectiveSizeHint(Qt.MinimumSize).width() for plot in view.heatmap_plots.values())
    left, _, right, _ = heatmaps.ci.layout.getContentsMargins()
    two_fit = 2 * widest + heatmaps.ci.layout.horizontalSpacing() + left + right <= view.heatmap_grid.width()
    assert view.heatmap_grid.columns == (2 if two_fit else 1)
