"""What scoring costs: prefill and decode time of every built-in policy against `full`.

Default model, a ~2k-token prose prompt (Python's own documentation, `pydoc_data.topics`), 16 new
tokens, budget 256, each built-in policy at `--chunk-size 512` and at one chunk covering the prompt.
Runs are interleaved (every policy once per round), medians over rounds. Prints per policy: prefill
seconds and their ratio to `full` at the same chunk size, decode ms/token and its ratio to `window`
(the cheapest bounded policy: what attention scoring adds at decode), and the peak float32 scratch of
the scoring pass (`PolicyCache.peak_scoring_bytes`). `h2o:2pass` is h2o with SDPA plus a separate
scoring pass, where the default on the CPU computes output and scores in one pass.

Ends with prefill_ratio_h2o_vs_full_chunk512=, prefill_ratio_h2o_vs_full_one_chunk= and
prefill_ratio_worst_vs_full= (targets <= 1.3 each).

usage: python benchmarks/policy_cost.py [--model SPEC] [--tokens 2048] [--rounds 3]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from kvstudio.core.runtime.engine import Engine, GenerationSettings  # noqa: E402
from kvstudio.core.models.loading import load_model  # noqa: E402
from kvstudio.core.policies import BUILT_IN, available_policies, source_of
from kvstudio.core.spec import create_policy  # noqa: E402
from kvstudio.core.units import format_bytes  # noqa: E402


def prose_ids(engine, n_tokens: int) -> list[int]:
    """n_tokens of real English prose: Python's documentation topics, always installed."""
    from pydoc_data.topics import topics

    text = "\n\n".join(topics[name] for name in sorted(topics))
    return engine.encode(text)[:n_tokens]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="default")
    parser.add_argument("--tokens", type=int, default=2048)
    parser.add_argument("--new-tokens", type=int, default=16)
    parser.add_argument("--budget", type=int, default=256)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--policies", help="comma-separated subset (default: every built-in)")
    parser.add_argument("--scratch-mib", type=float, help="bound on one tile of scoring scratch (default: the "
                                                          "engine's, core.attention.SCRATCH_BYTES)")
    args = parser.parse_args()

    engine = Engine(load_model(args.model, device=args.device))
    ids = prose_ids(engine, args.tokens)
    names = args.policies.split(",") if args.policies else [
        name for name in available_policies() if source_of(name) == BUILT_IN] + ["h2o:2pass"]
    chunkings = {"chunk512": 512, "one_chunk": len(ids)}

    def policy(name):
        name = name.split(":")[0]
        return create_policy(name) if name == "full" else create_policy(name, budget=args.budget)

    def cache_for(name, policy):
        cache = engine.new_cache(policy)
        if args.scratch_mib:
            cache.scoring_scratch_bytes = int(args.scratch_mib * 2**20)
        if name.endswith(":2pass"):
            cache.fused_scoring = False
        return cache

    prefill: dict[tuple[str, str], list[float]] = {}
    decode: dict[tuple[str, str], list[float]] = {}
    scratch: dict[tuple[str, str], int] = {}
    settings = {label: GenerationSettings(max_new_tokens=args.new_tokens, chunk_size=size, ignore_eos=True,
                                          memory_sample_hz=0) for label, size in chunkings.items()}
    print(f"model {engine.loaded.describe()}; prompt {len(ids)} tokens of prose; {args.new_tokens} new tokens; "
          f"budget {args.budget}; {args.rounds} interleaved rounds, medians", flush=True)
    engine.generate(ids[:256], policy("h2o"), settings["chunk512"])  # warm-up
    for round_ in range(args.rounds):
        for label in chunkings:
            for name in names:
                chosen = policy(name)
                result = engine.generate(ids, chosen, settings[label], keep_cache=True, cache=cache_for(name, chosen))
                key = (name, label)
                prefill.setdefault(key, []).append(result.prefill_seconds)
                decode.setdefault(key, []).append(result.decode_seconds * 1000 / max(len(result.token_ids) - 1, 1))
                scratch[key] = max(scratch.get(key, 0), result.cache.peak_scoring_bytes)
        print(f"round {round_ + 1}/{args.rounds} done", flush=True)

    med = {key: statistics.median(values) for key, values in prefill.items()}
    med_decode = {key: statistics.median(values) for key, values in decode.items()}
    worst = 0.0  # over the built-in policies as they run by default (not the h2o:2pass variant)
    for label in chunkings:
        print(f"\n{label}: {'policy':<14} {'prefill s':>9} {'vs full':>8} {'decode ms/tok':>14} {'vs window':>10} "
              f"{'scoring scratch':>16}")
        for name in names:
            key = (name, label)
            ratio = med[key] / med[("full", label)]
            if ":" not in name:
                worst = max(worst, ratio)
            decode_ratio = med_decode[key] / med_decode[("window", label)] if ("window", label) in med_decode else float("nan")
            print(f"{'':10}{name:<14} {med[key]:9.2f} {ratio:8.3f} {med_decode[key]:14.1f} {decode_ratio:10.3f} "
                  f"{format_bytes(scratch[key]):>16}")
    for label in chunkings:
        if ("h2o", label) in med:
            print(f"prefill_ratio_h2o_vs_full_{label}={med[('h2o', label)] / med[('full', label)]:.3f}")
    print(f"prefill_ratio_worst_vs_full={worst:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
