"""Perplexity and KL to the full cache along a long text fed through a policy (the StreamingLLM
evaluation, Xiao et al. 2023, arXiv:2309.17453).

The first `prefix_tokens` are prefilled in chunks; from there on the text is fed `stride` tokens a
step: 1 (the default) is token by token, the policy evicting after every token as it does while
decoding. A larger stride scores every token of a step together (each sees the cache as the policy
left it after the previous step, plus the step's earlier tokens) and runs many times faster on a
CPU; the cache then holds up to budget + stride entries during a step. At every position we read the log-probability of the true next token, and the KL
divergence KL(full || policy) of the policy's next-token distribution from the full cache's at the
same position.

The full cache's distributions come from one ordinary forward pass over the text in chunks (a
transformers DynamicCache, no policy), computed a chunk ahead of the policy and dropped once used, so
memory holds one chunk of logits, not the whole text's.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch

from kvstudio.core.runtime.engine import CancelToken, Engine, GenerationResult
from kvstudio.core.runtime.session import RunSession
from kvstudio.core.recording.events import Recorder, RunStartedEvent
from kvstudio.core.policies.base import Policy
from kvstudio.core.evaluate.haystack import prose_ids
from kvstudio.core.evaluate.metrics import kl_divergence, perplexity
from kvstudio.core.evaluate.tasks import TaskError
from kvstudio.core.io.prompts import read_text_file

REFERENCE_CHUNK = 256  # positions of full-cache logits held at a time (256 x vocab x 4 bytes)


@dataclass
class LanguageOptions:
    tokens: int = 4096  # length of the text, in tokens
    prefix_tokens: int = 512  # prefilled in chunks before the per-position evaluation starts
    stride: int = 1  # tokens fed per step after the prefix (1: token by token)
    seed: int = 0  # which prose (when no text file is given)
    text_file: str | None = None

    def validate(self) -> None:
        if self.tokens < 8:
            raise TaskError(f"--tokens must be at least 8, got {self.tokens}")
        if not 1 <= self.prefix_tokens < self.tokens:
            raise TaskError(f"--prefix-tokens must be between 1 and --tokens - 1 ({self.tokens - 1}), "
                            f"got {self.prefix_tokens}")
        if self.stride < 1:
            raise TaskError(f"--stride must be at least 1, got {self.stride}")


@dataclass
class LanguageResult:
    positions: list[int]  # the index of each predicted token in the text
    true_logprobs: list[float]  # log p(true token | what the policy kept)
    kl: list[float]  # KL(full || policy) at each position, nats
    peak_cache_bytes: int
    seconds: float
    cancelled: bool = False
    run: GenerationResult | None = field(default=None, repr=False)  # for the run history

    @property
    def perplexity(self) -> float:
        return perplexity(self.true_logprobs)

    @property
    def mean_kl(self) -> float:
        return sum(self.kl) / len(self.kl) if self.kl else float("nan")


def text_ids(engine: Engine, options: LanguageOptions) -> list[int]:
    """The evaluated text's token ids: the user's file, or prose, cut to `options.tokens`."""
    if options.text_file:
        ids = engine.encode(read_text_file(options.text_file))
        if len(ids) < options.tokens:
            raise TaskError(f"{options.text_file} has {len(ids)} tokens, fewer than --tokens {options.tokens}")
        return ids[:options.tokens]
    bos = engine.encode("")  # the model's start token, when it has one
    return bos + prose_ids(engine.tokenizer, options.seed, options.tokens - len(bos))


def full_cache_logprobs(engine: Engine, ids: list[int], chunk: int = REFERENCE_CHUNK) -> Iterator[torch.Tensor]:
    """Log-probabilities of the full cache at every position, one chunk of rows at a time."""
    from transformers import DynamicCache

    cache = DynamicCache(config=engine.model.config)
    device = engine.loaded.device
    with torch.inference_mode():
        for start in range(0, len(ids), chunk):
            piece = torch.tensor(ids[start:start + chunk], device=device).unsqueeze(0)
            logits = engine.model(input_ids=piece, **{engine.cache_keyword: cache}, use_cache=True, logits_to_keep=0).logits
            yield torch.log_softmax(logits[0].float(), dim=-1)


def evaluate_language(engine: Engine, ids: list[int], policy: Policy, options: LanguageOptions,
                      chunk_size: int = 512, cancel: CancelToken | None = None, recorder: Recorder | None = None,
                      progress: Callable[[int, int], None] | None = None) -> LanguageResult:
    """Feed `ids` through `policy`; per-position true-token log-probability and KL to the full cache."""
    options.validate()
    if len(ids) < options.tokens:
        raise TaskError(f"the text has {len(ids)} tokens, fewer than --tokens {options.tokens}")
    cancel = cancel or CancelToken()
    recorder = recorder or Recorder()
    loaded = engine.loaded
    cache = engine.new_cache(policy)
    run = RunSession(engine, cache, recorder)
    recorder.record(RunStartedEvent(
        loaded.name, policy.describe(), loaded.n_layers, loaded.n_kv_heads, tuple(cache.budgets),
        tuple(engine.tokenizer.convert_tokens_to_string([t]) for t in engine.tokenizer.convert_ids_to_tokens(ids)),
        loaded.n_heads, windows=loaded.layer_windows, state_layers=loaded.state_layers))
    reference = _Rows(full_cache_logprobs(engine, ids))
    started = time.perf_counter()
    positions, true_logprobs, kls = [], [], []

    def score(logits: torch.Tensor, first: int) -> None:
        """logits (n, vocab) predict tokens first+1 .. first+n (those that exist)."""
        count = min(len(logits), len(ids) - 1 - first)
        if count <= 0:
            return
        logprobs = torch.log_softmax(logits[:count].float(), dim=-1)
        targets = torch.tensor(ids[first + 1:first + 1 + count], device=logprobs.device)
        true_logprobs.extend(logprobs.gather(1, targets[:, None])[:, 0].tolist())
        kls.extend(kl_divergence(reference.take(first, count).to(logprobs.device), logprobs).tolist())
        positions.extend(range(first + 1, first + 1 + count))

    prefix = options.prefix_tokens
    logits = run.prefill(ids[:prefix], chunk_size, cancel)
    cancelled = logits is None
    if not cancelled:
        score(logits[None], prefix - 1)
        fed = prefix
        while fed < len(ids) - 1:
            if cancel.cancelled:
                cancelled = True
                break
            step = ids[fed:min(fed + options.stride, len(ids) - 1)]
            logits = run.forward(step, "decode", all_logits=True)
            score(logits, fed)
            fed += len(step)
            if progress is not None:
                progress(fed, len(ids))
    seconds = time.perf_counter() - started
    result = LanguageResult(positions, true_logprobs, kls, cache.peak_bytes, seconds, cancelled)
    result.run = GenerationResult(
        text="", token_ids=[], prompt_tokens=len(ids), policy=policy.describe(), model=loaded.name,
        stop_reason="cancelled" if cancelled else "max_new_tokens", prefill_seconds=seconds, decode_seconds=0.0,
        peak_cache_bytes=cache.peak_bytes, kept_per_layer=cache.kept_per_layer(),
        peak_kept_per_layer=list(cache.peak_kept_per_layer), evictions=sum(r.evicted for r in run.records),
        steps=run.records, started_unix=run.started_unix)
    return result


class _Rows:
    """Reads the full cache's rows in order from the chunk iterator, holding only the current chunk."""

    def __init__(self, chunks: Iterator[torch.Tensor]):
        self.chunks = chunks
        self.start = 0
        self.current = torch.empty(0)

    def take(self, first: int, count: int) -> torch.Tensor:
        rows = []
        while count:
            while first >= self.start + len(self.current):
                self.start += len(self.current)
                self.current = next(self.chunks)
            offset = first - self.start
            part = self.current[offset:offset + count]
            rows.append(part)
            first += len(part)
            count -= len(part)
        return torch.cat(rows)
