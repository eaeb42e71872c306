"""`kvstudio run`'s storage options: --codec, --group-size, --residual, --tier, --recall,
--block-size, --measure-error, and the `--policy h2o-int8` shorthand. The storage itself is
kvstudio.core.storage; this module only reads the command line into a StorageConfig.
"""

from __future__ import annotations

import argparse

from kvstudio.core.storage import StorageConfig, available_codecs, merge_in_name, split_cache_name
from kvstudio.core.storage.base import CodecError


# Options that take None on the command line, so that one given where it does nothing is refused, not
# ignored: a codec besides `--policy h2o-int4`'s, a merge setting without --merge minicache.
GIVEN_OR_NONE = ("codec", "merge_threshold", "merge_t")


def add_storage_options(parser: argparse.ArgumentParser) -> None:
    """One option per StorageConfig field, from its declaration (help, choices, default)."""
    group = parser.add_argument_group("cache storage (how the kept entries are held; `--policy h2o-int4` works too)")
    merging = parser.add_argument_group("cross-layer merging (MiniCache, Liu et al. 2024; any policy and codec)")
    for spec in StorageConfig.parameters():
        target = merging if spec.name.startswith("merge") else group
        # The float settings' help names the paper's value, which is their default.
        shows_default = spec.default is not None and not isinstance(spec.default, float)
        help_text = spec.help + (f" (default {spec.default})" if shows_default else "")
        if spec.name == "codec":
            help_text = f"{', '.join(available_codecs())}; {spec.help} (default fp)"
        if spec.type is bool:
            target.add_argument(spec.option, dest=spec.name, action="store_true", help=spec.help)
            continue
        target.add_argument(spec.option, dest=spec.name, type=spec.type, choices=spec.choices,
                            default=None if spec.name in GIVEN_OR_NONE else spec.default,
                            metavar=spec.metavar or (None if spec.choices else spec.type.__name__.upper().replace(
                                "STR", "TEXT")), help=help_text)


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
    args.policy = policy
    values = {spec.name: getattr(args, spec.name) for spec in StorageConfig.parameters()}
    values["codec"] = codec or args.codec
    config = StorageConfig(**{name: value for name, value in values.items() if value is not None})
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
