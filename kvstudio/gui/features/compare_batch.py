"""Compare as one batched pass: the compared policies run over the prompt as the rows of one batch
(core/runtime/batch.py), one row per policy, each row its own cache, policy, sampler and recorder.

Row r's tokens, kept positions and evictions are those of the single run under policy r (the batch's
exactness tests say so), so the comparison reads as before; what changes is that the model's weights
are read once per step for all the rows. Each row is its own run in the history, its settings naming
the batch as the CLI's batched rows do (`"batch": {"id", "row", "rows", "label"}`).

Where a batch cannot run (`why_serial`: a model with MLA or state layers, an adapter applied, the
attention loss measured), Compare runs the policies one after the other, and says why.
"""

from __future__ import annotations

from dataclasses import dataclass

from kvstudio.core.recording.packing import pack_events
from kvstudio.core.runtime.batch import BatchResult, BatchRow, generate_batch
from kvstudio.core.spec import build_policy
from kvstudio.gui.task_runner import Task
from kvstudio.gui.tasks import banner_text


@dataclass
class CompareBatch:
    """What the batched pass gives back when it ends: every row's outcome, and the batch's figures."""

    outcomes: list  # RunOutcome per row, in the policies' order
    batch: BatchResult


def row_label(index: int, policy: str, parameters: dict) -> str:
    """'row 2: h2o@128': how the row chooser names a row (1-based, the policy and its budget)."""
    budget = parameters.get("budget")
    return f"row {index + 1}: {policy}" + (f"@{budget}" if budget is not None else "")


def why_serial(info, measure_loss: bool) -> str | None:
    """Why this comparison cannot be one batched pass, in words (None: it can)."""
    if info.batch_refusal:
        return info.batch_refusal
    if info.adapter:
        return f"the adapter {info.adapter} is applied, and batched runs do not take adapters yet"
    if measure_loss:
        return "measuring the attention loss needs each policy's shadow cache, which batched runs do not keep yet"
    return None


def compare_batch_task(outcomes: list) -> Task:
    """The rows of `outcomes` (RunOutcomes made on the GUI thread) as one batch on the model's thread.
    Each row's outcome is sent as a partial result the moment its row ends, its events packed."""
    requests = [outcome.request for outcome in outcomes]
    settings = requests[0].settings

    def work(engine, state):
        rows = [BatchRow(request.prompt, build_policy(request.policy, request.parameters), label=request.policy)
                for request in requests]

        def row_ended(row) -> None:
            outcome = outcomes[row.index]
            outcome.result = row.result  # a cancelled row keeps what it made
            outcome.error = None if row.error is None else banner_text(row.error, policy=requests[row.index].policy)
            outcome.events = pack_events(row.recorder)  # here, not on the GUI thread: it compresses
            state.set_partial_result(outcome)

        batch = generate_batch(engine, rows, settings, recorders=[request.recorder for request in requests],
                               cancel=state.cancel, on_row_end=row_ended)
        return CompareBatch(outcomes, batch)

    return Task("run", work, explain={"chunk_size": settings.chunk_size,
                                      "policy": ", ".join(f"'{request.policy}'" for request in requests)})

