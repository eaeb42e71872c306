"""Figures of stored runs without Qt: `kvstudio runs plot`, the exported JSON that re-plots a run alone,
and the clear errors (real runs on tiny-llama, a real history, real files)."""

from __future__ import annotations

import json
import os
import re
import stat
import struct

import numpy as np
import pytest

from kvstudio.core.runtime.engine import GenerationSettings
from kvstudio.core.recording.events import Recorder
from kvstudio.core.persist.history import RunHistory
from kvstudio.core.figures import colours, data
from kvstudio.core.figures.render import FigureRequest, draw, token_map_of
from kvstudio.core.spec import build_policy
from kvstudio.core.recording.packing import pack_events, recording_from_dict

from .helpers import random_ids, run_cli

PROMPT = random_ids(150, seed=3)


def _png_size(path) -> tuple[int, int]:
    header = path.read_bytes()[:24]
    assert header[:8] == b"\x89PNG\r\n\x1a\n"
    return struct.unpack(">II", header[16:24])


def _stored_run(engine, watch=(0, 1, 2, 3), policy="h2o", new_tokens=12):
    """A tiny-llama run stored in the history (as `kvstudio run` stores one); (run id, recorder, result)."""
    recorder = Recorder(watch_layers=watch)
    policy_object = build_policy(policy, {"budget": 16} if policy != "full" else {})
    result = engine.generate(PROMPT, policy_object, GenerationSettings(max_new_tokens=new_tokens, chunk_size=32),
                             recorder=recorder)
    history = RunHistory()
    run_id = history.start("tiny-llama", policy, {"budget": 16}, "random ids")
    history.finish(run_id, result, events=pack_events(recorder))
    history.close()
    return run_id, recorder, result


def _events(recorder) -> dict:
    return {kind: recorder.all(kind) for kind in ("runs", "tokens", "steps", "evictions", "attention", "memory",
                                                    "recalls")}


def test_every_view_is_written_as_png_svg_pdf_with_a_caption(llama_engine, capsys, tmp_path):
    run_id, recorder, result = _stored_run(llama_engine)
    for view in ("token-map", "attention", "occupancy", "evictions", "memory"):
        code, out, err = run_cli(capsys, "runs", "plot", str(run_id), "--view", view, str(tmp_path / f"{view}.png"),
                                 "--width", "900", "--layer", "1")
        assert code == 0, err
        assert _png_size(tmp_path / f"{view}.png")[0] == 900  # the pixel width asked for
        assert run_cli(capsys, "runs", "plot", str(run_id), "--view", view, str(tmp_path / f"{view}.svg"))[0] == 0
        svg = (tmp_path / f"{view}.svg").read_text()
        assert "tiny-llama · h2o(budget=16" in svg and f"run {run_id}" in svg  # the caption line, as text
        assert run_cli(capsys, "runs", "plot", str(run_id), "--view", view, str(tmp_path / f"{view}.pdf"))[0] == 0
        assert (tmp_path / f"{view}.pdf").read_bytes()[:5] == b"%PDF-"
    assert "layer 0 · mean over heads · linear scale" in (tmp_path / "attention.svg").read_text()  # first recorded
    # The token map as HTML: one hover per token, the prompt's end marked, the colour key.
    assert run_cli(capsys, "runs", "plot", str(run_id), "--view", "token-map", str(tmp_path / "map.html"))[0] == 0
    page = (tmp_path / "map.html").read_text()
    token_map = token_map_of(_events(recorder))
    assert page.count('title="position ') == len(token_map.tokens) == len(PROMPT) + len(result.token_ids)
    assert "the prompt ends here" in page and "not fed yet" in page
    first_gone = int(np.flatnonzero(token_map.layers_holding() == 0)[0])
    assert f"background:{colours.held_colour(0.0)}\" title=\"position {first_gone} (prompt)" in page


def test_the_drawn_figure_holds_the_recordings_data(llama_engine):
    _, recorder, _ = _stored_run(llama_engine)
    events = _events(recorder)
    figure = draw(recorder, FigureRequest("token-map"))
    drawn = figure.axes[0].images[0].get_array().reshape(-1, 3)
    token_map = token_map_of(events)
    from matplotlib.colors import to_rgb

    expected = [to_rgb(colours.UNFED if np.isnan(f) else colours.held_colour(f)) for f in token_map.held_fractions()]
    assert np.allclose(drawn[: len(expected)], expected)
    assert token_map.gone_count() > 50  # h2o at 16 dropped most of 150 tokens: red, not green
    figure = draw(recorder, FigureRequest("attention", layer=2, head=1))
    image = data.attention_image(events["attention"], 2, 1)
    shown = figure.axes[0].images[0].get_array()
    assert shown.shape == image.shape == (len(events["steps"]), len(PROMPT) + 11)
    held = image >= 0
    assert np.allclose(shown[held], data.scale_attention(image, data.attention_top(image))[held])


def test_an_exported_json_replots_the_run_alone(llama_engine, capsys, tmp_path):
    run_id, recorder, _ = _stored_run(llama_engine)
    previous = os.umask(0o022)
    try:
        assert run_cli(capsys, "runs", "export", str(run_id), str(tmp_path / "run.json"))[0] == 0
        assert stat.S_IMODE(os.stat(tmp_path / "run.json").st_mode) == 0o644  # the user's normal permissions
    finally:
        os.umask(previous)
    exported = json.loads((tmp_path / "run.json").read_text())
    assert exported["prompt_token_ids"] == PROMPT  # the full prompt, to reproduce the run
    evictions = exported["recording"]["evictions"]
    assert {(e["step"], e["layer"], e["kv_head"]) for e in evictions} == {
        (e.step, e.layer, e.kv_head) for e in recorder.all("evictions")}
    # The same figure data from the file alone as from the history...
    again = recording_from_dict(exported["recording"])
    original, replayed = _events(recorder), _events(again)
    assert np.array_equal(token_map_of(original).held_fractions(), token_map_of(replayed).held_fractions(),
                          equal_nan=True)
    for layer in range(4):
        assert np.array_equal(data.attention_image(original["attention"], layer, None),
                              data.attention_image(replayed["attention"], layer, None))
        for a, b in zip(data.eviction_points(original["evictions"], layer), data.eviction_points(replayed["evictions"],
                                                                                               layer)):
            assert np.array_equal(a, b)
    assert data.occupancy(original["runs"], original["steps"], original["memory"]) == data.occupancy(
        replayed["runs"], replayed["steps"], replayed["memory"])
    # ... and the same picture, even with the run gone from the history.
    assert run_cli(capsys, "runs", "plot", str(run_id), "--view", "attention", str(tmp_path / "history.png"))[0] == 0
    history = RunHistory()
    history.delete(run_id)
    history.close()
    code, _, err = run_cli(capsys, "runs", "plot", str(tmp_path / "run.json"), "--view", "attention",
                           str(tmp_path / "file.png"))
    assert code == 0, err
    assert (tmp_path / "file.png").read_bytes() == (tmp_path / "history.png").read_bytes()


@pytest.fixture(scope="module")
def unwatched_run():
    """One stored run without attention rows, shared by the error cases (one generation, not eight)."""
    from .conftest import engine_for

    return _stored_run(engine_for("tiny-llama"), watch=(), new_tokens=2)[0]


@pytest.mark.parametrize("argv, message", [
    (["999999", "--view", "memory", "{tmp}/a.png"], "no run 999999 in the history"),
    (["{id}", "--view", "attention", "{tmp}/a.png"], "recorded no attention rows"),
    (["{id}", "--view", "evictions", "{tmp}/a.png", "--layer", "9"], "layer 9 is out of range: the model has "
                                                                     "layers 0-3"),
    (["{id}", "--view", "occupancy", "{tmp}/a.jpg"], "cannot write a figure as '.jpg'"),
    (["{id}", "--view", "memory", "{tmp}/a.html"], "only the token map is written as .html"),
    (["{id}", "--view", "memory", "{tmp}/missing/a.png"], "the folder does not exist"),
    (["{tmp}/nothing.json", "--view", "memory", "{tmp}/a.png"], "cannot read"),
    (["{id}", "--view", "heatmap", "{tmp}/a.png"], "invalid choice: 'heatmap'"),
])
def test_bad_requests_are_one_line_errors(unwatched_run, capsys, tmp_path, argv, message):
    run_id = unwatched_run
    argv = [a.format(id=run_id, tmp=tmp_path) for a in argv]
    code, out, err = run_cli(capsys, "runs", "plot", *argv)
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1, err
    assert not [p for p in tmp_path.iterdir() if p.suffix in (".png", ".jpg", ".html")]


def test_a_layer_that_was_not_recorded_is_named(llama_engine, capsys, tmp_path):
    run_id, _, _ = _stored_run(llama_engine, watch=(2,), new_tokens=2)
    code, _, err = run_cli(capsys, "runs", "plot", str(run_id), "--view", "attention", str(tmp_path / "a.png"),
                           "--layer", "1")
    assert code == 2 and "layer 1 was not recorded in this run (recorded: 2)" in err


def test_padded_ranges_never_zoom_into_a_flat_line():
    low, high = data.padded_range([34560] * 20)  # was drawn as 34559.6..34560.4
    assert low == 0 and 34560 * 1.05 < high < 34560 * 1.2
    low, high = data.padded_range([5.0, 5.0], floor_at_zero=False)
    assert low < 5 < high and high - low > 0.5
    assert data.padded_range([]) == (0.0, 1.0)
    low, high = data.padded_range([3, 7])
    assert low == 0 and high > 7


def test_memory_readings_carry_entries_per_layer_within_a_step(llama_engine):
    """A long first chunk: readings taken while it runs show the layers filling one after another."""
    import time

    layers = llama_engine.model.model.layers
    slow = layers[2].register_forward_pre_hook(lambda *_: time.sleep(0.15))  # a slow layer, mid-chunk
    try:
        recorder = Recorder()
        llama_engine.generate(random_ids(200), build_policy("full", {}),
                              GenerationSettings(max_new_tokens=1, chunk_size=200, memory_sample_hz=100),
                              recorder=recorder)
    finally:
        slow.remove()
    during = [m for m in recorder.all("memory") if m.source == "timer" and m.step == 0]
    assert any(m.kept_per_layer[:2] == (200, 200) and m.kept_per_layer[3] == 0 for m in during)
    steps = recorder.all("steps")
    assert [m.kept_per_layer for m in recorder.all("memory") if m.source == "step"] == [
        s.kept_per_layer for s in steps]
    # The occupancy a view or figure shows mid-chunk is that reading's, not zero.
    mid = next(m for m in during if m.kept_per_layer[:2] == (200, 200) and m.kept_per_layer[3] == 0)
    assert data.occupancy(recorder.all("runs"), [], [mid]).per_layer == list(mid.kept_per_layer)


def test_a_headless_run_records_attention_layers_to_plot(capsys, tmp_path):
    code, _, err = run_cli(capsys, "run", "--model", "tiny-llama", "--policy", "window", "--budget", "16", "--prompt",
                           "abcdefgh" * 8, "--max-new-tokens", "3", "--chunk-size", "32", "--attention-layers", "1,3")
    assert code == 0, err
    run_id = int(re.search(r"stored as run (\d+)", err).group(1))
    code, _, err = run_cli(capsys, "runs", "plot", str(run_id), "--view", "attention", str(tmp_path / "a.svg"),
                           "--layer", "3", "--log")
    assert code == 0, err
    assert "layer 3 · mean over heads · log scale" in (tmp_path / "a.svg").read_text()
    code, _, err = run_cli(capsys, "run", "--model", "tiny-llama", "--prompt", "x", "--attention-layers", "7")
    assert code == 2 and "--attention-layers: layer 7 is out of range" in err


def test_a_run_json_file_plots_alone(capsys, tmp_path):
    """`kvstudio runs plot run.json` takes what `kvstudio run --json` wrote (issue 26)."""
    written = tmp_path / "run.json"
    code, _, err = run_cli(capsys, "run", "--model", "tiny-llama", "--policy", "window", "--budget", "16", "--prompt",
                           "abcdefgh" * 8, "--max-new-tokens", "3", "--chunk-size", "32", "--no-history",
                           "--json", str(written))
    assert code == 0, err
    code, _, err = run_cli(capsys, "runs", "plot", str(written), "--view", "token-map", str(tmp_path / "t.svg"))
    assert code == 0, err
    assert "window(budget=16" in (tmp_path / "t.svg").read_text()
