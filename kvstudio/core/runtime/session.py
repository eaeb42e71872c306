"""A run session: one sequence fed through the model under a policy's cache, step by step.

Positions: by default the n-th token of the sequence gets RoPE position n, whatever was evicted
(what kvpress and KVCache-Factory do). With a policy's `rerotate` on, kept keys are re-rotated to
0..k-1 after each eviction and the next token gets position k, as in the StreamingLLM paper.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from typing import Callable

import torch

from kvstudio.core.recording.events import (AttentionEvent, EvictionEvent, MemoryEvent, MergeEvent, PrefillProgressEvent,
                                            RecallEvent, Recorder, StepEvent)
from kvstudio.core.recording.memory import MemorySampler, read_system_memory, reset_peak
from kvstudio.core.runtime.cache import PolicyCache, StepContext, StepReport
from kvstudio.core.runtime.layer_hooks import StepCancelled

MAX_TIMER_READINGS = 10_000  # per run, kept in its result and history (20 Hz: the first 8 minutes in full)


class CancelToken:
    """Set from any thread; the engine checks it before every forward step."""

    def __init__(self):
        self._event = threading.Event()

    def cancel(self) -> None:
        self._event.set()

    @property
    def cancelled(self) -> bool:
        return self._event.is_set()


@dataclass
class StepRecord:
    """One forward step of a run, as written to --json."""

    step: int
    phase: str
    input_tokens: int
    seconds: float
    kept_per_layer: list[int]
    cache_bytes: int
    evicted: int
    token_id: int | None = None
    text: str | None = None
    logprob: float | None = None
    cache_bytes_per_layer: list[int] = field(default_factory=list)
    process_bytes: int = 0  # resident memory of the process after the step
    cuda_allocated: int = 0
    cuda_reserved: int = 0
    cuda_peak: int = 0
    device_used: int = 0
    device_total: int = 0
    left_window: int = 0  # entries dropped because they left a sliding layer's window (not in `evicted`)
    attention_loss: list = field(default_factory=list)  # per layer, with --measure-loss (runtime/attention_loss.py)
    # Per layer, with --measure-loss: ((position, share), ...) of the evicted tokens it would have attended most
    evicted_attention: tuple = ()


class RunSession:
    """One sequence's forward steps through a PolicyCache: positions, the step protocol, what gets recorded.

    The public way to drive the model under a policy: `prefill` (the one chunked feeding loop; the policy
    evicts between chunks), `forward` (one step: a decode token, or a chunk with all or some logits and
    autograd for training), `record_step` (a step restored from a saved state), `record_memory`. The
    engine's generate loop, evaluation (language.py, codec_error.py), fine-tuning (through_cache.py) and
    saved caches (run_state.py: capture and restore) all run through it."""

    def __init__(self, engine, cache: PolicyCache, recorder: Recorder):
        self.engine = engine
        self.cache = cache
        self.recorder = recorder
        self.seen = 0  # tokens fed so far; the next token's position without re-rotation
        self.first_step = 0  # the first step's number: more than 0 when the run goes on from a saved state
        self.records: list[StepRecord] = []
        self.phase = "prefill"
        self.started = time.perf_counter()
        self.started_unix = time.time()
        # Every reading after a step, and timer readings thinned to at most MAX_TIMER_READINGS.
        self.memory_readings: list[MemoryEvent] = []
        self.memory_sampler: MemorySampler | None = None
        self._timer_readings = 0
        self._memory_lock = threading.Lock()  # the sampler's thread and the engine's both append
        reset_peak(engine.loaded.device, engine.devices)
        # Every token fed so far (`token_ids`), in a buffer that doubles when full: appending a
        # decode step's token copies one id, not the whole sequence.
        self._token_buffer = torch.empty(1024, dtype=torch.long, device=engine.loaded.device)
        self._n_tokens = 0
        self._chunk = None  # during a prefill chunk: (tokens done before it, total, its tokens, CancelToken)

    def prefill(self, ids: list[int], chunk_size: int, cancel: CancelToken | None = None,
                before_last_chunk: Callable | None = None, offset: int = 0) -> torch.Tensor | None:
        """Feed the prompt chunk by chunk (the policy evicts between chunks); the last position's
        logits, or None when cancelled before the prompt was in. `before_last_chunk(logits)` sees the
        run at the last chunk boundary before the end (a prompt cache saves it there); `offset` says
        how many prompt tokens a restored state already fed."""
        logits = None
        for start in range(0, len(ids), chunk_size):
            if cancel is not None and cancel.cancelled:
                return None
            chunk = ids[start:start + chunk_size]
            # A state at the last chunk boundary serves prompts that share all but the last chunk.
            if (before_last_chunk is not None and start > 0 and start + chunk_size >= len(ids)
                    and (offset + len(ids)) % chunk_size):
                before_last_chunk(logits)
            self._chunk = (offset + start, offset + len(ids), len(chunk), cancel)
            try:
                logits = self.forward(chunk, "prefill", is_last_prefill_chunk=start + len(chunk) >= len(ids))
            except StepCancelled:  # Stop between two layers: the half-fed chunk leaves layers unequal
                self.cache.free()
                return None
            finally:
                self._chunk = None
            self.recorder.record(PrefillProgressEvent(offset + start + len(chunk), offset + len(ids)))
        return logits

    def before_layer(self, index: int) -> None:
        """Before each decoder layer of a prefill chunk: stop there when cancelled, else say how far
        the chunk got. Decode steps are short: they stop between steps, as before."""
        if self._chunk is None:
            return
        done, total, chunk_tokens, cancel = self._chunk
        if cancel is not None and cancel.cancelled:
            raise StepCancelled()
        if index > 0:
            self.recorder.record(PrefillProgressEvent(done, total, chunk_tokens, index, self.engine.loaded.n_layers))

    def forward(self, token_ids: list[int], phase: str, is_last_prefill_chunk: bool = False,
                all_logits: bool = False, keep_logits: torch.Tensor | None = None,
                grad: bool = False) -> torch.Tensor:
        """Feed tokens, let the policy evict, record the step; returns the last position's logits.

        `all_logits`: every fed position's, (n, vocab) (the perplexity evaluation scores them all).
        Fine-tuning (core/train) passes `keep_logits` (indices into the chunk: the logits wanted,
        (k, vocab) returned) and `grad` (autograd on, so kept keys and values stay in the graph)."""
        step, new_ids, rope_positions = self.begin_forward(token_ids, phase, is_last_prefill_chunk)
        started = time.perf_counter()
        with torch.enable_grad() if grad else torch.inference_mode():
            output = self.engine.model(
                input_ids=new_ids.unsqueeze(0),
                position_ids=rope_positions.unsqueeze(0),
                **{self.engine.cache_keyword: self.cache},
                use_cache=True,
                logits_to_keep=0 if all_logits else (1 if keep_logits is None else keep_logits),
                kvstudio_cache=self.cache,
            )
        logits = output.logits[0, -1] if keep_logits is None and not all_logits else output.logits[0]
        self.end_forward(step, phase, len(token_ids), started, is_last_prefill_chunk)
        return logits

    def begin_forward(self, token_ids: list[int], phase: str, is_last_prefill_chunk: bool = False):
        """The first half of a step, before the model runs: the new tokens' positions, the cache's step
        context. (step, the tokens as a tensor, the position ids to rotate them with). A batched run
        (batch.py) calls it for each row, then runs the model once for all of them."""
        device = self.engine.loaded.device
        n = len(token_ids)
        positions = torch.arange(self.seen, self.seen + n, device=device)
        if self.cache.policy.config.rerotate:
            held = self.cache.entries_held()
            rope_positions = torch.arange(held, held + n, device=device)
        else:
            rope_positions = positions
        step = self.first_step + len(self.records)
        new_ids = torch.tensor(token_ids, device=device)
        self._append_tokens(new_ids)
        self.cache.begin_step(StepContext(step, phase, positions, rope_positions, is_last_prefill_chunk,
                                          self.recorder.watch_layers, self.token_ids))
        self.cache.tokens_seen = self.seen  # get_seq_length(): tokens absorbed before this step
        return step, new_ids, rope_positions

    def end_forward(self, step: int, phase: str, n: int, started: float, is_last_prefill_chunk: bool = False) -> None:
        """The second half, after the model ran: what the policy did, recorded as the step."""
        report = self.cache.end_step()
        seconds = time.perf_counter() - started
        self.seen += n
        self.record_step(step, phase, n, seconds, report, prefill_done=is_last_prefill_chunk)

    @property
    def token_ids(self) -> torch.Tensor:
        """(seen,) long: every token fed so far."""
        return self._token_buffer[:self._n_tokens]

    @token_ids.setter
    def token_ids(self, ids: torch.Tensor) -> None:  # a run going on from a restored state
        self._n_tokens = 0
        self._append_tokens(ids.to(self._token_buffer.device))

    def _append_tokens(self, new_ids: torch.Tensor) -> None:
        have, n = self._n_tokens, new_ids.shape[0]
        if have + n > self._token_buffer.shape[0]:
            grown = torch.empty(max(2 * self._token_buffer.shape[0], have + n), dtype=torch.long,
                                device=self._token_buffer.device)
            grown[:have] = self._token_buffer[:have]
            self._token_buffer = grown
        self._token_buffer[have:have + n] = new_ids
        self._n_tokens = have + n

    def record_step(self, step: int, phase: str, n: int, seconds: float, report: StepReport,
                prefill_done: bool = False) -> None:
        memory = self.record_memory("step", step, next_phase="decode" if prefill_done else None)
        record = StepRecord(step, phase, n, seconds, report.kept_per_layer, report.cache_bytes, report.evicted_count,
                            cache_bytes_per_layer=list(memory.cache_bytes_per_layer),
                            process_bytes=memory.process_bytes, cuda_allocated=memory.cuda_allocated,
                            cuda_reserved=memory.cuda_reserved, cuda_peak=memory.cuda_peak,
                            device_used=memory.device_used, device_total=memory.device_total,
                            left_window=report.left_window_count, attention_loss=report.attention_loss,
                            evicted_attention=report.evicted_attention)
        self.records.append(record)
        self.recorder.record(StepEvent(step, phase, n, seconds, tuple(report.kept_per_layer), report.cache_bytes,
                                       self.cache.peak_bytes, report.evicted_count, report.left_window_count,
                                       tuple(report.attention_loss), report.evicted_attention))
        for eviction in report.evictions:
            for head, positions in enumerate(eviction.positions.numpy()):
                self.recorder.record(EvictionEvent(step, eviction.layer, head, positions, eviction.reason))
        for rows in report.attention:
            self.recorder.record(AttentionEvent(step, rows.layer, rows.weights.numpy(), rows.positions.numpy()))
        for recall in report.recalled:
            self.recorder.record(RecallEvent(step, recall.layer, recall.positions.numpy()))
        if report.merging is not None:
            self.recorder.record(MergeEvent(step, **report.merging))

    def record_memory(self, source: str, step: int | None = None, next_phase: str | None = None) -> MemoryEvent:
        """Read memory now and record it. Runs on the engine's thread ("step") or the sampler's
        ("timer"); the cache's bytes are read from its tensors either way. `next_phase` switches
        the phase under the same lock, so no timer reading falls between the prompt's last step
        and decoding with the wrong phase."""
        with self._memory_lock:  # one reading at a time: readings stay in time order
            per_layer = tuple(self.cache.bytes_per_layer())
            system = read_system_memory(self.engine.loaded.device, self.engine.devices)
            clock = time.perf_counter()
            step = self.first_step + len(self.records) if step is None else step
            event = MemoryEvent(step, clock - self.started, clock, self.phase, source, sum(per_layer), per_layer,
                                **vars(system), host_cache_bytes=self.cache.host_bytes,
                                kept_per_layer=tuple(self.cache.kept_per_layer()),
                                shared_cache_bytes=self.cache.shared_bytes())
            self.recorder.record(event)
            self.memory_readings.append(event)
            if source == "timer":
                self._timer_readings += 1
                if self._timer_readings > MAX_TIMER_READINGS:
                    self._thin_timer_readings()
            if next_phase is not None:
                self.phase = next_phase
        return event

    def _thin_timer_readings(self) -> None:
        """A long run keeps its whole memory curve at half the resolution: drop every other timer
        reading and sample half as often from now on, so the readings stay evenly spread in time
        and bounded in number however long the run goes."""
        kept, timer_index = [], 0
        for reading in self.memory_readings:
            if reading.source == "timer":
                timer_index += 1
                if timer_index % 2:
                    continue
            kept.append(reading)
        self.memory_readings = kept
        self._timer_readings = timer_index // 2
        if self.memory_sampler is not None:
            self.memory_sampler.interval_s *= 2
