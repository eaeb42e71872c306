"""The model's thread: the loaded engine lives here, and all model work (loading, tokenizing,
generating, evaluating, training, saving caches) runs here.

`StudioWorker` is a QObject moved to its own QThread. It holds the engine; the long work on it is
queued as tasks through the task runner (task_runner.py), which also says how each ends. Loading is
the one task that replaces the engine, so it is written here, beside it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from PySide6.QtCore import QObject, Signal, Slot

from kvstudio.core.errors import KVStudioError
from kvstudio.core.models.loading import load_model, model_identity
from kvstudio.core.runtime.batch import batch_refusal
from kvstudio.core.runtime.engine import Engine
from kvstudio.core.train.lora import adapter_name
from kvstudio.gui.task_runner import Task


class LoadCancelled(KVStudioError):
    """Cancel was pressed during a load: the banner says so, and the previous model stays."""

    def __init__(self):
        super().__init__("loading cancelled")


@dataclass
class ModelInfo:
    spec: str
    description: str
    n_layers: int
    n_heads: int
    n_kv_heads: int
    has_chat_template: bool
    device: str
    adapter_folder: str = ""  # the LoRA checkpoint generation runs use, "" for the base model: what --adapter takes
    dtype: str = ""  # what the weights compute in (float32, bfloat16, ...): the run history's provenance
    batch_refusal: str | None = None  # why Compare cannot run its policies as one batch (core/runtime/batch.py)

    @property
    def adapter(self) -> str:
        """How runs name the applied adapter (lora.adapter_name: "session/step-000040"), "" for none."""
        return adapter_name(Path(self.adapter_folder)) if self.adapter_folder else ""

    @property
    def identity(self) -> str:
        """The model as the run history names it, the same way the CLI does (LoadedModel.identity)."""
        return model_identity(self.spec, self.adapter)


class StudioWorker(QObject):
    tokens_counted = Signal(object, int)  # document key, token count

    def __init__(self):
        super().__init__()
        self.engine: Engine | None = None
        self.model_thread_ids: set[int] = set()  # threads that ran model code (the tests check)

    @Slot(object, str)
    def count_tokens(self, key, text: str) -> None:
        """Queued from the GUI thread: too quick to be a task, but it needs the tokenizer of this thread."""
        if self.engine is None:
            return
        self.tokens_counted.emit(key, len(self.engine.tokenizer(text)["input_ids"]))

    def load(self, spec: str, device: str, dtype: str, recorder, state) -> ModelInfo:
        """On the model's thread (a task's work): load `spec` and hold it instead of the previous model."""
        def progress(message, fraction):
            if state.is_interruption_requested():
                raise LoadCancelled()
            state.set_status(message)
            if fraction is not None:
                state.set_progress_value(100 * float(fraction))

        if state.is_interruption_requested():
            raise LoadCancelled()
        loaded = load_model(spec, device=device, dtype=dtype, progress=progress, recorder=recorder)
        if state.is_interruption_requested():
            raise LoadCancelled()
        self.engine = None  # free the previous model before holding the new one
        self.engine = Engine(loaded)
        return ModelInfo(spec, loaded.describe(), loaded.n_layers, loaded.n_heads, loaded.n_kv_heads,
                         loaded.has_chat_template, str(loaded.device),
                         dtype=str(loaded.dtype).removeprefix("torch."), batch_refusal=batch_refusal(loaded))


def load_task(worker: StudioWorker, spec: str, device: str, dtype: str, recorder) -> Task:
    """Loading `spec` as a task. Not exclusive: a run asked for meanwhile waits in the thread's queue,
    as it always has (the Load button is what the busy state disables)."""
    def work(_engine, state):
        return worker.load(spec, device, dtype, recorder, state)

    return Task("load", work, exclusive=False, needs_model=False, explain={"stage": "load", "model": spec})
