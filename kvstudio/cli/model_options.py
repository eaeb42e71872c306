"""`--kv-groups G`, for every command that loads a model: the model's KV heads mean-pooled into G
groups at load time (kvstudio.core.models.kv_pooling). It is the same as the spec suffix `SPEC+kvG`, so the
pooled model is named by its spec everywhere (history, sweeps, saved caches)."""

from __future__ import annotations

import argparse


def add_kv_groups_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--kv-groups", type=int, metavar="G",
                        help="pool the model's KV heads into G groups (mean of each group's K/V projections, as in "
                             "GQA's uptraining) when G divides the KV heads; or expand them, when G is a multiple "
                             "dividing the query heads: G = the query heads gives each query head its own cache "
                             "(KVCache-Factory's published layout; 3x the entries on SmolLM2). Same as SPEC+kvG")


def apply_kv_groups(args) -> None:
    """Rewrite args.model to the pooled model's spec when --kv-groups is given."""
    from kvstudio.core.models.kv_pooling import with_kv_groups

    if getattr(args, "kv_groups", None) is not None:
        if args.kv_groups < 1:
            from kvstudio.core.errors import ModelLoadError

            raise ModelLoadError(f"--kv-groups must be 1 or more, got {args.kv_groups}")
        args.model = with_kv_groups(args.model, args.kv_groups)
