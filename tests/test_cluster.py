"""Sweeps on a Ray cluster: a local Ray instance (2 CPUs) with 2 workers on tiny-llama, shared by
every test here (starting Ray and loading the model in each worker are the slow parts).

What is checked: the cluster's store equals a local sweep's cell by cell; a worker killed mid-sweep
loses nothing; Ctrl-C then a rerun computes only the missing cells; plugin policies are shipped to
the workers and run there; a cell whose worker dies twice is recorded failed and the sweep goes on;
a worker of another version is refused in one line; `kvstudio eval --ray` and the studio's
"run on" choice; without Ray, one line saying how to install it.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import sys
import threading
import time

import pytest
import torch

ray = pytest.importorskip("ray")

from kvstudio.core.errors import KVStudioError  # noqa: E402
from kvstudio.core.evaluate.cluster import (ClusterSweep, WorkerPool, check_report, close_pools,  # noqa: E402
                                           shared_pool)
from kvstudio.core.evaluate.sweep import Sweep, SweepSpec, SweepStore  # noqa: E402
from kvstudio.core.evaluate.tasks import TaskOptions  # noqa: E402
from kvstudio.core.persist.history import RunHistory  # noqa: E402
from kvstudio.core.plugins.loader import PluginManager  # noqa: E402
from kvstudio.core.runtime.engine import CancelToken  # noqa: E402

from .conftest import engine_for  # noqa: E402
from .helpers import run_cli  # noqa: E402

# Two policies known only from a plugin file in a temporary folder: the workers have them only if
# the driver shipped them. Each select() notes the process it ran in; worker_killer at budget 33
# ends its process as a crash would (os._exit: nothing to catch).
PLUGIN = '''
import os

from kvstudio.core.policies.base import Policy, PolicyConfig, keep_all_if_within, keep_sinks_and_recent

TRACE = {trace!r}


def note():
    with open(TRACE, "a") as stream:
        stream.write(f"{{os.getpid()}}\\n")


class ShippedRecent(Policy):
    name = "shipped_recent"
    summary = "the newest entries and two sinks (a test plugin)"
    Config = PolicyConfig

    def select(self, view, state):
        note()
        return None if keep_all_if_within(view) else keep_sinks_and_recent(view, sink=2)


class WorkerKiller(Policy):
    name = "worker_killer"
    summary = "ends its process at budget 33 (a test plugin)"
    Config = PolicyConfig

    def select(self, view, state):
        if self.config.budget == 33:
            os._exit(3)
        return None if keep_all_if_within(view) else keep_sinks_and_recent(view, sink=0)
'''


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    folder = tmp_path_factory.mktemp("cluster_plugins")
    trace = folder.parent / "cluster_trace.txt"
    (folder / "test_policies.py").write_text(PLUGIN.format(trace=str(trace)))
    plugins = PluginManager([folder])
    plugins.load()
    assert not plugins.errors, plugins.errors
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        # The same settings as `kvstudio eval --device cpu --ray-workers 2`: the CLI test reuses the pool.
        pool = shared_pool("tiny-llama", "cpu", "auto", 2, None)
        yield pool, trace
    finally:
        close_pools()
        ray.shutdown()
        plugins.unload()


def _spec(**changes) -> SweepSpec:
    spec = SweepSpec("needle", "tiny-llama", ("full", "streaming_llm", "shipped_recent"), (32, 64),
                     TaskOptions(lengths=(400,), depths=(0.0, 1.0)), chunk_size=64)
    for name, value in changes.items():
        setattr(spec, name, value)
    return spec


@contextlib.contextmanager
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _comparable(cells: dict) -> dict:
    """Cells without what depends on when and where they ran."""
    return {key: {k: v for k, v in cell.items() if k not in ("seconds", "run_id")} for key, cell in cells.items()}


def _lines(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_the_cluster_store_equals_the_local_store_cell_by_cell(cluster, tmp_path):
    pool, trace = cluster
    spec = _spec()
    history = RunHistory(tmp_path / "history.sqlite3")
    progress = []
    trace.unlink(missing_ok=True)
    outcome = ClusterSweep(pool, spec, tmp_path / "cluster.jsonl", history=history).run(on_progress=progress.append)
    assert not outcome.cancelled and not outcome.failed and outcome.computed == len(outcome.records) == 10
    # The plugin policy ran in the workers' processes, never in this one.
    ran_in = {int(pid) for pid in trace.read_text().split()}
    assert ran_in and os.getpid() not in ran_in
    assert ran_in <= {w.report["pid"] for w in pool.workers}
    with one_thread():  # as each worker computes; two threads on busy cores are many times slower here
        Sweep(engine_for("tiny-llama"), spec, tmp_path / "local.jsonl").run()
    remote, local = SweepStore(tmp_path / "cluster.jsonl", spec).cells, SweepStore(tmp_path / "local.jsonl", spec).cells
    assert list(remote) and set(remote) == set(local)
    assert _comparable(remote) == _comparable(local)
    # One store for both: a local sweep resumes the cluster's and computes nothing; another sweep's is refused.
    assert Sweep(engine_for("tiny-llama"), spec, tmp_path / "cluster.jsonl").run().computed == 0
    with pytest.raises(KVStudioError, match="holds another sweep"):
        ClusterSweep(pool, _spec(chunk_size=32), tmp_path / "cluster.jsonl")
    # Every cell is a run in this machine's history, with its events, naming the worker it ran on.
    for record in outcome.records:
        row = history.get(record["run_id"])
        assert row.status == "finished" and row.output == record["output"] and row.policy == record["policy"]
        assert row.settings["evaluation"]["worker"].startswith("worker ")
        assert row.settings["evaluation"]["store"] == str(tmp_path / "cluster.jsonl")
        assert history.events(record["run_id"])
    # Time left, from the cluster's throughput, once a cell has finished; the last report is the end.
    assert progress[0].seconds_left is None and any(p.seconds_left for p in progress[1:-1])
    assert (progress[-1].done, progress[-1].current) == (10, "done")


def test_a_worker_of_another_version_is_refused_in_one_line(cluster):
    pool, _ = cluster
    report = ray.get(pool.workers[0].actor.report.remote())
    check_report(report, "worker 1")  # as it is: accepted
    with pytest.raises(KVStudioError) as caught:
        check_report({**report, "kvstudio": "0.0.1"}, "worker 1 (node-b pid 7)")
    message = str(caught.value)
    assert "worker 1 (node-b pid 7) runs KV Studio 0.0.1, this machine " in message and "\n" not in message
    with pytest.raises(KVStudioError, match="plugin package 'extra': worker 1 has extra-policies 2.0, this machine "
                                            "none"):
        check_report({**report, "entry_points": {**report["entry_points"], "extra": "extra-policies 2.0"}}, "worker 1")


def test_stop_while_workers_start_gives_up_at_once(cluster):
    """The module's pool holds both CPUs: a new worker waits for one; Stop ends the wait."""
    cancel = CancelToken()
    threading.Timer(1.0, cancel.cancel).start()
    started = time.perf_counter()
    with pytest.raises(KVStudioError, match="stopped while the Ray workers were starting"):
        WorkerPool("tiny-llama", "cpu", workers=1, cpus_per_worker=1, cancel=cancel)
    assert time.perf_counter() - started < 30


def test_eval_command_runs_on_the_cluster_and_resumes(cluster, capsys, tmp_path):
    argv = ["eval", "needle", "--model", "tiny-llama", "--device", "cpu", "--policies", "full,streaming_llm",
            "--budgets", "32", "--lengths", "400", "--depths", "0,1", "--chunk-size", "64", "--no-history",
            "--store", str(tmp_path / "s.jsonl"), "--ray", "auto", "--ray-workers", "2"]
    code, out, err = run_cli(capsys, *argv)
    assert code == 0, err
    assert "2 Ray workers (1 CPU each" in err and "4 cells computed, 0 reused" in err
    assert "about" in err and "left" in err and "streaming_llm" in out
    code, _, err = run_cli(capsys, *argv)
    assert code == 0 and "0 cells computed, 4 reused" in err


def test_ctrl_c_then_a_rerun_computes_only_the_missing_cells(cluster, tmp_path):
    pool, _ = cluster
    spec, store = _spec(), tmp_path / "s.jsonl"
    first = ClusterSweep(pool, spec, store)

    def interrupt(record):
        if len(first.store.cells) == 3:
            signal.raise_signal(signal.SIGINT)  # Ctrl-C, as the terminal sends it

    with pytest.raises(KeyboardInterrupt):
        first.run(on_cell=interrupt)
    stored = SweepStore(store, spec).cells
    assert 3 <= len(stored) < len(first.cells)
    second = ClusterSweep(pool, spec, store)
    outcome = second.run()
    assert outcome.reused == len(stored) and outcome.computed == len(first.cells) - len(stored)
    # No cell was computed twice: one line per cell in the store, and the first ones unchanged.
    cell_lines = [line for line in _lines(store) if line["kind"] == "cell"]
    assert len(cell_lines) == len({line["key"] for line in cell_lines}) == len(first.cells)
    assert {k: SweepStore(store, spec).cells[k] for k in stored} == stored


@pytest.mark.studio_model("tiny-llama")
def test_the_studio_runs_a_sweep_on_a_ray_address_stops_and_resumes(cluster, qtbot, window):
    from kvstudio.gui.features.evaluate_cluster import RAY

    from .test_evaluate_view import _choose, stop_after_a_cell_then_resume

    view = window.evaluate.view
    _choose(view, depths="0,0.5,1")
    assert not view.run_on.address.isEnabled()  # this machine, until a Ray address is chosen
    view.run_on.where.setCurrentText(RAY)
    assert view.run_on.address.isEnabled()
    view.run_on.address.setText("auto")
    view.run_on.workers.setValue(2)
    stop_after_a_cell_then_resume(qtbot, window, view, cells=6)
    assert (view.heatmap_values("full") >= 1).all()
    # A cell computed on a worker opens as an ordinary run from this machine's history.
    computed = [r for r in view.records if r.get("run_id") is not None][-1]
    window.runs.reopen(computed["run_id"])
    assert window.views.showing_stored_run


def test_a_worker_killed_mid_sweep_loses_nothing_and_the_sweep_finishes(cluster, tmp_path):
    pool, _ = cluster
    spec = _spec(policies=("full", "streaming_llm"))
    sweep = ClusterSweep(pool, spec, tmp_path / "s.jsonl")
    victim = pool.workers[0]
    killed = []

    def kill_once(record):
        if not killed:
            os.kill(victim.report["pid"], signal.SIGKILL)
            killed.append(record)

    outcome = sweep.run(on_cell=kill_once)
    assert not outcome.cancelled and not outcome.failed
    assert outcome.computed == len(sweep.cells) == 6
    assert len(SweepStore(tmp_path / "s.jsonl", spec).cells) == 6
    # The cell the dead worker held (or was given) went to another worker; a new worker replaced it.
    assert len(sweep.retried) == 1 and "died" in sweep.retried[0][1]
    assert victim not in pool.workers and len(pool.workers) == 2


def test_a_cell_whose_worker_dies_twice_is_recorded_failed_and_the_sweep_goes_on(cluster, tmp_path):
    pool, _ = cluster
    spec = _spec(policies=("shipped_recent", "worker_killer"), budgets=(32, 33),
                 task_options=TaskOptions(lengths=(400,), depths=(0.5,)))
    store, history = tmp_path / "s.jsonl", RunHistory(tmp_path / "history.sqlite3")
    sweep = ClusterSweep(pool, spec, store, history=history)
    outcome = sweep.run()
    assert outcome.computed == 3 and not outcome.cancelled
    [(key, reason)] = outcome.failed.items()
    assert json.loads(key)["policy"] == "worker_killer" and json.loads(key)["budget"] == 33
    assert reason.count(" died (") == 2  # tried on two workers
    failed_lines = [line for line in _lines(store) if line["kind"] == "failed"]
    assert [(line["key"], line["reason"]) for line in failed_lines] == [(key, reason)]
    assert key not in SweepStore(store, spec).cells  # so the next run tries it again
    rows = {row.status: row for row in history.list()}
    assert rows["failed"].error == reason and rows["failed"].policy == "worker_killer"


def test_without_ray_the_command_says_how_to_install_it(capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` fails as on a machine without it
    code, _, err = run_cli(capsys, "eval", "needle", "--model", "tiny-llama", "--no-history", "--ray", "auto")
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert "needs Ray, which is not installed here: pip install 'kvstudio[cluster]'" in err


@pytest.mark.studio_model("tiny-llama")
def test_the_studio_without_ray_says_how_to_install_it(qtbot, window, monkeypatch):
    from kvstudio.gui.features.evaluate_cluster import RAY

    from .test_evaluate_view import _choose

    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` fails as on a machine without it
    view = window.evaluate.view
    _choose(view)
    view.run_on.where.setCurrentText(RAY)
    view.start.click()
    qtbot.waitUntil(lambda: not window.state.busy, timeout=60_000)
    assert "pip install 'kvstudio[cluster]'" in view.status.text(), view.status.text()
    assert view.records == [] and view.start.isEnabled()



def test_an_address_where_nothing_answers_is_refused_in_seconds():
    from kvstudio.core.evaluate.cluster import _probe

    with socket.socket() as listener:  # a port certainly closed: bound, then released
        listener.bind(("127.0.0.1", 0))
        port = listener.getsockname()[1]
    with pytest.raises(KVStudioError, match=f"--ray 127.0.0.1:{port}: nothing answers there"):
        _probe(f"127.0.0.1:{port}", "start one")
    _probe("auto", "start one")  # Ray's own names are left to Ray
