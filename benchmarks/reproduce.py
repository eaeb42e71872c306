"""The needle grid under both question protocols, with what each policy loses while it runs.

KVCache-Factory's needle-in-a-haystack (a "special magic number" at a grid of context lengths x
depths) for snapkv, pyramidkv and h2o at one budget, under `question-aware` compression (the whole
prompt in one prefill chunk, the question inside the observation window: KVCache-Factory, SnapKV's
paper) and `question-agnostic` compression (the context compressed before the question is fed:
kvpress's default), with `full` as the reference. Each cell also measures the attention loss (the
attention mass on evicted entries against a shadow cache of every key, runtime/attention_loss.py).
PyramidKV runs KVCache-Factory's own per-layer schedule (the default) and SnapKV/PyramidKV combine a
GQA group's query heads by mean (KVCache-Factory's default gqa_score_agg).

Prints the two tables side by side (mean needle score and mean attention loss per policy), then
one line per protocol and policy: reproduce_<protocol>_<policy>_score= and _attention_loss=.

The grid is configurable because the default model on 2 CPU cores prefills ~330 tokens/s: the default
grid (lengths 1024, 2048; depths 0, 0.25, 0.5, 0.75, 1) is 7 x 10 cells per protocol, about 15 minutes
there. Say what ran: the header line names the model, grid, budget and observation window.

usage: python benchmarks/reproduce.py [--model default] [--budget 128] [--window 32]
                                      [--lengths 1024,2048] [--depths 0,0.25,0.5,0.75,1]
                                      [--policies snapkv,pyramidkv,h2o] [--store-dir DIR]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from collections import defaultdict

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

from kvstudio.core.evaluate.protocols import QUESTION_AGNOSTIC, QUESTION_AWARE  # noqa: E402
from kvstudio.core.evaluate.sweep import Sweep, SweepSpec  # noqa: E402
from kvstudio.core.evaluate.tasks import TaskOptions  # noqa: E402
from kvstudio.core.models.loading import load_model  # noqa: E402
from kvstudio.core.runtime.engine import Engine  # noqa: E402

PROTOCOLS = (QUESTION_AWARE, QUESTION_AGNOSTIC)


def numbers(text: str, kind=int) -> tuple:
    return tuple(kind(part) for part in text.split(",") if part.strip())


def table(records: list[dict]) -> list[list[str]]:
    """Rows (policy, mean score, mean attention loss, cells) of one protocol's records."""
    groups: dict[str, list[dict]] = defaultdict(list)
    for record in records:
        label = record["policy"] if record["budget"] is None else f"{record['policy']} @ {record['budget']}"
        groups[label].append(record)
    rows = [["policy", "score", "attention loss", "cells"]]
    for label, cells in groups.items():
        losses = [c["attention_loss"] for c in cells if c.get("attention_loss") is not None]
        rows.append([label, f"{sum(c['score'] for c in cells) / len(cells):.3f}",
                     f"{sum(losses) / len(losses):.4f}" if losses else "-", str(len(cells))])
    return rows


def side_by_side(left: list[list[str]], right: list[list[str]], titles: tuple[str, str]) -> str:
    def lines(rows):
        widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
        return ["  ".join(cell.ljust(width) for cell, width in zip(row, widths)) for row in rows]
    a, b = lines(left), lines(right)
    width = max(map(len, a + [titles[0]]))
    out = [f"{titles[0].ljust(width)}  |  {titles[1]}"]
    for index in range(max(len(a), len(b))):
        out.append(f"{(a[index] if index < len(a) else '').ljust(width)}  |  {b[index] if index < len(b) else ''}")
    return "\n".join(out)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="default")
    parser.add_argument("--budget", type=int, default=128)
    parser.add_argument("--window", type=int, default=32, help="observation window of snapkv and pyramidkv")
    parser.add_argument("--lengths", type=numbers, default=(1024, 2048))
    parser.add_argument("--depths", type=lambda text: numbers(text, float), default=(0.0, 0.25, 0.5, 0.75, 1.0))
    parser.add_argument("--policies", type=lambda text: tuple(text.split(",")), default=("snapkv", "pyramidkv", "h2o"))
    parser.add_argument("--store-dir", help="keep the sweeps' stores here (they resume); default: a temporary folder")
    args = parser.parse_args()

    loaded = load_model(args.model, device="cpu")
    engine = Engine(loaded)
    store_dir = args.store_dir or tempfile.mkdtemp(prefix="kvstudio-reproduce-")
    print(f"# {loaded.describe()}; needle grid lengths {list(args.lengths)} x depths {list(args.depths)}; "
          f"budget {args.budget}, observation window {args.window}; policies full,{','.join(args.policies)}",
          flush=True)
    tables, figures = {}, []
    for protocol in PROTOCOLS:
        spec = SweepSpec("needle", args.model, ("full", *args.policies), (args.budget,),
                         TaskOptions(lengths=args.lengths, depths=args.depths),
                         policy_options={"observation_window": args.window}, protocol=protocol, measure_loss=True)
        started = time.perf_counter()
        outcome = Sweep(engine, spec, os.path.join(store_dir, f"needle-{protocol}.jsonl")).run()
        print(f"# {protocol}: {outcome.computed} cells computed, {outcome.reused} reused, "
              f"{time.perf_counter() - started:.0f} s", flush=True)
        tables[protocol] = table(outcome.records)
        for row in tables[protocol][1:]:
            name = row[0].split(" @ ")[0]
            figures.append(f"reproduce_{protocol.replace('-', '_')}_{name}_score={row[1]}")
            figures.append(f"reproduce_{protocol.replace('-', '_')}_{name}_attention_loss={row[2]}")
    print()
    print(side_by_side(tables[QUESTION_AWARE], tables[QUESTION_AGNOSTIC], PROTOCOLS))
    print()
    print("\n".join(figures))
    return 0


if __name__ == "__main__":
    sys.exit(main())
