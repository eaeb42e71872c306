"""Small tensor work on one CPU thread, where waking the thread pool costs more than the work.

Every kvstudio process runs libgomp with OMP_WAIT_POLICY=PASSIVE (kvstudio/__init__.py): idle
workers sleep instead of spinning, so a run sharing the CPU with the studio's window or another
process is not slowed several times by spinning workers. The price is paid per parallel region: an
operation on more than PyTorch's grain (32k elements) wakes the sleeping workers, which on the
2-core machine this was measured on costs about 100 us, while adding 100k floats costs 10 us
(`benchmarks/omp_wait.py` and docs/batching.md). A batched decode step's attention and evictions are
many such operations on small tensors (8 rows of 3 KV heads x 257 entries: a cat of their keys took
760 us on two passive threads, 98 on one). `one_thread(...)` runs such a block on one thread when the
pool would sleep between operations, and the work is small enough that one thread does it as fast.

Results do not depend on it: the operations in such blocks (copies, gathers, element-wise
arithmetic, per-row softmax, batched matrix products whose matrices are each computed whole) give
the same bits on one thread as on several (tests/test_batch.py compares a grouped decode computed on
one thread with the single-run attention on two).
"""

from __future__ import annotations

import os
from contextlib import contextmanager

import torch

# Above this many elements in the block's largest tensors, the pool's threads earn their wake-up.
SMALL_WORK = 2**22


def pool_sleeps() -> bool:
    return os.environ.get("OMP_WAIT_POLICY", "").upper() == "PASSIVE"


@contextmanager
def one_thread(device: torch.device, elements: int):
    """Run the block on one intra-op thread when it is CPU work of at most SMALL_WORK elements and the
    pool sleeps between operations; otherwise leave the threads as they are."""
    threads = torch.get_num_threads()
    if device.type != "cpu" or threads == 1 or elements > SMALL_WORK or not pool_sleeps():
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)
