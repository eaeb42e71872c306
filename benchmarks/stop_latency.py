"""How long Stop takes during a long prefill chunk, against how long the chunk takes.

One prompt of one chunk (512 tokens by default) under `full`: first timed whole, then run again and
cancelled from another thread at a fraction of that time (Stop pressed mid-chunk). Before the
per-layer check (core/runtime/layer_hooks.py) a Stop waited for the chunk's end; now it waits for the layer
in progress. Prints the chunk's time, the delay from cancel to the run's return for each repeat, and
their median as a fraction of the chunk.

usage: python benchmarks/stop_latency.py [--model SPEC] [--chunk N] [--at 0.3] [--repeats N]
"""

from __future__ import annotations

import argparse
import os
import statistics
import threading
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from kvstudio.core.runtime.engine import CancelToken, Engine, GenerationSettings  # noqa: E402
from kvstudio.core.models.loading import load_model  # noqa: E402
from kvstudio.core.spec import create_policy  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="default")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--chunk", type=int, default=512, help="prompt tokens, all in one prefill chunk")
    parser.add_argument("--at", type=float, default=0.3, help="when to cancel, as a fraction of the chunk's time")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()

    engine = Engine(load_model(args.model, device=args.device))
    ids = [engine.tokenizer.encode(" the", add_special_tokens=False)[0]] * args.chunk
    settings = GenerationSettings(max_new_tokens=1, chunk_size=args.chunk)
    policy = create_policy("full")
    engine.generate(ids[:32], policy, settings)  # warm-up
    started = time.perf_counter()
    engine.generate(ids, policy, settings)
    chunk_seconds = time.perf_counter() - started
    print(f"model {engine.loaded.name}, {engine.loaded.n_layers} layers; one {args.chunk}-token chunk: "
          f"{chunk_seconds:.2f} s ({chunk_seconds / engine.loaded.n_layers * 1000:.0f} ms a layer)")

    delays = []
    for _ in range(args.repeats):
        cancel = CancelToken()
        cancelled_at = {}

        def stop_later(cancel=cancel, cancelled_at=cancelled_at):
            time.sleep(chunk_seconds * args.at)
            cancelled_at["t"] = time.perf_counter()
            cancel.cancel()

        stopper = threading.Thread(target=stop_later)
        stopper.start()
        result = engine.generate(ids, policy, settings, cancel=cancel)
        returned = time.perf_counter()
        stopper.join()
        delays.append(returned - cancelled_at["t"])
        print(f"  stopped ({result.stop_reason}) {delays[-1] * 1000:.0f} ms after the cancel")
    median = statistics.median(delays)
    print(f"stop delay median {median * 1000:.0f} ms = {median / chunk_seconds:.2f} of the chunk "
          f"(waiting for the chunk's end would be {(1 - args.at):.2f})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
