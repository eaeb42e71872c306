"""Entries that left a sliding layer's window, as the views, figures and history show them: a reason of
their own (not the policy's evictions), the layer's window drawn in the occupancy view and figure."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from kvstudio.core.figures.data import TokenMap, occupancy
from kvstudio.core.figures.render import FigureRequest, save_view
from kvstudio.core.models.loading import LoadedModel
from kvstudio.core.models.tiny import byte_tokenizer
from kvstudio.core.models.tiny_families import WINDOW, build_family_model
from kvstudio.core.persist.history import RunHistory
from kvstudio.core.recording.events import Recorder
from kvstudio.core.recording.packing import pack_events, unpack_events
from kvstudio.core.runtime.engine import Engine, GenerationSettings
from kvstudio.core.spec import create_policy

pytest.importorskip("pytestqt")

PROMPT = torch.randint(0, 256, (30,), generator=torch.Generator().manual_seed(1)).tolist()
NEW_TOKENS = 3


@pytest.fixture(scope="module")
def recorded():
    """gemma3_text: layers 0-2 sliding (window 8), layer 3 global; `full`, so every entry that goes
    left a window. The recording is what a stored run reads back."""
    model = build_family_model("gemma3_text")
    engine = Engine(LoadedModel(model, byte_tokenizer(), "tiny gemma3_text", "gemma3_text", torch.device("cpu"),
                                torch.float32))
    recorder = Recorder(capacity=None)
    result = engine.generate(PROMPT, create_policy("full"), GenerationSettings(max_new_tokens=NEW_TOKENS, chunk_size=8,
                                                                               ignore_eos=True), recorder=recorder)
    return result, unpack_events(pack_events(recorder))


def token_map_of(recorder) -> TokenMap:
    token_map = TokenMap.for_run(recorder.all("runs")[-1])
    token_map.add({kind: recorder.all(kind) for kind in ("tokens", "steps", "evictions", "recalls")})
    return token_map


def test_the_run_records_each_layers_window(recorded):
    _, recorder = recorded
    assert recorder.all("runs")[-1].windows == (WINDOW, WINDOW, WINDOW, None)
    reasons = {e.reason for e in recorder.all("evictions")}
    assert reasons == {"window"}  # `full` evicts nothing itself


def test_token_map_tells_left_the_window_from_evicted(recorded):
    _, recorder = recorded
    token_map = token_map_of(recorder)
    fed = token_map.fed_count
    tiers = token_map.tiers(0)
    held = WINDOW - 1  # transformers' sliding layer holds W-1 entries after a step
    assert tiers[:fed - held] == ["window"] * (fed - held) and tiers[fed - held:fed] == ["device"] * held
    assert set(token_map.tiers(3)[:fed]) == {"device"}  # the global layer holds everything
    assert "left the layer's sliding window" in token_map.describe(0, layer=0)
    assert "evicted" not in token_map.describe(0, layer=0)
    assert "left the sliding window of layers 0, 1, 2" in token_map.describe(0)
    assert "held by 1 of 4 layers" in token_map.describe(0)


def test_a_policy_eviction_is_still_called_evicted():
    token_map = TokenMap(2, 1, ["a", "b", "c"])
    from kvstudio.core.recording.event_types import EvictionEvent, StepEvent

    token_map.add({"steps": [StepEvent(0, "prefill", 3, 0.0, (2, 2), 0, 0, 1)],
                   "evictions": [EvictionEvent(0, 0, 0, np.array([0]), "policy"),
                                 EvictionEvent(0, 1, 0, np.array([1]), "window")]})
    assert token_map.tiers(0)[:2] == ["evicted", "device"] and token_map.tiers(1)[:2] == ["device", "window"]
    assert "evicted at step 0" in token_map.describe(0, layer=0)
    assert "left the layer's sliding window at step 0" in token_map.describe(1, layer=1)


def test_occupancy_has_the_windows_and_the_figure_draws_them(recorded, tmp_path):
    _, recorder = recorded
    events = {kind: recorder.all(kind) for kind in ("runs", "steps", "memory")}
    data = occupancy(events["runs"], events["steps"], events["memory"])
    assert data.windows[:3] == [float(WINDOW)] * 3 and math.isnan(data.windows[3]) and data.has_windows
    path = tmp_path / "occupancy.svg"
    save_view(recorder, FigureRequest(view="occupancy"), path)
    assert "sliding window" in path.read_text()


def test_occupancy_view_draws_the_window_of_sliding_layers_only(qtbot, recorded):
    from kvstudio.gui.views.occupancy import OccupancyView

    _, recorder = recorded
    view = OccupancyView()
    qtbot.addWidget(view)
    view.follow(recorder)
    view.refresh()
    xs, ys = view.window_line.getData()
    assert view.window_line.isVisibleTo(view.per_layer.getPlotItem())
    assert list(ys[:3]) == [WINDOW] * 3 and math.isnan(ys[3])
    assert "sliding layer's window" in view.caption.text()
    view.show_bytes.setChecked(True)
    assert "window" not in view.caption.text() and not view.window_line.isVisibleTo(view.per_layer.getPlotItem())


def test_history_keeps_left_the_window_apart_from_evictions(recorded, tmp_path):
    from kvstudio.gui.features.runs import _evictions_text

    result, _ = recorded
    history = RunHistory(tmp_path / "history.sqlite")
    run_id = history.start("tiny gemma3_text", "full", {}, "p")
    history.finish(run_id, result)
    figures = history.get(run_id).figures
    assert figures["evictions"] == 0 and figures["left_window"] == result.left_window > 0
    assert _evictions_text(figures) == f"0 (+{result.left_window} left the window)"
