"""PolicyCache: a transformers Cache whose layers keep only what a policy selects.

Each layer stores keys and values as (1, kv_heads, n, head_dim) like DynamicLayer, plus each
entry's token position (kv_heads, n). Different KV heads may hold different tokens, but always the
same number of them, so tensors stay rectangular.

One forward step goes:
  engine: cache.begin_step(...)        positions of the new tokens, phase, step number
  model:  layer.update(k, v)           append (transformers calls this before attention)
  attention function: cache.after_attention(layer, rows, sums, watched row)
                                       the policy selects, the layer evicts, right away, so the
                                       next layer runs with this one already back within budget
  engine: cache.end_step()             what happened: occupancy, evictions, bytes

`get_seq_length()` is the number of tokens the layer has absorbed (what transformers' own layers
say, and what its default position ids and mask offsets read), not the number of stored entries
(`entry_count()`). The token positions the model needs for RoPE come from the engine
(`position_ids`), never from the cache length, and the attention function builds each layer's mask
from its entries' original positions (core/runtime/attention.py), so the mask transformers builds is
not used inside a run.

Sliding-window layers (core/models/layer_kinds.py): after attention, entries that have left the
layer's window (position <= next position - W) can never be attended again; they are dropped and
reported with reason "window", apart from the policy's evictions (reason "policy"). The policy then
acts on what is left: it only ever sees entries inside the window.

Layers that are not attention (linear attention, convolution state) are transformers' own layers
(core/runtime/state_layers.py): `attention_layers` are the PolicyLayers, `layers` all of them, in
the model's order; a state layer holds no entries and its bytes are counted after each step.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from transformers.cache_utils import Cache, DynamicLayer

from kvstudio.core.runtime.attention import SCRATCH_BYTES
from kvstudio.core.errors import PolicyError
from kvstudio.core.models.layer_kinds import FULL, LayerKind
from kvstudio.core.plugins.guard import call_policy, checked_count, policy_label, returned_wrong_type
from kvstudio.core.policies.base import LayerState, LayerView, Phase, Policy
from kvstudio.core.recording.event_types import POLICY, WINDOW
from kvstudio.core.runtime.rotary import Rerotator
from kvstudio.core.runtime.state_layers import state_bytes
from kvstudio.core.storage import create_codec, storage_of
from kvstudio.core.storage.host import HostTier, splice
from kvstudio.core.storage.linked import LinkedStore
from kvstudio.core.storage.minicache import create_merging
from kvstudio.core.storage.layer_stores import make_store
from kvstudio.core.policies import BUILT_IN, source_of


@dataclass
class StepContext:
    step: int
    phase: Phase
    positions: torch.Tensor  # (n_new,) long: token index of each new entry in the sequence
    rope_positions: torch.Tensor  # (n_new,) long: the position_ids the model rotated them with
    is_last_prefill_chunk: bool = False
    watched_layers: frozenset[int] = frozenset()
    token_ids: torch.Tensor | None = None  # (seen,) every token fed so far, this step's included




@dataclass
class Eviction:
    layer: int
    positions: torch.Tensor  # (kv_heads, m) long, on the CPU: original positions evicted per head
    reason: str = POLICY  # POLICY or WINDOW


@dataclass
class AttentionRows:
    layer: int
    weights: torch.Tensor  # (query_heads, n) float32, CPU: the newest query over all entries
    positions: torch.Tensor  # (kv_heads, n) long, CPU: the position of each of those entries


@dataclass
class StepReport:
    """What one forward step did to the cache."""

    kept_per_layer: list[int]
    evictions: list[Eviction] = field(default_factory=list)
    attention: list[AttentionRows] = field(default_factory=list)
    cache_bytes: int = 0

    recalled: list[Eviction] = field(default_factory=list)  # host-tier entries attention saw this step
    host_bytes: int = 0
    merging: dict | None = None  # cross-layer merging after the step (MiniCacheMerging.step_report)
    attention_loss: list[float | None] = field(default_factory=list)  # per layer, with --measure-loss
    # Per layer, with --measure-loss: ((position, share), ...) the evicted tokens would have received most
    evicted_attention: tuple = ()

    @property
    def evicted_count(self) -> int:
        """Entries the policy evicted (not those that left a sliding window)."""
        return sum(e.positions.numel() for e in self.evictions if e.reason == POLICY)

    @property
    def left_window_count(self) -> int:
        """Entries dropped because they left a sliding layer's window."""
        return sum(e.positions.numel() for e in self.evictions if e.reason == WINDOW)


def _unused_setter(self, value):
    # transformers' base classes assign None at construction; the store holds the real tensors.
    if value is not None:
        raise AttributeError("a PolicyLayer's keys and values live in its store (kvstudio.core.storage)")


class PolicyLayer(DynamicLayer):
    """One layer's storage. The policy decides what stays; this class does the bookkeeping, and the
    layer's store (kvstudio.core.storage) holds the entries: preallocated, through the run's codec."""

    # What attention sees: (1, kv_heads, n, head_dim), decoded when a codec holds them.
    keys = property(lambda self: self.store.keys() if self.is_initialized else None, _unused_setter)
    values = property(lambda self: self.store.values() if self.is_initialized else None, _unused_setter)
    # Token positions (kv_heads, n), and where each key's rotation stands (differs under rerotate).
    positions = property(lambda self: self.store.positions() if self.is_initialized else None)
    rope_positions = property(lambda self: self.store.rope_positions() if self.is_initialized else None)

    def __init__(self, cache: PolicyCache, layer_idx: int):
        super().__init__()
        self.cache = cache
        self.layer_idx = layer_idx
        self.empty_storage()
        self.state: LayerState = _new_layer_state(cache.policy, layer_idx)
        self.kind: LayerKind = cache.layer_kinds[layer_idx]
        self.window = self.kind.window if self.kind.kind != FULL else None
        self.n_new = 0
        self.attended_this_step = False
        self.recalled_positions: torch.Tensor | None = None  # host entries put in front this step
        # The keys and values `update` handed attention this step, (kv_heads, n, head_dim) each: the
        # policy's view reuses them unless an eviction came between (_evict clears them).
        self._step_entries: tuple[torch.Tensor, torch.Tensor] | None = None

    def empty_storage(self) -> None:
        """A fresh store and no host tier; with merging, this layer's side of its pair (the cache's
        current merging: PolicyCache.free makes a new one)."""
        cache = self.cache
        self.store = cache.new_store(self.layer_idx)
        self.host: HostTier | None = None  # the host tier, made at the first eviction when it is on
        # Cross-layer merging (storage/minicache.py): this layer's side of its pair, or None.
        self.merge = cache.merging.side(self.layer_idx) if cache.merging is not None else None
        self.store.keep_step_groups = self.merge is not None  # a codec encodes the merged states again
        self._step_entries = None

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.dtype, self.device = key_states.dtype, key_states.device
        if self.cache.codec is not None:
            self.cache.codec.check(key_states.device)  # bnb codecs: CUDA only, said before any work
        self.is_initialized = True

    def get_seq_length(self) -> int:
        """Tokens absorbed (transformers' meaning); `entry_count()` is what the layer holds."""
        return self.cache.tokens_seen

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        # transformers' mask is not used inside a run (the attention function masks by position): keep
        # it the size of what the layer holds.
        held = self.entry_count()
        return held + query_length, max(self.cache.tokens_seen - held, 0)

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if key_states.shape[0] != 1:
            raise ValueError("PolicyCache holds one sequence (batch size 1)")
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        cache, store = self.cache, self.store
        kv_heads, n_new = key_states.shape[1], key_states.shape[-2]
        positions, rope = cache.step_positions(kv_heads)
        before = store.byte_count()
        keys, values = store.append(key_states[0], value_states[0], positions, rope)
        if self.merge is not None:
            self.merge.appended(kv_heads, n_new, key_states.device)
        else:  # (merging rewrites a pair's entries between the steps of its two layers)
            self._step_entries = (keys[0], values[0])
        self.n_new = n_new
        cache.note_bytes(store.byte_count() - before)
        held, peaks = keys.shape[-2], cache.peak_kept_per_layer
        if held > peaks[self.layer_idx]:
            peaks[self.layer_idx] = held
        return keys, values

    def entry_count(self) -> int:
        return self.store.entry_count() if self.is_initialized else 0

    # -- the rest of transformers' layer contract -------------------------------------------------

    def reset(self) -> None:
        """Empty the layer and its policy state; the layer object stays (transformers' Cache.reset)."""
        self.cache.note_bytes(-self.store.byte_count())
        self.cache.note_host_bytes(-self.host_byte_count())
        self.empty_storage()
        self.state = _new_layer_state(self.cache.policy, self.layer_idx)
        self.n_new = 0
        self.is_initialized = False
        self.cache.tokens_seen = 0  # the cache's count: transformers resets every layer together

    def crop(self, tokens_to_remove: int) -> None:
        raise NotImplementedError(
            "a PolicyCache cannot crop: after evictions its KV heads hold different tokens, so 'the last n "
            "tokens' is not one slice of the layer (assisted or speculative decoding needs a DynamicCache)")

    def batch_repeat_interleave(self, repeats: int) -> None:
        raise NotImplementedError("a PolicyCache holds one sequence: beam search and batch expansion need a DynamicCache")

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        raise NotImplementedError("a PolicyCache holds one sequence: selecting batch rows needs a DynamicCache")

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        raise NotImplementedError("a PolicyCache holds one sequence: beam search needs a DynamicCache")

    def offload(self) -> None:
        raise NotImplementedError("a PolicyCache keeps its entries in its stores; use the host tier (--tier host) "
                                  "instead of transformers' offloading")

    def prefetch(self) -> None:
        raise NotImplementedError("a PolicyCache keeps its entries in its stores; use the host tier (--tier host) "
                                  "instead of transformers' offloading")

    def byte_count(self) -> int:
        """What the layer holds; with merging, as a MiniCache store holds it (storage/minicache.py)."""
        return self.store.byte_count() - (self.merge.estimated_bytes if self.merge is not None else 0)

    def host_byte_count(self) -> int:
        return 0 if self.host is None else self.host.byte_count()

    def drop_outside_window(self, attention: torch.Tensor | None, attention_sums: torch.Tensor | None):
        """A sliding layer: drop the entries no later query can see (position <= next position - W),
        reported as having left the window. Each head's entries are in position order, so those are a
        prefix of its row; heads keep the same count (tensors stay rectangular): where per-head
        selection left heads with different numbers of such entries, the surplus stays until it too
        can go, masked by position meanwhile (never attended). Returns the policy's attention rows
        and sums for the entries that stay."""
        if self.window is None or not self.entry_count():
            return attention, attention_sums
        positions = self.positions
        threshold = self.cache.context.positions[-1] + 1 - self.window  # the next query sees positions > threshold
        outside = positions <= threshold
        n = positions.shape[1]
        # One read of the device per sliding layer and step: how many go, and that they are a prefix.
        drop, scattered = torch.stack([outside.sum(dim=1).min(),
                                       (outside[:, 1:] & ~outside[:, :-1]).any().long()]).tolist()
        if drop == 0 or scattered:  # (scattered: never in position order; the mask still hides them)
            return attention, attention_sums
        keep = torch.arange(drop, n, device=positions.device).unsqueeze(0).expand(positions.shape[0], -1)
        self._evict(keep, self._view(None, None), reason=WINDOW)
        self.n_new = min(self.n_new, n - drop)
        return _columns(attention, keep), _columns(attention_sums, keep)

    def _view(self, attention, attention_sums) -> LayerView:
        cache, context = self.cache, self.cache.context
        entries, self._step_entries = self._step_entries, None
        keys, values = entries if entries is not None else (self.keys[0], self.values[0])
        return LayerView(
            layer_idx=self.layer_idx, n_layers=cache.n_layers, step=context.step, phase=context.phase,
            keys=keys, values=values, positions=self.positions, n_new=self.n_new,
            budget=cache.budgets[self.layer_idx], attention=attention,
            is_last_prefill_chunk=context.is_last_prefill_chunk, token_ids=context.token_ids,
            tokenizer=cache.tokenizer, attention_sums=attention_sums,
        )

    def apply_policy(self, attention: torch.Tensor | None, attention_sums: torch.Tensor | None = None) -> None:
        cache, context = self.cache, self.cache.context
        policy = cache.policy
        attention, attention_sums = self.drop_outside_window(attention, attention_sums)
        view = self._view(attention, attention_sums)
        keep = call_policy(policy, "select()", self.layer_idx, policy.select, view, self.state)
        limit = cache.limits[context.phase][self.layer_idx]
        if keep is None:
            if limit is not None and view.n_entries > limit:
                raise PolicyError(f"policy {_label(policy)} kept all {view.n_entries} entries of layer "
                                  f"{self.layer_idx}, above its budget of {limit}")
            self._release_step()
            return
        self._check_selection(keep, view, limit)
        if keep.shape[1] == view.n_entries:
            self._release_step()
            return
        self._evict(keep.to(view.keys.device, torch.long), view)  # int32 indices are accepted; scatter wants long

    def _check_selection(self, keep: torch.Tensor, view: LayerView, limit: int | None) -> None:
        name, layer = _label(self.cache.policy), self.layer_idx
        if not isinstance(keep, torch.Tensor):
            raise returned_wrong_type(self.cache.policy, "select", keep, "None or a tensor of indices", layer)
        if keep.dim() != 2 or keep.shape[0] != view.kv_heads or keep.dtype not in (torch.long, torch.int32, torch.int64):
            raise PolicyError(f"policy {name} returned indices of shape {tuple(keep.shape)} and dtype {keep.dtype} "
                              f"in layer {layer}; expected integer indices of shape ({view.kv_heads}, k)")
        if keep.shape[1] == 0:
            raise PolicyError(f"policy {name} kept no entries in layer {layer}; keep at least one")
        if limit is not None and keep.shape[1] > limit:
            raise PolicyError(f"policy {name} kept {keep.shape[1]} entries in layer {layer}, above its budget "
                              f"of {limit}")
        if not keep.numel() or not self.cache.checks_index_values:
            return
        # Reading a value back waits for the device to finish: one read for both checks, and only for
        # plugins (built-in policies are checked by the test suite instead, and run on a GPU unstalled).
        outside, unordered = torch.stack([
            (keep.min() < 0) | (keep.max() >= view.n_entries),
            (keep[:, 1:] <= keep[:, :-1]).any(),
        ]).tolist()
        if outside:
            raise PolicyError(f"policy {name} returned an index outside 0..{view.n_entries - 1} in layer {layer}")
        if unordered:
            raise PolicyError(f"policy {name} returned indices that are not strictly increasing in layer {layer}")

    def _evict(self, keep: torch.Tensor, view: LayerView, reason: str = POLICY) -> None:
        self._step_entries = None  # the store changes: a later view reads it again
        kv_heads, n = self.positions.shape
        dropped = torch.ones(kv_heads, n, dtype=torch.uint8, device=keep.device)
        dropped.scatter_(1, keep, 0)
        # The dropped indices of each row in increasing order: a stable sort puts them first. (A
        # boolean index would do it too, but it waits for the device to count them.)
        dropped_index = dropped.argsort(dim=1, descending=True, stable=True)[:, :n - keep.shape[1]]
        evicted_positions = self.positions.gather(1, dropped_index)
        if self.cache.storage.tier == "host" and reason == POLICY:  # out-of-window entries are gone for good
            self._move_to_host(dropped_index, evicted_positions, view)

        before = self.byte_count()
        if self.merge is not None:  # a partner reading this layer's rows copies out the ones that go
            self.merge.before_keep(self, keep)
        self.store.keep(keep)  # compacts keys, values and positions in place
        if reason == WINDOW:
            # The oldest entries of every row went. The policy's per-entry state may not cover this
            # step's new entries yet (select() grows it), so it loses the same prefix.
            drop = view.n_entries - keep.shape[1]
            self.state.per_entry = {name: tensor[:, drop:] for name, tensor in self.state.per_entry.items()}
        else:
            self.state.keep(keep)
        if self.merge is not None:
            self.merge.keep(self, keep)
        self.cache.note_bytes(self.byte_count() - before)
        self.cache.record_eviction(self.layer_idx, evicted_positions, reason)

        if self.cache.policy.config.rerotate:
            # The StreamingLLM scheme: kept keys move to positions 0..k-1 in the cache. RoPE is a
            # rotation, so rotating a key by (new - old) equals having rotated it at `new`.
            contiguous = torch.arange(keep.shape[1], device=keep.device).unsqueeze(0).expand(kv_heads, -1)
            old = self.rope_positions  # already compacted: the kept entries' rotations
            self.store.set_keys(self.cache.rerotator.rotate(self.keys, contiguous - old), contiguous)
        self._release_step()

    def evict_decided(self, keep: torch.Tensor, evicted_positions: torch.Tensor, first_moved: int) -> None:
        """A decode step's eviction selected together with other rows' (core/runtime/group_eviction.py),
        which has kept the policy state already: the store compacts from `first_moved` on, and the
        eviction is counted and recorded as `_evict` does it."""
        self._step_entries = None
        self.attended_this_step = True
        before = self.byte_count()
        self.store.keep(keep, first_moved)
        self.cache.note_bytes(self.byte_count() - before)
        self.cache.record_eviction(self.layer_idx, evicted_positions)
        self._release_step()

    def _release_step(self) -> None:
        """The policy has run: the store drops the step's decoded copy and encodes what waited for it
        (a quantized store's grouped entries), which changes its bytes."""
        before = self.store.byte_count()
        self.store.release_step()
        self.cache.note_bytes(self.store.byte_count() - before)

    def _move_to_host(self, dropped_index: torch.Tensor, positions: torch.Tensor, view: LayerView) -> None:
        """The host tier: evicted entries (as attention saw them) go to host memory, not away.
        dropped_index (kv_heads, m): the evicted entries of each head, in increasing order."""
        if self.host is None:
            storage = self.cache.storage
            self.host = HostTier(storage.block_size, storage.recall, view.keys.device)
        index = dropped_index.unsqueeze(-1).expand(-1, -1, view.keys.shape[-1])
        before = self.host.byte_count()
        self.host.add(view.keys.gather(1, index), view.values.gather(1, index), positions)
        self.cache.note_host_bytes(self.host.byte_count() - before)

    def recall(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor):
        """Host blocks the query would attend to, put in front of key/value for this step only."""
        recalled = None if self.host is None else self.host.recall(query)
        self.recalled_positions = None if recalled is None else recalled.positions
        if recalled is not None:
            self.cache.record_recall(self.layer_idx, recalled.positions)
        return splice(key, value, recalled)


def _columns(scores: torch.Tensor | None, keep: torch.Tensor) -> torch.Tensor | None:
    """Attention rows (heads, q, n) or sums (heads, n) of query heads, cut to the kept entries of
    their KV head: keep (kv_rows, k), kv_rows = the KV heads or 1."""
    if scores is None:
        return None
    heads = scores.shape[0]
    index = keep.repeat_interleave(heads // keep.shape[0], dim=0) if keep.shape[0] != heads else keep
    if scores.dim() == 3:
        index = index[:, None, :].expand(-1, scores.shape[1], -1)
    return scores.gather(-1, index)


def _label(policy: Policy) -> str:
    """'name', or 'name' (plugin FILE) for a plugin's policy: errors say where to look."""
    return policy_label(policy)


def _new_layer_state(policy: Policy, layer_idx: int) -> LayerState:
    state = call_policy(policy, "new_layer_state()", layer_idx, policy.new_layer_state, layer_idx)
    if not isinstance(state, LayerState):
        raise returned_wrong_type(policy, "new_layer_state", state, "a LayerState", layer_idx)
    return state


def _budgets(policy: Policy, method: str, n_layers: int, *phase) -> list[int | None]:
    """budget_for / limit_for of every layer, each checked: an int >= 1 or None."""
    function = getattr(policy, method)
    return [checked_count(policy, method, call_policy(policy, f"{method}()", i, function, i, n_layers, *phase),
                          minimum=1, allow_none=True, layer=i) for i in range(n_layers)]


class PolicyCache(Cache):
    """A Cache that applies a policy after every forward step. Batch size 1."""

    def __init__(self, policy: Policy, n_layers: int, rerotator: Rerotator | None = None, tokenizer=None,
                 layer_kinds: list[LayerKind] | None = None, state_layers: dict[int, object] | None = None):
        self.policy = policy
        self.tokenizer = tokenizer
        self.n_layers = n_layers
        # What each layer computes (core/models/layer_kinds.py); every layer global when not given.
        self.layer_kinds = list(layer_kinds) if layer_kinds is not None else [LayerKind(FULL)] * n_layers
        if len(self.layer_kinds) != n_layers:
            raise ValueError(f"{len(self.layer_kinds)} layer kinds for {n_layers} layers")
        self.tokens_seen = 0  # tokens absorbed: get_seq_length() (the session sets it before each step)
        self.budgets = _budgets(policy, "budget_for", n_layers)
        # What the engine enforces after each step; fixed for a run, so computed once.
        self.limits = {phase: _budgets(policy, "limit_for", n_layers, phase) for phase in ("prefill", "decode")}
        if policy.needs_attention and policy.attention_form not in ("rows", "sums"):
            raise PolicyError(f"policy {_label(policy)} declares attention_form = {policy.attention_form!r}; "
                              "it must be 'rows' or 'sums'")
        if policy.config.rerotate and rerotator is None:
            raise PolicyError("--rerotate needs a rotary (RoPE) model")
        nope = [i for i, kind in enumerate(self.layer_kinds) if not kind.rope]
        if policy.config.rerotate and nope:
            raise PolicyError(f"--rerotate re-rotates every layer's kept keys, but layers {nope} of this model use no "
                              "RoPE (their keys carry no position): run without --rerotate")
        self.rerotator = rerotator
        self.storage = storage_of(policy)  # codec and tier (kvstudio.core.storage); fp on the device by default
        self.codec = create_codec(self.storage)
        self.merging = create_merging(self.storage, n_layers)  # cross-layer merging, or None
        if policy.config.rerotate and self.merging is not None:
            raise PolicyError("--rerotate moves each layer's kept keys to its own new positions, so two merged layers "
                              "would need different directions for one token: use --merge without --rerotate")
        if policy.config.rerotate and self.codec is not None:
            raise PolicyError(f"--rerotate re-rotates stored keys and works with --codec fp only, "
                              f"not {self.storage.codec}")
        if policy.config.rerotate and self.storage.tier == "host":
            raise PolicyError("--rerotate moves kept keys to new positions, and host entries would come back at "
                              "their old ones: use --tier host without --rerotate")
        self.context: StepContext | None = None
        self._step_positions: tuple[StepContext | None, dict] = (None, {})  # per KV-head count
        self._queries_asked: tuple[StepContext | None, tuple[int, int]] = (None, (0, 0))  # (n_new, the answer)
        self.current_bytes = 0
        self.peak_bytes = 0
        self.host_bytes = 0
        self.peak_host_bytes = 0
        self.recalled_total = 0  # host entries brought back, over steps, layers and KV heads
        self.peak_kept_per_layer = [0] * n_layers
        self.peak_scoring_bytes = 0  # float32 scratch of the largest attention-scoring pass
        self.scoring_scratch_bytes = SCRATCH_BYTES  # the bound on one tile of scores ("sums" policies)
        # Index values a plugin returns are checked (one device read per layer and step); built-in
        # policies' are not, so a GPU run under them never stalls on a check.
        self.checks_index_values = source_of(policy.name) != BUILT_IN
        # One pass for attention output and H2O-style sums (core.attention.attention_and_sums):
        # None = where it is faster, on the CPU; on a GPU SDPA's fused kernels win.
        self.fused_scoring: bool | None = None
        # Where "sums" policies' scores come from (core/runtime/triton_scoring.py): None = the Triton
        # kernels on CUDA where Triton is installed, the PyTorch path elsewhere; "triton" or "torch" to choose.
        self.scoring_kernel: str | None = None
        self.loss_meter = None  # --measure-loss: an AttentionLossMeter (core/runtime/attention_loss.py)
        self._report: StepReport | None = None
        state_layers = state_layers or {}
        if state_layers and self.merging is not None:
            raise PolicyError(f"--merge pairs adjacent attention layers, and layers {sorted(state_layers)} of this model "
                              "hold recurrent or convolution state: run without --merge")
        super().__init__(layers=[state_layers[i] if i in state_layers else PolicyLayer(self, i) for i in range(n_layers)])
        self.attention_layers: list[PolicyLayer] = [layer for layer in self.layers if isinstance(layer, PolicyLayer)]
        self.state_layer_bytes = 0  # what the state layers held at the last step's end
        if self.merging is not None:
            self.merging.connect(self)

    def new_store(self, layer_idx: int):
        """An empty store for a layer: through the run's codec, or linked to its partner (merging under fp)."""
        storage = self.storage
        if self.merging is not None and self.merging.holds_links(layer_idx, self.codec):
            return LinkedStore(self.budgets[layer_idx])
        return make_store(self.codec, storage.group_size, storage.residual, self.budgets[layer_idx],
                          storage.measure_error)

    # -- the step protocol ------------------------------------------------------------------------

    def begin_step(self, context: StepContext) -> None:
        self.context = context
        self._report = StepReport(kept_per_layer=[])
        for layer in self.attention_layers:
            layer.attended_this_step = False

    def step_positions(self, kv_heads: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(positions, rotation positions) of the step's new entries, (kv_heads, n_new) each: the same for
        every layer, so made once per step."""
        context = self.context
        made_for, made = self._step_positions
        if made_for is not context:  # a new step (the memo is keyed by its context, however it was set)
            made = {}
            self._step_positions = (context, made)
        both = made.get(kv_heads)
        if both is None:
            n_new = context.positions.shape[0]
            positions = context.positions.unsqueeze(0).expand(kv_heads, n_new)
            rope = (context.rope_positions.unsqueeze(0).expand(kv_heads, n_new) if self.policy.config.rerotate
                    else positions)
            both = made[kv_heads] = (positions, rope)
        return both

    def attention_queries_for(self, layer_idx: int, n_new: int) -> tuple[int, bool]:
        """(queries the policy needs, whether the newest row is recorded for a viewer)."""
        wanted = 0
        if self.policy.needs_attention:
            # The answer depends on the step's new tokens and phase only: asked once a step, not per layer.
            made_for, asked = self._queries_asked
            if made_for is not self.context or asked[0] != n_new:
                asked = (n_new, checked_count(self.policy, "attention_queries", call_policy(
                    self.policy, "attention_queries()", layer_idx, self.policy.attention_queries, n_new,
                    self.context.phase), minimum=0, allow_none=False))
                self._queries_asked = (self.context, asked)
            wanted = asked[1]
        return min(wanted, n_new), layer_idx in self.context.watched_layers

    def after_attention(self, layer_idx: int, policy_rows: torch.Tensor | None, policy_sums: torch.Tensor | None,
                        watched_row: torch.Tensor | None):
        layer = self.layers[layer_idx]
        if watched_row is not None:
            # Moved to the CPU at the end of the step, in one wait. A copy of the positions: the
            # store compacts its buffers in place after this.
            self._report.attention.append(AttentionRows(layer_idx, watched_row.detach().float(),
                                                        layer.positions.detach().clone()))
        layer.attended_this_step = True
        layer.apply_policy(policy_rows, policy_sums)
        if self.merging is not None:  # a pair's later layer has attended: merge the step's entries
            self.merging.after_attention(self, layer_idx)

    def end_step(self) -> StepReport:
        missing = [layer.layer_idx for layer in self.attention_layers if not layer.attended_this_step]
        if missing:
            raise PolicyError(
                f"layers {missing} did not route attention through KV Studio's attention function, so the "
                "policy could not run there; this model architecture is not supported yet"
            )
        report = self._report
        # Evictions and watched rows stayed on the device during the step, so the step never
        # waited for it; now they come to the CPU (the first copy waits, the rest find it idle).
        for eviction in report.evictions:
            eviction.positions = eviction.positions.cpu()
        for rows in report.attention:
            rows.weights, rows.positions = rows.weights.cpu(), rows.positions.cpu()
        report.kept_per_layer = self.kept_per_layer()
        self._count_state_bytes()
        self.tokens_seen += int(self.context.positions.shape[0])
        report.merging = self.merging.step_report(self) if self.merging is not None else None
        report.cache_bytes = self.current_bytes
        report.host_bytes = self.host_bytes
        if self.loss_meter is not None:
            report.attention_loss = self.loss_meter.end_step()
            report.evicted_attention = self.loss_meter.evicted_attention
        self._report = None
        self.context = None
        return report

    def free(self) -> None:
        """Drop every entry: a step abandoned between two layers (core/runtime/layer_hooks.py) left the layers
        holding different tokens, so nothing in them can be used again."""
        self.merging = create_merging(self.storage, self.n_layers)  # its flags described the dropped entries
        for layer in self.attention_layers:
            layer.empty_storage()
        for layer in self.layers:
            if not isinstance(layer, PolicyLayer):
                layer.reset()  # a state absorbed part of the abandoned step: it cannot be used again either
        if self.merging is not None:
            self.merging.connect(self)
        self.current_bytes = self.host_bytes = self.state_layer_bytes = 0
        self.context = self._report = None

    # -- bookkeeping ------------------------------------------------------------------------------

    def fuses_scoring_on(self, device: torch.device) -> bool:
        return self.fused_scoring if self.fused_scoring is not None else device.type == "cpu"

    def note_scoring_scratch(self, nbytes: int) -> None:
        self.peak_scoring_bytes = max(self.peak_scoring_bytes, nbytes)

    def note_bytes(self, delta: int) -> None:
        self.current_bytes += delta
        self.peak_bytes = max(self.peak_bytes, self.current_bytes)

    def _count_state_bytes(self) -> None:
        """State layers grow (or are replaced) inside transformers' code: their bytes are read once per step."""
        now = sum(state_bytes(layer) for layer in self.layers if not isinstance(layer, PolicyLayer))
        self.note_bytes(now - self.state_layer_bytes)
        self.state_layer_bytes = now

    def record_eviction(self, layer_idx: int, positions: torch.Tensor, reason: str = POLICY) -> None:
        self._report.evictions.append(Eviction(layer_idx, positions.detach(), reason))

    def note_host_bytes(self, delta: int) -> None:
        self.host_bytes += delta
        self.peak_host_bytes = max(self.peak_host_bytes, self.host_bytes)

    def record_recall(self, layer_idx: int, positions: torch.Tensor) -> None:
        self._report.recalled.append(Eviction(layer_idx, positions.detach().cpu()))
        self.recalled_total += positions.numel()

    def recall(self, layer_idx: int, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor):
        """(key, value, n) with n recalled host entries in front; (key, value, 0) without a host tier."""
        if self.storage.tier != "host":
            return key, value, 0
        return self.layers[layer_idx].recall(query, key, value)

    def host_bytes_per_layer(self) -> list[int]:
        return [layer.host_byte_count() if isinstance(layer, PolicyLayer) else 0 for layer in self.layers]

    def codec_error(self) -> dict[str, float | None]:
        """Mean relative error of decoded keys and values over every encoded group (measure_error on)."""
        sums = {"key": [], "value": []}
        for layer in self.attention_layers:
            for kind, value in layer.store.mean_relative_error().items():
                if value is not None:
                    sums[kind].append(value)
        return {kind: (sum(values) / len(values) if values else None) for kind, values in sums.items()}

    def shared_bytes(self) -> int:
        """Of the cache's bytes, the directions merged layers share (0 without --merge)."""
        return 0 if self.merging is None else self.merging.shared_bytes()

    def kept_per_layer(self) -> list[int]:
        """Entries each layer holds; 0 for a state layer (it holds state, not entries)."""
        return [layer.entry_count() if isinstance(layer, PolicyLayer) else 0 for layer in self.layers]

    def bytes_per_layer(self) -> list[int]:
        """Keys plus values held by each layer (a state layer: its states), from the tensors themselves.
        Safe to call from the memory sampler's thread mid-step: each layer's read sees one consistent
        pair of tensors."""
        return [layer.byte_count() if isinstance(layer, PolicyLayer) else state_bytes(layer) for layer in self.layers]

    def key_positions(self, layer_idx: int, recalled: int = 0) -> tuple[torch.Tensor, int | None]:
        """The positions of the keys attention sees in a layer, (rows, n) with recalled host entries
        in front, and the layer's window (None: a global layer)."""
        layer = self.layers[layer_idx]
        positions = layer.positions
        if recalled:
            positions = torch.cat([layer.recalled_positions.to(positions.device), positions], dim=1)
        return positions, layer.window

    def positions(self, layer_idx: int) -> torch.Tensor:
        """Token positions held by a layer, (kv_heads, n)."""
        return self.layers[layer_idx].positions

    def entries_held(self) -> int:
        """Entries of the first attention layer; the same in every layer under uniform budgets."""
        return self.attention_layers[0].entry_count()
