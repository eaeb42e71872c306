"""Sweeps beyond one machine: the cells of a sweep computed by Ray workers, stored here.

  connected(address)  Ray: "auto" (the cluster this machine is part of), "local" (start one on this
                      machine), or a cluster's address (host:port, ray://host:10001)
  WorkerPool          workers that load the model once and keep it: one per GPU (num_gpus=1), or CPU
                      workers where the cluster has none; checked before any cell starts
  ClusterSweep        a Sweep whose cells run on the pool: the same cells, the same store, resumable
                      exactly as a local sweep (either kind resumes the other's store)

Before any cell: every worker has loaded the model (a path every worker reads, or a spec each can
load) and reports its KV Studio version, its installed plugin packages and a fingerprint of the
model and tokenizer; a version that differs from this machine's is refused with one line naming
both; plugin files are shipped from here (core/plugins/shipping.py) and loaded on every worker; and
every worker must plan exactly the same cells from the same prompts.

While it runs: each worker computes one cell at a time (the next goes to whichever is free). A cell
that finishes is written here at once, into the sweep's store (fsynced, one line) and the run
history, with its events. A worker that dies takes no finished cell with it: its cell goes to
another worker (a new one replaces the dead), and a cell whose worker dies twice is recorded
failed, with the reason, in the store (a line the store's reader skips, so the next run tries it
again) and the history; the sweep goes on. Stop (the CancelToken, or Ctrl-C) starts nothing new
and stops the running cells at their next step; what finished is kept.
"""

from __future__ import annotations

import contextlib
import socket
import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import kvstudio
from kvstudio.core.errors import KVStudioError
from kvstudio.core.evaluate.cluster_worker import CellWorker
from kvstudio.core.evaluate.sweep import (Cell, SweepOutcome, SweepProgress, SweepSpec, SweepStore, describe_cell,
                                          as_task, default_store_path, make_policy)
from kvstudio.core.persist.run_book import RunBook
from kvstudio.core.plugins import shipping
from kvstudio.core.runtime.engine import CancelToken
from kvstudio.core.spec import CacheSpec

INSTALL = "pip install 'kvstudio[cluster]'"
START_TIMEOUT_S = 900.0  # a large model on a busy cluster takes minutes to load
PROBE_TIMEOUT_S = 5.0
POLL_S = 0.2  # how often Stop is looked at while cells run
WORKER_ENV = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "error"}  # workers never reach for a hub


def import_ray():
    try:
        import ray  # deferred: an optional extra, and seconds to import
    except ImportError:
        raise KVStudioError(f"running on a Ray cluster needs Ray, which is not installed here: {INSTALL}") from None
    return ray


@contextlib.contextmanager
def connected(address: str) -> Iterator[object]:
    """Ray, connected to `address` for the block (an existing connection is used as it is and kept)."""
    ray = import_ray()
    if ray.is_initialized():
        yield ray
        return
    _init(ray, address)
    try:
        yield ray
    finally:
        close_pools()
        ray.shutdown()


def ensure_connected(address: str):
    """Ray, connected to `address` unless it is already connected, and left connected (the studio:
    its workers stay for the next sweep; Ray disconnects when the process ends)."""
    ray = import_ray()
    if not ray.is_initialized():
        _init(ray, address)
    return ray


def _init(ray, address: str) -> None:
    hint = "start one with `ray start --head` and give its address, or --ray local to start one on this machine"
    _probe(address, hint)
    try:
        if address == "local":
            ray.init(include_dashboard=False, log_to_driver=False)
        else:
            ray.init(address=address, log_to_driver=False)
    except (ConnectionError, RuntimeError, ValueError) as error:
        found = ("no Ray cluster is running on this machine" if address == "auto"
                 else f"no Ray cluster there ({_first_line(error)})")
        raise KVStudioError(f"--ray {address}: {found}; {hint}") from None


def _probe(address: str, hint: str) -> None:
    """host:port is tried first: Ray itself waits minutes for an address where nothing answers."""
    host, separator, port = address.rpartition(":")
    if address in ("auto", "local") or address.startswith("ray://") or not separator or not port.isdigit():
        return
    try:
        socket.create_connection((host, int(port)), timeout=PROBE_TIMEOUT_S).close()
    except OSError as error:
        raise KVStudioError(f"--ray {address}: nothing answers there ({error.strerror or error}); {hint}") from None


@dataclass
class ClusterTarget:
    """Where the studio's sweep runs: a Ray address and a number of workers (None: the default)."""

    address: str = "auto"
    workers: int | None = None


def open_cluster_sweep(target: ClusterTarget, spec: SweepSpec, store_path, history=None,
                       cancel: CancelToken | None = None) -> ClusterSweep:
    """Connected, the workers started (or kept from the last sweep) and checked, the sweep planned."""
    ensure_connected(target.address)
    pool = shared_pool(spec.model, "auto", "auto", target.workers, cancel=cancel)
    return ClusterSweep(pool, spec, store_path, history, cancel)


_pools: dict[tuple, "WorkerPool"] = {}


def shared_pool(model: str, device: str = "auto", dtype: str = "auto", workers: int | None = None,
                cpus_per_worker: int | None = None, cancel: CancelToken | None = None) -> "WorkerPool":
    """The pool of these settings that an earlier sweep of this connection started (its workers hold
    the model already: the studio's second sweep starts at once), or a new one. Plugins changed
    since then (another bundle) make a new pool."""
    device = worker_device(device)  # "auto" and what it means on this cluster are one pool
    key = (model, device, dtype, workers, cpus_per_worker, tuple(p.digest for p in shipping.bundle()))
    pool = _pools.get(key)
    if pool is None or not pool.workers:
        pool = _pools[key] = WorkerPool(model, device, dtype, workers, cpus_per_worker, cancel=cancel)
    return pool


def worker_device(device: str) -> str:
    """What "auto" means on the workers: a GPU each when the cluster has GPUs, else the CPU."""
    if device != "auto":
        return device
    return "cuda" if import_ray().cluster_resources().get("GPU", 0) >= 1 else "cpu"


def close_pools() -> None:
    for pool in _pools.values():
        pool.close()
    _pools.clear()


# --- the workers ----------------------------------------------------------------------------------


@dataclass
class Worker:
    actor: object
    number: int  # 1, 2, ...: replacements get new numbers
    report: dict | None = None

    @property
    def where(self) -> str:
        return f"worker {self.number}" + (f" ({self.report['where']})" if self.report else "")


def local_report() -> dict:
    return {"kvstudio": kvstudio.__version__, "entry_points": shipping.entry_point_versions()}


def check_report(report: dict, where: str, reference: dict | None = None) -> None:
    """Refuse a worker that cannot run the sweep as this machine would, in one line naming both sides."""
    if report.get("problem"):
        raise KVStudioError(f"{where}: {report['problem']}")
    local = local_report()
    if report["kvstudio"] != local["kvstudio"]:
        raise KVStudioError(f"{where} runs KV Studio {report['kvstudio']}, this machine {local['kvstudio']}: "
                            "install the same version on every worker")
    for name in sorted(set(report["entry_points"]) | set(local["entry_points"])):
        theirs, ours = report["entry_points"].get(name, "none"), local["entry_points"].get(name, "none")
        if theirs != ours:
            raise KVStudioError(f"plugin package '{name}': {where} has {theirs}, this machine {ours}: install the "
                                "same version on every worker")
    if reference is None:
        return
    for what, key in (("model", "model"), ("tokenizer", "tokenizer")):
        if report.get(key) != reference["report"].get(key):
            raise KVStudioError(f"{where} loaded another {what} than {reference['where']} under the same name: give a "
                                "model path every worker reads the same files from")
    if "plan" in report and report["plan"] != reference["report"].get("plan"):
        raise KVStudioError(f"{where} planned other cells than {reference['where']}: their tokenizers or plugins "
                            "differ")


class WorkerPool:
    """Ray actors that each load the model once and keep it, across the sweeps given to them."""

    def __init__(self, model: str, device: str = "auto", dtype: str = "auto", workers: int | None = None,
                 cpus_per_worker: int | None = None, start_timeout: float = START_TIMEOUT_S,
                 cancel: CancelToken | None = None):
        """`cancel`: Stop while the workers load the model (minutes for a large one) gives up."""
        self.ray = ray = import_ray()
        if not ray.is_initialized():
            raise KVStudioError("not connected to a Ray cluster (cluster.connected(address) first)")
        self.model, self.device, self.dtype = model, device, dtype
        self.plugins = shipping.bundle()
        self.numbers = 0
        self.options = self._resources(workers, cpus_per_worker)
        self.actor_class = ray.remote(CellWorker)
        self.spec: SweepSpec | None = None
        self.generation = 0  # sweeps prepared: a worker installs only the newest (CellWorker.prepare)
        self.reference: dict | None = None  # the first worker: every other is compared with it
        self.warnings: list[str] = []
        self.workers = [self._spawn() for _ in range(self.count)]
        try:
            reports = self._started([w.actor.report.remote() for w in self.workers], start_timeout, cancel)
        except ray.exceptions.GetTimeoutError:
            self.close()
            raise KVStudioError(f"{self.count} workers did not start within {start_timeout:.0f} s; the cluster has "
                                f"{_resources_text(ray.cluster_resources())}: ask for fewer --ray-workers") from None
        except ray.exceptions.RayError as error:
            self.close()
            raise KVStudioError(f"a worker could not start: {_first_line(error)}") from None
        except KVStudioError:
            self.close()
            raise
        try:
            for worker, report in zip(self.workers, reports):
                worker.report = report
                check_report(report, worker.where, self.reference)
                self.reference = self.reference or {"where": worker.where, "report": report}
        except KVStudioError:
            self.close()
            raise

    def _started(self, refs: list, timeout: float, cancel: CancelToken | None) -> list:
        """The workers' first reports, looking at Stop while they load."""
        deadline = time.perf_counter() + timeout
        while True:
            _, waiting = self.ray.wait(refs, num_returns=len(refs), timeout=POLL_S)
            if not waiting:
                return self.ray.get(refs)
            if cancel is not None and cancel.cancelled:
                raise KVStudioError("stopped while the Ray workers were starting; no cell was computed")
            if time.perf_counter() > deadline:
                raise self.ray.exceptions.GetTimeoutError()

    @property
    def count(self) -> int:
        return self.options["count"]

    def _resources(self, workers: int | None, cpus_per_worker: int | None) -> dict:
        resources = self.ray.cluster_resources()
        gpus = 0 if self.device == "cpu" else int(resources.get("GPU", 0))
        cpus = int(resources.get("CPU", 0))
        if workers is not None and workers < 1:
            raise KVStudioError(f"--ray-workers must be at least 1, got {workers}")
        if gpus:  # one worker per GPU
            count = workers or gpus
            if count > gpus:
                raise KVStudioError(f"--ray-workers {count}: the cluster has {gpus} GPUs, one worker each")
            return {"count": count, "num_gpus": 1, "num_cpus": cpus_per_worker or 1}
        nodes = sum(1 for node in self.ray.nodes() if node.get("Alive"))
        count = workers or max(nodes, 1)
        per_worker = cpus_per_worker or max(1, cpus // count)
        if count * per_worker > cpus:
            raise KVStudioError(f"{count} CPU workers of {per_worker} CPUs each: the cluster has {cpus} CPUs")
        return {"count": count, "num_gpus": 0, "num_cpus": per_worker}

    def _spawn(self) -> Worker:
        self.numbers += 1
        options = self.options
        actor = self.actor_class.options(
            num_cpus=options["num_cpus"], num_gpus=options["num_gpus"],
            max_restarts=0,  # a dead worker is replaced by the driver, which knows which cell it held
            max_concurrency=2,  # compute on one thread, cancel on the other
            runtime_env={"env_vars": WORKER_ENV},
        ).remote(self.model, self.device, self.dtype, self.plugins,
                 options["num_cpus"] if not options["num_gpus"] else None)
        return Worker(actor, self.numbers)

    def prepare(self, spec: SweepSpec) -> list[Cell]:
        """Every worker plans `spec`; the cells, once all agree."""
        if spec.model != self.model:
            raise KVStudioError(f"the workers hold '{self.model}', the sweep is of '{spec.model}'")
        self.spec = spec
        self.generation += 1
        asked = [(w, w.actor.prepare.remote(spec, index == 0, self.generation)) for index, w in enumerate(self.workers)]
        reference, cells = None, None
        for worker, ref in asked:
            try:
                report = self.ray.get(ref)
            except self.ray.exceptions.RayActorError as error:  # died since the last sweep: the others go on
                self.warnings.append(f"{worker.where} is gone: {_first_line(error)}")
                self.workers.remove(worker)
                continue
            worker.report = report
            check_report(report, worker.where, reference)
            reference = reference or {"where": worker.where, "report": report}
            cells = cells if cells is not None else report["cells"]
        if reference is None:
            raise KVStudioError(f"no worker is left: {'; '.join(self.warnings)}")
        self.reference = reference
        if cells is None:  # the worker asked for them had died
            cells = self.ray.get(self.workers[0].actor.prepare.remote(spec, True, self.generation))["cells"]
        return cells

    def replace(self, dead: Worker) -> tuple[Worker, object]:
        """A new worker for a dead one, and the reference to its preparation for the current sweep."""
        self.workers.remove(dead)
        with contextlib.suppress(Exception):
            self.ray.kill(dead.actor)
        worker = self._spawn()
        self.workers.append(worker)
        return worker, worker.actor.prepare.remote(self.spec, False, self.generation)

    def joined(self, worker: Worker, ref) -> bool:
        """Whether a replacement is ready for cells; one that is not is dropped with a warning."""
        try:
            report = self.ray.get(ref)
            worker.report = report
            check_report(report, worker.where, self.reference)
            return True
        except (KVStudioError, self.ray.exceptions.RayError) as error:
            self.warnings.append(f"{worker.where} did not start: {_first_line(error)}")
            self.workers.remove(worker)
            with contextlib.suppress(Exception):
                self.ray.kill(worker.actor)
            return False

    def describe(self) -> str:
        kind = f"{self.options['num_gpus']} GPU" if self.options["num_gpus"] else f"{self.options['num_cpus']} CPU"
        where = sorted({w.report["where"].split(" pid ")[0] for w in self.workers if w.report})
        first = self.reference["report"].get("describe", self.model) if self.reference else self.model
        return f"{len(self.workers)} Ray workers ({kind} each, on {', '.join(where)}): {first}"

    def close(self) -> None:
        for worker in self.workers:
            with contextlib.suppress(Exception):
                self.ray.kill(worker.actor)
        self.workers = []


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def _exit_detail(error: BaseException) -> str:
    """What Ray knows of why a worker's process ended (killed, out of memory, a crash), in short."""
    text = " ".join(str(error).split())
    marker = "Worker exit detail:"
    if marker in text:
        return text.split(marker, 1)[1].strip().split(". ")[0].rstrip(".")
    return "its process ended"


def _resources_text(resources: dict) -> str:
    return ", ".join(f"{resources.get(k, 0):g} {k}" for k in ("CPU", "GPU"))


# --- the sweep ------------------------------------------------------------------------------------


class ClusterStore(SweepStore):
    def add_failure(self, key: str, reason: str) -> None:
        """A line the store's reader skips: the cell is tried again by the next run of the sweep."""
        self._append({"kind": "failed", "key": key, "reason": reason})


@dataclass
class _Running:
    worker: Worker
    cell: Cell


class ClusterSweep:
    """The cells of `spec` computed on `pool`; the same interface as Sweep (cells, store, stored, run)."""

    def __init__(self, pool: WorkerPool, spec: SweepSpec, store_path: str | Path | None = None, history=None,
                 cancel: CancelToken | None = None):
        spec.validate()  # here first: a bad option is one line before any worker is asked
        self.pool, self.spec = pool, spec
        self.store = ClusterStore(store_path or default_store_path(spec), spec)
        self.history = history
        self.cancel = cancel or CancelToken()
        self.cells = pool.prepare(spec)
        self.failures: dict[str, str] = {}  # cell key -> why it failed
        self.retried: list[tuple[str, str]] = []  # (cell key, why): cells given to another worker

    def stored(self) -> list[dict]:
        task = self.spec.task
        return [as_task(self.store.cells[c.key(task)], task) for c in self.cells if c.key(task) in self.store.cells]

    def run(self, on_cell: Callable[[dict], None] | None = None,
            on_progress: Callable[[SweepProgress], None] | None = None) -> SweepOutcome:
        task = self.spec.task
        for cell in self.cells:
            if cell.key(task) in self.store.cells and on_cell:
                on_cell(as_task(self.store.cells[cell.key(task)], task))
        state = _Run(self, on_cell, on_progress)
        interrupted = False
        while not state.finished():
            try:
                state.step()
            except KeyboardInterrupt:
                if interrupted:
                    raise
                interrupted = True  # Ctrl-C: stop like Stop, keep what finishes meanwhile, then say so
                self.cancel.cancel()
        records = self.stored()
        cancelled = len(records) + len(self.failures) < len(self.cells)
        state.progress("cancelled" if cancelled else "done", done=len(records), left=0.0)
        if interrupted:
            raise KeyboardInterrupt
        return SweepOutcome(records, state.computed, state.reused, cancelled, self.store.path, dict(self.failures))

    # -- what comes back ----------------------------------------------------------------------------

    def store_cell(self, job: _Running, outcome: dict) -> dict:
        """History row first (its id goes into the record), then the store's line: as a local sweep."""
        record = {**outcome["record"], "run_id": self._history_row(job, outcome["row"])}
        self.store.add(job.cell.key(self.spec.task), record)
        return as_task(record, self.spec.task)

    def fail_cell(self, job: _Running, reason: str, row: dict | None = None, status: str = "failed") -> None:
        key = job.cell.key(self.spec.task)
        self.failures[key] = reason
        self.store.add_failure(key, reason)
        self._history_row(job, row, error=reason, status=status)

    def _history_row(self, job: _Running, row: dict | None, error: str | None = None, status: str = "failed"):
        if self.history is None:
            return None
        if row is None:  # the worker died: the row says what was asked for
            row = {"model": self.spec.model, "cache": None, "prompt": "", "kind": "generate", "settings": {}}
        evaluation = {**row["settings"].get("evaluation", {}), "store": str(self.store.path),
                      "worker": job.worker.where}
        book = RunBook(self.history, model=row["model"], cache=row["cache"] or _cache_of(job.cell, self.spec),
                       prompt=row["prompt"], settings={**row["settings"], "evaluation": evaluation}, kind=row["kind"],
                       on_warning=self._history_failed)
        book.start()
        if error is None:
            book.finish(row["result"], events=row["events"])
        else:
            book.fail(error, status=status)
        return book.run_id

    def _history_failed(self, message: str) -> None:
        self.history = None


class _Run:
    """One run of a ClusterSweep: which cells wait, which worker computes which, what is done."""

    def __init__(self, sweep: ClusterSweep, on_cell, on_progress):
        self.sweep, self.on_cell, self.on_progress = sweep, on_cell, on_progress
        self.ray, self.task = sweep.pool.ray, sweep.spec.task
        self.started = time.perf_counter()
        self.queue = deque(c for c in sweep.cells if c.key(self.task) not in sweep.store.cells)  # plan order
        self.reused = len(sweep.cells) - len(self.queue)
        self.idle = deque(sweep.pool.workers)
        self.running: dict[object, _Running] = {}  # a compute's reference -> who computes what
        self.starting: dict[object, Worker] = {}  # a replacement's preparation -> the replacement
        self.deaths: dict[str, list[str]] = {}  # cell key -> the workers that died computing it
        self.computed = self.weight_done = 0
        self.weight_left = sum(c.weight for c in self.queue)
        self.first_sent: float | None = None
        self.cancel_sent = False

    def finished(self) -> bool:
        """Nothing runs and nothing more will be sent; replacements still starting are not waited
        for (they join the next sweep)."""
        if self.running:
            return False
        if not self.queue or self.sweep.cancel.cancelled:
            return True
        if not self.idle and not self.starting:
            raise KVStudioError(f"no worker is left ({'; '.join(self.sweep.pool.warnings) or 'all died'}); "
                                f"{len(self.sweep.store.cells)} cells are stored in {self.sweep.store.path}: run "
                                "the sweep again to resume")
        return False

    def step(self) -> None:
        self.dispatch()
        if self.sweep.cancel.cancelled and not self.cancel_sent:
            for job in self.running.values():
                job.worker.actor.cancel.remote()
            self.cancel_sent = True
        ready, _ = self.ray.wait([*self.running, *self.starting], num_returns=1, timeout=POLL_S)
        for ref in ready:
            if ref in self.starting:
                worker = self.starting.pop(ref)
                if self.sweep.pool.joined(worker, ref):
                    self.idle.append(worker)
            else:
                self.returned(ref, self.running.pop(ref))

    def dispatch(self) -> None:
        """A cell to every free worker (one each: a worker computes one cell at a time)."""
        while self.queue and self.idle and not self.sweep.cancel.cancelled:
            worker, cell = self.idle.popleft(), self.queue.popleft()
            self.running[worker.actor.compute.remote(cell.key(self.task))] = _Running(worker, cell)
            self.first_sent = self.first_sent or time.perf_counter()
            self.progress(f"{describe_cell(cell)} on {worker.where}")

    def returned(self, ref, job: _Running) -> None:
        try:
            outcome = self.ray.get(ref)
        except self.ray.exceptions.RayActorError as error:  # the worker died under the cell
            self.died(job, error)
            return
        except self.ray.exceptions.RayError as error:
            outcome = {"status": "failed", "error": _first_line(error)}
        self.idle.append(job.worker)
        self.dispatch()  # the worker's next cell first: the writes below need no worker waiting for them
        if outcome["status"] == "cancelled":
            return
        self.weight_left -= job.cell.weight
        if outcome["status"] != "finished":
            self.sweep.fail_cell(job, outcome.get("error") or outcome["status"], outcome.get("row"), outcome["status"])
            return
        record = self.sweep.store_cell(job, outcome)
        self.computed += 1
        self.weight_done += job.cell.weight
        if self.on_cell:
            self.on_cell(record)

    def died(self, job: _Running, error: BaseException) -> None:
        """A new worker for the dead one; the cell to another worker, or recorded failed the second time."""
        key = job.cell.key(self.task)
        reasons = self.deaths.setdefault(key, [])
        reasons.append(f"{job.worker.where} died ({_exit_detail(error)})")
        self.sweep.retried.append((key, reasons[-1]))
        new, prepared = self.sweep.pool.replace(job.worker)
        self.starting[prepared] = new
        if len(reasons) >= 2:
            self.sweep.fail_cell(job, "; ".join(reasons))
            self.weight_left -= job.cell.weight
        else:
            self.queue.appendleft(job.cell)  # first in line: the next free worker, never the dead one

    def progress(self, current: str, done: int | None = None, left: float | None = None) -> None:
        """Time left from the cluster's throughput: prompt tokens done per second since the first cell."""
        if self.on_progress is None:
            return
        now = time.perf_counter()
        if left is None and self.weight_done and self.first_sent:
            left = self.weight_left / (self.weight_done / (now - self.first_sent))
        self.on_progress(SweepProgress(self.reused + self.computed if done is None else done, len(self.sweep.cells),
                                       self.reused, left, current, now - self.started))


def _cache_of(cell: Cell, spec: SweepSpec) -> CacheSpec:
    return CacheSpec.of(make_policy(cell.policy, cell.budget, spec.policy_options, cell.variant))
