"""Fine-tuning through the cache: memory against sequence length, and whether training helps.

(a) Peak memory of one training step (LoRA, loss on a pass-key answer) at 1k, 2k and 4k tokens,
    under h2o at a fixed budget in `through` and `truncated` mode, and under `full` (through).
    Peak bytes: on CUDA the allocator's peak in the step; on CPU the most bytes autograd held for
    the backward pass (unique storages, parameters excluded), which is what the two modes differ
    in. Prints peak_bytes_ratio_4k_vs_1k_truncated=<x> (target <= 1.2) and ..._through=<x>.
(b) A short session on the embedded model: synthetic pass key at about 1k tokens, h2o at a small
    budget, a few dozen steps; prints the validation loss (on the answer tokens) before and after,
    under the policy and under full, and val_loss_ratio_after_vs_before_policy=<x>.

usage: python benchmarks/finetune.py [--model SPEC] [--part a|b|both] [--lengths 1000,2000,4000]
                                     [--budget 128] [--chunk-size 256] [--steps 30] [--validation 8]
                                     [--session-model default]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

from kvstudio.core.runtime.engine import Engine  # noqa: E402
from kvstudio.core.models.loading import load_model  # noqa: E402
from kvstudio.core.spec import create_policy  # noqa: E402
from kvstudio.core.train import lora  # noqa: E402
from kvstudio.cli.finetune import format_step  # noqa: E402
from kvstudio.core.train.data import load_data, passkey_examples  # noqa: E402
from kvstudio.core.train.log import TrainingLog  # noqa: E402
from kvstudio.core.train.session import FinetuneSession, FinetuneSettings  # noqa: E402
from kvstudio.core.train.through_cache import SavedTensorMeter, example_loss  # noqa: E402
from kvstudio.core.units import format_bytes  # noqa: E402


def peak_of_one_step(engine, example, policy, chunk_size, mode) -> tuple[int, float]:
    meter = SavedTensorMeter(engine.model.parameters())
    device = engine.loaded.device
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
    started = time.perf_counter()
    example_loss(engine, example, policy, chunk_size, mode, meter=meter)
    seconds = time.perf_counter() - started
    for parameter in engine.model.parameters():
        parameter.grad = None
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) - base, seconds
    return meter.peak, seconds


def part_a(args) -> None:
    loaded = load_model(args.model)
    engine = Engine(loaded)
    torch.manual_seed(0)
    lora.attach(loaded, lora.LoraSettings())
    lengths = [int(x) for x in args.lengths.split(",")]
    source = "CUDA allocator peak above the model" if loaded.device.type == "cuda" else \
        "bytes autograd held for backward (CPU)"
    print(f"(a) {loaded.describe()}; LoRA rank 8 on attention projections; chunk {args.chunk_size}; "
          f"h2o budget {args.budget}; one training step per cell; peak = {source}")
    configs = [("h2o", "through"), ("h2o", "truncated"), ("full", "through")]
    peaks: dict[tuple[str, str], dict[int, int]] = {}
    print("| policy | mode | " + " | ".join(f"{n} tokens" for n in lengths) + " |")
    print("|---|---|" + "---|" * len(lengths))
    for name, mode in configs:
        cells = []
        for length in lengths:
            example = passkey_examples(loaded.tokenizer, length, 1, seed=length)[0]
            policy = create_policy(name, budget=args.budget) if name != "full" else create_policy("full")
            peak, seconds = peak_of_one_step(engine, example, policy, args.chunk_size, mode)
            peaks.setdefault((name, mode), {})[length] = peak
            cells.append(f"{format_bytes(peak)} ({seconds:.1f} s)")
        print(f"| {name} | {mode} | " + " | ".join(cells) + " |", flush=True)
    lora.detach(loaded)
    first, last = lengths[0], lengths[-1]
    tag = f"{last // 1000}k_vs_{first // 1000}k"
    for (name, mode), by_length in peaks.items():
        suffix = mode if name == "h2o" else f"{mode}_full"
        print(f"peak_bytes_ratio_{tag}_{suffix}={by_length[last] / max(by_length[first], 1):.3f}")


def part_b(args) -> None:
    loaded = load_model(args.session_model)
    engine = Engine(loaded)
    data = load_data("synthetic-passkey", loaded.tokenizer, args.session_len, seed=0, synthetic_count=64,
                     synthetic_validation=args.validation)
    policy = create_policy("h2o", budget=args.session_budget)
    settings = FinetuneSettings(steps=args.steps, learning_rate=args.lr, warmup_steps=3, chunk_size=args.chunk_size,
                                grad_mode="through", eval_every=0, save_every=0, memory_sample_hz=0)
    print(f"(b) {loaded.describe()}; {data.description}; {len(data.train)} training / {len(data.validation)} "
          f"validation examples; policy {policy.describe()}; {args.steps} steps, lr {args.lr}, chunk "
          f"{args.chunk_size}, grad mode through", flush=True)
    def show(event):  # one line per step and validation, as `kvstudio finetune` prints them
        line = format_step(event, args.steps)
        if line and not line.startswith("[kvstudio]"):
            print("   ", line, flush=True)

    with tempfile.TemporaryDirectory() as out:
        result = FinetuneSession(engine, policy, data, settings, out, log=TrainingLog(listener=show)).run()
    seconds = sum(s.seconds for s in result.steps)
    print(f"training: {len(result.steps)} steps in {seconds:.0f} s; loss {result.steps[0].loss:.3f} (step 1) -> "
          f"{result.steps[-1].loss:.3f} (step {result.steps[-1].step})")
    print(f"validation loss under h2o:  {result.initial_val_loss_policy:.4f} -> {result.final_val_loss_policy:.4f}")
    print(f"validation loss under full: {result.initial_val_loss_full:.4f} -> {result.final_val_loss_full:.4f}")
    print(f"val_loss_ratio_after_vs_before_policy={result.final_val_loss_policy / result.initial_val_loss_policy:.3f}")
    print(f"val_loss_ratio_after_vs_before_full={result.final_val_loss_full / result.initial_val_loss_full:.3f}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="default", help="model of part (a)")
    parser.add_argument("--part", choices=("a", "b", "both"), default="both")
    parser.add_argument("--lengths", default="1000,2000,4000")
    parser.add_argument("--budget", type=int, default=128)
    parser.add_argument("--chunk-size", type=int, default=256)
    parser.add_argument("--session-model", default="default", help="model of part (b)")
    parser.add_argument("--session-len", type=int, default=1000)
    parser.add_argument("--session-budget", type=int, default=64)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--validation", type=int, default=8, help="held-out pass-key examples of part (b)")
    args = parser.parse_args()
    if args.part in ("a", "both"):
        part_a(args)
    if args.part in ("b", "both"):
        part_b(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
