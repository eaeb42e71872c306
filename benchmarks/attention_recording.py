"""What recording attention rows costs: nothing watched, one layer, every layer (the Attention map's
"record" choice and `kvstudio run --attention-layers`).

Same model, prompt and policy; runs interleaved (none, one, all, none, ...) so machine noise hits all
alike; medians compared. Prints the seconds per run, the bytes of attention rows recorded per decode
step (measured from the events) next to the figure the studio shows (attention_row_bytes), and the
ratios to nothing watched.

usage: python benchmarks/attention_recording.py [--model SPEC] [--prompt-tokens N] [--new-tokens N]
       [--budget N] [--repeats N]
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from kvstudio.core.runtime.engine import Engine, GenerationSettings  # noqa: E402
from kvstudio.core.recording.events import Recorder  # noqa: E402
from kvstudio.core.models.loading import load_model  # noqa: E402
from kvstudio.core.figures.data import attention_row_bytes  # noqa: E402
from kvstudio.core.spec import build_policy  # noqa: E402
from kvstudio.core.units import format_bytes  # noqa: E402

from common import prompt_of_length  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="default")
    parser.add_argument("--prompt-tokens", type=int, default=512)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--budget", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    loaded = load_model(args.model, device="cpu")
    engine = Engine(loaded)
    prompt = prompt_of_length(engine, args.prompt_tokens)
    settings = GenerationSettings(max_new_tokens=args.new_tokens, chunk_size=256, ignore_eos=True,
                                  memory_sample_hz=0)
    choices = {"none": (), "one": (loaded.n_layers // 2,), "all": tuple(range(loaded.n_layers))}
    seconds = {name: [] for name in choices}
    recorded = {}
    for _ in range(args.repeats):
        for name, layers in choices.items():
            recorder = Recorder(watch_layers=layers)
            started = time.perf_counter()
            engine.generate(prompt, build_policy("h2o", {"budget": args.budget}), settings, recorder=recorder)
            seconds[name].append(time.perf_counter() - started)
            recorded[name] = recorder
    print(f"{loaded.name}: h2o budget {args.budget}, {args.prompt_tokens} prompt tokens, {args.new_tokens} new, "
          f"{loaded.n_layers} layers, {loaded.n_heads} query / {loaded.n_kv_heads} KV heads, CPU")
    decode_steps = {s.step for s in recorded["all"].all("steps") if s.phase == "decode"}
    for name in choices:
        rows = [a for a in recorded[name].all("attention") if a.step in decode_steps]
        per_step = sum(a.weights.nbytes + a.positions.nbytes for a in rows) / max(len(decode_steps), 1)
        entries = rows[-1].positions.shape[1] if rows else 0
        shown = len(choices[name]) * attention_row_bytes(loaded.n_heads, loaded.n_kv_heads, entries)
        print(f"  {name:>4}: median {statistics.median(seconds[name]):.3f} s; attention rows per decode step "
              f"{format_bytes(int(per_step))} (the studio says {format_bytes(shown)} at {entries} entries)")
    base = statistics.median(seconds["none"])
    print(f"  ratio one/none {statistics.median(seconds['one']) / base:.3f}; "
          f"all/none {statistics.median(seconds['all']) / base:.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
