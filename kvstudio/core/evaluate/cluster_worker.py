"""What runs on a worker of a cluster sweep (cluster.py drives it).

A CellWorker loads the model once and keeps it, loads the plugins the driver shipped (and no others),
and computes the cells of one sweep at a time, each with the local Sweep's own code, so a cell is
the same computation wherever it runs. The worker has no sweep store and no run history: the
driver's are on another machine. A cell's record comes back with what its history row needs (the
generation result, the packed events, the prompt), and the driver writes both.

Nothing here imports ray: cluster.py wraps CellWorker in `ray.remote`, so the same class also runs,
and is checked, as plain Python.
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import tempfile
import threading
from dataclasses import replace
from pathlib import Path

import torch

import kvstudio
from kvstudio.core.errors import KVStudioError
from kvstudio.core.evaluate.sweep import Cell, Sweep, SweepSpec
from kvstudio.core.models.loading import load_model
from kvstudio.core.persist.fingerprint import model_fingerprint, tokenizer_sha256
from kvstudio.core.persist.run_book import RunBook
from kvstudio.core.plugins.shipping import (ShippedPlugin, ShippedPluginManager, entry_point_versions,
                                            record_problems, unpack)
from kvstudio.core.runtime.engine import CancelToken, Engine
from kvstudio.core.runtime.interruptions import end_status


class DeferredBook(RunBook):
    """A cell's history row as a worker keeps it: what RunBook would write, kept for the driver."""

    def __init__(self, book: RunBook, prompt: str):
        super().__init__(None, model=book.model, cache=book.cache, prompt=prompt, settings=book.settings,
                         kind=book.kind, recorder=book.recorder)
        self.result = None
        self.events: bytes | None = None

    def finish(self, result, *, error: str | None = None, events: bytes | None = None) -> None:
        # The live cache and a captured state stay here: they are tensors the driver has no use for.
        self.result = replace(result, cache=None, state=None)
        self.events = events if events is not None else self._events()
        self.ended = True

    def row(self) -> dict:
        """What the driver's RunBook needs to write this cell's row."""
        return {"model": self.model, "cache": self.cache, "prompt": self.prompt, "settings": self.settings,
                "kind": self.kind, "result": self.result, "events": self.events}


class WorkerSweep(Sweep):
    """Sweep's cells of one spec, computed one at a time by key; history rows deferred to the driver.
    Its store is a scratch file of the worker's: the driver's store is the sweep's."""

    def __init__(self, engine: Engine, spec: SweepSpec, scratch: Path):
        super().__init__(engine, spec, scratch / f"{spec.fingerprint()}.jsonl")
        self.by_key = {cell.key(spec.task): cell for cell in self.cells}
        self.book: DeferredBook | None = None

    def _book(self, policy, ids, settings, base, recorder) -> DeferredBook:
        prompt = self.engine.tokenizer.decode(ids)
        self.book = DeferredBook(super()._book(policy, ids, settings, base, recorder), prompt)
        return self.book

    def compute(self, key: str) -> dict:
        """{"status": finished | cancelled | failed, "record", "row" (finished), "error" (failed)}."""
        cell = self.by_key.get(key)
        if cell is None:
            return {"status": "failed", "error": "this worker planned no such cell (another model or plugins?)"}
        self.cancel = CancelToken()  # one per cell: a Stop ends the cell it was meant for
        self.book = None
        try:
            record = self._run_cell(cell)
        except Exception as error:  # the cell failed; the worker, its model and the sweep go on
            status, message = end_status(error)
            return {"status": status, "error": message, "row": self.book.row() if self.book else None}
        if record is None:
            return {"status": "cancelled"}
        return {"status": "finished", "record": record, "row": self.book.row()}


def plan_digest(cells: list[Cell], task: str) -> str:
    """The same on every worker exactly when they planned the same cells from the same prompts."""
    digest = hashlib.sha256()
    for cell in cells:
        digest.update(cell.key(task).encode())
        if cell.sample is not None:
            digest.update(json.dumps(cell.sample.ids).encode())
    return digest.hexdigest()


class CellWorker:
    """One worker: the model loaded once and kept, the shipped plugins, the current sweep's cells.
    The constructor never raises for what a user can fix: report() says what went wrong."""

    def __init__(self, model: str, device: str, dtype: str, plugins: tuple[ShippedPlugin, ...],
                 threads: int | None = None):
        self.scratch = Path(tempfile.mkdtemp(prefix="kvstudio-worker-"))
        self.problem: str | None = None
        self.engine: Engine | None = None
        self.sweep: WorkerSweep | None = None
        self.generation = 0  # of the sweep prepared last (see prepare)
        self.preparing = threading.Lock()
        self.shipped = plugins
        if threads:
            torch.set_num_threads(threads)  # what Ray gave this worker, not every core of its machine
        self.plugins = ShippedPluginManager(unpack(plugins, self.scratch / "plugins"))
        self.plugins.load()
        problems = record_problems(self.plugins.records)
        if problems:
            self.problem = "a plugin did not load: " + "; ".join(problems)
            return
        try:
            self.engine = Engine(load_model(model, device=device, dtype=dtype))
        except (KVStudioError, OSError) as error:
            self.problem = f"cannot load the model '{model}': {error}"

    def report(self) -> dict:
        """Who this worker is and what it runs: compared with the driver's and the other workers'."""
        report = {"where": f"{socket.gethostname()} pid {os.getpid()}", "pid": os.getpid(),
                  "kvstudio": kvstudio.__version__, "entry_points": entry_point_versions(),
                  "plugins": {plugin.name: plugin.digest for plugin in self.shipped},
                  "problem": self.problem}
        if self.engine is not None:
            loaded = self.engine.loaded
            report |= {"model": model_fingerprint(loaded), "tokenizer": tokenizer_sha256(loaded.tokenizer),
                       "device": str(loaded.device), "describe": loaded.describe()}
        return report

    def prepare(self, spec: SweepSpec, want_cells: bool = False, generation: int = 0) -> dict:
        """Plan `spec`'s cells (the plugins' policies are checked here too); the plan's digest, and
        the cells themselves for the one worker the driver asks. `generation` counts the driver's
        sweeps: the actor's two threads may run an older sweep's preparation (sent to a replacement
        while it started) after a newer one, and the older must not win."""
        with self.preparing:
            report = self.report()
            if self.engine is None:
                return report
            if generation < self.generation:
                return report | {"problem": f"a preparation for an earlier sweep ({generation} < {self.generation})"}
            try:
                sweep = WorkerSweep(self.engine, spec, self.scratch)
            except KVStudioError as error:
                return report | {"problem": f"cannot plan the sweep: {error}"}
            self.sweep, self.generation = sweep, generation
            return report | {"plan": plan_digest(sweep.cells, spec.task), "cells": sweep.cells if want_cells else None}

    def compute(self, key: str) -> dict:
        if self.sweep is None:
            return {"status": "failed", "error": "the worker was given a cell before its sweep"}
        return self.sweep.compute(key)

    def cancel(self) -> None:
        """From another thread of the actor while compute runs: the cell stops at its next step."""
        if self.sweep is not None:
            self.sweep.cancel.cancel()

    def pid(self) -> int:
        return os.getpid()
