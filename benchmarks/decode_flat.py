"""Decode time per token after a short and a long prompt: flat under an evicting policy.

Under h2o with budget 256 every decode step attends to at most 257 entries, so the time per token
should not depend on how long the prompt was; under full it grows with the prompt. The h2o/window
ratio at the same budget is what computing attention rows costs during decoding.
Prints decode_ms_ratio_h2o_vs_window=<x> (target <= 1.25, measured at the short prompt: at a
fixed budget the prompt length does not matter) and ends with decode_ms_ratio_8k_vs_1k_h2o=<x>
(target <= 1.2).

usage: python benchmarks/decode_flat.py [--model SPEC] [--budget 256] [--new-tokens 48]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, os.path.dirname(__file__))

from common import prompt_of_length  # noqa: E402

from kvstudio.core.runtime.engine import Engine, GenerationSettings  # noqa: E402
from kvstudio.core.models.loading import load_model  # noqa: E402
from kvstudio.core.spec import create_policy  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="default")
    parser.add_argument("--budget", type=int, default=256)
    parser.add_argument("--new-tokens", type=int, default=48)
    parser.add_argument("--short", type=int, default=1000)
    parser.add_argument("--long", type=int, default=8000)
    parser.add_argument("--rounds", type=int, default=2, help="interleaved rounds for the long/short ratio")
    parser.add_argument("--cost-rounds", type=int, default=5, help="interleaved rounds for h2o vs window")
    args = parser.parse_args()

    engine = Engine(load_model(args.model))
    settings = GenerationSettings(max_new_tokens=args.new_tokens, chunk_size=512, ignore_eos=True)
    prompts = {length: prompt_of_length(engine, length) for length in (args.short, args.long)}
    policies = {"h2o": {"budget": args.budget}, "window": {"budget": args.budget}, "full": {}}
    step_ms: dict[tuple[str, int], list[float]] = {}

    def run(name: str, length: int) -> None:
        result = engine.generate(prompts[length], create_policy(name, **policies[name]), settings)
        step_ms.setdefault((name, length), []).extend(
            step.seconds * 1000 for step in result.steps if step.phase == "decode")

    print(f"model {engine.loaded.describe()}; {args.new_tokens} new tokens, budget {args.budget}")
    run("h2o", args.short)  # warm-up
    step_ms.clear()
    # Runs interleaved, so machine noise falls on every case alike; medians over all decode steps.
    for _ in range(args.rounds):
        for name in ("h2o", "full"):
            for length in (args.short, args.long):
                run(name, length)
    for _ in range(args.cost_rounds):
        for name in ("window", "h2o"):
            run(name, args.short)
    ms = {case: statistics.median(values) for case, values in step_ms.items()}
    print("median decode ms/token (per-step times; prefill steps excluded)")
    for (name, length), value in sorted(ms.items()):
        print(f"  {name:<7} prompt {length:>5}: {value:7.2f} ms/token over {len(step_ms[(name, length)])} steps")
    print(f"decode_ms_ratio_8k_vs_1k_full={ms[('full', args.long)] / ms[('full', args.short)]:.3f}")
    print(f"decode_ms_ratio_h2o_vs_window={ms[('h2o', args.short)] / ms[('window', args.short)]:.3f}")
    print(f"decode_ms_ratio_8k_vs_1k_h2o={ms[('h2o', args.long)] / ms[('h2o', args.short)]:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
