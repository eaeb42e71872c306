"""What KV Studio's own loop costs, measured side by side in one process.

Same model, same prompt, greedy, same number of new tokens:
  hf        model.generate with transformers' own DynamicCache
  engine    KV Studio's engine under the `full` policy, nothing watched (memory read at 20 Hz, the default)
  recording the engine recording attention rows of one watched layer
  no_sampler the engine with memory read only after each step (--memory-sample-hz 0)
Runs are interleaved (hf, engine, recording, hf, ...) so machine noise hits all three alike, and
medians are compared. Then a breakdown: the engine's runs again with a timer around each of its
parts (benchmarks/step_parts.py), in microseconds per step, against model.generate's whole step.
The last lines are the ratios.

usage: python benchmarks/overhead.py [--model SPEC] [--prompt-tokens N] [--new-tokens N] [--repeats N] [--threads N]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, os.path.dirname(__file__))

import torch  # noqa: E402

from step_parts import breakdown_lines, timed_parts  # noqa: E402

from kvstudio.core.runtime.engine import Engine, GenerationSettings  # noqa: E402
from kvstudio.core.recording.events import Recorder  # noqa: E402
from kvstudio.core.models.loading import load_model  # noqa: E402
from kvstudio.core.spec import create_policy  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="default")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--prompt-tokens", type=int, default=256)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--threads", type=int, default=None, help="torch's CPU threads (1: steadier on a shared machine)")
    parser.add_argument("--breakdown-runs", type=int, default=3, help="engine runs timed part by part (0: none)")
    parser.add_argument("--watch-layer", type=int, default=None, help="layer watched in the recording run "
                                                                      "(default: the middle one)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    loaded = load_model(args.model, device=args.device)
    engine = Engine(loaded)
    generator = torch.Generator().manual_seed(0)
    vocab = min(loaded.model.config.vocab_size, 256 if args.model.startswith("tiny-") else 32000)
    prompt = torch.randint(10, vocab, (args.prompt_tokens,), generator=generator).tolist()
    watch = args.watch_layer if args.watch_layer is not None else loaded.n_layers // 2
    settings = GenerationSettings(max_new_tokens=args.new_tokens, chunk_size=max(args.prompt_tokens, 1))
    input_ids = torch.tensor([prompt], device=loaded.device)

    def sync():
        if loaded.device.type == "cuda":
            torch.cuda.synchronize()

    def run_hf():
        with torch.inference_mode():
            out = loaded.model.generate(input_ids, max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens,
                                        do_sample=False)
        return out[0, len(prompt):].tolist()

    def run_engine():
        return engine.generate(prompt, create_policy("full"), settings).token_ids

    def run_recording():
        recorder = Recorder(watch_layers=(watch,))
        tokens = engine.generate(prompt, create_policy("full"), settings, recorder=recorder).token_ids
        assert len(recorder.all("attention")) == len(tokens)
        return tokens

    def run_no_sampler():
        quiet = GenerationSettings(**{**vars(settings), "memory_sample_hz": 0})
        return engine.generate(prompt, create_policy("full"), quiet).token_ids

    runs = {"hf": run_hf, "engine": run_engine, "recording": run_recording, "no_sampler": run_no_sampler}
    for fn in runs.values():  # warm-up: first calls pay for allocations and lazy imports
        fn()
    reference = run_hf()
    if run_engine() != reference[: len(run_engine())]:
        print("warning: engine and model.generate produced different tokens", file=sys.stderr)

    times = {name: [] for name in runs}
    for _ in range(args.repeats):
        for name, fn in runs.items():
            sync()
            started = time.perf_counter()
            fn()
            sync()
            times[name].append(time.perf_counter() - started)

    print(f"model {loaded.describe()}")
    print(f"prompt {args.prompt_tokens} tokens, {args.new_tokens} new tokens, greedy, {args.repeats} interleaved repeats")
    for name, values in times.items():
        print(f"{name:<11} median {statistics.median(values) * 1000:8.1f} ms   "
              f"min {min(values) * 1000:8.1f} ms   max {max(values) * 1000:8.1f} ms")
    medians = {name: statistics.median(values) for name, values in times.items()}
    if args.breakdown_runs:
        with timed_parts(loaded.model) as (totals, calls):
            for _ in range(args.breakdown_runs):
                run_engine()
        steps = calls["step"]
        print(f"engine parts over {args.breakdown_runs} runs ({steps // args.breakdown_runs} steps each), "
              f"timers on; uninstrumented: engine {medians['engine'] / (steps / args.breakdown_runs) * 1e6:.0f} "
              f"us/step, model.generate {medians['hf'] / (steps / args.breakdown_runs) * 1e6:.0f} us/step")
        for line in breakdown_lines(loaded.model, totals, calls, steps):
            print("  " + line)
    print(f"ratio_engine_full_vs_hf_generate={medians['engine'] / medians['hf']:.3f}")
    print(f"ratio_recording_on_vs_off={medians['recording'] / medians['engine']:.3f}")
    print(f"ratio_memory_sampler_20hz_vs_off={medians['engine'] / medians['no_sampler']:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
