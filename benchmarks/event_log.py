"""What the event log holds for a long evicting run: bytes per eviction event, and the whole run.

A tiny-llama `window` run (budget 8) of --steps decode steps evicts one entry per layer and KV head
every step, so nearly every eviction event holds one position: the log's per-event cost, not the
positions', dominates. Prints the eviction events recorded, the bytes the log holds for them
(allocated, free room included, and used), bytes_per_eviction_event=, the log's total, what the same
events cost as Python objects (tracemalloc, for comparison), and the packed size the history stores.

usage: python benchmarks/event_log.py [--steps N] [--budget N]
"""

from __future__ import annotations

import argparse
import os
import time
import tracemalloc

import numpy as np

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from kvstudio.core.models.loading import load_model  # noqa: E402
from kvstudio.core.spec import create_policy  # noqa: E402
from kvstudio.core.recording.events import EvictionEvent, Recorder  # noqa: E402
from kvstudio.core.recording.packing import pack_events  # noqa: E402
from kvstudio.core.runtime.engine import Engine, GenerationSettings  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=3000)
    parser.add_argument("--budget", type=int, default=8)
    args = parser.parse_args()

    engine = Engine(load_model("tiny-llama", device="cpu"))
    recorder = Recorder()
    started = time.perf_counter()
    result = engine.generate(list(range(1, 17)), create_policy("window", budget=args.budget),
                             GenerationSettings(max_new_tokens=args.steps, ignore_eos=True, memory_sample_hz=0),
                             recorder=recorder)
    seconds = time.perf_counter() - started
    log = recorder.log
    events = log.count("evictions")
    rows, values = log.columns("evictions")
    used = rows.nbytes + values["positions"].nbytes
    allocated = log.nbytes_of("evictions")
    print(f"steps={len(result.steps)} seconds={seconds:.1f} eviction_events={events} "
          f"evicted_entries={sum(step.evicted for step in result.steps)}")
    print(f"eviction_bytes_allocated={allocated} eviction_bytes_used={used}")
    print(f"bytes_per_eviction_event={allocated / max(events, 1):.1f} (used {used / max(events, 1):.1f})")
    print(f"log_total_bytes={log.nbytes} (columnar kinds; the small kinds are a few objects per step)")

    # The same events as one Python object each, as the ring buffers held them before the log.
    tracemalloc.start()
    objects = [EvictionEvent(e.step, e.layer, e.kv_head, np.array(e.positions)) for e in log.all("evictions")]
    as_objects = tracemalloc.get_traced_memory()[0]
    tracemalloc.stop()
    print(f"as_python_objects_bytes_per_event={as_objects / max(len(objects), 1):.1f}")
    print(f"packed_bytes={len(pack_events(recorder))}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
