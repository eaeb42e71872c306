"""The events a run emits, one frozen dataclass per kind, and the kind names they are read by.

Costs: token, step and eviction events are a few small ones per step. Attention rows, the only
large events, exist only for the layers a Recorder watches; with nothing watched none are computed.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np

Phase = Literal["load", "prefill", "decode"]
POLICY, WINDOW = "policy", "window"  # why entries left a layer: the policy chose, or they left its sliding window
# StepEvent.evicted_attention keeps, per layer and step, the TOP_EVICTED evicted tokens that would have
# received the largest shares of the layer's attention, those of at least EVICTED_FLOOR
TOP_EVICTED, EVICTED_FLOOR = 32, 1e-3


@dataclass(frozen=True)
class TokenEvent:
    step: int
    index: int  # 0 for the first generated token
    token_id: int
    text: str  # the new text this token completed (may be empty mid UTF-8 sequence)
    logprob: float  # log-probability under the model's unmodified distribution
    seconds: float  # wall time of the forward step that produced it


@dataclass(frozen=True)
class StepEvent:
    step: int
    phase: Phase
    input_tokens: int  # tokens fed in this forward step (chunk size at prefill, 1 at decode)
    seconds: float
    kept_per_layer: tuple[int, ...]
    cache_bytes: int  # after this step's evictions
    peak_cache_bytes: int  # the most the cache has held so far, including mid-step before eviction
    evicted: int  # entries the policy evicted in this step, over layers and KV heads
    left_window: int = 0  # entries that left a sliding layer's window this step (not in `evicted`)
    # With --measure-loss: each layer's attention mass on evicted entries this step (None: not measured
    # there), runtime/attention_loss.py; () otherwise.
    attention_loss: tuple = ()
    # With --measure-loss, per layer: ((position, share), ...) the evicted tokens that would have received
    # the most of the layer's attention at this step, largest first (runtime/attention_loss.py); () otherwise.
    evicted_attention: tuple = ()


@dataclass(frozen=True)
class EvictionEvent:
    step: int
    layer: int
    kv_head: int
    positions: np.ndarray  # token positions evicted, int64
    # "policy": the policy evicted them; "window": they left a sliding layer's window (can never be
    # attended again). Histories stored before reasons existed read back as "policy".
    reason: str = POLICY


@dataclass(frozen=True)
class AttentionEvent:
    step: int
    layer: int
    weights: np.ndarray  # (query_heads, n) float32: the step's newest query over the held entries
    positions: np.ndarray  # (kv_heads, n) int64: token position of each held entry


@dataclass(frozen=True)
class RunStartedEvent:
    """What a viewer needs before the first step: the prompt as the model sees it."""

    model: str
    policy: str
    n_layers: int
    n_kv_heads: int
    budgets: tuple[int | None, ...]  # per layer
    prompt_tokens: tuple[str, ...]  # the text of each prompt token, in order
    n_heads: int = 0  # query heads
    storage_tier: str = "device"  # "host": evicted entries live on in host memory (kvstudio.core.storage)
    prompt_token_ids: tuple[int, ...] = ()  # the prompt's ids: a stored run can be re-plotted or re-run from them
    restored_tokens: int = 0  # tokens fed before this run, from a saved cache (the token map shows them fed)
    # Per layer, per restored position: how many KV heads no longer hold it (evicted before the cache was
    # saved), so the token map starts from the restored cache's true state; () when nothing was restored.
    restored_missing_heads: tuple = ()
    # Per layer: a sliding layer's window W (entries older than W tokens leave it), None for a global
    # one; () for runs recorded before windows were (the views then draw none).
    windows: tuple = ()
    # Layers that hold recurrent or convolution state instead of entries (linear attention, Mamba,
    # convolution: core/runtime/state_layers.py); the policy never acts there
    state_layers: tuple = ()


@dataclass(frozen=True)
class MemoryEvent:
    step: int  # the step just finished ("step" readings) or in progress ("timer" readings)
    seconds: float  # since the run started
    clock: float  # time.perf_counter() at the reading: puts loads and runs on one timeline
    phase: Phase
    source: str  # "step": right after the step's evictions; "timer": the sampler, mid-step
    cache_bytes: int  # exact, from the cache's tensors
    cache_bytes_per_layer: tuple[int, ...]
    process_bytes: int  # resident set size of this process
    cuda_allocated: int = 0  # torch's allocator; 0 without CUDA
    cuda_reserved: int = 0
    cuda_peak: int = 0  # the most allocated since the run started
    device_used: int = 0  # the whole GPU, all processes (NVML or the CUDA driver)
    device_total: int = 0
    host_cache_bytes: int = 0  # the host tier's evicted entries (cache_bytes counts the device's only)
    kept_per_layer: tuple[int, ...] = ()  # entries held per layer at the reading: moves within a long chunk
    shared_cache_bytes: int = 0  # of cache_bytes: directions merged layers share (MiniCache, --merge)


@dataclass(frozen=True)
class RecallEvent:
    step: int
    layer: int
    positions: np.ndarray  # (kv_heads, r) int64: host-tier entries that attention saw again this step


@dataclass(frozen=True)
class MergeEvent:
    """Cross-layer merging (kvstudio.core.storage.minicache) after one step, for every layer."""

    step: int
    merged_entries_per_layer: tuple[int, ...]  # entries (over KV heads) held merged; 0 outside pairs
    shared_bytes_per_layer: tuple[int, ...]  # directions shared with the paired layer, where held (minicache.py)
    retained: tuple[np.ndarray, ...]  # per layer: positions the retention rule kept unmerged this step


@dataclass(frozen=True)
class PrefillProgressEvent:
    tokens_done: int  # prompt tokens through every layer
    tokens_total: int
    # Within the chunk in progress (core/runtime/layer_hooks.py): its tokens, and how many of the model's
    # layers have run on it. 0 between chunks.
    chunk_tokens: int = 0
    layers_done: int = 0
    layers_total: int = 0


EVENT_KINDS = {TokenEvent: "tokens", StepEvent: "steps", EvictionEvent: "evictions",
               AttentionEvent: "attention", PrefillProgressEvent: "prefill", RunStartedEvent: "runs",
               MemoryEvent: "memory", RecallEvent: "recalls", MergeEvent: "merges"}
