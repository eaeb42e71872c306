"""Fine-tune sessions and adapters as tasks on the model's thread (task_runner.py).

Training runs where generation runs (the thread that loaded the model), never beside it. Stop goes
through the task's CancelToken, which the session checks before every chunk and inside the backward
pass, as generation does.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field

from kvstudio.core.spec import CacheSpec
from kvstudio.core.train import lora
from kvstudio.core.train.data import load_data
from kvstudio.core.train.log import TrainingLog
from kvstudio.core.train.session import FinetuneSession, FinetuneSettings
from kvstudio.gui.task_runner import Task


@dataclass
class FinetuneRequest:
    policy: str
    parameters: dict
    settings: FinetuneSettings
    data: str  # synthetic-passkey, documents, or a file path
    seq_len: int
    out_dir: str
    log: TrainingLog
    examples: int = 64
    documents: list[str] = field(default_factory=list)
    text_field: str | None = None
    prompt_field: str | None = None
    answer_field: str | None = None
    resume: bool = False
    snapshot_path: str | None = None
    history_id: int | None = None
    book: object = None  # the RunBook keeping its row (records.book)


@dataclass
class FinetuneOutcome:
    request: FinetuneRequest
    result: object = None  # FinetuneResult
    error: str | None = None
    snapshot: dict | None = None
    thread_ids: set = field(default_factory=set)


def finetune_task(outcome: FinetuneOutcome) -> Task:
    """The session as a task: it holds the model's thread (Run, Load, Compare wait for it)."""
    request = outcome.request

    def work(engine, state):
        outcome.thread_ids.add(threading.get_ident())
        policy = CacheSpec.parse(request.policy, request.parameters).build()  # with the storage parameters
        request.log.status("preparing the data…")
        dataset = load_data(request.data, engine.tokenizer, request.seq_len, seed=request.settings.seed,
                            text_field=request.text_field, prompt_field=request.prompt_field,
                            answer_field=request.answer_field, synthetic_count=request.examples,
                            documents=request.documents)
        request.log.status(f"{dataset.description}: {len(dataset.train)} training, {len(dataset.validation)} "
                           "validation examples")
        session = FinetuneSession(engine, policy, dataset, request.settings, request.out_dir, log=request.log,
                                  cancel=state.cancel, resume=request.resume, snapshot_path=request.snapshot_path)
        outcome.result = session.run()
        outcome.snapshot = session.snapshot
        return outcome

    return Task("fine-tune", work, explain={"chunk_size": request.settings.chunk_size,
                                            "policy": f"'{request.policy}'"})


def apply_adapter_task(folder: str) -> Task:
    """Apply a saved adapter to generation runs; its result is the checkpoint folder applied."""
    def work(engine, _state):
        _, checkpoint, _ = lora.load_adapter(engine.loaded, folder)
        return str(checkpoint)

    return Task("adapter", work, exclusive=False)


def remove_adapter_task() -> Task:
    """Back to the base model (nothing to do without a model)."""
    def work(engine, _state):
        if engine is not None:
            lora.detach(engine.loaded)
        return ""

    return Task("adapter", work, exclusive=False, needs_model=False)
