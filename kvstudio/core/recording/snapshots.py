"""Memory snapshots: every allocation a run made, with the Python frames that made it.

The file is the pickle PyTorch's memory viewer (pytorch.org/memory_viz) reads: a dict with
"segments" (what the allocator held at the end) and "device_traces" (per device, the allocation
events in order: action alloc / free_requested / free_completed, addr, size, frames, time_us).

- On CUDA, torch's allocator records it (`torch.cuda.memory._record_memory_history`).
- On CPU there is no such allocator history, so the profiler records every allocation and free
  (`profile_memory=True`, `with_stack=True`), and `snapshot_from_profile` turns those events into
  the same shape. (torch.cuda._memory_viz._profile_to_snapshot does this too, through the memory
  profiler's data-flow analysis: 10 s for a 16-token run of a 4-layer model; reading the raw
  allocation events takes a fraction of that.) The profiler itself makes a CPU run slower and
  spends seconds after it assembling its events: see benchmarks/snapshot_cost.py.

Reading a snapshot back uses an unpickler that refuses every Python class or function, so a
malicious file cannot run code through it: a snapshot is made only of dicts, lists, strings and
numbers. The studio still warns before opening one, since the format is a pickle.
"""

from __future__ import annotations

import math
import pickle
import re
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from kvstudio.core.io.atomic import atomic_write, check_writable_folder
from kvstudio.core.errors import KVStudioError

# Allocation events torch keeps on CUDA (a ring: the newest survive). Seen on an H100: h2o over a
# 1.5k-token prompt and 32 tokens made ~200k events, and 200k lost the whole prefill.
CUDA_MAX_ENTRIES = 2_000_000
KVSTUDIO_KEY = "kvstudio"  # our own metadata in the snapshot; PyTorch's viewer ignores it


class SnapshotError(KVStudioError):
    """A snapshot could not be recorded, written or read; the message says why."""


class MemorySnapshotRecording:
    """Records allocations while the `with` block runs; `.snapshot` is the result.

    The snapshot is built even when the block raises (an out-of-memory is when it is most
    wanted); the exception goes on. `mark(label)` notes a moment (a prefill chunk's end) that the
    viewer draws on the timeline; `save(path, result)` marks the run's phases and writes the file.
    """

    def __init__(self, device: torch.device | str):
        self.device = torch.device(device)
        self.snapshot: dict | None = None
        self.marks: list[dict] = []
        self._profile = None

    def mark(self, label: str, unix_seconds: float | None = None) -> None:
        moment = time.time() if unix_seconds is None else unix_seconds
        self.marks.append({"time_us": int(moment * 1e6), "label": label})

    def mark_run(self, result) -> None:
        """Mark where each prefill chunk of a run ended and the first decode step ended (from its memory
        readings after each step), so the viewer can place allocations in the run's phases."""
        chunk, decoding = 0, False
        for reading in result.memory:
            if reading["source"] != "step":
                continue
            if reading["phase"] == "prefill":
                chunk += 1
                self.mark(f"chunk {chunk} end", result.started_unix + reading["seconds"])
            elif not decoding:
                decoding = True
                self.mark("decode", result.started_unix + reading["seconds"])

    def save(self, path: str | Path, result=None) -> Path:
        """Write the snapshot (after the block), with the run's phases marked when it finished."""
        if self.snapshot is None:
            raise SnapshotError("no memory snapshot: recording did not start")
        if result is not None:
            self.mark_run(result)
        return save_snapshot(self.snapshot, path)

    def __enter__(self) -> "MemorySnapshotRecording":
        if self.device.type == "cuda":
            # Python frames only, as on the CPU: with C++ frames every allocation is labelled by
            # torch's own snapshot code, and recording them costs more per event.
            torch.cuda.memory._record_memory_history(max_entries=CUDA_MAX_ENTRIES, device=self.device,
                                                     stacks="python", clear_history=True)  # this run only
        else:
            from torch.profiler import ProfilerActivity, profile

            self._profile = profile(activities=[ProfilerActivity.CPU], profile_memory=True, with_stack=True)
            self._profile.__enter__()
        return self

    def __exit__(self, kind, error, trace) -> bool:
        if self.device.type == "cuda":
            try:
                self.snapshot = torch.cuda.memory._snapshot(self.device)
            finally:
                torch.cuda.memory._record_memory_history(enabled=None, device=self.device)
            source = "torch.cuda.memory._record_memory_history"
        else:
            self._profile.__exit__(None, None, None)
            self.snapshot = snapshot_from_profile(self._profile)
            self._profile = None
            source = "torch.profiler (profile_memory=True, with_stack=True)"
        # The list itself, so marks added after the block (mark_run) land in the snapshot too.
        self.snapshot[KVSTUDIO_KEY] = {"device": str(self.device), "source": source, "marks": self.marks}
        return False


def snapshot_from_profile(profile) -> dict:
    """A CPU profile's allocation events as a memory snapshot (one device trace: the CPU)."""
    allocations = sorted(_allocations_with_frames(profile), key=lambda pair: pair[0].start_time_ns)
    trace, live = [], {}
    for event, frames in allocations:
        fields = event.extra_fields
        if fields.device.type != "cpu":
            continue
        address, size, time_us = int(fields.ptr), int(fields.alloc_size), event.start_time_ns // 1000
        if size > 0:
            entry = {"action": "alloc", "addr": address, "size": size, "stream": 0, "time_us": time_us,
                     "frames": frames}
            live[address] = entry
            trace.append(entry)
        elif size < 0:
            made = live.pop(address, None)
            frames = made["frames"] if made else frames
            for action in ("free_requested", "free_completed"):
                trace.append({"action": action, "addr": address, "size": -size, "stream": 0, "time_us": time_us,
                              "frames": frames})
    return {"segments": _segments_at_end(live.values()), "device_traces": [trace]}


_PYTHON_FRAME = re.compile(r"^(?P<file>.+)\((?P<line>\d+)\): (?P<name>.+)$")


def _allocations_with_frames(profile) -> list[tuple]:
    """(allocation event, frames innermost first) for every CPU allocation and free.

    One walk down the event tree carries the Python stack along, so each frame is built once and
    allocations under the same call share one frames list: walking up from each allocation instead
    took 17 s for a 512-token run, and pickling shared lists once keeps the file small.
    """
    from torch._C._profiler import _EventType

    found = []
    # Frames lists by (Python stack, operator); the operator event is kept in the value so its id
    # cannot be reused by another event while the walk goes on.
    shared: dict[tuple[int, int], tuple] = {}
    # Tags compared as ints: comparing the enum objects costs a pybind call each, seconds in all.
    allocation, python_call = int(_EventType.Allocation), int(_EventType.PyCall)
    operators = (int(_EventType.PyCCall), int(_EventType.TorchOp))
    # (event, Python frames around it, the innermost operator event since the last Python frame)
    pending = [(root, [], None) for root in profile.profiler.kineto_results.experimental_event_tree()]
    while pending:
        event, python, operator = pending.pop()
        tag = int(event.tag)
        if tag == allocation:
            key = (id(python), id(operator))
            if key not in shared:
                op_frame = [{"filename": "??", "line": 0, "name": _name(operator)}] if operator is not None else []
                shared[key] = (operator, op_frame + python)
            found.append((event, shared[key][1]))
            continue
        if tag == python_call:
            name = _name(event)
            match = _PYTHON_FRAME.match(name)
            frame = ({"filename": match["file"], "line": int(match["line"]), "name": match["name"]} if match
                     else {"filename": "??", "line": 0, "name": name})
            python, operator = [frame] + python, None
        elif tag in operators:
            operator = event
        pending.extend([(child, python, operator) for child in event.children])
    return found


def _name(event) -> str:
    """An event's name. With the studio's GUI thread running Python while the worker is profiled,
    torch 2.13 now and then hands back a name that is not UTF-8 (seen on frames of other threads);
    one bad frame must not lose the snapshot."""
    try:
        return event.name
    except UnicodeDecodeError:
        return "(unreadable frame name)"


def _segments_at_end(live) -> list[dict]:
    """What was still allocated when recording stopped, as one segment of blocks (the shape
    PyTorch's viewer reads to know what existed; gaps between blocks are inactive)."""
    blocks_at_end = sorted((entry["addr"], entry["size"], entry["frames"]) for entry in live)
    if not blocks_at_end:
        return []
    start = blocks_at_end[0][0]
    blocks, cursor = [], start
    for address, size, frames in blocks_at_end:
        if address > cursor:
            blocks.append({"size": address - cursor, "state": "inactive"})
        blocks.append({"size": size, "state": "active_allocated", "requested_size": size, "frames": frames})
        cursor = max(cursor, address + size)
    return [{"device": 0, "address": start, "total_size": cursor - start, "stream": 0, "blocks": blocks,
             "segment_type": "large"}]


# -- files ---------------------------------------------------------------------------------------

def save_snapshot(snapshot: dict, path: str | Path) -> Path:
    check_writable_folder(path, SnapshotError)
    return atomic_write(path, lambda stream: pickle.dump(snapshot, stream, protocol=4), binary=True)


class _PlainDataUnpickler(pickle.Unpickler):
    """Loads dicts, lists, tuples, strings, numbers; refuses anything that names Python code."""

    def find_class(self, module, name):
        raise pickle.UnpicklingError(f"it asks to load the Python object {module}.{name}, which a memory "
                                     "snapshot never does (refused: loading it could run code)")


def load_snapshot(path: str | Path) -> dict:
    path = Path(path)
    try:
        with open(path, "rb") as stream:
            snapshot = _PlainDataUnpickler(stream).load()
    except FileNotFoundError:
        raise SnapshotError(f"no such file: {path}") from None
    except IsADirectoryError:
        raise SnapshotError(f"{path} is a folder: choose a memory snapshot file (.pickle)") from None
    except Exception as error:  # any unpickling failure means: not a snapshot
        raise SnapshotError(f"{path.name} is not a memory snapshot: {error}. Record one with "
                            "`kvstudio run ... --memory-snapshot FILE` or the studio's Memory menu") from None
    if not (isinstance(snapshot, dict) and isinstance(snapshot.get("device_traces"), list)
            and isinstance(snapshot.get("segments"), list)):
        raise SnapshotError(f"{path.name} is a pickle but not a memory snapshot: it has no 'segments' and "
                            "'device_traces'")
    problem = snapshot_problem(snapshot)
    if problem is not None:
        raise SnapshotError(f"{path.name} is shaped like a memory snapshot but {problem}: it was not written by "
                            "PyTorch or KV Studio, or was changed since; record it again")
    return snapshot


def _kind(value) -> str:
    return "missing" if value is None else f"a {type(value).__name__}"


def snapshot_problem(snapshot: dict) -> str | None:
    """What in a snapshot the timeline reads is missing or of the wrong kind, in words; None when all is
    well. Checked when a file is read, so drawing it never meets a KeyError or a string for a size."""
    for device, trace in enumerate(snapshot["device_traces"]):
        if not isinstance(trace, list):
            return f"device_traces[{device}] is {_kind(trace)}, not a list of events"
        for index, entry in enumerate(trace):
            where = f"device_traces[{device}][{index}]"
            if not isinstance(entry, dict):
                return f"{where} is {_kind(entry)}, not an event"
            action = entry.get("action")
            if not isinstance(action, str):
                return f"{where}.action is {_kind(action)}, not a word"
            if "time_us" in entry and not _is_number(entry["time_us"]):  # the first event's is the origin
                return f"{where}.time_us is {_kind(entry['time_us'])}, not a number"
            if action not in ("alloc", "free_completed"):
                continue  # the timeline skips every other action
            for key in ("addr", "size"):
                if not _is_integer(entry.get(key)):
                    return f"{where}.{key} is {_kind(entry.get(key))}, not an integer"
            frames = entry.get("frames", [])
            if not isinstance(frames, list) or not all(_is_frame(frame) for frame in frames):
                return f"{where}.frames is not a list of frames (filename, line, name)"
    ours = snapshot.get(KVSTUDIO_KEY, {})
    if not isinstance(ours, dict):
        return f"its '{KVSTUDIO_KEY}' entry is {_kind(ours)}, not a table"
    if not isinstance(ours.get("device", ""), str):
        return f"{KVSTUDIO_KEY}.device is {_kind(ours.get('device'))}, not a name"
    marks = ours.get("marks", [])
    if not isinstance(marks, list) or not all(
            isinstance(mark, dict) and isinstance(mark.get("label"), str) and _is_number(mark.get("time_us"))
            for mark in marks):
        return f"{KVSTUDIO_KEY}.marks is not a list of marks (time_us, label)"
    return None


def _is_integer(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and -2**63 <= value < 2**64  # what torch writes


def _is_number(value) -> bool:
    return _is_integer(value) or (isinstance(value, float) and math.isfinite(value))


def _is_frame(frame) -> bool:
    return (isinstance(frame, dict) and isinstance(frame.get("filename", ""), str)
            and isinstance(frame.get("name", ""), str) and _is_integer(frame.get("line", 0)))


# -- reading a snapshot: the allocation timeline ---------------------------------------------------

@dataclass
class Allocation:
    address: int
    size: int
    start: float  # seconds from the trace's first event (or its event index without times)
    end: float | None  # None: still allocated when recording stopped
    frames: list[dict]

    @property
    def label(self) -> str:
        return frame_label(self.frames)


@dataclass
class Timeline:
    """One device's allocation history, ready to draw."""

    device: int
    times: list[float] = field(default_factory=list)  # seconds, one per event that changed the total
    active_bytes: list[int] = field(default_factory=list)  # allocated bytes after that event
    allocations: list[Allocation] = field(default_factory=list)
    baseline_bytes: int = 0  # allocated before recording started (freed during it without an alloc)
    has_times: bool = True
    marks: list[tuple[float, str]] = field(default_factory=list)

    @property
    def peak_bytes(self) -> int:
        return max(self.active_bytes, default=self.baseline_bytes)

    @property
    def duration(self) -> float:
        return self.times[-1] if self.times else 0.0

    def largest(self, count: int) -> list[Allocation]:
        """By size; among equal sizes (a model makes many), the longest held first."""
        end = self.duration

        def held(a: Allocation) -> float:
            return (a.end if a.end is not None else end) - a.start

        return sorted(self.allocations, key=lambda a: (a.size, held(a)), reverse=True)[:count]


def timelines(snapshot: dict) -> list[Timeline]:
    """A Timeline per device that has allocation events, busiest first."""
    found = [_timeline(index, trace, snapshot.get(KVSTUDIO_KEY, {}).get("marks", []))
             for index, trace in enumerate(snapshot["device_traces"]) if trace]
    return sorted(found, key=lambda timeline: len(timeline.allocations), reverse=True)


def _timeline(device: int, trace: list[dict], marks: list[dict]) -> Timeline:
    has_times = all("time_us" in entry for entry in trace)
    origin = trace[0]["time_us"] if has_times else 0
    moment = (lambda i, entry: (entry["time_us"] - origin) / 1e6) if has_times else (lambda i, entry: float(i))
    timeline = Timeline(device, has_times=has_times)
    live: dict[int, Allocation] = {}
    active, before = 0, 0
    for i, entry in enumerate(trace):
        action, size = entry.get("action"), int(entry.get("size", 0))
        if action == "alloc":
            allocation = Allocation(int(entry["addr"]), size, moment(i, entry), None, entry.get("frames", []))
            live[allocation.address] = allocation
            timeline.allocations.append(allocation)
            active += size
        elif action == "free_completed":
            allocation = live.pop(int(entry["addr"]), None)
            if allocation is None:
                before += size  # made before recording started
            else:
                allocation.end = moment(i, entry)
            active -= size
        else:
            continue
        timeline.times.append(moment(i, entry))
        timeline.active_bytes.append(active)
    # Shift so that the curve counts what existed before recording: never below zero.
    timeline.baseline_bytes = before
    timeline.active_bytes = [value + before for value in timeline.active_bytes]
    if has_times:
        end = timeline.duration
        timeline.marks = [((m["time_us"] - origin) / 1e6, m["label"]) for m in marks
                          if 0 <= (m["time_us"] - origin) / 1e6 <= end]
    return timeline


_INTERNAL = ("torch/", "<built-in", "aten::", "??", "site-packages/torch", "contextlib.py", "threading.py")


def frame_label(frames: list[dict]) -> str:
    """The frame that best says who made an allocation: the innermost one outside torch itself
    (a line of the model or of KV Studio), else the innermost one."""
    if not frames:
        return "(no frames recorded)"
    chosen = next((f for f in frames if not any(mark in f.get("filename", "") or f.get("name", "").startswith(mark)
                                                for mark in _INTERNAL)), frames[0])
    return format_frame(chosen)


def format_frame(frame: dict) -> str:
    filename = frame.get("filename", "??")
    if filename in ("??", "none"):
        return frame.get("name", "?")
    short = "/".join(Path(filename).parts[-2:])
    return f"{frame.get('name', '?')} ({short}:{frame.get('line', 0)})"
