"""A run's events packed into bytes, and back into a Recorder: how the history reopens a run's views.

The format is a compressed NumPy .npz (no pickle; loaded with allow_pickle=False): a JSON header
with the small events (run start, tokens, steps, memory readings) and flat arrays for the large
ones (evicted positions, host-tier recalls, attention rows), which would be slow and big as JSON.
Arrays added later (recalls) are optional on reading: older recordings simply have none.
What is packed is the run's whole event log (event_log.py), never only the live views' ring.
"""

from __future__ import annotations

import io
import json
from dataclasses import asdict

import numpy as np

from kvstudio.core.errors import KVStudioError
from kvstudio.core.recording.event_log import EventLog
from kvstudio.core.recording.events import (AttentionEvent, EvictionEvent, MemoryEvent, MergeEvent,
                                            PrefillProgressEvent, RecallEvent, Recorder, RunStartedEvent, StepEvent,
                                            TokenEvent)

FORMAT_VERSION = 1
_SMALL = {"runs": RunStartedEvent, "tokens": TokenEvent, "steps": StepEvent, "memory": MemoryEvent,
          "prefill": PrefillProgressEvent}
_TUPLES = {"runs": ("budgets", "prompt_tokens", "prompt_token_ids", "restored_missing_heads", "windows",
                     "state_layers"), "steps": ("kept_per_layer", "attention_loss"),
           "memory": ("cache_bytes_per_layer", "kept_per_layer")}


def pack_events(recorder: Recorder | EventLog) -> bytes:
    """Every event of the run's log (not only the live ring's), packed; the large kinds straight from
    the log's columns, without making an event object each."""
    log = recorder.log if isinstance(recorder, Recorder) else recorder
    header = {"version": FORMAT_VERSION}
    for kind in _SMALL:
        header[kind] = [asdict(event) for event in log.all(kind)]
    header["prefill"] = header["prefill"][-1:]  # only where it got to
    header["merges"] = [{"step": m.step, "merged": list(m.merged_entries_per_layer),  # cross-layer merging
                         "shared": list(m.shared_bytes_per_layer), "retained": [r.tolist() for r in m.retained]}
                        for m in log.all("merges")]

    evictions, eviction_values = log.columns("evictions")
    recalls, recall_values = log.columns("recalls")
    attention, attention_values = log.columns("attention")
    arrays = {
        "recall_ids": _stack(recalls, ("step", "layer", "kv_heads", "count")),
        "recall_positions": recall_values["positions"],
        "eviction_ids": _stack(evictions, ("step", "layer", "kv_head", "count")),
        "eviction_positions": eviction_values["positions"],
        "eviction_window": evictions["window"].astype(np.int8),  # 1: left a sliding window (absent before)
        "attention_ids": _stack(attention, ("step", "layer", "query_heads", "n", "kv_heads", "held")),
        "attention_weights": attention_values["weights"],
        "attention_positions": attention_values["positions"],
    }
    buffer = io.BytesIO()
    np.savez_compressed(buffer, header=np.frombuffer(json.dumps(header).encode("utf-8"), dtype=np.uint8), **arrays)
    return buffer.getvalue()


def _pairs_as_tuples(fields: dict) -> dict:
    """A step's evicted_attention as recorded: per layer, (position, share) tuples (JSON made them lists)."""
    if "evicted_attention" in fields:
        fields["evicted_attention"] = tuple(tuple(tuple(pair) for pair in layer) for layer in fields["evicted_attention"])
    return fields


def _stack(rows: np.ndarray, fields: tuple[str, ...]) -> np.ndarray:
    """The stored id table: one int64 row per event, `fields` of the log's rows as its columns."""
    return np.stack([rows[name].astype(np.int64) for name in fields], axis=1).reshape(-1, len(fields))


def unpack_events(blob: bytes) -> Recorder:
    """A Recorder whose log holds every stored event, in their recorded order within each kind."""
    try:
        with np.load(io.BytesIO(blob), allow_pickle=False) as data:
            header = json.loads(bytes(data["header"]).decode("utf-8"))
            arrays = {name: data[name] for name in data.files if name != "header"}
    except Exception as error:
        raise KVStudioError(f"the stored views of this run are unreadable ({error})") from None
    if header.get("version") != FORMAT_VERSION:
        raise KVStudioError(f"the stored views use format {header.get('version')}; this KV Studio reads "
                            f"{FORMAT_VERSION}")
    events = []
    for kind, cls in _SMALL.items():
        for fields in header[kind]:
            for name in _TUPLES.get(kind, ()):
                if name in fields:  # recordings older than a field lack it: its default applies
                    fields[name] = tuple(fields[name])
            events.append(cls(**_pairs_as_tuples(fields)))
    for fields in header.get("merges", ()):  # absent from recordings made before merging existed
        events.append(MergeEvent(fields["step"], tuple(fields["merged"]), tuple(fields["shared"]),
                                 tuple(np.array(r, dtype=np.int64) for r in fields["retained"])))
    offset = 0
    windows = arrays.get("eviction_window", np.zeros(len(arrays["eviction_ids"]), dtype=np.int8))
    for (step, layer, head, count), window in zip(arrays["eviction_ids"], windows):
        events.append(EvictionEvent(int(step), int(layer), int(head),
                                    arrays["eviction_positions"][offset:offset + count],
                                    "window" if window else "policy"))
        offset += count
    offset = 0
    for step, layer, kv_heads, count in arrays.get("recall_ids", np.zeros((0, 4), dtype=np.int64)):
        positions = arrays["recall_positions"][offset:offset + kv_heads * count].reshape(kv_heads, count)
        events.append(RecallEvent(int(step), int(layer), positions))
        offset += kv_heads * count
    weights_at = positions_at = 0
    for step, layer, q_heads, n, kv_heads, held in arrays["attention_ids"]:
        weights = arrays["attention_weights"][weights_at:weights_at + q_heads * n].reshape(q_heads, n)
        positions = arrays["attention_positions"][positions_at:positions_at + kv_heads * held].reshape(kv_heads, held)
        weights_at, positions_at = weights_at + q_heads * n, positions_at + kv_heads * held
        events.append(AttentionEvent(int(step), int(layer), weights, positions))
    # No live ring bound: a reopened run's views read it whole.
    recorder = Recorder(capacity=None, watch_layers={int(layer) for layer in arrays["attention_ids"][:, 1]})
    # The run's start first: viewers begin a run with it; the rest by kind, each in its own order.
    for event in sorted(events, key=lambda e: not isinstance(e, RunStartedEvent)):
        recorder.record(event)
    return recorder


# -- as JSON: an exported run carries its recording, so it can be re-plotted from the file alone ------


def recording_to_dict(recorder: Recorder) -> dict:
    """Every event as plain JSON data: the prompt's tokens and ids, steps, memory readings, the evicted
    positions per step, layer and KV head, and the recorded attention rows (float32 weights written
    as JSON numbers read back to the same float32)."""
    data = {"version": FORMAT_VERSION}
    for kind in _SMALL:
        data[kind] = [asdict(event) for event in recorder.all(kind)]
    data["evictions"] = [{"step": e.step, "layer": e.layer, "kv_head": e.kv_head, "positions": e.positions.tolist(),
                          "reason": e.reason} for e in recorder.all("evictions")]
    data["attention"] = [{"step": a.step, "layer": a.layer, "weights": a.weights.astype(np.float32).tolist(),
                          "positions": a.positions.tolist()} for a in recorder.all("attention")]
    data["recalls"] = [{"step": r.step, "layer": r.layer, "positions": r.positions.tolist()}
                       for r in recorder.all("recalls")]
    return data


def recording_from_dict(data: dict) -> Recorder:
    """The Recorder an exported run's "recording" describes (recording_to_dict), as the studio had it."""
    if not isinstance(data, dict) or data.get("version") != FORMAT_VERSION:
        version = data.get("version") if isinstance(data, dict) else None
        raise KVStudioError(f"the run's recording has format {version}; this KV Studio reads {FORMAT_VERSION}")
    try:
        events = []
        for kind, cls in _SMALL.items():
            for fields in data.get(kind, []):
                fields = dict(fields)
                for name in _TUPLES.get(kind, ()):
                    if name in fields:
                        fields[name] = tuple(fields[name])
                events.append(cls(**_pairs_as_tuples(fields)))
        events += [EvictionEvent(e["step"], e["layer"], e["kv_head"], np.array(e["positions"], dtype=np.int64),
                                 e.get("reason", "policy")) for e in data.get("evictions", [])]
        events += [AttentionEvent(a["step"], a["layer"], np.array(a["weights"], dtype=np.float32).reshape(
                       len(a["weights"]), -1), np.array(a["positions"], dtype=np.int64).reshape(len(a["positions"]), -1))
                   for a in data.get("attention", [])]
        events += [RecallEvent(r["step"], r["layer"], np.array(r["positions"], dtype=np.int64))
                   for r in data.get("recalls", [])]
    except (KeyError, TypeError, ValueError) as error:
        raise KVStudioError(f"the run's recording is malformed ({type(error).__name__}: {error})") from None
    recorder = Recorder(capacity=None, watch_layers={int(a.layer) for a in events if isinstance(a, AttentionEvent)})
    for event in sorted(events, key=lambda e: not isinstance(e, RunStartedEvent)):
        recorder.record(event)
    return recorder
