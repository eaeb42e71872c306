"""The generation loop: chunked prefill, decode, sampling, stopping and cancellation.

KV Studio runs its own loop instead of `model.generate` because a policy must act between prefill
chunks and at every decode step, and because positions must be passed explicitly: once entries are
evicted, the cache length no longer says how many tokens were seen.

Each run is a RunSession (session.py): positions, the step protocol and what gets recorded.
"""

from __future__ import annotations

import math

import time
from dataclasses import asdict, dataclass, field, replace
from typing import Callable

import torch

from kvstudio.core.errors import KVStudioError, PromptError
from kvstudio.core.models.layer_kinds import kinds_record
from kvstudio.core.models.loading import LoadedModel
from kvstudio.core.policies.base import Policy
from kvstudio.core.recording.events import Recorder, RunStartedEvent, TokenEvent
from kvstudio.core.recording.memory import MemorySampler
from kvstudio.core.runtime import attention, run_state
from kvstudio.core.runtime.attention_loss import loss_summary, new_loss_meter
from kvstudio.core.runtime.cache import PolicyCache
from kvstudio.core.runtime.cache_keyword import cache_keyword
from kvstudio.core.runtime.layer_hooks import layer_callbacks
from kvstudio.core.runtime.layer_tensors import cache_unsaveable_reason
from kvstudio.core.runtime.rotary import Rerotator
from kvstudio.core.runtime.state_layers import state_layers
from kvstudio.core.runtime.run_state import RunState
# The session is the public way to drive steps; CancelToken and StepRecord are named from here too.
from kvstudio.core.runtime.session import CancelToken, RunSession, StepRecord  # noqa: F401
from kvstudio.core.storage.summary import summarize




SEED_RANGE = (-(2**63), 2**64 - 1)  # what torch.Generator.manual_seed takes
MIN_SAMPLE_HZ = 0.001  # a reading every ~17 minutes; a slower rate overflows the timer's wait


@dataclass
class GenerationSettings:
    max_new_tokens: int = 64
    temperature: float = 0.0  # 0 means greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 means no top-k filter
    seed: int | None = None
    chunk_size: int = 512
    stop_strings: tuple[str, ...] = ()
    chat_template: bool = False
    ignore_eos: bool = False  # generate max_new_tokens whatever the model says (benchmarks)
    memory_sample_hz: float = 20.0  # memory readings between steps, besides the one after each step; 0: off
    # The attention mass on evicted entries, per layer and step, against a shadow cache of every key
    # (core/runtime/attention_loss.py); it costs a full cache of keys beside the policy's.
    measure_loss: bool = False
    # Question-agnostic compression (core/evaluate/protocols.py): the prompt's tokens from this index on
    # (the question) are fed after the context was prefilled and compressed, in one step the policy
    # treats as decoding (SnapKV and PyramidKV keep it whole; H2O, TOVA go on evicting). None: all prefilled.
    question_start: int | None = None

    def validate(self) -> None:
        checks = [
            (self.max_new_tokens >= 0, f"--max-new-tokens must be 0 or more, got {self.max_new_tokens}"),
            (0 <= self.temperature < math.inf, f"--temperature must be 0 (greedy) or a finite number above it, "
                                               f"got {self.temperature}"),
            (0 < self.top_p <= 1, f"--top-p must be in (0, 1], got {self.top_p}"),
            (self.top_k >= 0, f"--top-k must be 0 (off) or more, got {self.top_k}"),
            (self.seed is None or SEED_RANGE[0] <= self.seed <= SEED_RANGE[1],
             f"--seed must be between {SEED_RANGE[0]} and {SEED_RANGE[1]} (64 bits), got {self.seed}"),
            (self.chunk_size >= 1, f"--chunk-size must be at least 1, got {self.chunk_size}"),
            (self.memory_sample_hz == 0 or MIN_SAMPLE_HZ <= self.memory_sample_hz <= 1000,
             f"--memory-sample-hz must be 0 (off) or between {MIN_SAMPLE_HZ} and 1000, got {self.memory_sample_hz}"),
            (self.question_start is None or self.question_start >= 1,
             f"the question must start after the context (token 1 or later), got {self.question_start}"),
        ]
        for ok, message in checks:
            if not ok:
                raise KVStudioError(message)

    def record(self) -> dict:
        """The settings as the run history and --json store them (plain JSON values)."""
        return vars(self) | {"stop_strings": list(self.stop_strings)}


@dataclass
class GenerationResult:
    text: str
    token_ids: list[int]
    prompt_tokens: int
    policy: str
    model: str
    stop_reason: str  # max_new_tokens | eos | stop_string | cancelled
    prefill_seconds: float
    decode_seconds: float
    peak_cache_bytes: int
    kept_per_layer: list[int]
    peak_kept_per_layer: list[int]
    evictions: int
    steps: list[StepRecord] = field(default_factory=list)
    memory: list[dict] = field(default_factory=list)  # every memory reading, timer ones included
    started_unix: float = 0.0  # when the run started (seconds since 1970): places it among other records
    storage: dict = field(default_factory=dict)  # codec, tier, host bytes, errors (kvstudio.core.storage.summary)
    cache: PolicyCache | None = field(default=None, repr=False)
    state: RunState | None = field(default=None, repr=False)  # with keep_state: to save and continue later
    restored_tokens: int = 0  # tokens that came from a saved cache instead of being computed
    left_window: int = 0  # entries dropped because they left a sliding layer's window (not evictions)
    layer_kinds: dict = field(default_factory=dict)  # {"summary": "4 layers: ...", "layers": [{kind, window}]}
    attention_loss: float | None = None  # with measure_loss: attention_loss.mean_loss of the steps
    attention_loss_per_layer: list[float] = field(default_factory=list)
    shadow_bytes: int = 0  # what the shadow cache of measure_loss held at the end

    @property
    def tokens_per_second(self) -> float:
        """Decode speed: tokens after the first over the time spent producing them."""
        decoded = max(len(self.token_ids) - 1, 0)
        return decoded / self.decode_seconds if self.decode_seconds > 0 else 0.0

    @property
    def computed_prompt_tokens(self) -> int:
        """Prompt tokens the prefill computed: those restored from a saved cache were not."""
        return max(self.prompt_tokens - self.restored_tokens, 0)

    @property
    def prefill_tokens_per_second(self) -> float:
        """Over the computed tokens only: a restored prefix took no model time to speak of."""
        computed = self.computed_prompt_tokens
        return computed / self.prefill_seconds if computed and self.prefill_seconds > 0 else 0.0

    def to_dict(self) -> dict:
        data = {k: v for k, v in asdict(replace(self, cache=None, state=None)).items() if k not in ("cache", "state")}
        data["tokens_per_second"] = self.tokens_per_second
        data["prefill_tokens_per_second"] = self.prefill_tokens_per_second
        return data


class Sampler:
    """Greedy when temperature is 0; otherwise temperature, top-k, then top-p (nucleus) sampling."""

    def __init__(self, settings: GenerationSettings, device: torch.device):
        self.settings = settings
        self.generator = None
        if settings.temperature > 0:
            self.generator = torch.Generator(device="cpu")
            self.generator.manual_seed(settings.seed if settings.seed is not None else torch.seed())

    def __call__(self, logits: torch.Tensor) -> tuple[int, float]:
        logits = logits.float()
        logprobs = torch.log_softmax(logits, dim=-1)
        s = self.settings
        if s.temperature == 0:
            token = int(torch.argmax(logits))
            return token, float(logprobs[token])
        # From the largest logit down, in float64: a tiny temperature then sends the others to -inf and
        # keeps the largest at 0 (never inf - inf or 0 / 0 = nan: float32 would round 1e-46 to 0), which
        # is the greedy limit it approaches.
        scaled = (logits.double() - logits.max()) / s.temperature
        if s.top_k:
            kth = torch.topk(scaled, min(s.top_k, scaled.shape[-1])).values[-1]
            scaled = scaled.masked_fill(scaled < kth, float("-inf"))
        if s.top_p < 1:
            sorted_logits, order = torch.sort(scaled, descending=True)
            cumulative = torch.softmax(sorted_logits, dim=-1).cumsum(dim=-1)
            # Drop a token when the tokens before it already cover top_p; the first always stays.
            drop_sorted = (cumulative - torch.softmax(sorted_logits, dim=-1)) >= s.top_p
            scaled = scaled.masked_fill(drop_sorted.scatter(0, order, drop_sorted), float("-inf"))
        probs = torch.softmax(scaled, dim=-1).cpu()
        token = int(torch.multinomial(probs, 1, generator=self.generator))
        return token, float(logprobs[token])


class TextStream:
    """Incremental detokenization: the text each new token adds, holding back partial UTF-8.

    Each push decodes only the tokens since the last piece that came out whole, plus those of that
    piece for context (byte-level and SentencePiece tokenizers decide spaces and multi-byte
    characters from the neighbours), so a generation costs O(tokens) decoding, not O(tokens^2)
    from re-decoding everything generated so far at every step. The pieces join to the text a
    one-shot decode gives.
    """

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self._pieces: list[str] = []
        self._prefix_offset = 0  # start of the context window
        self._read_offset = 0  # tokens before this have been emitted
        self._tail = ""  # the newest text, enough to find a stop string that ends in the newest piece

    def push(self, token_id: int) -> str:
        self.ids.append(token_id)
        decode = self.tokenizer.decode
        context = decode(self.ids[self._prefix_offset:self._read_offset], skip_special_tokens=True)
        text = decode(self.ids[self._prefix_offset:], skip_special_tokens=True)
        if len(text) <= len(context) or text.endswith("\ufffd"):
            return ""  # nothing new yet, or half a character: wait for the rest of its bytes
        piece = text[len(context):]
        self._prefix_offset, self._read_offset = self._read_offset, len(self.ids)
        self._pieces.append(piece)
        self._tail = (self._tail + piece)[-4096:]
        return piece

    @property
    def emitted(self) -> str:
        """All text emitted so far."""
        return "".join(self._pieces)

    @emitted.setter
    def emitted(self, text: str) -> None:
        """Go on from a restored run: `ids` are already set and `text` is what they emitted. Tokens at
        the end that emitted nothing yet (half a character) stay unread, so they come out later."""
        read = len(self.ids)
        decode = self.tokenizer.decode
        while read > 0 and len(self.ids) - read < 4 and decode(self.ids[:read], skip_special_tokens=True) != text:
            read -= 1
        self._pieces, self._tail = [text], text[-4096:]
        self._prefix_offset, self._read_offset = max(read - 4, 0), read

    def found_stop(self, stops: tuple[str, ...], piece: str) -> bool:
        """Whether a stop string now appears. One that does must end inside the newest piece (or it
        would have been found before), so only the tail is searched: O(piece + stop) per token."""
        return bool(piece) and any(stop in self._tail[-(len(piece) + len(stop) - 1):] for stop in stops)


class Engine:
    """Runs generation for one loaded model under any policy. Not thread-safe: one run at a time."""

    def __init__(self, loaded: LoadedModel):
        self.loaded = loaded
        self.model = loaded.model
        self.tokenizer = loaded.tokenizer
        self.devices = loaded.devices  # several under a device map: memory readings cover each
        self.model.set_attn_implementation(attention.register())
        self.rerotator = Rerotator.for_model(self.model)
        self.cache_keyword = cache_keyword(self.model)  # `cache` from transformers 5.24, `past_key_values` before
        eos = self.model.generation_config.eos_token_id
        eos = eos if isinstance(eos, list) else [eos]
        self.eos_ids = {i for i in eos + [self.tokenizer.eos_token_id] if i is not None}
        self._token_texts: dict[int, str] = {}  # token id -> its text alone (record_start), read once per id

    # -- prompts ----------------------------------------------------------------------------------

    def encode(self, prompt: str, chat_template: bool = False) -> list[int]:
        if chat_template:
            if not self.loaded.has_chat_template:
                raise PromptError(f"{self.loaded.name} has no chat template; run without --chat")
            encoded = self.tokenizer.apply_chat_template([{"role": "user", "content": prompt}],
                                                         add_generation_prompt=True, tokenize=True)
            ids = encoded["input_ids"] if isinstance(encoded, dict) or hasattr(encoded, "keys") else encoded
            return list(ids)
        return list(self.tokenizer(prompt, add_special_tokens=True)["input_ids"])

    # -- the loop ---------------------------------------------------------------------------------

    def new_cache(self, policy: Policy) -> PolicyCache:
        kinds = self.loaded.layer_kinds
        return PolicyCache(policy, self.loaded.n_layers, self.rerotator, self.tokenizer, kinds,
                           state_layers(self.model.config, kinds))

    def prompt_logits(self, ids: list[int], policy: Policy, chunk_size: int) -> torch.Tensor:
        """Logits at the last prompt position after a chunked prefill under `policy`."""
        return RunSession(self, self.new_cache(policy), Recorder()).prefill(ids, chunk_size)

    def generate(
        self,
        prompt: str | list[int],
        policy: Policy,
        settings: GenerationSettings | None = None,
        recorder: Recorder | None = None,
        cancel: CancelToken | None = None,
        on_text: Callable[[str], None] | None = None,
        keep_cache: bool = False,
        cache: PolicyCache | None = None,
        start: RunState | None = None,
        resume: bool = False,
        keep_state: bool = False,
        on_prefill_state: Callable[[RunState], None] | None = None,
    ) -> GenerationResult:
        """Run `policy` on `prompt`. From a saved `start` (see store/run_state.py): with `resume`, go on
        generating where it stopped (prompt ignored); without, `prompt` must extend the tokens it fed
        and only the rest is prefilled. `keep_state` puts the final RunState on the result;
        `on_prefill_state` receives the state after the prompt and at the last chunk boundary before
        it (what a prompt cache saves). `cache`: one made by `new_cache(policy)` whose options
        (scoring scratch bound, fused scoring) the caller set; by default a new one."""
        settings = settings or GenerationSettings()
        settings.validate()
        if start is not None and resume:
            ids = list(start.token_ids)
        else:
            ids = self.encode(prompt, settings.chat_template) if isinstance(prompt, str) else list(prompt)
        if not ids:
            raise PromptError("the prompt is empty: give some text")
        cancel = cancel or CancelToken()
        # The recorder says which layers' attention rows are watched (it may change mid-run).
        recorder = recorder or Recorder()
        cache = cache if cache is not None else self.new_cache(policy)
        if settings.measure_loss:
            cache.loss_meter = new_loss_meter(cache, start)
        sampler = Sampler(settings, self.loaded.device)
        stream = TextStream(self.tokenizer)
        run = RunSession(self, cache, recorder)
        self.record_start(recorder, ids, policy, cache, start)

        interval = 1 / settings.memory_sample_hz if settings.memory_sample_hz else 0
        # Between decoder layers, a prefill chunk can stop and shows its progress (core/runtime/layer_hooks.py).
        with MemorySampler(interval, lambda: run.record_memory("timer")) as run.memory_sampler, \
                layer_callbacks(self.model, self.loaded.n_layers, run.before_layer):
            result = self._generate(run, ids, policy, settings, sampler, stream, cancel, on_text,
                                    start, resume, keep_state, on_prefill_state)
        result.memory = [vars(reading).copy() for reading in run.memory_readings]  # flat fields: no deep copy
        result.started_unix = run.started_unix
        if keep_cache:
            result.cache = cache
        return result

    def record_start(self, recorder: Recorder, ids: list[int], policy: Policy, cache: PolicyCache,
                     start: RunState | None = None) -> None:
        """The run's first event: model, policy, budgets and the prompt's tokens (the views' set-up)."""
        recorder.record(RunStartedEvent(
            self.loaded.name, policy.describe(), self.loaded.n_layers, self.loaded.n_kv_heads, tuple(cache.budgets),
            self.token_texts(ids),
            self.loaded.n_heads, cache.storage.tier, tuple(ids), len(start.token_ids) if start is not None else 0,
            run_state.missing_heads(start, self.loaded.n_kv_heads) if start is not None else (),
            self.loaded.layer_windows, self.loaded.state_layers,
        ))

    def token_texts(self, ids: list[int]) -> tuple[str, ...]:
        """Each token's text on its own (the views label entries with it). Converting is ~4 us a token
        and a prompt is re-run many times in the studio and the sweeps: each id is converted once."""
        texts = self._token_texts
        missing = list({i for i in ids if i not in texts})
        if missing:
            tokenizer = self.tokenizer
            for i, token in zip(missing, tokenizer.convert_ids_to_tokens(missing)):
                texts[i] = tokenizer.convert_tokens_to_string([token])
        return tuple(texts[i] for i in ids)

    def _generate(self, run, ids, policy, settings, sampler, stream, cancel, on_text, start=None, resume=False,
                  keep_state=False, on_prefill_state=None) -> GenerationResult:
        prefill_started = time.perf_counter()
        earlier: list[int] = []  # tokens a resumed run generated before it was saved
        checkpoint = None
        if cache_unsaveable_reason(run.cache) is not None:  # a codec, or state layers, saved caches cannot hold yet
            on_prefill_state, keep_state = None, False
        if on_prefill_state is not None:
            checkpoint = lambda logits: on_prefill_state(run_state.capture(  # noqa: E731
                run, logits, [], run.seen, prefill_seconds=time.perf_counter() - prefill_started))
        split = settings.question_start if settings.question_start is not None and not resume else None
        context = ids if split is None else ids[:split]
        if start is None:
            logits = run.prefill(context, settings.chunk_size, cancel, checkpoint)
        else:
            logits, earlier = run_state.start_from(run, start, context, resume, sampler, stream, settings.chunk_size,
                                                   cancel, checkpoint)
        if split is not None and split < len(ids) and logits is not None and not cancel.cancelled:
            logits = run.forward(ids[split:], "decode")  # the question, after the context's compression
        prefill_seconds = time.perf_counter() - prefill_started
        stop_reason = "max_new_tokens" if logits is not None else "cancelled"
        if on_prefill_state is not None and logits is not None and not resume:
            on_prefill_state(run_state.capture(run, logits, [], len(ids), sampler, prefill_seconds))

        generated: list[int] = []
        decode_started = time.perf_counter()
        while logits is not None and settings.max_new_tokens > 0:
            piece, stop = self.next_token(run, logits, sampler, stream, generated, settings)
            if on_text and piece:
                on_text(piece)
            if stop is not None:
                stop_reason = stop
                break
            if cancel.cancelled:
                stop_reason = "cancelled"
                break
            logits = run.forward([generated[-1]], "decode")
        # The first token comes from the prefill's logits; decode time covers the tokens after it.
        decode_seconds = time.perf_counter() - decode_started if len(generated) > 1 else 0.0

        text = final_text(stream, stop_reason, settings)
        state = None
        if keep_state and logits is not None:
            prompt_tokens = start.prompt_tokens if resume else len(ids)
            state = run_state.capture(run, logits, earlier + generated, prompt_tokens, sampler,
                                      start.prefill_seconds if resume else prefill_seconds, stream.emitted)
        if resume:
            text = text[len(start.generated_text):] if text.startswith(start.generated_text) else text
        return self.result_of(run, text, generated, len(ids), policy, stop_reason, prefill_seconds, decode_seconds,
                              state, len(start.token_ids) if start is not None else 0)

    def next_token(self, run: RunSession, logits: torch.Tensor, sampler: Sampler, stream: TextStream,
                   generated: list[int], settings: GenerationSettings) -> tuple[str, str | None]:
        """Sample the next token from `logits`, record it on the step that produced them; (the text
        it adds, why the run stops there: eos, stop_string, max_new_tokens; None to go on)."""
        token, logprob = sampler(logits)
        generated.append(token)
        piece = stream.push(token)
        record = run.records[-1]
        record.token_id, record.text, record.logprob = token, piece, logprob
        run.recorder.record(TokenEvent(record.step, len(generated) - 1, token, piece, logprob, record.seconds))
        if token in self.eos_ids and not settings.ignore_eos:
            return piece, "eos"
        if stream.found_stop(settings.stop_strings, piece):
            return piece, "stop_string"
        if len(generated) >= settings.max_new_tokens:
            return piece, "max_new_tokens"
        return piece, None

    def result_of(self, run: RunSession, text: str, generated: list[int], prompt_tokens: int, policy: Policy,
                  stop_reason: str, prefill_seconds: float, decode_seconds: float, state: RunState | None = None,
                  restored_tokens: int = 0) -> GenerationResult:
        """A run's result from its session: the figures every run reports (a batched run's rows too)."""
        return GenerationResult(
            text=text, token_ids=generated, prompt_tokens=prompt_tokens, policy=policy.describe(),
            model=self.loaded.name, stop_reason=stop_reason, prefill_seconds=prefill_seconds,
            decode_seconds=decode_seconds, peak_cache_bytes=run.cache.peak_bytes,
            kept_per_layer=run.cache.kept_per_layer(), peak_kept_per_layer=list(run.cache.peak_kept_per_layer),
            evictions=sum(r.evicted for r in run.records), steps=run.records, state=state,
            restored_tokens=restored_tokens, storage=summarize(run.cache),
            left_window=sum(r.left_window for r in run.records), layer_kinds=kinds_record(run.cache.layer_kinds),
            **loss_summary(run.cache.loss_meter, run.records),
        )


def final_text(stream: TextStream, stop_reason: str, settings: GenerationSettings) -> str:
    """What a run answers: the text emitted, cut before the stop string that ended it."""
    text = stream.emitted
    if stop_reason == "stop_string":
        text = text[:min(text.index(stop) for stop in settings.stop_strings if stop in text)]
    return text
