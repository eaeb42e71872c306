"""Taking a run away: JSON (everything, every memory reading included), CSV (one row per step, with
the memory read after it), attention maps as .npy.

Every export is written atomically (kvstudio.core.io.atomic): an interrupted export leaves the
previous file intact.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np

from kvstudio.core.io.atomic import atomic_write, check_writable_folder
from kvstudio.core.errors import KVStudioError
from kvstudio.core.recording.packing import recording_to_dict

CSV_COLUMNS = ("step", "phase", "input_tokens", "seconds", "token_id", "text", "logprob", "cache_bytes",
               "evicted", "kept_total", "kept_per_layer", "cache_bytes_per_layer", "process_bytes", "cuda_allocated",
               "cuda_reserved", "cuda_peak", "device_used", "device_total")


def step_rows(steps: list[dict]) -> list[dict]:
    """Per-step records flattened for a table: per-layer lists as "a;b;c", plus the kept total."""
    rows = []
    for step in steps:
        row = {column: step.get(column) for column in CSV_COLUMNS}
        row["kept_total"] = sum(step["kept_per_layer"])
        for column in ("kept_per_layer", "cache_bytes_per_layer"):
            row[column] = ";".join(map(str, step.get(column) or []))
        rows.append(row)
    return rows


def export_run(record, path: str | Path, recording=None) -> Path:
    """A stored run (history.RunRecord) as .json or .csv, chosen by the file's suffix.

    JSON with the run's `recording` (a Recorder, e.g. recordings.unpack_events of the stored events)
    also holds the prompt's token ids and texts and every event the views draw (evicted positions per
    step, layer and KV head; attention rows), so the file alone re-plots the run
    (`kvstudio runs plot run.json ...`) or re-runs its prompt."""
    path = Path(path)
    check_writable_folder(path)
    if path.suffix == ".json":
        data = record.to_dict()
        if recording is not None:
            data["recording"] = recording_to_dict(recording)
            started = data["recording"]["runs"][-1:] or [{}]
            data["prompt_token_ids"] = list(started[0].get("prompt_token_ids", ()))
            data["prompt_as_tokens"] = "".join(started[0].get("prompt_tokens", ()))
        return atomic_write(path, lambda stream: json.dump(data, stream, indent=1))
    if path.suffix == ".csv":
        if getattr(record, "kind", "generate") == "finetune":  # a session's steps: loss, grad norm, lr, ...
            columns, rows = (list(record.steps[0]) if record.steps else ["step"]), record.steps
        else:
            columns, rows = CSV_COLUMNS, step_rows(record.steps)

        def write(stream):
            writer = csv.DictWriter(stream, fieldnames=columns)
            writer.writeheader()
            writer.writerows(rows)
        return atomic_write(path, write)
    raise KVStudioError(f"cannot export to '{path.suffix or path.name}': use a .json or .csv file name")


def export_array(array: np.ndarray, path: str | Path) -> Path:
    """An array (e.g. the attention map) as .npy."""
    path = Path(path)
    check_writable_folder(path)
    if path.suffix != ".npy":
        raise KVStudioError(f"an array is exported as .npy, not '{path.suffix or path.name}'")
    return atomic_write(path, lambda stream: np.save(stream, np.asarray(array)), binary=True)
