"""Fine-tune sessions and adapters on the model's thread.

`FinetuneRunner` is a QObject moved to the studio worker's thread (the one that loaded the model),
so training runs where generation runs and never beside it. It takes commands through queued
signals like the worker; Stop goes through `cancel`, a CancelToken the window sets directly
(the session checks it before every chunk and inside the backward pass), as for generation.
"""

from __future__ import annotations

import threading
import traceback
from dataclasses import dataclass, field

from PySide6.QtCore import QObject, Signal, Slot

from kvstudio.core.runtime.engine import CancelToken
from kvstudio.core.errors import KVStudioError
from kvstudio.core.spec import CacheSpec
from kvstudio.core.train import lora
from kvstudio.core.train.data import load_data
from kvstudio.core.train.log import TrainingLog
from kvstudio.core.train.session import FinetuneSession, FinetuneSettings
from kvstudio.gui.tasks import banner_text


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


class FinetuneRunner(QObject):
    finished = Signal(object)  # FinetuneOutcome
    adapter_changed = Signal(str)  # the applied checkpoint folder; "" when none
    adapter_failed = Signal(str)

    def __init__(self, worker):
        super().__init__()
        self.worker = worker  # the StudioWorker: its engine is the loaded model
        self.cancel = CancelToken()

    def reset_cancel(self) -> None:
        self.cancel = CancelToken()

    @Slot(object)
    def train(self, request: FinetuneRequest) -> None:
        outcome = FinetuneOutcome(request, thread_ids={threading.get_ident()})
        try:
            engine = self.worker.engine
            if engine is None:
                raise KVStudioError("no model loaded: load one first")
            self.adapter_changed.emit("")  # a session starts from the base model and leaves it so
            policy = CacheSpec(request.policy, request.parameters).build()
            request.log.status("preparing the data…")
            dataset = load_data(request.data, engine.tokenizer, request.seq_len, seed=request.settings.seed,
                                text_field=request.text_field, prompt_field=request.prompt_field,
                                answer_field=request.answer_field, synthetic_count=request.examples,
                                documents=request.documents)
            request.log.status(f"{dataset.description}: {len(dataset.train)} training, {len(dataset.validation)} "
                               "validation examples")
            session = FinetuneSession(engine, policy, dataset, request.settings, request.out_dir, log=request.log,
                                      cancel=self.cancel, resume=request.resume,
                                      snapshot_path=request.snapshot_path)
            outcome.result = session.run()
            outcome.snapshot = session.snapshot
        except Exception as error:  # the studio stays usable whatever a session does
            outcome.error = banner_text(error, chunk_size=request.settings.chunk_size, policy=f"'{request.policy}'")
        self.finished.emit(outcome)

    @Slot(str)
    def apply_adapter(self, folder: str) -> None:
        try:
            if self.worker.engine is None:
                raise KVStudioError("no model loaded: load one first")
            _, checkpoint, _ = lora.load_adapter(self.worker.engine.loaded, folder)
        except KVStudioError as error:
            self.adapter_failed.emit(str(error))
            return
        except Exception as error:
            traceback.print_exc()
            self.adapter_failed.emit(f"could not apply the adapter: {type(error).__name__}: {error}")
            return
        self.adapter_changed.emit(str(checkpoint))

    @Slot()
    def remove_adapter(self) -> None:
        if self.worker.engine is not None:
            lora.detach(self.worker.engine.loaded)
        self.adapter_changed.emit("")
