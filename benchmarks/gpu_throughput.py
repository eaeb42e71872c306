"""GPU speed of the engine against the memory-bandwidth limit and against `model.generate`.

Decoding one token reads every weight once and every cached key and value once, so on a GPU its
time is bounded below by (weight bytes + cache bytes) / memory bandwidth. This script measures the
bandwidth (a device-to-device copy), then for `full` and for h2o at a budget: prefill tokens/s
(one chunk and 512-token chunks) and decode tokens/s, each next to `model.generate` on the same
model and prompt, and the decode time as a multiple of the bandwidth floor.

Weights are random (`--random-weights CONFIG_DIR`: a model folder's config and tokenizer; weights
do not change the speed of a forward pass), so it runs where the real weights cannot travel.
`--scale-to-1b` widens the config to a TinyLlama-1.1B shape, where weights dominate the bytes read.

usage: python benchmarks/gpu_throughput.py --random-weights DIR [--scale-to-1b] [--prompt-tokens 2048]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

from kvstudio.core.runtime.engine import Engine, GenerationSettings  # noqa: E402
from kvstudio.core.models.loading import LoadedModel  # noqa: E402
from kvstudio.core.spec import create_policy  # noqa: E402


def measured_bandwidth(device) -> float:
    """Bytes per second a device-to-device copy moves, counting bytes read and written."""
    source = torch.empty(2**30, dtype=torch.uint8, device=device)
    target = torch.empty_like(source)
    for _ in range(3):
        target.copy_(source)
    torch.cuda.synchronize()
    started = time.perf_counter()
    for _ in range(10):
        target.copy_(source)
    torch.cuda.synchronize()
    return 2 * source.numel() * 10 / (time.perf_counter() - started)


def random_model(folder: str, scale_to_1b: bool, dtype, device) -> LoadedModel:
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    config = AutoConfig.from_pretrained(folder)
    if scale_to_1b:  # TinyLlama-1.1B's shape, keeping the tokenizer's vocabulary
        config.update(dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22,
                           num_attention_heads=32, num_key_value_heads=4, head_dim=64, tie_word_embeddings=False))
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation="sdpa")
    model.eval()
    name = "random-1.1B-shape" if scale_to_1b else "random-" + os.path.basename(folder.rstrip("/"))
    return LoadedModel(model, AutoTokenizer.from_pretrained(folder), name, name, torch.device(device), dtype)


def timed(fn):
    torch.cuda.synchronize()
    started = time.perf_counter()
    value = fn()
    torch.cuda.synchronize()
    return time.perf_counter() - started, value


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--random-weights", required=True, metavar="DIR")
    parser.add_argument("--scale-to-1b", action="store_true")
    parser.add_argument("--prompt-tokens", type=int, default=2048)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--budget", type=int, default=256)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()

    device = "cuda"
    loaded = random_model(args.random_weights, args.scale_to_1b, torch.bfloat16, device)
    engine = Engine(loaded)
    model = engine.model
    bandwidth = measured_bandwidth(device)
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(100, loaded.config.vocab_size - 100, (args.prompt_tokens,), generator=generator).tolist()
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    # One embedding row is read per token, not the whole table (unless it is tied to the output layer).
    embedding = model.get_input_embeddings().weight
    if model.get_output_embeddings().weight is not embedding:
        weight_bytes -= embedding.numel() * embedding.element_size()
    per_entry = 2 * loaded.n_layers * loaded.n_kv_heads * loaded.head_dim * 2  # keys + values, bf16
    print(f"{torch.cuda.get_device_name()}; {loaded.describe()}; weights read per token "
          f"{weight_bytes / 2**20:.0f} MiB; copy bandwidth {bandwidth / 1e12:.2f} TB/s; prompt "
          f"{len(ids)} random tokens, {args.new_tokens} new, greedy", flush=True)

    results: dict[str, list[float]] = {}

    def note(key, value):
        results.setdefault(key, []).append(value)

    def hf_generate(n_new):
        prompt = torch.tensor([ids], device=device)
        return model.generate(prompt, max_new_tokens=n_new, min_new_tokens=n_new, do_sample=False,
                              attention_mask=torch.ones_like(prompt))

    def engine_run(name, chunk, n_new):
        policy = create_policy(name) if name == "full" else create_policy(name, budget=args.budget)
        settings = GenerationSettings(max_new_tokens=n_new, chunk_size=chunk, ignore_eos=True, memory_sample_hz=0)
        return engine.generate(ids, policy, settings)

    hf_generate(4), engine_run("h2o", 512, 4), engine_run("full", len(ids), 4)  # warm-up, kernels compiled
    for _ in range(args.rounds):
        prefill_s, _ = timed(lambda: hf_generate(1))
        total_s, _ = timed(lambda: hf_generate(args.new_tokens))
        note("generate prefill tok/s", len(ids) / prefill_s)
        note("generate decode ms/tok", (total_s - prefill_s) * 1000 / (args.new_tokens - 1))
        for name in ("full", "h2o"):
            for label, chunk in (("one chunk", len(ids)), ("chunk 512", 512)):
                prefill_s, _ = timed(lambda: engine_run(name, chunk, 1))
                note(f"{name} prefill tok/s ({label})", len(ids) / prefill_s)
            total_s, result = timed(lambda: engine_run(name, 512, args.new_tokens))
            note(f"{name} decode ms/tok", result.decode_seconds * 1000 / (len(result.token_ids) - 1))

    median = {key: statistics.median(values) for key, values in results.items()}
    for key, value in median.items():
        print(f"  {key:<34} {value:10.2f}")
    seq = len(ids) + args.new_tokens // 2  # the cache's mean length while decoding
    floors = {"full": (weight_bytes + per_entry * seq) / bandwidth * 1000,
              "h2o": (weight_bytes + per_entry * (args.budget + 1)) / bandwidth * 1000}
    for name in ("full", "h2o"):
        ratio = median[f"{name} decode ms/tok"] / floors[name]
        print(f"{name}: decode floor {floors[name]:.3f} ms/token (bytes read / bandwidth); measured "
              f"{median[f'{name} decode ms/tok']:.2f} ms = {ratio:.1f}x the floor, "
              f"{1000 / median[f'{name} decode ms/tok']:.0f} tokens/s")
    print(f"prefill_ratio_engine_full_vs_generate="
          f"{median['full prefill tok/s (one chunk)'] / median['generate prefill tok/s']:.3f}")
    print(f"decode_ratio_engine_full_vs_generate="
          f"{median['full decode ms/tok'] / median['generate decode ms/tok']:.3f}")
    print(f"decode_ratio_h2o_vs_full={median['h2o decode ms/tok'] / median['full decode ms/tok']:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
