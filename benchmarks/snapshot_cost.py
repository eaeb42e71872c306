"""What recording a memory snapshot costs a run, measured side by side in one process.

Same model, prompt and policy, greedy: a plain run and a run inside MemorySnapshotRecording
(on CPU the profiler with memory and stacks, then the conversion; on CUDA torch's allocator
history), interleaved, medians compared. Also prints the snapshot's size and allocation count.

usage: python benchmarks/snapshot_cost.py [--model SPEC] [--device D] [--prompt-tokens N] [--repeats N]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

from kvstudio.core.runtime.engine import Engine, GenerationSettings  # noqa: E402
from kvstudio.core.models.loading import load_model  # noqa: E402
from kvstudio.core.spec import create_policy  # noqa: E402
from kvstudio.core.recording.snapshots import MemorySnapshotRecording, save_snapshot, timelines  # noqa: E402
from kvstudio.core.units import format_bytes  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="default")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--prompt-tokens", type=int, default=512)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    loaded = load_model(args.model, device=args.device)
    engine = Engine(loaded)
    vocab = min(loaded.model.config.vocab_size, 256 if args.model.startswith("tiny-") else 32000)
    prompt = torch.randint(10, vocab, (args.prompt_tokens,), generator=torch.Generator().manual_seed(0)).tolist()
    settings = GenerationSettings(max_new_tokens=args.new_tokens, chunk_size=256, ignore_eos=True)

    def plain():
        engine.generate(prompt, create_policy("h2o", budget=128), settings)

    snapshots = []

    def recorded():
        with MemorySnapshotRecording(loaded.device) as recording:
            result = engine.generate(prompt, create_policy("h2o", budget=128), settings)
        recording.mark_run(result)
        snapshots.append(recording.snapshot)

    plain()  # warm-up
    times = {"plain": [], "snapshot": []}
    for _ in range(args.repeats):
        for name, fn in (("plain", plain), ("snapshot", recorded)):
            started = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - started)

    with tempfile.TemporaryDirectory() as folder:
        path = save_snapshot(snapshots[-1], Path(folder) / "run.pickle")
        size = path.stat().st_size
    timeline = timelines(snapshots[-1])[0]  # the CPU, or the busiest CUDA device
    print(f"model {loaded.describe()}; prompt {args.prompt_tokens} tokens, {args.new_tokens} new, h2o budget 128, "
          f"chunk 256, {args.repeats} interleaved repeats")
    for name, values in times.items():
        print(f"{name:<9} median {statistics.median(values):7.2f} s   min {min(values):7.2f} s   max {max(values):7.2f} s")
    print(f"snapshot: {len(timeline.allocations):,} allocations, file {format_bytes(size)}, "
          f"peak allocated during the run {format_bytes(timeline.peak_bytes)}")
    print(f"ratio_snapshot_vs_plain={statistics.median(times['snapshot']) / statistics.median(times['plain']):.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
