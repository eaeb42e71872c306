"""Batched runs against the same prompts run one by one: throughput, wall time, memory.

Default model, 8 pass-key prompts of 200 to 2,000 tokens (evenly spaced), under h2o (budget 256)
and `full`, in two workloads: (a) decode-heavy, 64 new tokens per row; (b) prefill-heavy, 4 new
tokens. Each is run as one batch of 8 (core/runtime/batch.py) and as the 8 single runs, interleaved
(serial, batch, serial, batch... over --rounds; medians). Per line: tokens/s (decode: tokens after
each row's first over the time of decode-only steps; prefill: prompt tokens over the wall time),
wall time, peak cache bytes (the batch: what the rows held together; serial: each run's peak, and
their sum) and peak RSS (sampled at 100 Hz during the run). Then the needle sweep (2 policies x 4
depths x 2 lengths, 16 cells) batched against serial.

Last lines:
  decode_throughput_ratio_batch8_vs_serial=   h2o, decode-heavy (target >= 3 on CPU)
  prefill_wall_ratio_batch8_vs_serial=        h2o, prefill-heavy (target <= 1.0)
  peak_cache_ratio_batch8_vs_sum_of_rows=     the largest over the four set-ups (target <= 1.1)
  sweep_wall_ratio=                           batched sweep wall / serial sweep wall

usage: python -m benchmarks.batching [--model default] [--rounds 1] [--quick]

--quick: the same set-ups, reduced to finish in minutes on a shared CPU: 8 prompts of 50-250 tokens,
32 new tokens in the decode-heavy workload, the sweep at one length (256 tokens: 8 cells). Its
ratios are indicative; the issue's figures are the full run's.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import threading
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from benchmarks.common import prompt_of_length  # noqa: E402
from kvstudio.core.evaluate.tasks import TaskOptions, generation_samples  # noqa: E402
from kvstudio.core.models.loading import load_model  # noqa: E402
from kvstudio.core.recording.memory import process_resident_bytes  # noqa: E402
from kvstudio.core.runtime.batch import BatchRow, generate_batch  # noqa: E402
from kvstudio.core.runtime.engine import Engine, GenerationSettings  # noqa: E402
from kvstudio.core.spec import create_policy  # noqa: E402
from kvstudio.core.units import format_bytes  # noqa: E402


class PeakRss:
    """The process's largest resident set while the block runs, sampled every 10 ms."""

    def __init__(self):
        self.peak = 0
        self._stop = threading.Event()

    def _loop(self):
        while not self._stop.wait(0.01):
            self.peak = max(self.peak, process_resident_bytes())

    def __enter__(self):
        self.peak = process_resident_bytes()
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, process_resident_bytes())
        return False


def policy_of(name: str, budget: int):
    return create_policy("full") if name == "full" else create_policy(name, budget=budget)


def serial(engine, prompts, name, budget, settings) -> dict:
    with PeakRss() as rss:
        started = time.perf_counter()
        results = [engine.generate(ids, policy_of(name, budget), settings) for ids in prompts]
        wall = time.perf_counter() - started
    decode_tokens = sum(max(len(r.token_ids) - 1, 0) for r in results)
    decode_seconds = sum(r.decode_seconds for r in results)
    return {"wall": wall, "decode_tps": decode_tokens / decode_seconds if decode_seconds else 0.0,
            "prefill_tps": sum(map(len, prompts)) / wall, "peak_cache": sum(r.peak_cache_bytes for r in results),
            "peak_cache_row_max": max(r.peak_cache_bytes for r in results), "rss": rss.peak,
            "tokens": [r.token_ids for r in results]}


def batched(engine, prompts, name, budget, settings) -> dict:
    rows = [BatchRow(ids, policy_of(name, budget)) for ids in prompts]
    with PeakRss() as rss:
        batch = generate_batch(engine, rows, settings)
    return {"wall": batch.seconds, "decode_tps": batch.decode_tokens_per_second,
            "prefill_tps": sum(map(len, prompts)) / batch.seconds, "peak_cache": batch.peak_cache_bytes,
            "rss": rss.peak, "tokens": [row.result.token_ids for row in batch.rows]}


def compare(engine, prompts, name, budget, new_tokens, rounds, chunk_size) -> tuple[dict, dict]:
    settings = GenerationSettings(max_new_tokens=new_tokens, chunk_size=chunk_size, ignore_eos=True,
                                  memory_sample_hz=0)
    runs = {"serial": [], "batch": []}
    for round_index in range(rounds):
        order = ("serial", "batch") if round_index % 2 == 0 else ("batch", "serial")
        for kind in order:
            runs[kind].append((serial if kind == "serial" else batched)(engine, prompts, name, budget, settings))
    if runs["serial"][0]["tokens"] != runs["batch"][0]["tokens"]:
        print(f"  WARNING: {name} rows' tokens differ from the single runs'", flush=True)
    medians = {kind: {key: statistics.median(r[key] for r in results) for key in results[0] if key != "tokens"}
               | ({"peak_cache_row_max": results[0]["peak_cache_row_max"]} if kind == "serial" else {})
               for kind, results in runs.items()}
    return medians["serial"], medians["batch"]


def sweep(engine, budget, lengths, chunk_size) -> tuple[float, float]:
    """The needle grid (2 policies x 4 depths x the lengths) one cell at a time, and as one batch."""
    samples = generation_samples("needle", engine.tokenizer, TaskOptions(lengths=lengths,
                                                                         depths=(0.0, 0.33, 0.66, 1.0)))
    cells = [(sample, name) for name in ("h2o", "full") for sample in samples]
    settings = GenerationSettings(max_new_tokens=samples[0].max_new_tokens, chunk_size=chunk_size, memory_sample_hz=0)
    started = time.perf_counter()
    single = [engine.generate(sample.ids, policy_of(name, budget), settings).text for sample, name in cells]
    serial_wall = time.perf_counter() - started
    started = time.perf_counter()
    batch = generate_batch(engine, [BatchRow(sample.ids, policy_of(name, budget)) for sample, name in cells],
                           settings, max_rows=8)
    batch_wall = time.perf_counter() - started
    if [row.result.text for row in batch.rows] != single:
        print("  WARNING: the batched sweep's answers differ from the serial sweep's", flush=True)
    scores = [sample.score(text)["score"] for (sample, _), text in zip(cells, single)]
    print(f"sweep: {len(cells)} cells, mean score {statistics.mean(scores):.2f}; serial {serial_wall:.1f} s, "
          f"batched (8 at a time) {batch_wall:.1f} s", flush=True)
    return serial_wall, batch_wall


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="default")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--budget", type=int, default=256)
    parser.add_argument("--chunk-size", type=int, default=512)
    parser.add_argument("--quick", action="store_true", help="prompts of 50-250 tokens, 32 new tokens decode-heavy, "
                        "the sweep at 256 tokens only")
    args = parser.parse_args()

    engine = Engine(load_model(args.model, device=args.device))
    low, high = (50, 250) if args.quick else (200, 2000)
    lengths = [round(low + (high - low) * i / 7) for i in range(8)]
    prompts = [prompt_of_length(engine, n, key=f"{57314 + i}") for i, n in enumerate(lengths)]
    print(f"model {engine.loaded.name} on {engine.loaded.device}; {len(prompts)} prompts of {lengths} tokens; "
          f"chunk {args.chunk_size}, rounds {args.rounds}", flush=True)
    figures = {}
    for workload, new_tokens in (("decode-heavy", 32 if args.quick else 64), ("prefill-heavy", 4)):
        for name in ("h2o", "full"):
            alone, together = compare(engine, prompts, name, args.budget, new_tokens, args.rounds, args.chunk_size)
            figures[(workload, name)] = (alone, together)
            for kind, run in (("serial", alone), ("batch8", together)):
                print(f"{workload:<13} {name:<4} {kind:<6} decode {run['decode_tps']:7.1f} tok/s  prefill "
                      f"{run['prefill_tps']:7.1f} tok/s  wall {run['wall']:7.2f} s  peak cache "
                      f"{format_bytes(run['peak_cache']):>10}  peak RSS {format_bytes(run['rss']):>10}", flush=True)
    sweep_lengths = (256,) if args.quick else (512, 1024)
    serial_wall, batch_wall = sweep(engine, args.budget, sweep_lengths, args.chunk_size)

    decode = figures[("decode-heavy", "h2o")]
    prefill = figures[("prefill-heavy", "h2o")]
    cache_ratio = max(together["peak_cache"] / alone["peak_cache"] for alone, together in figures.values())
    for (workload, name), (alone, together) in figures.items():
        print(f"  {workload} {name}: decode x{together['decode_tps'] / alone['decode_tps']:.2f}, wall "
              f"x{together['wall'] / alone['wall']:.2f}, peak cache / sum of rows "
              f"{together['peak_cache'] / alone['peak_cache']:.2f}", flush=True)
    print(f"decode_throughput_ratio_batch8_vs_serial={decode[1]['decode_tps'] / decode[0]['decode_tps']:.2f}")
    print(f"prefill_wall_ratio_batch8_vs_serial={prefill[1]['wall'] / prefill[0]['wall']:.2f}")
    print(f"peak_cache_ratio_batch8_vs_sum_of_rows={cache_ratio:.2f}")
    print(f"sweep_wall_ratio={batch_wall / serial_wall:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
