"""`kvstudio eval TASK ... --ray auto|local|ADDRESS`: the sweep's cells on a Ray cluster.

  kvstudio eval needle --model /shared/models/llama-8b --policies full,h2o,snapkv --budgets 256,1024 --ray auto
  kvstudio eval needle --model tiny-llama --ray local --ray-workers 2

The same sweep, store and output as without --ray (core/evaluate/cluster.py says what is checked
before any cell and what happens when a worker dies). Ray is the optional extra `cluster`.
"""

from __future__ import annotations

import contextlib
import sys


def add_options(parser) -> None:
    group = parser.add_argument_group("on a Ray cluster (the cluster extra: pip install 'kvstudio[cluster]')")
    group.add_argument("--ray", metavar="auto|local|ADDRESS",
                       help="compute the cells on Ray workers: auto (the cluster this machine is part of), local "
                            "(start Ray on this machine), or an address (host:6379, ray://host:10001); results "
                            "come back into this machine's store and run history")
    group.add_argument("--ray-workers", type=int, metavar="N",
                       help="workers, each loading the model once (default: one per GPU; without GPUs, one per node)")
    group.add_argument("--ray-cpus", type=int, metavar="N",
                       help="CPUs per CPU worker (default: the cluster's CPUs shared out among the workers)")


@contextlib.contextmanager
def cluster_sweep(args, spec, store, history):
    """(sweep, what runs it) for the block; the workers are started and checked on entry."""
    from kvstudio.core.evaluate.cluster import ClusterSweep, connected, shared_pool  # the engine: only when used

    with connected(args.ray):
        print(f"[eval] starting {args.ray_workers or 'the'} Ray workers for {spec.model} (each loads it once)…",
              file=sys.stderr, flush=True)
        pool = shared_pool(spec.model, args.device, args.dtype, args.ray_workers, args.ray_cpus)
        for warning in pool.warnings:
            print(f"kvstudio: warning: {warning}", file=sys.stderr)
        yield ClusterSweep(pool, spec, store, history=history), pool.describe()
