"""`kvstudio run`'s storage options: --codec, --group-size, --residual, --tier, --recall,
--block-size, --measure-error, and the `--policy h2o-int8` shorthand. The storage itself is
kvstudio.core.storage; this module only reads the command line into a StorageConfig.
"""

from __future__ import annotations

import argparse

from kvstudio.core.storage import StorageConfig, available_codecs, merge_in_name, split_cache_name
from kvstudio.core.storage.base import MERGE_METHODS, CodecError


def add_storage_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("cache storage (how the kept entries are held; `--policy h2o-int4` works too)")
    group.add_argument("--codec", help=f"{', '.join(available_codecs())} (default fp: the model's dtype)")
    group.add_argument("--group-size", type=int, default=64,
                       help="entries per key group and channels per value group, KIVI-style (default 64)")
    group.add_argument("--residual", type=int, default=0,
                       help="newest entries kept in full precision until they leave this window; keys wait until "
                            "their whole group has left it (default 0: values are quantized at once)")
    group.add_argument("--tier", default="device", help="device: evicted entries are dropped (default); "
                                                        "host: they move to host memory and can be recalled")
    group.add_argument("--recall", type=int, default=0,
                       help="host blocks the current query brings back each step (with --tier host)")
    group.add_argument("--block-size", type=int, default=16, help="entries per host block (default 16)")
    merging = parser.add_argument_group("cross-layer merging (MiniCache, Liu et al. 2024; any policy and codec)")
    merging.add_argument("--merge", default="none", choices=MERGE_METHODS,
                         help="minicache: from --merge-from on, adjacent layers share one direction per token "
                              "(default none)")
    merging.add_argument("--merge-from", type=int, metavar="L", help="first merged layer (default: half depth)")
    # The three below default to None, so that one given without --merge minicache is refused, not ignored.
    merging.add_argument("--merge-threshold", type=float, metavar="T",
                         help="retention threshold: tokens whose two states are farther apart than this fraction of "
                              "the pair's distance range stay unmerged; 0 keeps every token unmerged, above 1 merges "
                              f"every token both layers hold (default {StorageConfig.merge_threshold:g}, the paper's)")
    merging.add_argument("--merge-t", type=float, metavar="T",
                         help="SLERP interpolation parameter, 0 = the earlier layer's direction, 1 = the later's "
                              f"(default {StorageConfig.merge_t:g}, the paper's)")
    group.add_argument("--measure-error", action="store_true",
                       help="report the codec's relative error of keys and values and the KL divergence of the "
                            "next-token distribution from the same run stored in fp (runs the sequence twice more)")


def storage_from_args(args) -> StorageConfig:
    """The run's StorageConfig; rewrites args.policy from 'h2o-int4' to 'h2o'."""
    policy, codec = split_cache_name(args.policy)
    if codec is not None:
        if args.codec not in (None, codec):
            raise CodecError(f"--policy {args.policy} names codec {codec}, but --codec says {args.codec}; "
                             "give one of them")
    if merge_in_name(args.policy):  # --policy h2o+minicache: the same as --merge minicache
        args.merge = merge_in_name(args.policy)
    merge_settings = {"--merge-from": args.merge_from, "--merge-threshold": args.merge_threshold,
                      "--merge-t": args.merge_t}
    given = [option for option, value in merge_settings.items() if value is not None]
    if given and args.merge == "none":
        raise CodecError(f"{given[0]} needs --merge minicache (or --policy {args.policy}+minicache): without it no "
                         "layers are merged")
    defaults = StorageConfig()
    args.policy = policy
    config = StorageConfig(codec=codec or args.codec or "fp", group_size=args.group_size, residual=args.residual,
                           tier=args.tier, recall=args.recall, block_size=args.block_size,
                           measure_error=args.measure_error, merge=args.merge, merge_from=args.merge_from,
                           merge_threshold=defaults.merge_threshold if args.merge_threshold is None
                           else args.merge_threshold,
                           merge_t=defaults.merge_t if args.merge_t is None else args.merge_t)
    config.validate()
    return config


def format_storage(result) -> str | None:
    """The summary's storage lines, or None for an fp cache on the device."""
    storage = result.storage
    if not storage or (storage.get("codec") == "fp" and storage.get("tier") == "device"
                       and storage.get("merge", "none") == "none" and "kl_to_fp" not in storage):
        return None
    from kvstudio.core.units import format_bytes

    line = f"storage {storage['describe']}"
    if storage.get("tier") == "host":
        line += f"; host peak {format_bytes(storage['peak_host_bytes'])}, recalled {storage['recalled']} entries"
    errors = storage.get("relative_error") or {}
    if errors.get("key") is not None:
        line += f"\ncodec error: keys {errors['key']:.4f}, values {errors['value']:.4f} (mean relative)"
    merging = storage.get("merging") or {}
    if merging:
        saved = sum(merging["saved_bytes_per_layer"])
        shared = sum(merging["shared_bytes_per_layer"])
        line += (f"\nmerging: pairs {', '.join(f'{a}+{b}' for a, b in merging['pairs'])}; "
                 f"{format_bytes(saved)} saved at the end"
                 f"{' (estimated: the codec holds the restored states)' if merging.get('merge_storage') == 'estimated' else ''}"
                 f" ({format_bytes(shared)} of shared directions); entries in merged layers, over KV heads: "
                 f"{sum(merging.get('held_entries_per_layer', ())):,} held, "
                 f"{sum(merging['merged_entries_per_layer']):,} with a merged key or value, "
                 f"{sum(merging['retained_entries_per_layer']):,} kept unmerged by the retention rule")
    if "kl_to_fp" in storage:
        line += f", KL to fp {storage['kl_to_fp']:.5f} nats/token over {storage['kl_positions']} positions"
    return line


def measure_error(engine, result, policy, settings, prompt: str) -> None:
    """Adds the KL to fp to result.storage (the codec's relative errors were recorded in the run)."""
    import sys

    from kvstudio.core.evaluate.codec_error import kl_to_fp

    print("[kvstudio] measuring the codec's error: the sequence again in fp and through the codec",
          file=sys.stderr, flush=True)
    if not result.token_ids:
        return
    ids = engine.encode(prompt, settings.chat_template) + result.token_ids[:-1]
    kl, positions = kl_to_fp(engine, ids, result.prompt_tokens, policy, settings.chunk_size)
    result.storage["kl_to_fp"] = kl
    result.storage["kl_positions"] = positions
