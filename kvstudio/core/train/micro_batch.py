"""A micro-batch of examples of different lengths through the cache, one packed forward per chunk step.

Each example is a row, as in a batched run (core/runtime/batch.py, batch_cache.py). Each row has its
own PolicyCache, policy state and positions. A step packs every unfinished row's next chunk into one
sequence, batch dimension 1. Nothing is padded: no pad token is fed, stored, attended or scored. A short
example leaves when its last chunk is in. A row's chunks are those its single pass feeds
(`through_cache.example_loss`: the same boundaries, the same step protocol), so its evictions and
its loss are the single pass's. The linear layers read the weights once for all rows' tokens.

Why this is exact: the micro-batch's loss is the sum, over its examples, of each example's summed
token NLL times `scale / its target count`. That is the same sum `example_loss` forms one example at a
time. Attention (and the policy's selection) runs row by row on the row's own entries, so no row's
loss depends on another row's tokens. Its gradient is therefore the sum of the examples' gradients.
Only the rounding of the packed matrix products differs, in the last bits
(tests/test_micro_batch.py: float64, 1e-10). In `truncated` mode every row's cache is cut from
the graph after each packed step, at the same chunk boundaries as alone.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from kvstudio.core.errors import KVStudioError
from kvstudio.core.policies.base import Policy
from kvstudio.core.recording.events import Recorder
from kvstudio.core.runtime.batch import batch_refusal
from kvstudio.core.runtime.batch_cache import BatchCache, Segment
from kvstudio.core.runtime.engine import CancelToken, Engine
from kvstudio.core.runtime.session import RunSession
from kvstudio.core.train.data import Example
from kvstudio.core.train.through_cache import (ExampleLoss, StepCancelled, backward_timed, check_loss_arguments,
                                               cut_gradients, saved_tensors_of)


@dataclass
class MicroBatchLoss:
    examples: list[ExampleLoss]  # each example's own figures (its loss is its single pass's)
    forward_seconds: float  # the packed steps' time, once (the rows share every step)
    backward_seconds: float


class _Row:
    def __init__(self, engine: Engine, index: int, example: Example, policy: Policy):
        if example.target_count == 0:
            raise KVStudioError(f"example {index + 1} of the micro-batch has no target tokens to compute a loss on")
        self.example = example
        self.session = RunSession(engine, engine.new_cache(policy), Recorder())
        self.fed = 0
        self.loss_sum = 0.0


def micro_batch_loss(engine: Engine, examples: list[Example], policy: Policy, chunk_size: int,
                     grad_mode: str = "through", backward: bool = True, scale: float = 1.0,
                     cancel: CancelToken | None = None, meter=None, on_phase=None) -> MicroBatchLoss:
    """Feed `examples` together, each through its own fresh PolicyCache under `policy`. With `backward`,
    the gradients of every example's (mean loss * scale) are accumulated into .grad, as `example_loss`
    called on each would."""
    check_loss_arguments(grad_mode, chunk_size)
    refusal = batch_refusal(engine.loaded)
    if refusal is not None:
        raise KVStudioError(f"--micro-batch: {refusal}: use --micro-batch 1")
    on_phase = on_phase or (lambda phase: None)
    device = engine.loaded.device
    rows = [_Row(engine, index, example, policy) for index, example in enumerate(examples)]
    batch = BatchCache(engine.loaded.n_layers)
    pending: list[torch.Tensor] = []
    forward_seconds = backward_seconds = 0.0
    while active := [row for row in rows if row.fed < len(row.example.ids)]:
        if cancel is not None and cancel.cancelled:
            raise StepCancelled()
        on_phase("forward")
        started = time.perf_counter()
        pieces, segments, ids, positions, keep = [], [], [], [], []
        offset = 0
        for index, row in enumerate(active):
            example, start = row.example, row.fed
            chunk = example.ids[start:start + chunk_size]
            end = start + len(chunk)
            # Position i predicts token i + 1: keep the logits whose next token is a target.
            wanted = [i - start for i in range(start, min(end, len(example.ids) - 1)) if example.targets[i + 1]]
            is_last = end >= len(example.ids)
            step, new_ids, rope = row.session.begin_forward(chunk, "prefill", is_last)
            pieces.append((row, step, len(chunk), is_last, wanted))
            segments.append(Segment(index, row.session.cache, offset, offset + len(chunk)))
            ids.append(new_ids)
            positions.append(rope)
            keep += [offset + i for i in wanted]
            offset += len(chunk)
        batch.begin_step(segments)
        try:
            with saved_tensors_of(meter, backward), torch.enable_grad() if backward else torch.inference_mode():
                output = engine.model(input_ids=torch.cat(ids).unsqueeze(0),
                                      position_ids=torch.cat(positions).unsqueeze(0),
                                      **{engine.cache_keyword: batch}, use_cache=True,
                                      logits_to_keep=torch.tensor(keep or [0], device=device),
                                      kvstudio_cache=batch)
        finally:
            failed = dict(batch.failed)
            batch.end_step()
        if failed:  # a policy that fails in one example fails the step: a gradient needs every example
            index, error = next(iter(failed.items()))
            raise KVStudioError(f"example {rows.index(active[index]) + 1} of the micro-batch: {error}") from error
        logits = output.logits[0]
        terms, taken = [], 0
        for row, step, n, is_last, wanted in pieces:
            row.session.end_forward(step, "prefill", n, started, is_last)
            if wanted:
                row_logits = logits[taken:taken + len(wanted)]
                taken += len(wanted)
                labels = torch.tensor([row.example.ids[row.fed + i + 1] for i in wanted], device=device)
                with torch.enable_grad() if backward else torch.inference_mode():
                    loss = F.cross_entropy(row_logits.to(torch.promote_types(row_logits.dtype, torch.float32)),
                                           labels, reduction="sum")
                row.loss_sum += float(loss.detach())
                terms.append(loss * (scale / row.example.target_count))
            row.fed += n
        forward_seconds += time.perf_counter() - started
        if not backward:
            continue
        if grad_mode == "truncated":
            if terms:
                backward_seconds += backward_timed(torch.stack(terms).sum(), on_phase)
            if meter is not None:
                meter.graph_freed()
            for row, *_ in pieces:
                cut_gradients(row.session.cache)
        else:
            pending += terms
    if backward and pending:
        backward_seconds += backward_timed(torch.stack(pending).sum(), on_phase)
        if meter is not None:
            meter.graph_freed()
    losses = [ExampleLoss(row.loss_sum / row.example.target_count, row.example.target_count, len(row.example.ids),
                          sum(r.evicted for r in row.session.records), 0.0, 0.0) for row in rows]
    return MicroBatchLoss(losses, forward_seconds, backward_seconds)
