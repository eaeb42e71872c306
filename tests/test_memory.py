"""Memory readings (per step and on a timer) and memory snapshots, on CPU with real runs."""

from __future__ import annotations

import pickle
import threading
import time

import pytest
import torch

from kvstudio.core.runtime.engine import GenerationSettings
from kvstudio.core.errors import KVStudioError
from kvstudio.core.recording.events import Recorder
from kvstudio.core.recording.memory import MemorySampler, read_system_memory
from kvstudio.core.spec import create_policy
from kvstudio.core.recording.snapshots import (MemorySnapshotRecording, SnapshotError, frame_label, load_snapshot,
                                     save_snapshot, timelines)

PROMPT = "The quick brown fox jumps over the lazy dog. " * 6


def test_step_readings_hold_the_exact_cache_bytes_per_layer(llama_engine):
    loaded = llama_engine.loaded
    result = llama_engine.generate(PROMPT, create_policy("h2o", budget=40), GenerationSettings(
        max_new_tokens=12, chunk_size=64, memory_sample_hz=0))
    readings = result.memory
    assert [r["source"] for r in readings] == ["step"] * len(result.steps)
    entry_bytes = 2 * loaded.n_kv_heads * loaded.head_dim * 4  # keys + values, float32
    for reading, step in zip(readings, result.steps):
        assert list(reading["cache_bytes_per_layer"]) == [kept * entry_bytes for kept in step.kept_per_layer]
        assert reading["cache_bytes"] == step.cache_bytes == sum(step.cache_bytes_per_layer)
        assert reading["process_bytes"] > 10 * 2**20
        assert reading["cuda_allocated"] == reading["device_total"] == 0  # CPU run
    phases = [r["phase"] for r in readings]
    assert phases == sorted(phases, key=["prefill", "decode"].index) and phases[0] == "prefill"
    assert [r["seconds"] for r in readings] == sorted(r["seconds"] for r in readings)


def test_timer_readings_arrive_between_steps(llama_engine):
    recorder = Recorder()
    result = llama_engine.generate(PROMPT * 4, create_policy("window", budget=64), GenerationSettings(
        max_new_tokens=48, chunk_size=16, memory_sample_hz=500, ignore_eos=True), recorder=recorder)
    timer = [r for r in result.memory if r["source"] == "timer"]
    assert timer, "the sampler read nothing during a run of several hundred steps' worth of time"
    assert len(recorder.all("memory")) == len(result.memory)
    assert all(r["cache_bytes"] == sum(r["cache_bytes_per_layer"]) for r in timer)
    assert {r["phase"] for r in timer} <= {"prefill", "decode"}
    assert not any(t.name == "kvstudio-memory" for t in threading.enumerate()), "the sampler thread outlived the run"


def test_a_long_run_keeps_its_whole_memory_curve_at_bounded_size(llama_engine, monkeypatch):
    import kvstudio.core.runtime.session as session_module

    monkeypatch.setattr(session_module, "MAX_TIMER_READINGS", 8)
    result = llama_engine.generate(PROMPT * 4, create_policy("window", budget=64), GenerationSettings(
        max_new_tokens=200, chunk_size=16, memory_sample_hz=1000, ignore_eos=True))
    timer = [r for r in result.memory if r["source"] == "timer"]
    steps = [r for r in result.memory if r["source"] == "step"]
    assert 0 < len(timer) <= 8  # thinned, many times over at 1000 Hz
    assert [r["step"] for r in steps] == [s.step for s in result.steps]  # every step reading kept
    seconds = [r["seconds"] for r in result.memory]
    assert seconds == sorted(seconds)
    # Thinning keeps every other reading over the whole run: the curve still reaches its end.
    assert timer[-1]["seconds"] > steps[-1]["seconds"] / 2


def test_bad_sample_rate_is_refused_with_the_option_named(llama_engine):
    with pytest.raises(KVStudioError, match="--memory-sample-hz"):
        llama_engine.generate("hi", create_policy("full"), GenerationSettings(memory_sample_hz=-1))


def test_a_failing_reading_stops_the_sampler_not_the_run():
    calls = []

    def sample():
        calls.append(1)
        raise RuntimeError("sensor gone")

    with MemorySampler(0.001, sample) as sampler:
        time.sleep(0.05)
    assert len(calls) == 1 and isinstance(sampler.failure, RuntimeError)


def test_system_memory_on_cpu_is_the_process_only():
    reading = read_system_memory(torch.device("cpu"))
    assert reading.process_bytes > 0 and reading.cuda_reserved == reading.device_used == 0


# -- snapshots -------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def cpu_snapshot(tmp_path_factory):
    """A real run recorded on CPU, written to disk and read back."""
    from tests.conftest import engine_for

    engine = engine_for("tiny-llama")
    with MemorySnapshotRecording("cpu") as recording:
        result = engine.generate(PROMPT, create_policy("h2o", budget=24), GenerationSettings(
            max_new_tokens=6, chunk_size=32, ignore_eos=True))
    path = recording.save(tmp_path_factory.mktemp("snap") / "run.pickle", result)
    return result, recording.snapshot, path


def test_cpu_snapshot_round_trip(cpu_snapshot):
    result, snapshot, path = cpu_snapshot
    loaded = load_snapshot(path)
    assert loaded == snapshot
    assert loaded["kvstudio"]["device"] == "cpu"
    [timeline] = timelines(loaded)
    assert timeline.has_times and timeline.duration > 0
    assert len(timeline.allocations) > 100
    # The cache was made during the run, so its peak is among what the trace saw allocated.
    assert timeline.peak_bytes >= result.peak_cache_bytes
    labels = [label for _, label in timeline.marks]
    chunks = -(-result.prompt_tokens // 32)
    assert labels == [f"chunk {i} end" for i in range(1, chunks + 1)] + ["decode"]
    assert all(0 <= moment <= timeline.duration for moment, _ in timeline.marks)
    # Every free matches an allocation made in the run or before it; the total never goes negative.
    assert min(timeline.active_bytes) >= 0
    freed = [a for a in timeline.allocations if a.end is not None]
    assert freed and all(a.end >= a.start for a in freed)


def test_cpu_snapshot_names_the_frames_that_allocated(cpu_snapshot):
    _, snapshot, _ = cpu_snapshot
    [timeline] = timelines(snapshot)
    labels = {a.label for a in timeline.allocations}
    # Allocations are traced to lines of the model and of KV Studio's own cache and attention code.
    assert any("modeling_llama.py" in label for label in labels)
    assert any("runtime/cache.py" in label or "runtime/attention.py" in label for label in labels)
    assert all(frame_label(a.frames) == a.label for a in timeline.largest(5))


def test_cpu_snapshot_has_the_shape_pytorch_viewer_reads(cpu_snapshot):
    from torch.cuda._memory_viz import trace_plot

    _, snapshot, _ = cpu_snapshot
    html = trace_plot(snapshot)  # PyTorch's own reader of the snapshot format
    assert "<html" in html.lower() or "<script" in html.lower()
    for entry in snapshot["device_traces"][0][:50]:
        assert {"action", "addr", "size", "frames", "time_us"} <= entry.keys()


def test_snapshot_is_built_even_when_the_run_fails(llama_engine):
    with pytest.raises(KVStudioError):
        with MemorySnapshotRecording("cpu") as recording:
            llama_engine.generate("", create_policy("full"))
    assert recording.snapshot is not None and "device_traces" in recording.snapshot


def test_opening_what_is_not_a_snapshot_says_so(tmp_path):
    text = tmp_path / "notes.txt"
    text.write_text("hello")
    with pytest.raises(SnapshotError, match="notes.txt is not a memory snapshot"):
        load_snapshot(text)
    plain = tmp_path / "list.pickle"
    plain.write_bytes(pickle.dumps([1, 2, 3]))
    with pytest.raises(SnapshotError, match="no 'segments' and 'device_traces'"):
        load_snapshot(plain)
    with pytest.raises(SnapshotError, match="no such file"):
        load_snapshot(tmp_path / "missing.pickle")
    with pytest.raises(SnapshotError, match="is a folder"):
        load_snapshot(tmp_path)


class _Exploit:
    def __reduce__(self):
        return (open, ("/tmp/kvstudio-exploit-ran", "w"))


def test_a_pickle_that_would_run_code_is_refused_without_running_it(tmp_path):
    marker = "/tmp/kvstudio-exploit-ran"
    import os

    if os.path.exists(marker):
        os.remove(marker)
    path = tmp_path / "evil.pickle"
    path.write_bytes(pickle.dumps({"segments": [], "device_traces": [], "x": _Exploit()}))
    with pytest.raises(SnapshotError, match="refused"):
        load_snapshot(path)
    assert not os.path.exists(marker)


def test_snapshot_save_refuses_a_missing_folder(tmp_path):
    with pytest.raises(SnapshotError, match="folder does not exist"):
        save_snapshot({"segments": [], "device_traces": []}, tmp_path / "nope" / "s.pickle")


def test_an_interrupted_snapshot_write_leaves_the_previous_file_intact(tmp_path, cpu_snapshot):
    _, snapshot, _ = cpu_snapshot
    path = save_snapshot(snapshot, tmp_path / "keep.pickle")
    before = path.read_bytes()
    broken = {**snapshot, "device_traces": snapshot["device_traces"] + [[{"unpicklable": lambda: None}]]}
    with pytest.raises(Exception):
        save_snapshot(broken, path)  # fails part-way through pickling
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["keep.pickle"]  # no temporary file left behind
