"""A run's whole state between two forward steps, to stop a run and go on later (or elsewhere).

What a continuation needs to be bit-identical to never having stopped:
  - every cache layer's stored tensors as its store holds them (keys and values, or a codec's codes,
    scales, windows and group table; token positions, re-rotation positions; host-tier blocks),
  - every layer's policy state (`LayerState.per_entry` tensors such as H2O's running sums, and
    `LayerState.extra`: counters, random generators, plugin values),
  - the tokens fed so far (policies read them; the next token's position is their count),
  - the tokens generated so far (the last one is "pending" when it was sampled but not fed yet),
  - the last logits (the next token is sampled from them when nothing is pending),
  - the sampler's RNG state and the step counter.

`capture` copies all of it off a running `RunSession` (copies: the run may go on changing its cache);
`restore` puts it into a fresh `RunSession` of the same engine and policy. The file format lives in
`saved_cache.py`; this module knows nothing about files.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any

import torch

from kvstudio.core.errors import SavedCacheError
from kvstudio.core.recording.events import PrefillProgressEvent
from kvstudio.core.runtime.cache import StepReport
from kvstudio.core.runtime.layer_tensors import (layer_bytes, layer_codec, layer_state, layer_tensors, restore_layer,  # noqa: F401
                            describe_storage, storage_key, unsaveable_reason)


@dataclass
class LayerSnapshot:
    tensors: dict[str, torch.Tensor]  # from layer_state(): what the layer's store (and host tier) holds
    policy_tensors: dict[str, torch.Tensor]  # LayerState.per_entry, on the CPU
    policy_on_device: dict[str, bool]  # per_entry name -> it lived on the model's device (else the CPU)
    policy_extra: dict[str, Any]  # LayerState.extra, deep-copied
    storage: dict = field(default_factory=dict)  # from layer_state(): window starts, slot owners, bytes


@dataclass
class RunState:
    token_ids: list[int]  # every token fed to the model so far: the prompt, then generated ones
    prompt_tokens: int  # how many of token_ids were the prompt
    generated: list[int]  # tokens sampled so far; the last one is not fed yet when `pending`
    logits: torch.Tensor | None  # (vocab,) float32 CPU: the last forward's last-position logits
    rng_state: torch.Tensor | None  # the sampler's generator state (None when greedy)
    steps: int  # forward steps taken so far: the next step's number
    layers: list[LayerSnapshot]
    codec: str = "fp"
    storage: dict = field(default_factory=dict)  # storage_key() of the cache: codec, group size, residual, tier...
    storage_counters: dict = field(default_factory=dict)  # host bytes and their peak, entries recalled so far
    peak_bytes: int = 0
    peak_kept_per_layer: list[int] = field(default_factory=list)
    prefill_seconds: float = 0.0  # what computing the prompt took: what a restore saves
    generated_text: str = ""

    @property
    def pending(self) -> bool:
        """The last generated token was sampled from `logits` but not fed to the model yet."""
        return len(self.token_ids) < self.prompt_tokens + len(self.generated)

    def followed_by(self, extra_ids: list[int]) -> list[int]:
        """The ids a run fed after this state with a follow-up (`cache load --then`, the studio's Continue
        with a prompt typed) is given: everything fed so far, the sampled token not fed yet, then
        `extra_ids`. The run restores the state and prefills only what comes after it."""
        return self.token_ids + self.generated[-1:] * self.pending + list(extra_ids)

    @property
    def cache_bytes(self) -> int:
        """Keys and values held in memory, over all layers."""
        return sum(layer_bytes(layer.tensors, layer.storage) for layer in self.layers)

    @property
    def kept_per_layer(self) -> list[int]:
        return [layer.tensors["positions"].shape[-1] if layer.tensors else 0 for layer in self.layers]


def capture(run, logits: torch.Tensor | None, generated: list[int], prompt_tokens: int, sampler=None,
            prefill_seconds: float = 0.0, generated_text: str = "") -> RunState:
    """A copy of everything `run` needs to go on from here."""
    device = run.engine.loaded.device
    layers = []
    for layer in run.cache.layers:
        state = layer.state
        tensors, numbers = layer_state(layer)
        layers.append(LayerSnapshot(
            tensors=tensors, storage=numbers,
            policy_tensors={name: t.detach().to("cpu", copy=True).contiguous() for name, t in state.per_entry.items()},
            policy_on_device={name: t.device.type == device.type != "cpu" for name, t in state.per_entry.items()},
            policy_extra=copy.deepcopy(state.extra),
        ))
    generator = getattr(sampler, "generator", None)
    return RunState(
        token_ids=run.token_ids.tolist(), prompt_tokens=prompt_tokens, generated=list(generated),
        logits=None if logits is None else logits.detach().float().to("cpu", copy=True),
        rng_state=None if generator is None else generator.get_state(),
        steps=run.first_step + len(run.records), layers=layers, codec=layer_codec(run.cache.layers[0]),
        storage=storage_key(run.cache.storage), storage_counters=_storage_counters(run.cache),
        peak_bytes=run.cache.peak_bytes, peak_kept_per_layer=list(run.cache.peak_kept_per_layer),
        prefill_seconds=prefill_seconds, generated_text=generated_text,
    )


def missing_heads(state: RunState, kv_heads: int) -> tuple[tuple[int, ...], ...]:
    """Per layer, per position fed before the save: how many KV heads no longer hold it there (the
    token map's starting point for a run that goes on from `state`)."""
    fed = len(state.token_ids)
    per_layer = []
    for layer in state.layers:
        held = torch.zeros(fed, dtype=torch.int64)
        positions = layer.tensors.get("positions")
        if positions is not None and positions.numel():
            positions = positions[positions < fed]  # every KV head's entries, flattened
            held.scatter_add_(0, positions, torch.ones_like(positions))
        per_layer.append(tuple((kv_heads - held).clamp_min(0).tolist()))
    return tuple(per_layer)


def _storage_counters(cache) -> dict:
    return {"peak_host_bytes": cache.peak_host_bytes, "recalled": cache.recalled_total}


def restore(run, state: RunState, sampler=None) -> None:
    """Put `state` into a fresh run (nothing fed yet). With a sampler, its RNG goes on from the saved
    state too (a continuation); without, the caller's sampler starts fresh (a new question)."""
    device = run.engine.loaded.device
    cache = run.cache
    if state.storage and state.storage != storage_key(cache.storage):

        raise SavedCacheError(f"wrong storage: the state was stored as {describe_storage(state.storage)} and this "
                              f"run stores {describe_storage(storage_key(cache.storage))}")
    if len(state.layers) != len(cache.layers):
        raise ValueError(f"the state has {len(state.layers)} layers, the model {len(cache.layers)}")
    for layer, snapshot in zip(cache.layers, state.layers):
        restore_layer(layer, snapshot.tensors, device, snapshot.storage)
        layer.state.per_entry = {name: (t.to(device) if snapshot.policy_on_device.get(name) else t.clone())
                                 for name, t in snapshot.policy_tensors.items()}
        layer.state.extra = copy.deepcopy(snapshot.policy_extra)
    if cache.merging is not None:  # the merged layers' saved and shared bytes, from the restored flags
        for pair in cache.merging.pairs:
            pair.recount(cache)
    cache.current_bytes = sum(cache.bytes_per_layer())
    cache.peak_bytes = max(state.peak_bytes, cache.current_bytes)
    if state.peak_kept_per_layer:
        cache.peak_kept_per_layer = list(state.peak_kept_per_layer)
    cache.host_bytes = sum(cache.host_bytes_per_layer())
    cache.peak_host_bytes = max(state.storage_counters.get("peak_host_bytes", 0), cache.host_bytes)
    cache.recalled_total = state.storage_counters.get("recalled", 0)
    run.token_ids = torch.tensor(state.token_ids, dtype=torch.long, device=device)
    run.seen = len(state.token_ids)
    run.first_step = state.steps
    generator = getattr(sampler, "generator", None)
    if generator is not None and state.rng_state is not None:
        generator.set_state(state.rng_state.clone())


def follow_up_ids(state: RunState, tokenizer, text: str) -> list[int]:
    """The prompt of a follow-up question to a saved state: every token it fed (and a token it sampled
    but had not fed yet), then `text`'s tokens. Generating it with `start=state` restores the state and
    prefills only the question: one compressed context serves many questions."""
    return state.followed_by(tokenizer(text, add_special_tokens=False)["input_ids"])


def start_from(run, start: RunState, ids: list[int], resume: bool, sampler, stream, chunk_size: int, cancel,
               checkpoint) -> tuple[torch.Tensor | None, list[int]]:
    """Start `run` from a saved state: (the logits to sample the next token from, tokens generated
    before the save). With `resume` the generation goes on; otherwise `ids` (the new prompt) must
    begin with the tokens the state fed, and only the rest is prefilled, chunk by chunk from there."""


    restore(run, start, sampler if resume else None)
    run.recorder.record(PrefillProgressEvent(len(start.token_ids), len(ids)))  # what the views show as prefilled
    if resume:
        run.phase = "decode"
        stream.ids, stream.emitted = list(start.generated), start.generated_text
        if start.pending:  # sampled before the save, not fed yet: feed it, as the run would have next
            return run.forward([start.generated[-1]], "decode"), list(start.generated)
        return _saved_logits(run, start, "decode"), list(start.generated)
    fed = start.token_ids
    if ids[:len(fed)] != fed:
        raise SavedCacheError("the prompt does not begin with the tokens of the saved cache, so it cannot go on "
                              "from it; run without the saved cache")
    if len(ids) == len(fed):
        return _saved_logits(run, start, "prefill"), []
    return run.prefill(ids[len(fed):], chunk_size, cancel, checkpoint, offset=len(fed)), []


def _saved_logits(run, start: RunState, phase: str) -> torch.Tensor:
    """The saved logits, with the step that computed them recorded again (no input, no eviction):
    the run's records and views start where the saved run stood, and step numbers stay the same."""

    if start.logits is None:
        raise SavedCacheError("the saved cache holds no logits to go on from; run without it")
    run.first_step = start.steps - 1
    report = StepReport(kept_per_layer=run.cache.kept_per_layer(), cache_bytes=run.cache.current_bytes)
    run.record_step(start.steps - 1, phase, 0, 0.0, report, prefill_done=phase == "prefill")
    return start.logits.to(run.engine.loaded.device)
