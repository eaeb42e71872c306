"""Peak cache bytes against prompt length: bounded under evicting policies, linear under full.

The prompt goes in chunk by chunk and the policy evicts between chunks, so the peak stays at
(budget + chunk) entries per layer at most, whatever the prompt length. Ends with
peak_cache_ratio_8k_vs_1k_h2o=<x> (target <= 1.05; full grows about 8x).

usage: python benchmarks/memory_bound.py [--model SPEC] [--budget 256] [--chunk-size 512]
"""

from __future__ import annotations

import argparse
import os
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, os.path.dirname(__file__))

from common import prompt_of_length  # noqa: E402

from kvstudio.core.runtime.engine import Engine, GenerationSettings  # noqa: E402
from kvstudio.core.models.loading import load_model  # noqa: E402
from kvstudio.core.spec import create_policy  # noqa: E402

LENGTHS = (1000, 2000, 4000, 8000)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="default")
    parser.add_argument("--budget", type=int, default=256)
    parser.add_argument("--chunk-size", type=int, default=512)
    args = parser.parse_args()

    loaded = load_model(args.model)
    engine = Engine(loaded)
    bytes_per_entry = 2 * loaded.n_kv_heads * loaded.head_dim * loaded.dtype.itemsize
    bound = loaded.n_layers * (args.budget + args.chunk_size) * bytes_per_entry
    print(f"model {loaded.describe()}; budget {args.budget}, chunk {args.chunk_size}; "
          f"bound (budget + chunk) x layers = {bound / 2**20:.2f} MiB")
    print(f"{'policy':<8}" + "".join(f"{n:>14}" for n in LENGTHS) + "   (peak cache MiB, prefill s)")
    peaks = {}
    for name in ("full", "snapkv", "h2o"):
        policy_params = {} if name == "full" else {"budget": args.budget}
        cells = []
        for length in LENGTHS:
            ids = prompt_of_length(engine, length)
            started = time.perf_counter()
            result = engine.generate(ids, create_policy(name, **policy_params),
                                     GenerationSettings(max_new_tokens=1, chunk_size=args.chunk_size))
            peaks[(name, length)] = result.peak_cache_bytes
            cells.append(f"{result.peak_cache_bytes / 2**20:8.2f} ({time.perf_counter() - started:4.0f})")
        print(f"{name:<8}" + "".join(f"{c:>14}" for c in cells), flush=True)
    for name in ("full", "snapkv", "h2o"):
        within = all(peaks[(name, n)] <= bound for n in LENGTHS)
        print(f"{name}: 8k/1k peak ratio {peaks[(name, 8000)] / peaks[(name, 1000)]:.3f}; "
              f"within the bound at every length: {within}")
    print(f"peak_cache_ratio_8k_vs_1k_full={peaks[('full', 8000)] / peaks[('full', 1000)]:.3f}")
    print(f"peak_cache_ratio_8k_vs_1k_h2o={peaks[('h2o', 8000)] / peaks[('h2o', 1000)]:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
