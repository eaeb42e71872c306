"""Fuzzing at the boundaries (hypothesis): every file KV Studio reads, truncated and bit-flipped at
random offsets or with a field given a value of the wrong kind, and the CLI's numeric options at
their extremes. Always a clean refusal (the reader's own KVStudioError, one line) or a correct read,
never another exception; nothing stored is lost. Bounded: a few dozen examples each, no deadline
(a tiny model's run takes a varying fraction of a second on a shared machine)."""

from __future__ import annotations

import hashlib
import json
import pickle
import shutil
import sqlite3
from pathlib import Path

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from kvstudio.core.errors import PromptError, SavedCacheError
from kvstudio.core.io.documents import read_document
from kvstudio.core.persist.history import HistoryError, RunHistory
from kvstudio.core.persist.saved_cache import _PREFIX, load_saved_cache, write_saved_cache
from kvstudio.core.recording.snapshots import SnapshotError, load_snapshot, timelines
from kvstudio.core.runtime.engine import GenerationSettings
from kvstudio.core.spec import create_policy

from .conftest import engine_for
from .helpers import run_cli

FUZZ = settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)

# Values of every kind a damaged or hostile file may hold where something else belongs.
ODD_VALUES = st.one_of(st.none(), st.booleans(), st.integers(-(2**70), 2**70), st.floats(allow_nan=True),
                       st.text(max_size=8), st.lists(st.integers(), max_size=3),
                       st.dictionaries(st.text(max_size=3), st.integers(), max_size=2))


def _damage(data: bytes, draw_cut, flips) -> bytes:
    """`data` cut at an offset (or whole), then bytes XORed at offsets."""
    damaged = bytearray(data[:draw_cut] if draw_cut is not None else data)
    for offset, mask in flips:
        if damaged:
            damaged[offset % len(damaged)] ^= mask
    return bytes(damaged)


DAMAGE = st.tuples(st.one_of(st.none(), st.integers(0, 10**6)),
                   st.lists(st.tuples(st.integers(0, 10**7), st.integers(1, 255)), max_size=4))


# -- history rows --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def history_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("fuzz_history") / "history.sqlite3"
    history = RunHistory(path)
    engine = engine_for("tiny-llama")
    result = engine.generate("a prompt to keep", create_policy("h2o", budget=8), GenerationSettings(max_new_tokens=3))
    run_id = history.start("tiny-llama", "h2o", {"budget": 8}, "a prompt to keep", {"max_new_tokens": 3})
    history.finish(run_id, result)
    history.close()
    return path


COLUMNS = ("parameters", "figures", "steps", "settings", "memory", "model", "policy", "status", "kind", "created",
           "output")


@FUZZ
@given(column=st.sampled_from(COLUMNS), damage=DAMAGE, odd=ODD_VALUES, as_text=st.booleans())
def test_a_damaged_history_row_is_read_and_kept(tmp_path_factory, history_file, column, damage, odd, as_text):
    path = tmp_path_factory.mktemp("row") / "history.sqlite3"
    shutil.copy(history_file, path)
    with sqlite3.connect(path) as connection:
        stored = connection.execute(f"SELECT {column} FROM runs WHERE id = 1").fetchone()[0]
        if as_text:  # the stored text truncated and bit-flipped
            value = _damage(stored.encode(), *damage).decode("utf-8", "replace")
        else:  # a value of another kind in its place (SQLite keeps what it is given; NULL breaks NOT NULL)
            fits = isinstance(odd, str) or (type(odd) is int and abs(odd) < 2**63)
            value = odd if fits else json.dumps(odd)
        connection.execute(f"UPDATE runs SET {column} = ? WHERE id = 1", (value,))
    history = RunHistory(path)
    listed = history.list()
    assert [record.id for record in listed] == [1]  # the row is still there, whatever it holds
    record = history.get(1)
    assert isinstance(record.parameters, dict) and isinstance(record.steps, list) and isinstance(record.output, str)
    record.to_dict()
    _ = record.cache, record.shown_status  # what the list and the Runs view show of it
    history.close()


@FUZZ
@given(damage=DAMAGE)
def test_a_damaged_history_file_is_history_error_or_read(tmp_path_factory, history_file, damage):
    path = tmp_path_factory.mktemp("file") / "history.sqlite3"
    path.write_bytes(_damage(history_file.read_bytes(), *damage))
    try:
        history = RunHistory(path)
        for record in history.list():
            history.get(record.id)
            history.events(record.id)
    except HistoryError as error:
        assert "\n" not in str(error)


# -- memory snapshots ----------------------------------------------------------------------------------


SNAPSHOT = {"segments": [], "device_traces": [[
    {"action": "alloc", "addr": 64, "size": 256, "stream": 0, "time_us": 10,
     "frames": [{"filename": "model.py", "line": 12, "name": "forward"}]},
    {"action": "free_requested", "addr": 64, "size": 256, "stream": 0, "time_us": 30, "frames": []},
    {"action": "free_completed", "addr": 64, "size": 256, "stream": 0, "time_us": 31, "frames": []},
]], "kvstudio": {"device": "cpu", "source": "test", "marks": [{"time_us": 20, "label": "chunk 1 end"}]}}


def _replace_somewhere(data, path: list[int], value):
    """A copy of `data` with the node that `path` walks to (indices taken modulo) replaced by `value`."""
    if not path or not isinstance(data, (dict, list)) or not data:
        return value
    keys = list(data) if isinstance(data, dict) else list(range(len(data)))
    key = keys[path[0] % len(keys)]
    copy = dict(data) if isinstance(data, dict) else list(data)
    copy[key] = _replace_somewhere(data[key], path[1:], value)
    return copy


@FUZZ
@given(damage=DAMAGE, where=st.lists(st.integers(0, 20), max_size=5), odd=ODD_VALUES, structural=st.booleans())
def test_a_damaged_snapshot_is_snapshot_error_or_drawn(tmp_path_factory, damage, where, odd, structural):
    path = tmp_path_factory.mktemp("snapshot") / "snap.pickle"
    if structural:
        path.write_bytes(pickle.dumps(_replace_somewhere(SNAPSHOT, where, odd)))
    else:
        path.write_bytes(_damage(pickle.dumps(SNAPSHOT), *damage))
    try:
        snapshot = load_snapshot(path)
    except SnapshotError as error:
        assert "\n" not in str(error)
        return
    for timeline in timelines(snapshot):  # what the Memory snapshot view draws
        timeline.largest(10)
        [allocation.label for allocation in timeline.allocations]


# -- saved caches --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def saved_cache(tmp_path_factory):
    engine = engine_for("tiny-llama")
    policy = create_policy("h2o", budget=8)
    settings_ = GenerationSettings(max_new_tokens=2, chunk_size=8)
    result = engine.generate("a prompt for a saved cache", policy, settings_, keep_state=True)
    path = tmp_path_factory.mktemp("saved") / "a.kvcache"
    write_saved_cache(path, result.state, engine.loaded, policy, settings_)
    return path, policy


def _rewritten_header(data: bytes, where: list[int], value) -> bytes:
    """The file with one header field replaced and the checksum made to match: a hostile file, not a
    damaged one (a damaged one fails the checksum)."""
    magic, version, header_size, body_size = _PREFIX.unpack_from(data)
    header = json.loads(data[_PREFIX.size:_PREFIX.size + header_size])
    body = data[_PREFIX.size + header_size:_PREFIX.size + header_size + body_size]
    header_bytes = json.dumps(_replace_somewhere(header, where, value)).encode()
    content = _PREFIX.pack(magic, version, len(header_bytes), len(body)) + header_bytes + body
    return content + hashlib.sha256(content).digest()


@FUZZ
@given(damage=DAMAGE, where=st.lists(st.integers(0, 30), min_size=1, max_size=4), odd=ODD_VALUES,
       hostile=st.booleans())
def test_a_damaged_saved_cache_is_refused_in_one_line(tmp_path_factory, saved_cache, damage, where, odd, hostile):
    source, policy = saved_cache
    data = source.read_bytes()
    path = tmp_path_factory.mktemp("damaged") / "a.kvcache"
    path.write_bytes(_rewritten_header(data, where, odd) if hostile else _damage(data, *damage))
    engine = engine_for("tiny-llama")
    try:
        load_saved_cache(path, engine.loaded, policy, 8)
    except SavedCacheError as error:
        assert "\n" not in str(error)
    assert source.read_bytes() == data  # the original is untouched


# -- documents -----------------------------------------------------------------------------------------


@FUZZ
@given(content=st.binary(max_size=600), suffix=st.sampled_from([".txt", ".md", ".json", ".pdf", ".py", ""]),
       damage=DAMAGE)
def test_a_damaged_document_is_refused_or_read(tmp_path_factory, content, suffix, damage):
    if suffix == ".pdf" and content[:1] == b"%":  # near a PDF: a real header, then damage
        content = _damage(b"%PDF-1.4\n1 0 obj<<>>endobj\ntrailer<</Root 1 0 R>>\n%%EOF\n" + content, *damage)
    path = tmp_path_factory.mktemp("document") / f"doc{suffix}"
    path.write_bytes(content)
    try:
        document = read_document(path)
    except PromptError as error:
        assert "\n" not in str(error)
        return
    assert isinstance(document.text, str) and document.text


# -- plugins' declared options -------------------------------------------------------------------------


PLUGIN = '''
from dataclasses import dataclass
from kvstudio.core.policies.base import Policy, PolicyConfig, keep_all_if_within, parameter
import torch

@dataclass
class FuzzConfig(PolicyConfig):
    knob: {annotation} = parameter({default!r}, help="a fuzzed option", minimum={minimum!r}, maximum={maximum!r},
                                   choices={choices!r})

class FuzzPolicy(Policy):
    name = "fuzzed"
    summary = "a policy with a fuzzed option"
    Config = FuzzConfig

    def select(self, view, state):
        if keep_all_if_within(view):
            return None
        return torch.arange(view.n_entries - view.budget, view.n_entries).expand(view.kv_heads, -1)
'''

PLAIN = st.one_of(st.none(), st.booleans(), st.integers(-(2**64), 2**64), st.floats(allow_nan=True),
                  st.text(alphabet="abc -", max_size=4))


@settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
@given(annotation=st.sampled_from(["int", "float", "bool", "str", "int | None", "list", "dict", "bytes"]),
       default=PLAIN, minimum=PLAIN, maximum=PLAIN,
       choices=st.one_of(st.none(), st.tuples(), st.lists(PLAIN, max_size=3).map(tuple), PLAIN))
def test_a_plugins_odd_option_declaration_is_a_broken_plugin_not_a_crash(tmp_path_factory, capsys, annotation,
                                                                         default, minimum, maximum, choices):
    folder = tmp_path_factory.mktemp("plugins")
    source = PLUGIN.format(annotation=annotation, default=default, minimum=minimum, maximum=maximum, choices=choices)
    (folder / "fuzzed.py").write_text(source.replace("nan", "float('nan')").replace("inf", "float('inf')"))
    code, out, err = run_cli(capsys, "policies", "--plugins", str(folder))
    assert code in (0, 2) and "Traceback" not in err and "internal error" not in err, err
    if code == 0 and "fuzzed:" in out:  # loaded: its option works in a run, or is refused in one line
        code, out, err = run_cli(capsys, "run", "--plugins", str(folder), "--policy", "fuzzed", "--model",
                                 "tiny-llama", "--prompt", "hi", "--max-new-tokens", "1", "--no-history")
        assert code in (0, 2) and "Traceback" not in err and "internal error" not in err, err


# -- the CLI's numbers at their extremes ------------------------------------------------------------------


EXTREME_INTS = st.sampled_from(["0", "1", "-1", str(2**31), str(2**63 - 1), str(2**63), str(2**64), str(10**30),
                                "-" + str(10**30)])
EXTREME_FLOATS = st.sampled_from(["0", "-0.0", "5e-324", "1e-45", "1e-30", "0.5", "1", "1e308", "inf", "-inf", "nan",
                                  "-1"])


@settings(max_examples=30, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
@given(option=st.sampled_from(["--temperature", "--top-p", "--memory-sample-hz", "--top-k", "--seed", "--chunk-size",
                               "--budget", "--max-new-tokens", "--sink", "--recent"]),
       integer=EXTREME_INTS, real=EXTREME_FLOATS, policy=st.sampled_from(["h2o", "streaming_llm", "window", "full"]))
def test_numeric_options_at_their_extremes_run_or_are_one_line(capsys, option, integer, real, policy):
    floats = ("--temperature", "--top-p", "--memory-sample-hz")
    value = real if option in floats else integer
    # A huge token limit is a correct, endless run of the tiny model: asked for, not an error.
    assume(not (option == "--max-new-tokens" and int(value) > 2))
    max_new = ["--max-new-tokens", "2"] if option != "--max-new-tokens" else []
    if option in ("--sink", "--recent") and policy not in ("h2o", "streaming_llm"):
        policy = "streaming_llm" if option == "--sink" else "h2o"
    code, out, err = run_cli(capsys, "run", "--model", "tiny-llama", "--prompt", "hi there", "--no-history",
                             "--policy", policy, *max_new, "--temperature", "1" if option != "--temperature" else value,
                             *([option, value] if option != "--temperature" else []))
    assert code in (0, 2), err
    assert "Traceback" not in err and "internal error" not in err, err
    if code == 2:
        assert len([line for line in err.splitlines() if line.startswith("kvstudio: error")]) == 1, err
    else:
        assert "--- summary" in out
