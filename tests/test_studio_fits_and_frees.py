"""The studio at 1280x800 and what it holds in memory (issue 26, the items left open): the Evaluate
view's heatmaps and a document's name fit their panes; runs past the shown one live on disk; an
unloaded model is freed; the prefill bar goes when the run ends; the banner's check changes nothing.
pytest-qt, offscreen, tiny-llama."""

from __future__ import annotations

import gc
import os
import subprocess
import sys
import weakref

import pytest
from PySide6.QtCore import Qt

from .test_evaluate_view import _choose
from .test_gui import run

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


def _text_width(documents, row: int) -> int:
    """The width the list's delegate gives an item's text (what it elides to)."""
    from PySide6.QtWidgets import QStyle, QStyleOptionViewItem

    listing = documents.list
    item = listing.item(row)
    option = QStyleOptionViewItem()
    listing.initViewItemOption(option)
    listing.itemDelegate().initStyleOption(option, listing.indexFromItem(item))
    listing.doItemsLayout()  # Qt lays the items out lazily: the rectangle of the list as it is now
    option.rect = listing.visualItemRect(item).intersected(listing.viewport().rect())
    return listing.style().subElementRect(QStyle.SE_ItemViewItemText, option, listing).width()


@pytest.mark.parametrize("size", SIZES)
def test_a_documents_name_shows_whole_and_a_name_too_long_keeps_both_ends(qtbot, window, size, tmp_path):
    window.resize(*size)
    window._first_layout()  # the docks' widths of a launch at this size (the fixture's window first showed smaller)
    qtbot.wait(50)
    documents = window.prompt_area.documents
    path = tmp_path / "passkey_document.txt"
    path.write_text("The grass is green. The sky is blue. " * 40)
    assert documents.add_path(path)
    qtbot.waitUntil(lambda: bool(documents.token_counts), timeout=10_000)
    qtbot.wait(50)
    metrics = documents.list.fontMetrics()
    assert metrics.horizontalAdvance("passkey_document.txt") <= _text_width(documents, 0)  # not "passkey_d…"
    assert str(path) in documents.list.item(0).toolTip()
    # A name that fits no list: cut in its middle (both ends read), the preview keeps a third, the tooltip says it.
    long_name = "a_report_on_attention_sinks_and_heavy_hitters_in_long_contexts_final_version_2.txt"
    long_path = tmp_path / long_name
    long_path.write_text("Sinks. " * 10)
    assert documents.add_path(long_path)
    qtbot.wait(50)
    assert documents.list.textElideMode() == Qt.ElideMiddle
    assert long_name in documents.list.item(1).toolTip()
    list_width, preview_width = documents.shown.sizes()
    assert preview_width >= (list_width + preview_width) // 3 - 1
    assert metrics.horizontalAdvance("passkey_document.txt") <= _text_width(documents, 0)


# -- the fine-tune validation's 30 s: torch's idle threads spun ------------------------------------

def _libgomp_settings(env: dict) -> str:
    """What libgomp says it runs with, in a fresh process that imports kvstudio and then runs torch."""
    code = "import kvstudio, torch; torch.ones(4) + 1"
    out = subprocess.run([sys.executable, "-c", code], env=env | {"OMP_DISPLAY_ENV": "VERBOSE"},
                         capture_output=True, text=True, check=True)
    return out.stderr


def test_torchs_idle_threads_sleep_rather_than_spin_in_every_kvstudio_process():
    """Spinning idle workers cost a validation 18-38 s instead of 3-4 s on a shared CPU (benchmarks/omp_wait.py)."""
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")}
    settings = _libgomp_settings(env)
    if "GOMP_SPINCOUNT" not in settings:
        pytest.skip("this torch does not run on libgomp")
    assert "OMP_WAIT_POLICY = 'PASSIVE'" in settings and "GOMP_SPINCOUNT = '0'" in settings
    # A user's own choice is kept.
    assert "OMP_WAIT_POLICY = 'ACTIVE'" in _libgomp_settings(env | {"OMP_WAIT_POLICY": "ACTIVE"})


# -- memory: runs past the shown one live on disk; an unloaded model is freed ----------------------

def _alive(references) -> list[bool]:
    gc.collect()
    return [reference() is not None for reference in references]


def test_after_several_runs_only_the_shown_runs_recording_is_held(qtbot, window, tmp_path):
    window.prompt_area.prompt.setPlainText("the quick brown fox " * 4)
    window.form.max_new_tokens.setValue(3)
    window.form.chunk_size.setValue(16)
    recordings, ids, steps = [], [], []
    for _ in range(4):
        outcome = run(qtbot, window, "h2o", budget=16)
        assert outcome.error is None
        recordings.append(weakref.ref(window.state.recorder))
        ids.append(outcome.request.history_id)
        steps.append([(e.step, e.phase) for e in window.state.recorder.all("steps")])
    del outcome
    assert _alive(recordings) == [False, False, False, True]  # the last run, on screen
    # A stored run reopened: the last run's recording goes from memory (the history has it) ...
    window.runs.reopen(ids[0])
    shown = [weakref.ref(window.state.recorder)]
    assert _alive(recordings) == [False, False, False, False] and _alive(shown) == [True]
    # ... and comes back from the history when reopened, as it was recorded.
    window.runs.reopen(ids[3])
    assert _alive(shown) == [False]
    assert [(e.step, e.phase) for e in window.state.recorder.all("steps")] == steps[3]
    assert window.views.showing_stored_run
    # The last run's cache stays for "Save cache of the last run" (its recording is not needed for that).
    assert window.caches.save_last_run(str(tmp_path / "last.kvcache"))
    qtbot.waitUntil(lambda: (tmp_path / "last.kvcache").exists() and not window.state.busy, timeout=30_000)


def test_a_model_replaced_by_another_is_freed(qtbot, window):
    window.prompt_area.prompt.setPlainText("the quick brown fox " * 4)
    window.form.max_new_tokens.setValue(3)
    assert run(qtbot, window, "h2o", budget=16).error is None  # a run, its outcome and its cache kept
    loaded = window.worker.engine.loaded
    model, weight = weakref.ref(loaded.model), weakref.ref(next(loaded.model.parameters()))
    del loaded
    window.loading.request_load("tiny-qwen2", "cpu", "auto")
    qtbot.waitUntil(lambda: window.state.model_info is not None and "qwen2" in window.state.model_info.spec,
                    timeout=30_000)
    qtbot.waitUntil(lambda: not window.state.busy, timeout=30_000)
    assert _alive([model, weight]) == [False, False]


# -- small things ----------------------------------------------------------------------------------

def test_the_prefill_bar_shows_during_a_run_and_goes_when_it_ends(qtbot, window):
    bar = window.views.output_view.prefill
    window.prompt_area.prompt.setPlainText("the quick brown fox " * 8)
    window.form.max_new_tokens.setValue(5000)
    window.form.chunk_size.setValue(16)
    window.form.policy.setCurrentText("full")
    window.run.request_run()
    qtbot.waitUntil(lambda: bar.isVisible() and len(window.state.recorder.all("steps")) > 12, timeout=30_000)
    window.run.stop()
    qtbot.waitUntil(lambda: not window.state.busy, timeout=30_000)
    assert not bar.isVisible()
    # A stored run reopened is over too: no bar.
    window.runs.reopen(window.state.last_outcome.request.history_id)
    assert window.views.showing_stored_run and not bar.isVisible()


def test_a_refusals_banner_checks_the_form_without_touching_it(qtbot, window):
    """The banner asks 4 times a second whether the form's problem holds; asking must change nothing."""
    form = window.form
    form.policy.setCurrentText("h2o")
    form.policy_form.set_values({"budget": 128, "recent": 200})
    window.prompt_area.prompt.setPlainText("hello")
    window.run.request_run()
    assert window.error_text.text() == "policy parameters: Recent 200 is larger than budget 128"
    for note in (form.policy_form.error, form.storage_form.error):
        note.setText("what the form shows")  # whatever it shows: the checks leave it
    qtbot.wait(700)  # two checks or more
    assert window.error_banner.isVisible()  # the problem still holds
    assert form.policy_form.error.text() == form.storage_form.error.text() == "what the form shows"
    form.policy_form.set_values({"recent": 64})  # fixed: the banner goes, the note follows the change
    qtbot.waitUntil(lambda: not window.error_banner.isVisible(), timeout=2000)
    assert form.policy_form.error.text() == ""
