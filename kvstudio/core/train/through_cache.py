"""One example's loss, fed chunk by chunk through the engine's PolicyCache with autograd on.

The policy evicts between chunks exactly as in generation (the same `RunSession.forward`, positions and
step protocol). Selection is not differentiated (the attention rows a policy scores are computed
under no_grad); the kept keys and values are graph nodes, so the loss of a later chunk reaches an
earlier chunk only through the entries the policy kept.

Gradient modes:
  through    every chunk's graph is kept until one backward at the end: gradients flow through
             the kept entries across chunks; memory grows with the sequence.
  truncated  each chunk's loss is backpropagated right after the chunk and the cache is cut from
             the graph: no gradient crosses a chunk boundary; memory stays flat in sequence length.

The loss is the mean negative log-likelihood over the example's target tokens (scaled by `scale`
for gradient accumulation); logits are computed only at positions whose next token is a target.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

from kvstudio.core.runtime.engine import CancelToken, Engine
from kvstudio.core.runtime.session import RunSession
from kvstudio.core.errors import KVStudioError
from kvstudio.core.recording.events import Recorder
from kvstudio.core.policies.base import Policy
from kvstudio.core.storage.base import StorageConfig
from kvstudio.core.train.data import Example

GRAD_MODES = ("through", "truncated")


def check_trainable_storage(storage: StorageConfig) -> None:
    """Refuse, before a session starts, storage that cannot carry gradients through the kept entries:
    a quantizing codec (rounding has no gradient) and cross-layer merging (it writes merged states in
    place). The host tier trains: its entries come back as they left."""
    refused = []
    if storage.codec != "fp":
        refused.append(f"codec {storage.codec} (rounding has no gradient)")
    if storage.merge != "none":
        refused.append(f"merge layers {storage.merge} (merged states are written in place)")
    if refused:
        raise KVStudioError(f"fine-tuning through the cache cannot train with {' and '.join(refused)}: set the codec "
                            "to fp and merge layers to none (the host tier and its recall are supported)")


class StepCancelled(Exception):
    """Stop was asked for mid-step (between chunks or during a backward); the step is dropped."""


@dataclass
class ExampleLoss:
    loss: float  # mean NLL per target token
    targets: int
    tokens: int
    evictions: int
    forward_seconds: float
    backward_seconds: float


class SavedTensorMeter:
    """Bytes autograd holds for the backward pass (unique storages, parameters excluded): what
    `through` mode grows and `truncated` keeps flat. The CPU has no allocator peak to read, so
    on CPU this is a session's peak_bytes; on CUDA the allocator's peak is used instead."""

    def __init__(self, parameters):
        self._parameters = {p.untyped_storage().data_ptr() for p in parameters}
        self._held: dict[int, int] = {}
        self.current = 0
        self.peak = 0

    def _pack(self, tensor: torch.Tensor):
        try:
            storage = tensor.untyped_storage()
            pointer = storage.data_ptr()
        except (RuntimeError, NotImplementedError):  # tensors without storage (sparse, meta)
            return tensor
        if pointer and pointer not in self._parameters and pointer not in self._held:
            self._held[pointer] = storage.nbytes()
            self.current += storage.nbytes()
            self.peak = max(self.peak, self.current)
        return tensor

    def graph_freed(self) -> None:
        """After a backward: what it held is gone."""
        self._held.clear()
        self.current = 0

    def hooks(self):
        return torch.autograd.graph.saved_tensors_hooks(self._pack, lambda tensor: tensor)


def cut_gradients(cache) -> None:
    """Detach every layer's stored keys and values from the graph (truncated mode)."""
    for layer in cache.layers:
        if layer.is_initialized:
            layer.store.detach()  # the layer's store (core.storage) holds its keys and values


def example_loss(engine: Engine, example: Example, policy: Policy, chunk_size: int, grad_mode: str = "through",
                 backward: bool = True, scale: float = 1.0, cancel: CancelToken | None = None,
                 recorder: Recorder | None = None, meter: SavedTensorMeter | None = None,
                 on_phase: Callable[[str], None] | None = None) -> ExampleLoss:
    """Feed `example` through a fresh PolicyCache under `policy`; with `backward`, gradients of
    (loss * scale) are accumulated into the trainable parameters' .grad. (micro_batch.py feeds
    several examples at once, each as this function would.)"""
    check_loss_arguments(grad_mode, chunk_size)
    ids, total = example.ids, example.target_count
    if total == 0:
        raise KVStudioError("an example has no target tokens to compute a loss on")
    device = engine.loaded.device
    run = RunSession(engine, engine.new_cache(policy), recorder or Recorder())
    on_phase = on_phase or (lambda phase: None)
    loss_sum, pending = 0.0, []
    forward_seconds = backward_seconds = 0.0
    for start in range(0, len(ids), chunk_size):
        if cancel is not None and cancel.cancelled:
            raise StepCancelled()
        chunk = ids[start:start + chunk_size]
        end = start + len(chunk)
        # Position i predicts token i + 1: keep the logits whose next token is a target.
        wanted = [i - start for i in range(start, min(end, len(ids) - 1)) if example.targets[i + 1]]
        on_phase("forward")
        started = time.perf_counter()
        with saved_tensors_of(meter, backward):
            logits = run.forward(chunk, "prefill", is_last_prefill_chunk=end >= len(ids),
                                 keep_logits=torch.tensor(wanted or [len(chunk) - 1], device=device),
                                 grad=backward)
            chunk_loss = None
            if wanted:
                labels = torch.tensor([ids[start + i + 1] for i in wanted], device=device)
                # float32 at least (half-precision logits lose the loss), float64 models stay float64
                chunk_loss = F.cross_entropy(logits.to(torch.promote_types(logits.dtype, torch.float32)), labels,
                                             reduction="sum")
                loss_sum += float(chunk_loss.detach())
        forward_seconds += time.perf_counter() - started
        if not backward:
            continue
        if grad_mode == "truncated":
            if chunk_loss is not None:
                backward_seconds += backward_timed(chunk_loss * (scale / total), on_phase)
            if meter is not None:
                meter.graph_freed()
            cut_gradients(run.cache)
        elif chunk_loss is not None:
            pending.append(chunk_loss)
    if backward and pending:
        backward_seconds += backward_timed(torch.stack(pending).sum() * (scale / total), on_phase)
        if meter is not None:
            meter.graph_freed()
    return ExampleLoss(loss_sum / total, total, len(ids), sum(r.evicted for r in run.records),
                       forward_seconds, backward_seconds)


def check_loss_arguments(grad_mode: str, chunk_size: int) -> None:
    if grad_mode not in GRAD_MODES:
        raise KVStudioError(f"--grad-mode must be one of {', '.join(GRAD_MODES)}, got '{grad_mode}'")
    if chunk_size < 1:
        raise KVStudioError(f"--chunk-size must be at least 1, got {chunk_size}")


def saved_tensors_of(meter: SavedTensorMeter | None, backward: bool):
    """The meter's hooks while a forward that will be backpropagated runs (else nothing to count)."""
    return meter.hooks() if meter is not None and backward else _nothing()


def backward_timed(loss: torch.Tensor, on_phase) -> float:
    """loss.backward(), its seconds."""
    on_phase("backward")
    started = time.perf_counter()
    loss.backward()
    return time.perf_counter() - started


class _nothing:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def cancel_in_backward(parameters, cancel: CancelToken) -> list:
    """Hooks that stop a backward pass as soon as Stop is asked for: each trainable parameter's
    gradient hook raises StepCancelled. Returns the handles (remove them when done)."""
    def check(gradient):
        if cancel.cancelled:
            raise StepCancelled()
        return gradient

    return [p.register_hook(check) for p in parameters if p.requires_grad]
