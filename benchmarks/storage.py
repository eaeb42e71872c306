"""Cache storage side by side: codecs fp/int8/int4 under h2o (fixed budget) and full, the
transformers QuantizedCache peer, and preallocated buffers against torch.cat storage.

For each policy and codec, one run teacher-forced along real prose (Python's own documentation,
pydoc_data.topics): a ~2k-token prompt prefilled in chunks of 512, then --new-tokens decode steps
fed the text's own next tokens, so every codec sees the same tokens. Reported: peak cache bytes
ratio to fp (targets at group size 64, residual 0, of fp32 storage: int8 <= 0.30, int4 <= 0.17),
decode ms/token ratio to fp (medians over the decode steps), and KL(fp || codec) of the next-token
distribution at the prompt's end and every decode step. The peer is
transformers' QuantizedCache (quanto backend, 4 bits, q_group_size 64, its default residual 128)
under full on the same tokens: bytes (packed data, scales, shifts and its residual) and KL. Then
the decode ms/token of `full` in preallocated buffers against the same run with torch.cat storage
(the storage before this change), after a short and a long prompt (generated, --new-tokens). Ends with
bytes_ratio_int8_vs_fp_B=, bytes_ratio_int4_vs_fp_B=, kl_int8_vs_fp_B=, kl_int4_vs_fp_B= for each h2o budget B
(default 256 and 1024; the first also without the suffix, the names of before). --only-h2o runs the h2o rows
alone (no full rows, peer or timings).

For each codec run it also says what the peak held, as fractions of the fp peak: encoded rows (codes,
per-token scales, each key's group slot), full-precision windows (empty with residual 0), 8-bit tails
(each KV head's incomplete key group, at most group size - 1 keys, held per token in 8 bits) and group
tables (per-channel key scales of the groups held: keys are grouped over the entries a head keeps,
after the policy has run, so h2o's scattered heavy hitters fill whole groups).

usage: python benchmarks/storage.py [--model SPEC] [--budgets 256,1024] [--prompt-tokens 2000]
                                    [--new-tokens 32] [--short 1000] [--long 8000] [--codecs fp,int8,int4]
                                    [--only-h2o]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
sys.path.insert(0, os.path.dirname(__file__))

import torch  # noqa: E402

from kvstudio.core.runtime.cache_keyword import cache_kwargs  # noqa: E402
from kvstudio.core.runtime.engine import Engine, GenerationSettings  # noqa: E402
from kvstudio.core.models.loading import load_model  # noqa: E402
from kvstudio.core.spec import create_policy  # noqa: E402
from kvstudio.core.storage import StorageConfig, attach  # noqa: E402
from kvstudio.core.evaluate.codec_error import teacher_forced  # noqa: E402

CODECS = ("fp", "int8", "int4")


def prose_ids(engine, n_tokens: int) -> list[int]:
    """n_tokens of real English prose: Python's bundled documentation topics."""
    from pydoc_data.topics import topics

    text = "\n\n".join(topics[name] for name in sorted(topics))
    return engine.encode(text)[:n_tokens]


def median_decode_ms(steps) -> float:
    return statistics.median(step.seconds * 1000 for step in steps if step.phase == "decode")


def kl(reference: torch.Tensor, measured: torch.Tensor) -> float:
    return float((reference.exp() * (reference - measured)).sum(dim=-1).mean())


def tensor_bytes(obj) -> int:
    """Bytes of a tensor or a quanto tensor subclass (its packed data, scales and shifts)."""
    if obj is None:
        return 0
    if hasattr(obj, "__tensor_flatten__"):
        names, _ = obj.__tensor_flatten__()
        return sum(tensor_bytes(getattr(obj, name)) for name in names)
    return obj.numel() * obj.element_size()


def peer_quantized_cache(engine, ids: list[int], prompt_tokens: int, reference: torch.Tensor):
    """transformers' QuantizedCache (quanto, 4 bits) teacher-forced along ids: (peak bytes, KL) or None."""
    try:
        from transformers import QuantizedCache

        cache = QuantizedCache(backend="quanto", config=engine.model.config, nbits=4, q_group_size=64)
    except Exception as error:  # noqa: BLE001 - the peer is optional: say why it is missing
        print(f"  peer QuantizedCache unavailable: {type(error).__name__}: {error}")
        return None
    model, peak, rows = engine.model, 0, []
    with torch.inference_mode():
        feed = [ids[:prompt_tokens]] + [[token] for token in ids[prompt_tokens:]]
        seen = 0
        for chunk in feed:
            positions = torch.arange(seen, seen + len(chunk))[None]
            out = model(input_ids=torch.tensor([chunk]), position_ids=positions, **cache_kwargs(model, cache),
                        use_cache=True, logits_to_keep=1)
            seen += len(chunk)
            rows.append(out.logits[0, -1])
            held = sum(tensor_bytes(getattr(layer, "_quantized_keys", None))
                       + tensor_bytes(getattr(layer, "_quantized_values", None))
                       + tensor_bytes(layer.keys) + tensor_bytes(layer.values) for layer in cache.layers)
            peak = max(peak, held)
    measured = torch.log_softmax(torch.stack(rows).float(), dim=-1)
    return peak, kl(reference, measured)


def peak_parts(engine: Engine) -> tuple[Engine, dict]:
    """The engine, and a dict that gets what the stores held at the run's peak (QuantizedStore.byte_parts)."""
    original, at_peak = engine.new_cache, {}

    def new_cache(policy):
        cache = original(policy)
        note_bytes = cache.note_bytes

        def noting(delta):
            note_bytes(delta)
            if delta > 0 and cache.current_bytes == cache.peak_bytes:
                parts = [layer.store.byte_parts() for layer in cache.layers if hasattr(layer.store, "byte_parts")
                         and layer.store.window]
                at_peak.clear()
                at_peak.update({name: sum(p[name] for p in parts) for name in (parts[0] if parts else {})})
                at_peak["tail_keys"] = max((max(layer.store.tails["key"].lengths, default=0) for layer in cache.layers
                                            if getattr(layer.store, "tails", {}).get("key") is not None), default=0)

        cache.note_bytes = noting
        return cache

    engine.new_cache = new_cache
    return engine, at_peak


def cat_storage(engine: Engine) -> Engine:
    """The same engine with the storage of before: torch.cat on append, index_select on eviction."""
    original = engine.new_cache

    def new_cache(policy):
        cache = original(policy)
        for layer in cache.layers:
            layer.store.entries.out_of_place = True
        return cache

    engine.new_cache = new_cache
    return engine


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="default")
    parser.add_argument("--budgets", type=lambda text: [int(b) for b in text.split(",") if b.strip()],
                        default=[256, 1024], help="h2o budgets, one row each per codec (default 256,1024)")
    parser.add_argument("--prompt-tokens", type=int, default=2000)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--group-size", type=int, default=64)
    parser.add_argument("--short", type=int, default=1000)
    parser.add_argument("--long", type=int, default=8000)
    parser.add_argument("--only-h2o", action="store_true",
                        help="only the h2o rows: no full rows, transformers' QuantizedCache or buffer timings")
    parser.add_argument("--codecs", default=",".join(CODECS),
                        help="comma-separated, fp first (on CUDA: fp,int8,int4,bnb-int8,bnb-int4)")
    args = parser.parse_args()

    engine, at_peak = peak_parts(Engine(load_model(args.model)))
    loaded = engine.loaded
    print(f"model {loaded.describe()}; prompt {args.prompt_tokens} tokens of prose, {args.new_tokens} new tokens, "
          f"h2o budgets {', '.join(map(str, args.budgets))}, group size {args.group_size}, residual 0")
    ids = prose_ids(engine, args.prompt_tokens + args.new_tokens - 1)
    policies = {f"h2o@{budget}": ("h2o", {"budget": budget}) for budget in args.budgets}
    policies |= {} if args.only_h2o else {"full": ("full", {})}
    peer = None
    figures: dict[tuple[str, str], dict] = {}
    for name, (policy_name, params) in policies.items():
        reference = None
        for codec in args.codecs.split(","):
            policy = attach(create_policy(policy_name, **params), StorageConfig(codec=codec, group_size=args.group_size))
            started = time.perf_counter()
            logprobs, run = teacher_forced(engine, ids, args.prompt_tokens, policy, 512)
            reference = logprobs if codec == "fp" else reference
            figures[(name, codec)] = {"bytes": run.cache.peak_bytes, "ms": median_decode_ms(run.records),
                                      "kl": kl(reference, logprobs)}
            row = figures[(name, codec)]
            print(f"  ran {name}-{codec} in {time.perf_counter() - started:.1f} s: peak {row['bytes']:,} bytes, "
                  f"{row['ms']:.2f} decode ms/token, KL to fp {row['kl']:.5f}", flush=True)
            if codec != "fp" and "encoded" in at_peak:
                fp_bytes = figures[(name, "fp")]["bytes"]
                print(f"    at its peak, of the fp peak: encoded {at_peak['encoded'] / fp_bytes:.3f}, "
                      f"full-precision windows {at_peak['windows'] / fp_bytes:.3f}, tails (8-bit, fp16 under int8) "
                      f"{at_peak['tails'] / fp_bytes:.3f} (up to {at_peak['tail_keys']} keys a KV head), "
                      f"group tables {at_peak['group_tables'] / fp_bytes:.3f}", flush=True)
        if name == "full":
            peer = peer_quantized_cache(engine, ids, args.prompt_tokens, reference)

    print(f"\n{'cache':<17} {'peak bytes':>12} {'ratio':>7} {'decode ms/tok':>14} {'ratio':>7} {'KL to fp':>10}")
    for (name, codec), row in figures.items():
        fp = figures[(name, "fp")]
        print(f"{name + '-' + codec:<17} {row['bytes']:>12,} {row['bytes'] / fp['bytes']:>7.3f} {row['ms']:>14.2f} "
              f"{row['ms'] / fp['ms']:>7.3f} {row['kl']:>10.5f}")
    if peer is not None:
        peer_bytes, peer_kl = peer
        print(f"{'quanto-int4':<17} {peer_bytes:>12,} {peer_bytes / figures[('full', 'fp')]['bytes']:>7.3f} "
              f"{'':>14} {'':>7} {peer_kl:>10.5f}   (transformers QuantizedCache, full, residual 128)")

    for length in () if args.only_h2o else (args.short, args.long):
        if length == args.short:
            print("\nfull, decode ms/token: preallocated buffers vs torch.cat storage")
        timing(engine, loaded, args, length)
    for budget in args.budgets:  # the first budget's figures also under the names of before (one budget)
        name = f"h2o@{budget}"
        suffixes = [f"_{budget}"] + ([""] if budget == args.budgets[0] else [])
        for suffix in suffixes:
            for codec in ("int8", "int4"):
                if (name, codec) in figures:
                    ratio = figures[(name, codec)]["bytes"] / figures[(name, "fp")]["bytes"]
                    print(f"bytes_ratio_{codec}_vs_fp{suffix}={ratio:.3f}")
            for codec in ("int8", "int4"):
                if (name, codec) in figures:
                    print(f"kl_{codec}_vs_fp{suffix}={figures[(name, codec)]['kl']:.5f}")
    return 0


def timing(engine, loaded, args, length: int) -> None:
    """Decode ms/token of `full` after a prompt of `length`, in preallocated buffers and with torch.cat."""
    timing_settings = GenerationSettings(max_new_tokens=args.new_tokens, chunk_size=512, ignore_eos=True,
                                         memory_sample_hz=0)
    prompt = prose_ids(engine, length)
    if len(prompt) < length:
        prompt = (prompt * (length // len(prompt) + 1))[:length]
    preallocated = median_decode_ms(engine.generate(prompt, create_policy("full"), timing_settings).steps)
    concatenated = median_decode_ms(cat_storage(Engine(loaded)).generate(prompt, create_policy("full"),
                                                                         timing_settings).steps)
    print(f"  prompt {length:>5}: preallocated {preallocated:7.2f} ms, torch.cat {concatenated:7.2f} ms, "
          f"ratio {preallocated / concatenated:.3f}")
    print(f"decode_ms_ratio_prealloc_vs_cat_{length}={preallocated / concatenated:.3f}")


if __name__ == "__main__":
    sys.exit(main())
