"""OpenMP's wait policy under a busy CPU: one fine-tune validation (example_loss without backward, h2o,
2 synthetic pass-key examples of 256 tokens) with libgomp's default spinning and with kvstudio's
OMP_WAIT_POLICY=PASSIVE, side by side, interleaved, while a busy process takes one core (what another
program or the studio's window does to the model's thread).

    .venv/bin/python benchmarks/omp_wait.py [--model default] [--pairs 3] [--no-load]

Each measurement runs in its own process (libgomp reads the policy when it loads). Last line:
`spinning_vs_passive_validation_seconds=` (how many times slower the default spinning is).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

MEASURE = r"""
import json, sys, time
import kvstudio  # first: as every kvstudio process does
from kvstudio.core.models.loading import load_model
from kvstudio.core.runtime.engine import Engine
from kvstudio.core.spec import create_policy
from kvstudio.core.train.data import passkey_examples
from kvstudio.core.train.through_cache import example_loss
engine = Engine(load_model(sys.argv[1], device="cpu"))
examples = passkey_examples(engine.loaded.tokenizer, 256, 2, 1)
policy = create_policy("h2o", budget=128)
example_loss(engine, examples[0], policy, 128, backward=False)  # warm: weights paged in, kernels chosen
started, cpu = time.perf_counter(), time.process_time()
for example in examples:
    example_loss(engine, example, policy, 128, backward=False)
print(json.dumps({"wall": time.perf_counter() - started, "cpu": time.process_time() - cpu}))
"""


def measure(model: str, spinning: bool) -> dict:
    env = dict(os.environ)
    env.pop("OMP_WAIT_POLICY", None)
    env.pop("GOMP_SPINCOUNT", None)
    if spinning:
        env["GOMP_SPINCOUNT"] = "300000"  # libgomp's default spin, which an explicit PASSIVE turns to 0
    out = subprocess.run([sys.executable, "-c", MEASURE, model], env=env, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="default")
    parser.add_argument("--pairs", type=int, default=3)
    parser.add_argument("--no-load", action="store_true", help="no busy process beside the measurement")
    args = parser.parse_args()
    busy = None if args.no_load else subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        time.sleep(0.5)
        spinning, passive = [], []
        for pair in range(args.pairs):
            spinning.append(measure(args.model, True))
            passive.append(measure(args.model, False))
            print(f"pair {pair + 1}: spinning {spinning[-1]['wall']:.2f} s (cpu {spinning[-1]['cpu']:.2f} s), "
                  f"passive {passive[-1]['wall']:.2f} s (cpu {passive[-1]['cpu']:.2f} s)", flush=True)
    finally:
        if busy is not None:
            busy.kill()
    total_spinning = sum(m["wall"] for m in spinning)
    total_passive = sum(m["wall"] for m in passive)
    print(f"model={args.model} pairs={args.pairs} busy_process={'no' if args.no_load else 'one core'} "
          f"cores={os.cpu_count()}")
    print(f"spinning_validation_seconds={total_spinning / args.pairs:.2f}")
    print(f"passive_validation_seconds={total_passive / args.pairs:.2f}")
    print(f"spinning_vs_passive_validation_seconds={total_spinning / total_passive:.2f}")


if __name__ == "__main__":
    main()
