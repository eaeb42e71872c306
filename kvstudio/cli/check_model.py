"""`kvstudio check-model SPEC`: is this model computed exactly by KV Studio's engine?

Runs a short prompt through transformers alone (its own cache, eager attention) and through the engine
under `full`, in one chunk and in small chunks, and compares the logits of every prompt position and
of every decode step, and each layer's attention output (core/evaluate/conformance.py). Prints the model's layer kinds, heads and head
sizes, the cache's bytes per token, each comparison's max |delta logit| and the verdict: exact within
the tolerance, or where it differs. A model KV Studio cannot compute is refused when it loads, with
the reason.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from kvstudio.cli.model_options import add_device_map_option, add_kv_groups_option, apply_kv_groups, device_map_from
from kvstudio.cli.output import progress, write_json_atomic


def add_parser(subparsers) -> argparse.ArgumentParser:
    parser = subparsers.add_parser("check-model", help="compare the engine under `full` with transformers on your "
                                                       "model: exact, or where it differs")
    parser.add_argument("model", help="default, tiny-llama|..., a model folder, or a hub id in the local HF cache")
    add_kv_groups_option(parser)
    parser.add_argument("--device", default="auto", help="auto (cuda when present), cpu, cuda, cuda:N")
    add_device_map_option(parser)
    parser.add_argument("--dtype", default="float32", help="float32 (default: differences are rounding only), "
                                                          "bfloat16, float16, auto")
    parser.add_argument("--prompt", default=None, help="the text both are fed (default: two sentences)")
    parser.add_argument("--chunk-size", type=int, default=8, help="the chunked comparison's chunk size (default 8)")
    parser.add_argument("--decode-steps", type=int, default=6, help="decode steps compared (default 6)")
    parser.add_argument("--tolerance", type=float, help="max |delta logit| that counts as exact (default 1e-4 in "
                                                        "float32, 5e-2 in half precision)")
    parser.add_argument("--json", metavar="PATH", help="also write the report as JSON")
    return parser


def run(args) -> int:
    from kvstudio.core.errors import KVStudioError
    from kvstudio.core.evaluate.conformance import CHECK_PROMPT, check_model
    from kvstudio.core.io.atomic import check_writable_folder
    from kvstudio.core.models.layer_kinds import describe_kinds, kinds_record
    from kvstudio.core.models.loading import load_model
    from kvstudio.core.runtime.engine import Engine

    apply_kv_groups(args)
    if args.chunk_size < 1 or args.decode_steps < 0:
        raise KVStudioError("--chunk-size must be at least 1 and --decode-steps 0 or more")
    if args.json:
        check_writable_folder(args.json)
    loaded = load_model(args.model, device=args.device, dtype=args.dtype, progress=progress,
                        device_map=device_map_from(args))
    print("[kvstudio] comparing the engine under full with transformers' own forward and cache",
          file=sys.stderr, flush=True)
    result = check_model(Engine(loaded), args.prompt or CHECK_PROMPT, args.chunk_size, args.decode_steps, args.tolerance)
    dtype = result.dtype
    kinds = loaded.layer_kinds
    print(f"model {loaded.name}: {describe_kinds(kinds)}; {loaded.n_heads} query / {loaded.n_kv_heads} KV heads, "
          f"head size {loaded.head_dim}; cache {result.bytes_per_token:,.0f} bytes per token under full ({dtype})")
    lines = result.lines()
    for line in lines[:-1]:
        print(f"  {line}")
    print(lines[-1])
    if args.json:
        write_json_atomic(Path(args.json), {
            "model": loaded.identity, "dtype": dtype, "exact": result.exact, "tolerance": result.tolerance,
            "layer_kinds": kinds_record(kinds), "n_heads": loaded.n_heads, "n_kv_heads": loaded.n_kv_heads,
            "head_dim": loaded.head_dim, "cache_bytes_per_token": result.bytes_per_token,
            "prompt_tokens": result.prompt_tokens,
            "checks": [{"chunk_size": c.chunk_size, "prompt_max_delta": c.prompt_max_delta,
                        "decode_max_delta": c.decode_max_delta, "attention_output_max_delta": c.layer_max_delta}
                       for c in result.checks]})
        print(f"[kvstudio] wrote {args.json}", file=sys.stderr)
    return 0 if result.exact else 1
