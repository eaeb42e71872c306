"""A sweep's generation cells run as batches (`kvstudio eval --batch-size N`).

Every cell of a sweep shares the model and the chunk size, so the cells still missing from the store
run as one batched run (core/runtime/batch.py), at most N at a time, each cell a row under its own
policy and budget. Cells that need different numbers of new tokens (RULER subtasks) run as separate
batches, in plan order. A row is the single run of its cell (tests/test_batch.py), so a cell's record
is the one the serial sweep stores; each is stored as soon as its row ends, and a batch stopped part
way resumes like the serial sweep. Its `seconds` are the row's own prefill and decode time, beside
its neighbours. Perplexity and KL score one text step by step: they run one cell at a time.

Without --batch-size, `choose_batch_size` picks it from memory: as many of the missing cells as fit
together (core/runtime/batch_memory.py, the estimate batched runs refuse by), at most AUTO_MAX_ROWS.
"""

from __future__ import annotations

import itertools
import time
from typing import Callable

from kvstudio.core.errors import KVStudioError
from kvstudio.core.evaluate.sweep import (Sweep, SweepOutcome, SweepProgress, as_task, describe_cell,
                                          generation_record, make_policy)
from kvstudio.core.evaluate.protocols import DEFAULT_PROTOCOL
from kvstudio.core.evaluate.tasks import LANGUAGE_TASKS
from kvstudio.core.recording.events import Recorder
from kvstudio.core.runtime.batch import BatchRow, batch_refusal, generate_batch
from kvstudio.core.runtime.batch_memory import rows_that_fit
from kvstudio.core.runtime.engine import GenerationSettings
from kvstudio.core.units import format_bytes

# The most rows a batch size chosen from memory runs at once. More rows in flight means every cell ends
# later (a stopped sweep keeps fewer), while a decode step already reads the weights once for them all;
# 8 is the batch benchmarks/batching.py measures.
AUTO_MAX_ROWS = 8


def serial_reason(sweep: Sweep) -> str | None:
    """Why the sweep's cells run one at a time whatever --batch-size says, in words (None: they batch)."""
    spec = sweep.spec
    if spec.task in LANGUAGE_TASKS:
        return f"{spec.task} scores one text step by step, one cell at a time"
    if spec.protocol != DEFAULT_PROTOCOL:  # rows are fed the bounded way (chunks of the sweep's size)
        return f"the {spec.protocol} protocol runs cell by cell"
    if spec.measure_loss:
        return "--measure-loss keeps a shadow cache of every key, which batched rows do not keep"
    return batch_refusal(sweep.engine.loaded)


def choose_batch_size(sweep: Sweep, available_bytes: int | None = None) -> tuple[int, str]:
    """The batch size for a sweep given none, and why, in words: as many missing cells as fit in memory
    together (at most AUTO_MAX_ROWS), or 1 where the cells cannot batch."""
    reason = serial_reason(sweep)
    if reason is not None:
        return 1, reason
    task = sweep.spec.task
    missing = [cell for cell in sweep.cells if cell.key(task) not in sweep.store.cells]
    if not missing:
        return 1, "every cell is stored already"
    settings = GenerationSettings(max_new_tokens=max(cell.sample.max_new_tokens for cell in missing),
                                  chunk_size=sweep.spec.chunk_size, memory_sample_hz=0)
    policies = [make_policy(cell.policy, cell.budget, sweep.spec.policy_options, cell.variant) for cell in missing]
    fit = rows_that_fit(sweep.engine.loaded, [cell.sample.ids for cell in missing], policies, settings,
                        available_bytes=available_bytes)
    free = f"{format_bytes(fit.allowed_bytes)} of the {format_bytes(fit.available_bytes)} free may be used"
    if fit.rows == 0:
        return 1, (f"chosen from memory: not even the largest cell's cache and step fit together "
                   f"({format_bytes(fit.need_bytes)}; {free}), so one at a time")
    chosen = min(fit.rows, AUTO_MAX_ROWS)
    cells = f"{fit.rows} of the {len(missing)} missing cells" if fit.rows < len(missing) else \
        f"all {len(missing)} missing cells"
    cap = f", at most {AUTO_MAX_ROWS} at a time" if fit.rows > AUTO_MAX_ROWS else ""
    return chosen, f"chosen from memory: {cells} fit together ({free}){cap}"


def run_batched(sweep: Sweep, batch_size: int, on_cell: Callable[[dict], None] | None = None,
                on_progress: Callable[[SweepProgress], None] | None = None) -> SweepOutcome:
    """Run the sweep's missing cells in batches of at most `batch_size` rows; the serial sweep for
    perplexity and KL, or for a batch size of 1."""
    if batch_size < 1:
        raise KVStudioError(f"--batch-size must be at least 1, got {batch_size}")
    task = sweep.spec.task
    # Rows are fed the bounded way (chunks of the sweep's size); the other protocols, and the attention
    # loss's shadow cache, run cell by cell.
    if batch_size == 1 or task in LANGUAGE_TASKS or sweep.spec.protocol != DEFAULT_PROTOCOL or sweep.spec.measure_loss:
        return sweep.run(on_cell=on_cell, on_progress=on_progress)
    records: dict[int, dict] = {}
    pending = []
    for index, cell in enumerate(sweep.cells):
        key = cell.key(task)
        if key in sweep.store.cells:
            records[index] = as_task(sweep.store.cells[key], task)
            if on_cell:
                on_cell(records[index])
        else:
            pending.append((index, cell))
    reused, started = len(records), time.perf_counter()
    failures: list[str] = []
    for _, group in itertools.groupby(pending, key=lambda item: item[1].sample.max_new_tokens):
        if sweep.cancel.cancelled:
            break
        group = list(group)
        _run_group(sweep, group, batch_size, records, failures, on_cell, on_progress, reused, started)
    if failures:
        raise KVStudioError(f"{len(failures)} cell(s) failed (the others are stored): {failures[0]}")
    ordered = [records[i] for i in sorted(records)]
    cancelled = len(ordered) < len(sweep.cells)
    if on_progress:
        on_progress(SweepProgress(len(ordered), len(sweep.cells), reused, 0.0, "cancelled" if cancelled else "done",
                                  time.perf_counter() - started))
    return SweepOutcome(ordered, len(ordered) - reused, reused, cancelled, sweep.store.path)


def _run_group(sweep, group, batch_size, records, failures, on_cell, on_progress, reused, started) -> None:
    task = sweep.spec.task
    settings = GenerationSettings(max_new_tokens=group[0][1].sample.max_new_tokens, chunk_size=sweep.spec.chunk_size,
                                  memory_sample_hz=0)
    policies = [make_policy(cell.policy, cell.budget, sweep.spec.policy_options, cell.variant) for _, cell in group]
    bases = [sweep.cell_base(cell, policy) for (_, cell), policy in zip(group, policies)]
    recorders = [Recorder() for _ in group]
    books = {}
    ended: set[int] = set()

    def eta() -> float | None:
        """Seconds left, from the cells computed so far (rows end together, so it comes late)."""
        computed = len(records) - reused
        return (time.perf_counter() - started) / computed * (len(sweep.cells) - len(records)) if computed else None

    def on_row_start(row: int) -> None:
        index, cell = group[row]
        books[row] = sweep._book(policies[row], cell.sample.ids, settings, bases[row], recorders[row])
        books[row].start()
        if on_progress:
            on_progress(SweepProgress(len(records), len(sweep.cells), reused, eta(), describe_cell(cell),
                                      time.perf_counter() - started))

    def on_row_end(row_result) -> None:
        index, cell = group[row_result.index]
        ended.add(row_result.index)
        book = books.get(row_result.index)
        if row_result.failed:
            failures.append(f"{describe_cell(cell)}: {row_result.error}")
            if book is not None:
                book.fail(str(row_result.error))
            return
        result = row_result.result
        if book is not None:
            book.finish(result)
        if result.stop_reason == "cancelled":  # not stored: computed again next time
            return
        record = generation_record(cell.sample, bases[row_result.index], result, book.run_id if book else None,
                                   sweep.spec.protocol)
        sweep.store.add(cell.key(task), record)
        records[index] = record
        if on_cell:
            on_cell(record)
        in_flight = len(books) - len(ended)
        if on_progress and in_flight:
            on_progress(SweepProgress(len(records), len(sweep.cells), reused, eta(),
                                      f"({in_flight} in flight as one batch)", time.perf_counter() - started))

    rows = [BatchRow(cell.sample.ids, policy, label=describe_cell(cell)) for (_, cell), policy in zip(group, policies)]
    try:
        generate_batch(sweep.engine, rows, settings, max_rows=batch_size, recorders=recorders, cancel=sweep.cancel,
                       on_row_start=on_row_start, on_row_end=on_row_end)
    except BaseException as error:
        for book in books.values():
            if book.active:
                book.fail(error)
        raise
