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


def add_device_map_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device-map", metavar="auto|FILE.json",
                        help="spread the model's layers over several devices with accelerate (for a model larger "
                             "than one GPU): auto, or a JSON file mapping module names to devices "
                             '({"model.layers.0": "cuda:0", ...}); each cache layer lives on its layer\'s device')


def device_map_from(args) -> str | dict | None:
    """--device-map as load_model takes it: None, "auto" (or balanced, sequential), or the file's mapping."""
    import json
    from pathlib import Path

    from kvstudio.core.errors import ModelLoadError

    value = getattr(args, "device_map", None)
    if value is None or value in ("auto", "balanced", "balanced_low_0", "sequential"):
        return value
    path = Path(value).expanduser()
    try:
        mapping = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ModelLoadError(f"--device-map {value}: no such file (give auto or a JSON file)") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ModelLoadError(f"--device-map {value}: not a readable JSON file ({error})") from None
    if not isinstance(mapping, dict) or not all(isinstance(k, str) and isinstance(v, (str, int))
                                                for k, v in mapping.items()):
        raise ModelLoadError(f"--device-map {value}: the file must hold one object mapping module names to devices")
    return mapping
