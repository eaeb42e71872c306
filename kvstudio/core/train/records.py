"""Fine-tune sessions in the run history: one row of kind "finetune" per session.

The row is kept by a RunBook (core/persist/run_book.py), as every run's is: written when the
session starts (status running) and completed when it ends: the
curves (`steps`: one record per optimizer step; `figures["val"]`: the validations), the memory
timeline, the adapter folder (as the row's output) and the figures a list shows. A failed session
keeps its row, marked failed with the message. `session_from_record` turns a row back into what
the studio's Fine-tune views draw.
"""

from __future__ import annotations

from dataclasses import asdict

from kvstudio.core.persist.history import RunHistory, RunRecord
from kvstudio.core.persist.run_book import RunBook
from kvstudio.core.spec import CacheSpec
from kvstudio.core.train.log import MemoryReading, TrainingLog, TrainStep, Validation

KIND = "finetune"
MAX_STORED_READINGS = 4000


def book(history: RunHistory | None, model: str, cache: CacheSpec, data: str, settings: dict, out_dir: str,
         on_warning=None) -> RunBook:
    """The session's RunBook (not started): `model` is LoadedModel.identity, `data` the data's description."""
    return RunBook(history, model=model, cache=cache, prompt=data, settings=settings | {"out_dir": out_dir},
                   kind=KIND, on_warning=on_warning)


def finish(book: RunBook, result, log: TrainingLog | None = None) -> None:
    figures = {
        "steps_done": result.steps[-1].step if result.steps else 0,
        "initial_val_loss_policy": result.initial_val_loss_policy,
        "final_val_loss_policy": result.final_val_loss_policy,
        "initial_val_loss_full": result.initial_val_loss_full,
        "final_val_loss_full": result.final_val_loss_full,
        "resumed_from_step": result.resumed_from_step,
        "seconds": result.seconds,
        "peak_bytes": max((s.peak_bytes for s in result.steps), default=0),
        "peak_bytes_source": result.peak_bytes_source,
        "adapter": result.adapter,
        "val": [asdict(v) for v in result.val],
    }
    memory = [asdict(r) for r in log.all("memory")] if log is not None else []
    if len(memory) > MAX_STORED_READINGS:
        memory = memory[:: len(memory) // MAX_STORED_READINGS + 1]
    book.finish_session(result.status, result.adapter or "", figures, [asdict(s) for s in result.steps], memory)


def log_from_record(record: RunRecord) -> TrainingLog:
    """A TrainingLog holding a stored session's curves, for the views to draw as if live."""
    log = TrainingLog()
    for step in record.steps:
        log.record(TrainStep(**step))
    for validation in record.figures.get("val", []):
        log.record(Validation(**validation))
    for reading in record.memory:
        log.record(MemoryReading(**reading))
    log.phase = "done"
    return log
