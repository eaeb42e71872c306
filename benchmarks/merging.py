"""Merging side by side: MiniCache cross-layer merging and KV-head pooling against the unmerged cache.

On one model and a ~2k-token prose prompt (the evaluation's generated prose, core/evaluate/haystack.py),
teacher-forced: the prompt prefilled in chunks of 512, then --new-tokens decode steps fed the text's
own next tokens, so every configuration sees the same tokens. Under `full` and under h2o at a fixed
budget, each configuration reports its peak cache bytes, the ratio to the unmerged run of the same
policy, and KL(unmerged || configuration) of the next-token distribution at the prompt's end and every
decode step; the bytes the stores have allocated at the end (tensor capacity: what the process
holds, measured apart from the stores' byte counts); also the bytes held at the end (after the decode steps: under h2o the peak is the
prefill's last chunk, held unmerged until its step's merge). Configurations: MiniCache from half depth and from a deeper layer (paper defaults:
t 0.6, retention threshold 0.05), with the share of merged entries; KV pooling to 1 group (the model
SPEC+kv1, loaded beside the base model). Ends with bytes_ratio_minicache_vs_none=,
allocated_ratio_minicache_vs_none=, kl_minicache_vs_none= (full, half depth) and bytes_ratio_kvgroups1_vs_none= (full).

usage: python benchmarks/merging.py [--model SPEC] [--budget 256] [--prompt-tokens 2000] [--new-tokens 32]
                                    [--deeper L] [--threshold 0.05]
"""

from __future__ import annotations

import argparse
import os
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
sys.path.insert(0, os.path.dirname(__file__))

import torch  # noqa: E402

from kvstudio.core.runtime.engine import Engine  # noqa: E402
from kvstudio.core.evaluate.haystack import prose_ids  # noqa: E402
from kvstudio.core.models.kv_pooling import with_kv_groups  # noqa: E402
from kvstudio.core.models.loading import load_model  # noqa: E402
from kvstudio.core.spec import create_policy  # noqa: E402
from kvstudio.core.storage import StorageConfig, attach  # noqa: E402
from kvstudio.core.evaluate.codec_error import teacher_forced  # noqa: E402
from kvstudio.core.storage.minicache import angular_distance, split_magnitude  # noqa: E402
from storage import kl  # noqa: E402  (benchmarks/storage.py: KL of the next-token distributions)


def print_similarity(cache, starts) -> None:
    """Why MiniCache merges what it merges on this model: the angular distance (0 alike, 0.5 orthogonal)
    between adjacent layers' states of the same token and KV head, from the unmerged full cache."""
    for start in starts:
        for kind in ("keys", "values"):
            first, second = (getattr(cache.layers[i], kind)[0] for i in (start, start + 1))
            distance = angular_distance(split_magnitude(first)[1], split_magnitude(second)[1]).flatten()
            quartiles = torch.quantile(distance, torch.tensor([0.0, 0.25, 0.5, 0.75, 1.0]))
            print(f"  layers {start}+{start + 1} {kind}: angular distance min/quartiles/max "
                  + " ".join(f"{q:.3f}" for q in quartiles.tolist()))


def allocated_bytes(cache) -> int:
    """Bytes of every tensor the layers' stores have allocated (capacity, not just the entries held):
    what the process really holds for the cache, independent of the stores' own byte counts."""
    seen, total = set(), 0
    for layer in cache.layers:
        store = layer.store
        tensors = list(store.entries.tensors.values())
        for pool in getattr(store, "pools", {}).values():  # a linked later layer's row pools (storage/linked.py)
            tensors += [t for t in (pool.rows, pool.free) if t is not None]
        for tensor in tensors:
            storage = tensor.untyped_storage()
            if storage.data_ptr() not in seen:
                seen.add(storage.data_ptr())
                total += storage.nbytes()
    return total


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="default")
    parser.add_argument("--budget", type=int, default=256)
    parser.add_argument("--prompt-tokens", type=int, default=2000)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--deeper", type=int, help="the deeper start layer (default: three quarters of the depth)")
    parser.add_argument("--threshold", type=float, default=StorageConfig.merge_threshold)
    args = parser.parse_args()

    engine = Engine(load_model(args.model))
    loaded = engine.loaded
    half = loaded.n_layers // 2
    deeper = args.deeper if args.deeper is not None else min((3 * loaded.n_layers) // 4, loaded.n_layers - 2)
    ids = prose_ids(engine.tokenizer, 0, args.prompt_tokens + args.new_tokens - 1)
    print(f"model {loaded.describe()}; prompt {args.prompt_tokens} tokens of prose, {args.new_tokens} decode steps "
          f"teacher-forced, h2o budget {args.budget}; MiniCache t {StorageConfig.merge_t}, threshold {args.threshold}")
    pooled = Engine(load_model(with_kv_groups(args.model, 1)))
    configurations = {
        "none": (engine, {}),
        f"minicache@{half}": (engine, {"merge": "minicache", "merge_from": half, "merge_threshold": args.threshold}),
        f"minicache@{deeper}": (engine, {"merge": "minicache", "merge_from": deeper,
                                         "merge_threshold": args.threshold}),
        "kvgroups1": (pooled, {}),
    }
    figures: dict[tuple[str, str], dict] = {}
    for policy_name, params in (("full", {}), ("h2o", {"budget": args.budget})):
        reference = None
        for label, (runner, storage) in configurations.items():
            policy = create_policy(policy_name, **params)
            if storage:
                attach(policy, StorageConfig(**storage))
            started = time.perf_counter()
            logprobs, run = teacher_forced(runner, ids, args.prompt_tokens, policy, 512)
            reference = logprobs if label == "none" else reference
            if label == "none" and policy_name == "full":
                print_similarity(run.cache, (half, deeper))
            merging = run.cache.merging.summary(run.cache) if run.cache.merging is not None else None
            held = sum(layer.entry_count() * layer.positions.shape[0]
                       for i, layer in enumerate(run.cache.layers) if merging and i in run.cache.merging.by_layer)
            row = {"bytes": run.cache.peak_bytes, "end": run.cache.current_bytes, "kl": kl(reference, logprobs),
                   "allocated": allocated_bytes(run.cache),
                   "merged": sum(merging["merged_entries_per_layer"]) / held if merging and held else None}
            figures[(policy_name, label)] = row
            merged = "" if row["merged"] is None else f", {row['merged']:.1%} of the pairs' entries merged"
            print(f"  ran {policy_name} {label} in {time.perf_counter() - started:.1f} s: peak {row['bytes']:,} bytes, "
                  f"{row['end']:,} at the end, {row['allocated']:,} allocated, KL to none {row['kl']:.5f}{merged}", flush=True)

    print(f"\n{'policy':<6} {'configuration':<16} {'peak bytes':>12} {'ratio':>7} {'end bytes':>12} {'ratio':>7} "
          f"{'allocated':>12} {'ratio':>7} {'KL to none':>11} {'merged':>8}")
    for (policy_name, label), row in figures.items():
        none = figures[(policy_name, "none")]
        merged = "" if row["merged"] is None else f"{row['merged']:.1%}"
        print(f"{policy_name:<6} {label:<16} {row['bytes']:>12,} {row['bytes'] / none['bytes']:>7.3f} "
              f"{row['end']:>12,} {row['end'] / none['end']:>7.3f} {row['allocated']:>12,} "
              f"{row['allocated'] / none['allocated']:>7.3f} {row['kl']:>11.5f} {merged:>8}")
    for policy_name in ("h2o", "full"):
        none = figures[(policy_name, "none")]
        for label in configurations:
            if label != "none":
                row = figures[(policy_name, label)]
                key = label.replace("@", "_from")
                print(f"{policy_name}_bytes_ratio_{key}_vs_none={row['bytes'] / none['bytes']:.3f} "
                      f"{policy_name}_kl_{key}_vs_none={row['kl']:.5f}")
    full_none, full_half = figures[("full", "none")], figures[("full", f"minicache@{half}")]
    print(f"bytes_ratio_minicache_vs_none={full_half['bytes'] / full_none['bytes']:.3f}")
    print(f"allocated_ratio_minicache_vs_none={full_half['allocated'] / full_none['allocated']:.3f}")
    print(f"kl_minicache_vs_none={full_half['kl']:.5f}")
    print(f"bytes_ratio_kvgroups1_vs_none={figures[('full', 'kvgroups1')]['bytes'] / full_none['bytes']:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
