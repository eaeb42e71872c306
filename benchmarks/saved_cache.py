"""Saved caches: restoring a prompt's cache against computing it, file size against memory, and a
follow-up question on the same document with prefix reuse.

Everything goes through a prompt-cache folder, as `kvstudio run --prompt-cache DIR` does: the first
run of the prompt prefills and saves ("saved"), the second restores ("restored"), and a follow-up
question after the same document reuses the document's chunks ("prefix N").

Prints, for a ~4k-token prompt on the default model:
  restore_vs_prefill=<x>        restore (read, verify, decompress, put back) over prefill time, `full`
                                (target <= 0.1); restore_vs_prefill_h2o the same under h2o
  file_bytes_ratio_full=<x>     file bytes over in-memory cache bytes, `full`
  file_bytes_ratio_h2o=<x>      the same under h2o at budget 256 (policy state included)
  file_bytes_ratio_h2o_int4=<x> the same under h2o-int4 (--codec; memory is what the codec stores: codes,
                                scales, windows, group table), with restore_vs_prefill_h2o_int4
  follow_up_speedup=<x>         a follow-up question: a fresh prefill's time over the time with prefix
                                reuse (restore + the question's chunk); same_tokens says both gave the
                                same answer

usage: python benchmarks/saved_cache.py [--model SPEC] [--tokens 4096] [--chunk-size 512] [--codec int4|none]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import prompt_of_length  # noqa: E402
from kvstudio.core.runtime.engine import Engine, GenerationSettings  # noqa: E402
from kvstudio.core.models.loading import load_model  # noqa: E402
from kvstudio.core.spec import create_policy  # noqa: E402
from kvstudio.core.storage import StorageConfig, attach  # noqa: E402
from kvstudio.core.persist.prompt_cache import PromptCache, PromptCacheSession  # noqa: E402
from kvstudio.core.units import format_bytes  # noqa: E402

FOLLOW_UP = "\n\nAnother question: what is the first word of the text? Answer:"


def run_with_cache(engine, cache: PromptCache, ids: list[int], policy, settings):
    """One run through the prompt cache: (result, session, seconds until the first token)."""
    started = time.perf_counter()
    session = PromptCacheSession(cache, engine, policy, settings, ids)
    session.prepare()
    result = engine.generate(ids, policy, settings, **session.generate_options())
    until_first_token = time.perf_counter() - started - result.decode_seconds
    saving = time.perf_counter()
    session.finish()
    session.save_seconds = time.perf_counter() - saving
    return result, session, until_first_token


def measure(engine, ids, policy, settings, folder: Path, label: str) -> dict:
    cache = PromptCache(folder / label)
    fresh, saved, _ = run_with_cache(engine, cache, ids, policy, settings)
    restored, session, _ = run_with_cache(engine, cache, ids, policy, settings)
    assert saved.status == "saved" and session.status == "restored", (saved.status, session.status)
    file_bytes = saved.saved[-1].stat().st_size
    memory_bytes = _cache_bytes(saved.saved[-1])
    same = restored.token_ids == fresh.token_ids
    # Reading, checking and decompressing the file, then putting the tensors back into the cache.
    restore_seconds = session.restore_seconds + restored.prefill_seconds
    print(f"{label}: prefill {fresh.prefill_seconds:.2f} s, save {saved.save_seconds:.2f} s, restore "
          f"{restore_seconds:.3f} s; file {format_bytes(file_bytes)} vs memory {format_bytes(memory_bytes)}; "
          f"same tokens: {same}")
    return {"prefill": fresh.prefill_seconds, "restore": restore_seconds,
            "ratio": file_bytes / memory_bytes, "same": same, "cache": cache}


def _cache_bytes(path: Path) -> int:
    from kvstudio.core.persist.saved_cache import read_header

    return read_header(path)["cache_bytes"]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="default")
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--chunk-size", type=int, default=512)
    parser.add_argument("--codec", default="int4", help="also measure h2o stored with this codec ('none': skip)")
    args = parser.parse_args()

    engine = Engine(load_model(args.model))
    ids = prompt_of_length(engine, args.tokens)
    settings = GenerationSettings(max_new_tokens=8, chunk_size=args.chunk_size, memory_sample_hz=0)
    print(f"{engine.loaded.describe()}; prompt {len(ids)} tokens, chunk {args.chunk_size}, 8 new tokens")
    with tempfile.TemporaryDirectory() as temporary:
        folder = Path(temporary)
        full_policy = create_policy("full")
        full = measure(engine, ids, full_policy, settings, folder, "full")
        h2o = measure(engine, ids, create_policy("h2o", budget=256), settings, folder, "h2o-256")
        quantized = None
        if args.codec != "none":
            policy = attach(create_policy("h2o", budget=256), StorageConfig(codec=args.codec))
            quantized = measure(engine, ids, policy, settings, folder, f"h2o-256-{args.codec}")
        # A follow-up question after the same document: its first len(ids) tokens are saved already.
        follow_up = ids + engine.tokenizer(FOLLOW_UP, add_special_tokens=False)["input_ids"]
        fresh = engine.generate(follow_up, full_policy, settings)
        reused, session, with_reuse = run_with_cache(engine, full["cache"], follow_up, full_policy, settings)
    same = reused.token_ids == fresh.token_ids
    print(f"follow-up question ({len(follow_up)} tokens): prompt cache {session.status}; fresh prefill "
          f"{fresh.prefill_seconds:.2f} s, with reuse {with_reuse:.2f} s (restore {session.restore_seconds:.3f} s "
          f"+ {len(follow_up) - len(session.start.token_ids)} tokens)")
    print(f"restore_vs_prefill={full['restore'] / full['prefill']:.3f}")
    print(f"restore_vs_prefill_h2o={h2o['restore'] / h2o['prefill']:.3f}")
    print(f"file_bytes_ratio_full={full['ratio']:.3f}")
    print(f"file_bytes_ratio_h2o={h2o['ratio']:.3f}")
    if quantized is not None:
        print(f"restore_vs_prefill_h2o_{args.codec}={quantized['restore'] / quantized['prefill']:.3f}")
        print(f"file_bytes_ratio_h2o_{args.codec}={quantized['ratio']:.3f}")
    print(f"follow_up_speedup={fresh.prefill_seconds / with_reuse:.1f} same_tokens={same}")
    return 0 if full["same"] and h2o["same"] and (quantized is None or quantized["same"]) and same else 1


if __name__ == "__main__":
    sys.exit(main())
