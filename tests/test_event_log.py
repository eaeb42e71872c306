"""The event log keeps every event of a run; the live ring stays bounded; stored runs reopen whole."""

from __future__ import annotations

import numpy as np
import pytest

from kvstudio.core.spec import create_policy
from kvstudio.core.recording.event_log import ChunkedValues, EventLog
from kvstudio.core.recording.events import AttentionEvent, EvictionEvent, RecallEvent, Recorder, StepEvent
from kvstudio.core.recording.packing import pack_events, unpack_events
from kvstudio.core.runtime.engine import GenerationSettings

from .helpers import random_ids


def test_a_3000_step_evicting_run_stored_and_reopened_has_every_eviction_event(llama_engine):
    # 4 layers x 2 KV heads: 8 eviction events a step, 24,000 in all - more than the live ring holds.
    recorder = Recorder()
    result = llama_engine.generate(random_ids(16, seed=3), create_policy("window", budget=8),
                                   GenerationSettings(max_new_tokens=3000, ignore_eos=True, memory_sample_hz=0),
                                   recorder=recorder)
    assert len(result.steps) == 3000
    recorded = recorder.all("evictions")
    assert len(recorded) > recorder.capacity
    assert sum(len(e.positions) for e in recorded) == sum(step.evicted for step in result.steps)
    assert len(recorder.since("evictions", 0)[0]) == recorder.capacity  # the live ring: only the newest

    reopened = unpack_events(pack_events(recorder))
    evictions = reopened.all("evictions")
    assert len(evictions) == len(recorded)
    assert sum(len(e.positions) for e in evictions) == sum(step.evicted for step in result.steps)
    assert evictions[0].step == result.steps[0].step == 0  # the start of the run is there
    assert {e.step for e in evictions} == {step.step for step in result.steps if step.evicted}
    assert [(e.step, e.layer, e.kv_head, e.positions.tolist()) for e in evictions] == \
           [(e.step, e.layer, e.kv_head, e.positions.tolist()) for e in recorded]
    assert reopened.evicted_total == recorder.evicted_total == sum(step.evicted for step in result.steps)
    # A reopened run's views read it whole: no ring bound truncates it.
    assert len(reopened.since("evictions", 0)[0]) == len(recorded)


def test_the_ring_since_reads_stays_bounded_while_the_log_keeps_everything():
    recorder = Recorder(capacity=100)
    for step in range(50_000):
        recorder.record(EvictionEvent(step, step % 4, step % 2, np.array([step], dtype=np.int64)))
    assert len(recorder.all("evictions")) == 50_000
    assert [e.step for e in recorder.all("evictions")] == list(range(50_000))
    new, cursor = recorder.since("evictions", 0)
    assert [e.step for e in new] == list(range(49_900, 50_000)) and cursor == 50_000
    # A slow reader 1,000 events behind skips to the newest 100 (the live view may skip; the log never does).
    assert [e.step for e in recorder.since("evictions", 49_000)[0]] == list(range(49_900, 50_000))
    assert [e.step for e in recorder.since("evictions", 49_990)[0]] == list(range(49_990, 50_000))
    assert recorder.since("evictions", cursor)[0] == []
    # Columnar: tens of bytes per one-position event, not a Python object (hundreds) each.
    assert recorder.log.nbytes_of("evictions") / 50_000 < 64


def test_the_log_gives_back_each_kind_in_recorded_order_with_its_arrays():
    log = EventLog()
    rng = np.random.default_rng(0)
    expected = {"evictions": [], "attention": [], "recalls": [], "steps": []}
    for step in range(500):
        events = {"evictions": EvictionEvent(step, 1, step % 3, rng.integers(0, 999, step % 5)),
                  "attention": AttentionEvent(step, 2, rng.random((4, step % 7 + 1), dtype=np.float32),
                                              rng.integers(0, 999, (2, step % 7 + 1))),
                  "recalls": RecallEvent(step, 0, rng.integers(0, 999, (2, step % 4))),
                  "steps": StepEvent(step, "decode", 1, 0.1, (1, 2), 10, 20, step % 5)}
        for kind, event in events.items():
            log.append(event)
            expected[kind].append(event)
    for kind, events in expected.items():
        got = log.all(kind)
        assert len(got) == len(events)
        for a, b in zip(got, events):
            assert type(a) is type(b) and a.step == b.step
            for name in ("positions", "weights"):
                if hasattr(b, name):
                    assert getattr(a, name).shape == getattr(b, name).shape
                    assert np.array_equal(getattr(a, name), getattr(b, name))
    assert log.since("steps", log.sequence - 4)[0] == expected["steps"][-1:]  # the last append was a step


def test_chunked_values_read_back_what_was_written_across_chunk_boundaries():
    values = ChunkedValues(np.int64)
    rng = np.random.default_rng(1)
    written = []
    for size in rng.integers(0, 3000, 200):  # some writes larger than a chunk, many spanning two
        part = rng.integers(0, 1 << 40, size)
        written.append((values.append(part), part))
    for start, part in written:
        assert np.array_equal(values.read(start, part.size), part)
    assert np.array_equal(values.concatenated(), np.concatenate([part for _, part in written]))
    view = values.read(*next((start, part.size) for start, part in written if part.size))
    with pytest.raises(ValueError):
        view[0] = 0  # readers get the log's own values: read-only


def test_an_empty_run_packs_and_reopens():
    reopened = unpack_events(pack_events(Recorder()))
    assert reopened.all("evictions") == [] and reopened.all("attention") == [] and reopened.all("recalls") == []
