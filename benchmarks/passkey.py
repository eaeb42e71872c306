"""Pass-key retrieval for every policy at several budgets: the table in the policy-library note.

A 5-digit key hidden mid-prompt in ~2,000 tokens of filler, the question at the end, greedy
decoding; "yes" when the key comes back whole. The tests pin what this prints
(tests/test_passkey.py), so a change in any policy's behaviour shows up there.

usage: python benchmarks/passkey.py [--model SPEC] [--budgets 128,256,512] [--policies a,b] [--repeats 80]
"""

from __future__ import annotations

import argparse
import os
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from kvstudio.core.runtime.engine import Engine, GenerationSettings  # noqa: E402
from kvstudio.core.evaluate import passkey_prompt, passkey_retrieved  # noqa: E402
from kvstudio.core.models.loading import load_model  # noqa: E402
from kvstudio.core.policies import available_policies
from kvstudio.core.spec import create_policy  # noqa: E402

PASS_KEY = "57314"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="default")
    parser.add_argument("--budgets", default="128,256,512")
    parser.add_argument("--policies", default=",".join(p for p in available_policies() if p != "full"))
    parser.add_argument("--repeats", type=int, default=80, help="filler repeats (80 ~ 2,000 tokens)")
    parser.add_argument("--chunk-size", type=int, default=512)
    args = parser.parse_args()

    engine = Engine(load_model(args.model))
    ids = engine.encode(passkey_prompt(PASS_KEY, args.repeats))
    settings = GenerationSettings(max_new_tokens=8, chunk_size=args.chunk_size)
    budgets = [int(b) for b in args.budgets.split(",")]
    print(f"prompt {len(ids)} tokens, key {PASS_KEY}, chunk {args.chunk_size}, greedy, 8 new tokens")
    full = engine.generate(ids, create_policy("full"), settings)
    print(f"full: {'yes' if passkey_retrieved(full.text, PASS_KEY) else 'no'} ({full.text!r})")
    print(f"| policy | " + " | ".join(f"budget {b}" for b in budgets) + " |")
    print("|---" * (len(budgets) + 1) + "|")
    for name in args.policies.split(","):
        cells = []
        for budget in budgets:
            started = time.perf_counter()
            result = engine.generate(ids, create_policy(name, budget=budget), settings)
            found = passkey_retrieved(result.text, PASS_KEY)
            cells.append(f"{'yes' if found else 'no'} ({time.perf_counter() - started:.1f} s)")
            print(f"#   {name} {budget}: {result.text!r}", file=sys.stderr)
        print(f"| {name} | " + " | ".join(cells) + " |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
