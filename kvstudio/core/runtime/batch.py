"""Batched runs: prompts of different lengths in one run, each row with its own cache and policy.

`generate_batch(engine, rows, settings)` runs every row as the single run of its prompt would run,
but feeds all rows through the model together: each step packs every row's next piece (a prefill
chunk for a row still reading its prompt, its one new token for a row that decodes) into one
sequence, batch dimension 1, and BatchCache (batch_cache.py) gives each row's part to that row's
own PolicyCache. Nothing is padded: no pad token is fed, stored, attended or scored.

Exactness: row r runs the same steps as `Engine.generate` on prompt r alone (the same chunks, the
same decode steps, its own policy state, positions 0.. of its own sequence, its own sampler seeded
with the row's seed), through the same per-row code. What differs is only that the matrix products
of the linear layers see other rows' tokens beside its own; their rounding can differ in the last
bits, so logprobs agree within 1e-4 (fp32) and tokens and kept positions agree exactly (tests/
test_batch.py, for every built-in policy, codec and the host tier, and over random length mixes).

Short rows decode while long ones still prefill: a row whose prompt is in goes on decoding in the
next step, beside the chunks of rows still reading theirs, instead of waiting for the longest prompt.
A packed step has no padding, so a decode token costs one token's work whatever rides beside it,
and every step reads the weights once for all the rows it carries. The price: while a long row
prefills, the short rows' steps take as long as that chunk (their tokens/s is lower then; the
batch's throughput is what grows). With `max_rows` (--batch-size), at most that many rows are in
flight; a finished row's place goes to the next waiting one at the next step.

Bad input is refused before any work, naming the row: an empty prompt, a prompt longer than the
model's context, a batch whose rows would not fit in memory together (with how many would:
batch_memory.py). A policy that fails in one row ends that row with the policy's message; the
other rows go on and finish.
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field, replace
from typing import Callable

import torch

from kvstudio.core.errors import KVStudioError, PromptError
from kvstudio.core.models.layer_kinds import text_config
from kvstudio.core.policies.base import Policy
from kvstudio.core.recording.events import PrefillProgressEvent, Recorder
from kvstudio.core.recording.memory import MemorySampler
from kvstudio.core.runtime.batch_cache import BatchCache, Segment
from kvstudio.core.runtime.batch_memory import check_fits
from kvstudio.core.runtime.engine import Engine, GenerationResult, GenerationSettings, Sampler, TextStream, final_text
from kvstudio.core.runtime.layer_hooks import StepCancelled, layer_callbacks
from kvstudio.core.runtime.session import CancelToken, RunSession


@dataclass
class BatchRow:
    """One prompt of a batch, under its own policy (policies may differ by row)."""

    prompt: str | list[int]
    policy: Policy
    seed: int | None = None  # None: the settings' seed; a row's tokens never depend on its neighbours
    label: str = ""  # where the row came from ("A.txt", "prompts.jsonl line 3"), named in errors


@dataclass
class RowResult:
    """How one row ended: its result (also when cancelled), or the error that ended it."""

    index: int
    label: str
    recorder: Recorder
    result: GenerationResult | None = None
    error: KVStudioError | None = None

    @property
    def failed(self) -> bool:
        return self.error is not None


@dataclass
class BatchResult:
    rows: list[RowResult]
    seconds: float
    steps: int  # packed forward steps
    peak_cache_bytes: int  # the most the rows in flight held together (each row's peak within a step, summed)
    max_rows_in_flight: int
    tokens_generated: int = 0
    prompt_tokens: int = 0
    cancelled: bool = False
    errors: list[str] = field(default_factory=list)  # one line per failed row
    # Steps in which every row decoded (no prefill chunk beside them): their time and tokens, the
    # batch's decode throughput (benchmarks/batching.py).
    decode_seconds: float = 0.0
    decode_tokens: int = 0

    @property
    def decode_tokens_per_second(self) -> float:
        return self.decode_tokens / self.decode_seconds if self.decode_seconds > 0 else 0.0


def row_name(index: int, label: str) -> str:
    """'row 3 (B.txt)': how messages name a row (1-based, as a user counts)."""
    return f"row {index + 1}" + (f" ({label})" if label else "")


def batch_refusal(loaded) -> str | None:
    """Why `loaded` cannot run batches, in words (None: it can). The studio's Compare reads it to run
    its policies one after the other instead."""
    if getattr(text_config(loaded.config), "kv_lora_rank", None):
        return (f"{loaded.name} uses MLA attention (keys re-projected from latents after the cache), which "
                "batched runs do not support yet")
    if loaded.state_layers:  # one packed sequence would run every row through one recurrent state
        return (f"{loaded.name} has recurrent or convolution state layers "
                f"({', '.join(map(str, loaded.state_layers))}), which batched runs do not support yet")
    return None


def encode_rows(engine: Engine, rows: list[BatchRow], settings: GenerationSettings) -> list[list[int]]:
    """Every row's tokens, refusing (before any work) a row that is empty or longer than the model's context."""
    context = getattr(text_config(engine.loaded.config), "max_position_embeddings", None)
    encoded = []
    for index, row in enumerate(rows):
        ids = engine.encode(row.prompt, settings.chat_template) if isinstance(row.prompt, str) else list(row.prompt)
        if not ids:
            raise PromptError(f"{row_name(index, row.label)} is empty: give it some text or leave it out")
        if context is not None and len(ids) > context:
            raise PromptError(f"{row_name(index, row.label)} has {len(ids)} tokens, more than the "
                              f"{context}-token context of {engine.loaded.name}: shorten it or leave it out")
        encoded.append(ids)
    return encoded


class _RowRun:
    """One row in flight: its session, sampler and text, and where it is (prefill or decode)."""

    def __init__(self, engine: Engine, index: int, row: BatchRow, ids: list[int], settings: GenerationSettings,
                 recorder: Recorder):
        self.engine, self.index, self.row, self.ids, self.settings = engine, index, row, ids, settings
        self.recorder = recorder
        self.cache = engine.new_cache(row.policy)  # may raise PolicyError: the row fails before it starts
        self.session = RunSession(engine, self.cache, recorder)
        seed = row.seed if row.seed is not None else settings.seed
        self.sampler = Sampler(replace(settings, seed=seed), engine.loaded.device)
        self.stream = TextStream(engine.tokenizer)
        self.generated: list[int] = []
        self.fed = 0  # prompt tokens fed so far
        self.started = time.perf_counter()
        self.prefill_seconds = 0.0
        self.decode_started = 0.0
        self.stop_reason: str | None = None
        engine.record_start(recorder, ids, row.policy, self.cache)

    def next_piece(self) -> tuple[list[int], str, bool]:
        """(tokens to feed in the next step, phase, whether they end the prompt)."""
        if self.fed < len(self.ids):
            chunk = self.ids[self.fed:self.fed + self.settings.chunk_size]
            return chunk, "prefill", self.fed + len(chunk) >= len(self.ids)
        return [self.generated[-1]], "decode", False

    def after_step(self, n: int, phase: str, logits: torch.Tensor) -> None:
        """The step's logits are in: past the prompt, sample the next token and see whether the row stops."""
        if phase == "prefill":
            self.fed += n
            self.recorder.record(PrefillProgressEvent(self.fed, len(self.ids)))
            if self.fed < len(self.ids):
                return
            self.prefill_seconds = time.perf_counter() - self.started
            self.decode_started = time.perf_counter()
            if self.settings.max_new_tokens == 0:
                self.stop_reason = "max_new_tokens"
                return
        _, stop = self.engine.next_token(self.session, logits, self.sampler, self.stream, self.generated,
                                         self.settings)
        self.stop_reason = stop

    def result(self, stop_reason: str) -> GenerationResult:
        decode_seconds = time.perf_counter() - self.decode_started if len(self.generated) > 1 else 0.0
        prefill_seconds = self.prefill_seconds or time.perf_counter() - self.started
        return self.engine.result_of(self.session, final_text(self.stream, stop_reason, self.settings),
                                     self.generated, len(self.ids), self.row.policy, stop_reason, prefill_seconds,
                                     decode_seconds)


def generate_batch(engine: Engine, rows: list[BatchRow], settings: GenerationSettings | None = None, *,
                   max_rows: int | None = None, recorders: list[Recorder] | None = None,
                   cancel: CancelToken | None = None, on_row_start: Callable[[int], None] | None = None,
                   on_row_end: Callable[[RowResult], None] | None = None,
                   available_bytes: int | None = None) -> BatchResult:
    """Run every row; at most `max_rows` in flight (default: as many as fit in memory). `recorders[r]` receives row r's
    events (a run's own, as a single run records them). `on_row_start(r)` and `on_row_end(result)`
    say when each row starts and ends (the CLI keeps each row's history there). `available_bytes`:
    the memory the batch may use (default: what the device has free now)."""
    settings = settings or GenerationSettings()
    settings.validate()
    if not rows:
        raise PromptError("the batch has no rows: give at least one prompt")
    if max_rows is not None and max_rows < 1:
        raise KVStudioError(f"--batch-size must be at least 1, got {max_rows}")
    refusal = batch_refusal(engine.loaded)
    if refusal is not None:
        raise KVStudioError(f"{refusal}: run its prompts one by one")
    encoded = encode_rows(engine, rows, settings)
    # At most max_rows in flight, refused when they would not fit; by default as many as fit.
    max_rows = check_fits(engine.loaded, encoded, [row.policy for row in rows], settings, max_rows, available_bytes)
    recorders = recorders or [Recorder() for _ in rows]
    cancel = cancel or CancelToken()
    return _BatchLoop(engine, rows, encoded, settings, max_rows, recorders, cancel, on_row_start, on_row_end).run()


class _BatchLoop:
    def __init__(self, engine, rows, encoded, settings, max_rows, recorders, cancel, on_row_start, on_row_end):
        self.engine, self.rows, self.encoded, self.settings = engine, rows, encoded, settings
        self.max_rows, self.recorders, self.cancel = max_rows, recorders, cancel
        self.on_row_start, self.on_row_end = on_row_start, on_row_end
        self.cache = BatchCache(engine.loaded.n_layers)
        self.waiting = deque(range(len(rows)))
        self.active: list[_RowRun] = []
        self.results: dict[int, RowResult] = {}
        self.steps = 0
        self.decode_seconds = 0.0
        self.decode_tokens = 0
        self.peak_bytes = 0
        self.most_in_flight = 0

    def run(self) -> BatchResult:
        started = time.perf_counter()
        loaded = self.engine.loaded
        interval = 1 / self.settings.memory_sample_hz if self.settings.memory_sample_hz else 0
        with MemorySampler(interval, self._sample_memory), \
                layer_callbacks(self.engine.model, loaded.n_layers, self._before_layer):
            while self.waiting or self.active:
                self._admit()
                if not self.active:
                    continue
                if self.cancel.cancelled:
                    break
                try:
                    self._step()
                except StepCancelled:  # Stop between two layers: the rows' half-fed step is dropped
                    for run in self.active:
                        run.cache.free()
                    break
        for run in list(self.active):
            self._end(run, run.result("cancelled"))
        for index in list(self.waiting):  # never started: nothing ran, nothing to keep but the word
            self.results[index] = RowResult(index, self.rows[index].label, self.recorders[index],
                                            error=KVStudioError("cancelled before it started"))
        rows = [self.results[i] for i in range(len(self.rows))]
        finished = [r.result for r in rows if r.result is not None]
        return BatchResult(rows, time.perf_counter() - started, self.steps, self.peak_bytes, self.most_in_flight,
                           tokens_generated=sum(len(r.token_ids) for r in finished),
                           prompt_tokens=sum(len(ids) for ids in self.encoded), cancelled=self.cancel.cancelled,
                           errors=[f"{row_name(r.index, r.label)}: {r.error}" for r in rows if r.failed],
                           decode_seconds=self.decode_seconds, decode_tokens=self.decode_tokens)

    def _admit(self) -> None:
        """Rows start as places free up, in order."""
        while self.waiting and len(self.active) < self.max_rows:
            index = self.waiting.popleft()
            if self.on_row_start is not None:
                self.on_row_start(index)
            try:
                run = _RowRun(self.engine, index, self.rows[index], self.encoded[index], self.settings,
                              self.recorders[index])
            except KVStudioError as error:  # its policy refused to start (a plugin's new_layer_state raising)
                self._fail(index, error)
                continue
            self.active.append(run)
            self.most_in_flight = max(self.most_in_flight, len(self.active))

    def _step(self) -> None:
        """One packed forward: every row in flight feeds its next piece."""
        pieces, segments, ids, positions, begun = [], [], [], [], []
        offset = 0
        for run in self.active:
            tokens, phase, is_last = run.next_piece()
            step, new_ids, rope = run.session.begin_forward(tokens, phase, is_last)
            pieces.append((run, len(tokens), phase, is_last, step))
            segments.append(Segment(run.index, run.cache, offset, offset + len(tokens)))
            ids.append(new_ids)
            positions.append(rope)
            offset += len(tokens)
            begun.append(run.cache.peak_bytes)
            run.cache.peak_bytes = run.cache.current_bytes  # this step's own peak, summed over rows below
        self.cache.begin_step(segments)
        last = torch.tensor([segment.stop - 1 for segment in segments], device=self.engine.loaded.device)
        started = time.perf_counter()
        try:
            with torch.inference_mode():
                output = self.engine.model(input_ids=torch.cat(ids).unsqueeze(0),
                                           position_ids=torch.cat(positions).unsqueeze(0),
                                           **{self.engine.cache_keyword: self.cache}, use_cache=True,
                                           logits_to_keep=last, kvstudio_cache=self.cache)
        finally:
            failed = dict(self.cache.failed)
            self.cache.end_step()
            step_peak = 0
            for (run, *_), peak in zip(pieces, begun):
                step_peak += run.cache.peak_bytes
                run.cache.peak_bytes = max(peak, run.cache.peak_bytes)
            self.peak_bytes = max(self.peak_bytes, step_peak)
        self.steps += 1
        logits = output.logits[0]
        for position, (run, n, phase, is_last, step) in enumerate(pieces):
            if run.index in failed:
                run.cache.free()
                self._fail(run.index, failed[run.index], run)
                continue
            try:
                run.session.end_forward(step, phase, n, started, is_last)
            except KVStudioError as error:  # the row's policy broke the step protocol
                self._fail(run.index, error, run)
                continue
            run.after_step(n, phase, logits[position])
            if run.stop_reason is not None:
                self._end(run, run.result(run.stop_reason))
        if all(phase == "decode" for _, _, phase, _, _ in pieces):  # sampling included, as a single run's decode
            self.decode_seconds += time.perf_counter() - started
            self.decode_tokens += len(pieces)

    def _before_layer(self, index: int) -> None:
        if self.cancel.cancelled:
            raise StepCancelled()

    def _sample_memory(self) -> None:
        for run in tuple(self.active):
            run.session.record_memory("timer")

    def _end(self, run: _RowRun, result: GenerationResult) -> None:
        result.memory = [vars(reading).copy() for reading in run.session.memory_readings]
        result.started_unix = run.session.started_unix
        self.active.remove(run)
        self._record(RowResult(run.index, run.row.label, run.recorder, result=result))

    def _fail(self, index: int, error: KVStudioError, run: _RowRun | None = None) -> None:
        if run is not None:
            self.active.remove(run)
        self._record(RowResult(index, self.rows[index].label, self.recorders[index], error=error))

    def _record(self, row: RowResult) -> None:
        self.results[row.index] = row
        if self.on_row_end is not None:
            self.on_row_end(row)
