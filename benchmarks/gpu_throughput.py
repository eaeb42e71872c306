"""GPU speed of every built-in policy against `full`, and of `full` against the memory-bandwidth limit.

A 1B-class model with random weights (Llama-3.2-1B's shape: 16 layers, 2048 wide, 32 query / 8 KV
heads, a 128k vocabulary tied to the output; weights do not change the speed of a forward pass, so
nothing is downloaded), in bfloat16. For each prompt length (1k, 8k, 32k tokens) and each built-in
policy: prefill ms/token in one chunk and in `--chunk` chunks, decode ms/token, and each as a ratio to
`full`'s, beside the targets (prefill <= 1.3x, decode <= 1.2x). `model.generate` is measured beside
`full` on the same prompt.

Decoding one token reads every weight once and every cached key and value once, so its time is
bounded below by (weight bytes + cache bytes) / bandwidth; the bandwidth is the GPU's peak from a
table of known GPUs (else a measured device copy, printed either way). The target: `full` decode at
>= 0.5 of that limit.

`--smoke` runs the same loop on the CPU with a tiny model of the same shape family, in well under a
minute, so the script is known to work before a GPU is lent.

usage: python benchmarks/gpu_throughput.py [--lengths 1024,8192,32768] [--policies full,h2o,...]
       python benchmarks/gpu_throughput.py --smoke
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

from kvstudio.core.models.loading import LoadedModel  # noqa: E402
from kvstudio.core.models.tiny import byte_tokenizer  # noqa: E402
from kvstudio.core.policies import BUILT_IN, available_policies, source_of  # noqa: E402
from kvstudio.core.runtime.engine import Engine, GenerationSettings  # noqa: E402
from kvstudio.core.spec import create_policy  # noqa: E402

# Peak memory bandwidth, bytes/s, from the vendors' data sheets; matched against the device name in order.
KNOWN_BANDWIDTH = [
    ("H200", 4.8e12), ("H100 NVL", 3.9e12), ("H100 PCIe", 2.0e12), ("H100", 3.35e12), ("GH200", 4.0e12),
    ("B200", 8.0e12), ("A100-SXM4-80GB", 2.039e12), ("A100 80GB PCIe", 1.935e12), ("A100", 1.555e12),
    ("L40S", 0.864e12), ("L40", 0.864e12), ("L4", 0.3e12), ("A10G", 0.6e12), ("A10", 0.6e12),
    ("RTX 6000 Ada", 0.96e12), ("RTX A6000", 0.768e12), ("RTX 4090", 1.008e12), ("RTX 3090", 0.936e12),
    ("V100", 0.9e12), ("T4", 0.32e12),
]

LLAMA_3_2_1B = dict(vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                    num_attention_heads=32, num_key_value_heads=8, head_dim=64, max_position_embeddings=131072,
                    rope_theta=500000.0, tie_word_embeddings=True,
                    rope_scaling=dict(rope_type="llama3", factor=32.0, low_freq_factor=1.0, high_freq_factor=4.0,
                                      original_max_position_embeddings=8192))
SMOKE = dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, head_dim=16, max_position_embeddings=4096, tie_word_embeddings=True)
TARGETS = {"prefill": 1.3, "decode": 1.2, "bandwidth": 0.5}


def sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def copy_bandwidth(device, nbytes: int) -> float:
    """Bytes per second a device-to-device copy moves, counting bytes read and written."""
    source = torch.empty(nbytes, dtype=torch.uint8, device=device)
    target = torch.empty_like(source)
    for _ in range(3):
        target.copy_(source)
    sync(device)
    started = time.perf_counter()
    for _ in range(10):
        target.copy_(source)
    sync(device)
    return 2 * nbytes * 10 / (time.perf_counter() - started)


def peak_bandwidth(device) -> tuple[float | None, str]:
    """(the table's peak for this GPU, its name); (None, name) for a GPU not in the table or the CPU."""
    if device.type != "cuda":
        return None, "cpu"
    name = torch.cuda.get_device_name(device)
    return next((value for key, value in KNOWN_BANDWIDTH if key in name), None), name


def random_model(shape: dict, dtype, device) -> LoadedModel:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM(LlamaConfig(**shape)).to(dtype)
    model.eval()
    name = "random Llama-3.2-1B shape" if shape is LLAMA_3_2_1B else "random tiny Llama"
    return LoadedModel(model, byte_tokenizer(), name, name, torch.device(device), dtype)


def built_in_policies() -> list[str]:
    return [name for name in available_policies() if source_of(name) == BUILT_IN]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="the CPU, a tiny model, short prompts: that it works")
    parser.add_argument("--lengths", default=None, help="prompt lengths, comma-separated (default 1024,8192,32768)")
    parser.add_argument("--policies", default=None, help="comma-separated (default: every built-in policy)")
    parser.add_argument("--budget", type=int, default=None, help="budgeted policies' budget (default 1024; smoke 48)")
    parser.add_argument("--chunk", type=int, default=None, help="the chunked prefill's chunk (default 512; smoke 16)")
    parser.add_argument("--new-tokens", type=int, default=None, help="decode steps timed (default 64; smoke 4)")
    parser.add_argument("--rounds", type=int, default=None, help="interleaved rounds, medians (default 3; smoke 1)")
    args = parser.parse_args()
    smoke = args.smoke
    lengths = [int(x) for x in (args.lengths or ("64,128" if smoke else "1024,8192,32768")).split(",")]
    names = args.policies.split(",") if args.policies else built_in_policies()
    names = ["full"] + [name for name in names if name != "full"]
    budget = args.budget or (48 if smoke else 1024)
    chunk = args.chunk or (16 if smoke else 512)
    new_tokens = args.new_tokens or (4 if smoke else 64)
    rounds = args.rounds or (1 if smoke else 3)
    if not smoke and not torch.cuda.is_available():
        print("no CUDA device: run with --smoke for the CPU check", file=sys.stderr)
        return 2
    device = torch.device("cpu" if smoke else "cuda")
    loaded = random_model(SMOKE if smoke else LLAMA_3_2_1B, torch.float32 if smoke else torch.bfloat16, device)
    engine = Engine(loaded)
    model = engine.model
    measured = copy_bandwidth(device, 2**26 if smoke else 2**30)
    peak, device_name = peak_bandwidth(device)
    bandwidth = peak or measured
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    embedding = model.get_input_embeddings().weight
    if model.get_output_embeddings().weight is not embedding:  # untied: one embedding row is read, not the table
        weight_bytes -= embedding.numel() * embedding.element_size()
    entry_bytes = 2 * loaded.n_kv_heads * loaded.head_dim * embedding.element_size()  # one entry of one layer, K+V
    print(f"{device_name}; {loaded.describe()}; weights read per token {weight_bytes / 2**20:.0f} MiB; bandwidth "
          f"{'peak %.2f TB/s (table), ' % (peak / 1e12) if peak else ''}measured copy {measured / 1e12:.2f} TB/s; "
          f"budget {budget}, chunk {chunk}, {new_tokens} new tokens, {rounds} rounds, greedy", flush=True)

    def engine_run(name, ids, chunk_size, n_new):
        policy = create_policy(name) if name == "full" else create_policy(name, budget=budget)
        settings = GenerationSettings(max_new_tokens=n_new, chunk_size=chunk_size, ignore_eos=True, memory_sample_hz=0)
        return engine.generate(ids, policy, settings)

    def generate_run(ids, n_new):
        prompt = torch.tensor([ids], device=device)
        with torch.inference_mode():
            model.generate(prompt, max_new_tokens=n_new, min_new_tokens=n_new, do_sample=False,
                           attention_mask=torch.ones_like(prompt))

    failures = []
    for length in lengths:
        generator = torch.Generator().manual_seed(length)
        # Ids the byte tokenizer can name (the run's first event lists each prompt token's text).
        ids = torch.randint(10, 250, (length,), generator=generator).tolist()
        results: dict[tuple[str, str], list[float]] = {}
        kept: dict[str, float] = {}

        def note(key, value):
            results.setdefault(key, []).append(value)

        for name in names:  # warm-up: kernels compiled, allocator grown
            engine_run(name, ids[:min(length, 2 * chunk)], chunk, 2)
        generate_run(ids[:min(length, 2 * chunk)], 2)
        for _ in range(rounds):
            sync(device)
            started = time.perf_counter()
            generate_run(ids, 1)
            sync(device)
            prefill_s = time.perf_counter() - started
            started = time.perf_counter()
            generate_run(ids, new_tokens)
            sync(device)
            note(("generate", "prefill one chunk"), prefill_s * 1000 / length)
            note(("generate", "decode"), (time.perf_counter() - started - prefill_s) * 1000 / (new_tokens - 1))
            for name in names:
                for label, size in (("prefill one chunk", length), ("prefill chunked", chunk)):
                    result = engine_run(name, ids, size, 1)
                    note((name, label), result.prefill_seconds * 1000 / length)
                result = engine_run(name, ids, chunk, new_tokens)
                note((name, "decode"), result.decode_seconds * 1000 / (len(result.token_ids) - 1))
                kept[name] = sum(result.kept_per_layer)
        median = {key: statistics.median(values) for key, values in results.items()}
        print(f"\nprompt {length} tokens: ms/token (ratio to full; target)")
        print(f"  {'':<16} {'prefill one chunk':>26} {'prefill chunked':>26} {'decode':>26}  decode vs bandwidth limit")
        for name in ["generate"] + names:
            cells = []
            for label in ("prefill one chunk", "prefill chunked", "decode"):
                value = median.get((name, label))
                if value is None:
                    cells.append(f"{'-':>26}")
                    continue
                ratio = value / median[("full", label)]
                target = TARGETS["decode" if label == "decode" else "prefill"]
                mark = "" if name in ("generate", "full") or smoke else (" ok" if ratio <= target else " MISS")
                if mark == " MISS":
                    failures.append(f"{name} {label} at {length}: {ratio:.2f}x full (target {target}x)")
                cells.append(f"{value:10.4f} ({ratio:5.2f}x; {target}x){mark:>5}" if name not in ("generate", "full")
                             else f"{value:10.4f} ({ratio:5.2f}x){'':>11}")
            floor = ""
            if name in kept:
                floor_ms = (weight_bytes + kept[name] * entry_bytes) / bandwidth * 1000
                fraction = floor_ms / median[(name, "decode")]
                floor = f"{fraction:5.2f} (floor {floor_ms:.3f} ms)"
                if name == "full" and fraction < TARGETS["bandwidth"] and not smoke:
                    failures.append(f"full decode at {length}: {fraction:.2f} of the bandwidth limit "
                                    f"(target {TARGETS['bandwidth']})")
            print(f"  {name:<16} {' '.join(cells)}  {floor}")
        print(f"full_decode_fraction_of_bandwidth_limit_{length}="
              f"{(weight_bytes + kept['full'] * entry_bytes) / bandwidth * 1000 / median[('full', 'decode')]:.3f}")
        print(f"ratio_engine_full_vs_generate_decode_{length}="
              f"{median[('full', 'decode')] / median[('generate', 'decode')]:.3f}")
    if smoke:
        print("\nsmoke run on the CPU: the figures say the script works, not how fast a GPU is (targets not judged)")
    else:
        print("\ntargets " + ("met" if not failures else "missed:\n  " + "\n  ".join(failures)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
