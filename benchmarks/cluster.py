"""A 24-cell needle sweep on tiny-llama: here, then on 2 local Ray workers, interleaved.

3 policies x 2 budgets x 2 lengths x 2 depths = 24 cells, each stored in a fresh sweep store and a
run history (as `kvstudio eval` does), in rounds of: local with torch's own thread count (what
`kvstudio eval` gets), local with 1 thread (what each worker gets: on a machine whose cores are
busy, torch's threads waiting on each other cost more than the second core brings), then the
cluster. Starting Ray and the workers (each loads the model once) is timed apart: a pool serves
every sweep after it.

  cluster_overhead_ms_per_cell = (wall x workers - the cells' own compute seconds) / cells

is the time a worker slot spent not computing a cell, per cell: the round trip, the result's
transfer, the store's and the history's writes on the driver, scheduling.

usage: python benchmarks/cluster.py [--rounds 2] [--workers 2]
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("KVSTUDIO_DATA_DIR", tempfile.mkdtemp(prefix="kvstudio-bench-"))

from kvstudio.core.evaluate.cluster import ClusterSweep, WorkerPool, import_ray  # noqa: E402
from kvstudio.core.evaluate.sweep import Sweep, SweepSpec  # noqa: E402
from kvstudio.core.evaluate.tasks import TaskOptions  # noqa: E402
from kvstudio.core.models.loading import load_model  # noqa: E402
from kvstudio.core.persist.history import RunHistory  # noqa: E402
from kvstudio.core.runtime.engine import Engine  # noqa: E402
import torch  # noqa: E402

SPEC = SweepSpec("needle", "tiny-llama", ("streaming_llm", "h2o", "snapkv"), (48, 96),
                 TaskOptions(lengths=(400, 800), depths=(0.0, 1.0)), chunk_size=64)


def timed(make_sweep) -> tuple[float, float, int]:
    """(wall seconds, the cells' own seconds summed, cells computed) of one fresh sweep."""
    sweep = make_sweep()
    started = time.perf_counter()
    outcome = sweep.run()
    wall = time.perf_counter() - started
    assert outcome.computed == len(sweep.cells) == 24 and not outcome.failed, outcome
    return wall, sum(record["seconds"] for record in outcome.records), outcome.computed


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args()
    ray = import_ray()
    folder = Path(tempfile.mkdtemp(prefix="kvstudio-cluster-bench-"))
    engine = Engine(load_model("tiny-llama", device="cpu"))

    started = time.perf_counter()
    ray.init(num_cpus=args.workers, include_dashboard=False, log_to_driver=False)
    ray_init = time.perf_counter() - started
    started = time.perf_counter()
    pool = WorkerPool("tiny-llama", device="cpu", workers=args.workers)
    workers_start = time.perf_counter() - started
    print(f"ray_init_s={ray_init:.1f} workers_start_s={workers_start:.1f} ({pool.describe()})")

    threads = torch.get_num_threads()
    local, single, cluster = [], [], []
    for round_ in range(args.rounds):
        history = RunHistory(folder / f"history-{round_}.sqlite3")
        local.append(timed(lambda: Sweep(engine, SPEC, folder / f"local-{round_}.jsonl", history=history)))
        torch.set_num_threads(1)
        single.append(timed(lambda: Sweep(engine, SPEC, folder / f"single-{round_}.jsonl", history=history)))
        torch.set_num_threads(threads)
        cluster.append(timed(lambda: ClusterSweep(pool, SPEC, folder / f"cluster-{round_}.jsonl", history=history)))
        print(f"round {round_ + 1}: local ({threads} threads) {local[-1][0]:.2f} s, local (1 thread) "
              f"{single[-1][0]:.2f} s, cluster {cluster[-1][0]:.2f} s")
        history.close()
    pool.close()
    ray.shutdown()

    local_wall = statistics.median(w for w, _, _ in local)
    single_wall = statistics.median(w for w, _, _ in single)
    cluster_wall = statistics.median(w for w, _, _ in cluster)
    overhead = statistics.median((wall * args.workers - own) / cells * 1000 for wall, own, cells in cluster)
    local_overhead = statistics.median((wall - own) / cells * 1000 for wall, own, cells in single)
    print(f"cells=24 workers={args.workers} rounds={args.rounds} (medians)")
    print(f"local_wall_s={local_wall:.2f} (torch threads={threads})")
    print(f"local_1thread_wall_s={single_wall:.2f}")
    print(f"cluster_wall_s={cluster_wall:.2f}")
    print(f"cluster_speedup_vs_best_local={min(local_wall, single_wall) / cluster_wall:.2f}")
    print(f"local_overhead_ms_per_cell={local_overhead:.1f} (1 thread: wall - the cells' own seconds)")
    print(f"cluster_overhead_ms_per_cell={overhead:.1f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
