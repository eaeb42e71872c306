"""Saved caches: restoring a prompt's cache against computing it, file size against memory, and a
follow-up question on the same document with prefix reuse.

Prints, for a ~4k-token prompt on the default model:
  restore_vs_prefill=<x>        restore (read, verify, decompress, put back) over prefill time, `full`
                                (target <= 0.1)
  file_bytes_ratio_full=<x>     file bytes over in-memory cache bytes, `full`
  file_bytes_ratio_h2o=<x>      the same under h2o at budget 256 (policy state included)
  follow_up_speedup=<x>         a second question on the same document: a fresh prefill's time over
                                the time with prefix reuse through a prompt-cache folder (restore + the
                                question's chunk), and whether both gave the same tokens

usage: python benchmarks/saved_cache.py [--model SPEC] [--tokens 4096] [--chunk-size 512]
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
from kvstudio.core.engine import Engine, GenerationSettings  # noqa: E402
from kvstudio.core.models import load_model  # noqa: E402
from kvstudio.core.policies import create_policy  # noqa: E402
from kvstudio.core.store.prompt_cache import PromptCache, PromptCacheSession  # noqa: E402
from kvstudio.core.store.saved_cache import load_saved_cache, write_saved_cache  # noqa: E402
from kvstudio.core.units import format_bytes  # noqa: E402


def measure(engine, ids, policy, settings, folder: Path, label: str) -> dict:
    """Prefill once (keeping the state), save it, then restore it and take the first token."""
    states = []
    fresh = engine.generate(ids, policy, settings, on_prefill_state=states.append)
    state = next(s for s in states if len(s.token_ids) == len(ids))
    info = write_saved_cache(folder / f"{label}.kvcache", state, engine.loaded, policy, settings)
    started = time.perf_counter()
    _, restored_state, _ = load_saved_cache(info.path, engine.loaded, policy, settings.chunk_size)
    restored = engine.generate(ids, policy, settings, start=restored_state)
    restore_seconds = time.perf_counter() - started - restored.decode_seconds - _first_token_seconds(restored)
    same = restored.token_ids == fresh.token_ids
    print(f"{label}: prefill {fresh.prefill_seconds:.2f} s, save {info.seconds:.2f} s, restore {restore_seconds:.3f} s; "
          f"file {format_bytes(info.file_bytes)} vs memory {format_bytes(info.memory_bytes)}; same tokens: {same}")
    return {"prefill": fresh.prefill_seconds, "restore": restore_seconds, "ratio": info.file_bytes / info.memory_bytes,
            "same": same}


def _first_token_seconds(result) -> float:
    return 0.0  # the first token is sampled from saved logits: no forward step to subtract


def follow_up(engine, ids_document_text: str, policy, settings, folder: Path) -> tuple[float, bool]:
    first_prompt = ids_document_text + "\n\nQuestion: what is the pass key? Answer:"
    second_prompt = ids_document_text + "\n\nQuestion: what is the first word of the text? Answer:"
    cache = PromptCache(folder / "prompts")
    for prompt in (first_prompt,):  # the first question fills the prompt cache
        session = PromptCacheSession(cache, engine, policy, settings, engine.encode(prompt), prompt)
        session.prepare()
        engine.generate(session.ids, policy, settings, **session.generate_options())
        session.finish()
    fresh = engine.generate(second_prompt, policy, settings)
    started = time.perf_counter()
    session = PromptCacheSession(cache, engine, policy, settings, engine.encode(second_prompt), second_prompt)
    session.prepare()
    reused = engine.generate(session.ids, policy, settings, **session.generate_options())
    with_reuse = time.perf_counter() - started - reused.decode_seconds
    print(f"follow-up question: prompt cache {session.status}; fresh prefill {fresh.prefill_seconds:.2f} s, with reuse "
          f"{with_reuse:.2f} s (restore {session.restore_seconds:.3f} s + the rest)")
    return fresh.prefill_seconds / with_reuse, reused.token_ids == fresh.token_ids


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="default")
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--chunk-size", type=int, default=512)
    args = parser.parse_args()

    engine = Engine(load_model(args.model))
    ids = prompt_of_length(engine, args.tokens)
    settings = GenerationSettings(max_new_tokens=1, chunk_size=args.chunk_size, memory_sample_hz=0)
    print(f"{engine.loaded.describe()}; prompt {len(ids)} tokens, chunk {args.chunk_size}")
    with tempfile.TemporaryDirectory() as temporary:
        folder = Path(temporary)
        full = measure(engine, ids, create_policy("full"), settings, folder, "full")
        h2o = measure(engine, ids, create_policy("h2o", budget=256), settings, folder, "h2o-256")
        document = engine.tokenizer.decode(ids[1:] if ids[0] == engine.tokenizer.bos_token_id else ids)
        speedup, same = follow_up(engine, document, create_policy("full"), settings, folder)
    print(f"restore_vs_prefill={full['restore'] / full['prefill']:.3f}")
    print(f"restore_vs_prefill_h2o={h2o['restore'] / h2o['prefill']:.3f}")
    print(f"file_bytes_ratio_full={full['ratio']:.3f}")
    print(f"file_bytes_ratio_h2o={h2o['ratio']:.3f}")
    print(f"follow_up_speedup={speedup:.1f} same_tokens={same}")
    return 0 if full["same"] and h2o["same"] and same else 1


if __name__ == "__main__":
    sys.exit(main())
