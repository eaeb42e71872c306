"""The public contract of a KV-cache policy. Built-in policies and plugins use exactly this.

A policy decides, per layer and per KV head, which cached entries to keep. The engine owns the
storage (`kvstudio.core.runtime.cache`); after every forward step it shows the policy each layer through a
`LayerView` and asks `select()` which entries stay. Write a policy in four parts:

1. **Configuration**: a dataclass subclass of `PolicyConfig`. Declare every parameter with
   `parameter(default, help=..., minimum=...)`; the CLI options and the studio's forms are
   generated from these declarations. Check combinations in `validate()` and raise
   `PolicyConfigError` with a message that says what to change.

2. **Budgets**: `budget_for(layer, n_layers)` gives the entries each KV head of a layer keeps
   when the policy compresses (default: `config.budget` everywhere; `None` means unbounded). A
   pyramid-style policy overrides it to give layers different budgets. `limit_for(layer, n_layers,
   phase)` is what the engine enforces after every step: the budget, unless a policy compresses
   less often by design (SnapKV compresses the prompt once and lets decoding grow the cache).

3. **Attention**: set `needs_attention = True` if scoring needs attention weights. The engine
   then computes softmax weights only for the newest `attention_queries(n_new, phase)` queries of
   the step (default: all new queries), from the query and key already in hand. SDPA is never
   switched to eager for this. Say which form `select()` reads with `attention_form`:
   - `"rows"` (the default, what every plugin written before got): `view.attention`, the rows
     themselves, (query_heads, n_queries, n_entries) float32. Their memory grows with queries x
     entries: a 2k-token chunk is 151 MiB per layer on a 9-head model.
   - `"sums"`: `view.attention_sums`, each entry's weight summed over those queries,
     (query_heads, n_entries) float32, computed in query tiles of bounded scratch (4 MiB of
     scores; see `core.attention.attention_sums`) without the rows ever existing. Column sums are
     what H2O, SnapKV, PyramidKV and TOVA (one query) consume; prefer this form when it is enough.
   `view.attention_sums_per_kv_head()` works with either form.

4. **Selection**: `select(view, state)` returns the indices of the entries to keep, shape
   (kv_heads, k) with the same k for every head (tensors stay rectangular), each row strictly
   increasing, k <= the layer budget; or `None` to keep everything. The engine checks this and
   stops the run with a `PolicyError` naming the policy if it is violated. Shared helpers below
   (`keep_top_scores`, `keep_sinks_and_recent`) turn scores into indices.

State that must survive across steps (running attention sums, step counters) lives in the
`LayerState` the engine keeps for each layer, never in globals or on the policy object (one policy
object may serve several runs). Tensors in `state.per_entry` are aligned with the layer's cached
entries: the engine gathers them with the kept indices after every eviction, so a policy only
extends them for new entries (`state.grow(...)`).

What a token is: `view.token_ids[view.positions]` gives the token id of every entry, and
`view.tokenizer` turns ids into text, for policies that care what they keep (punctuation, special
tokens).

GQA: attention comes per query head. `view.attention_per_kv_head()` combines the query heads of
each group onto their KV head: mean by default (the convention kvpress and SnapKV use), or max or
sum (KVCache-Factory's `gqa_score_agg`). Policies that score with attention declare their config as
an `AttentionScoringConfig`, whose `gqa_aggregation` parameter says which, and pass it on.

Positions: `view.positions` are the entries' token positions in the sequence, shape (kv_heads, n).
By default kept keys stay rotated at those positions; with `rerotate=True` the engine re-rotates
kept keys to contiguous positions 0..k-1 after each eviction (the StreamingLLM paper's scheme).
`view.positions` still reports the token positions either way.

Rows decoding together (optional, built-in policies): in a batched run (core/runtime/batch.py) the
rows that decode at their budget at a layer under one rule may be selected in one stack of tensors
instead of row by row (core/runtime/group_eviction.py). A policy offers it by defining
`select_together(sums, states, budget, kv_heads)` in its own class (a subclass that does not define it again
is selected row by row, since it may have changed `select`): `sums` (rows, query_heads, n) is every
row's `view.attention_sums` at the decode step, `states` the rows' LayerStates; it returns indices
(rows, kv_heads, budget), row r exactly what `select` returns for row r alone, with its state left as
`select` leaves it, or None to have the rows selected one by one.
"""

from __future__ import annotations

import dataclasses
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import torch

from kvstudio.core.errors import PolicyConfigError
from kvstudio.core.params import ParameterSpec, check_value, declared, parameter

Phase = Literal["prefill", "decode"]


# --- declared parameters ------------------------------------------------------------------------
# `parameter` and `ParameterSpec` live in kvstudio.core.params (storage declares its options with them
# too); they stay importable from here, the plugin contract's module.


@dataclass
class PolicyConfig:
    """Parameters every policy has. Subclasses add theirs with `parameter(...)`."""

    budget: int | None = parameter(None, help="cache entries each KV head of a layer keeps (none: keep all)", minimum=1)
    rerotate: bool = parameter(False, help="re-rotate kept keys to contiguous positions after evictions "
                                           "(StreamingLLM paper); off keeps original positions")

    # Parameters added after runs of this policy were first recorded (history rows, saved caches), with
    # the value a record that lacks them ran with: a record is completed with these before it is
    # compared or rebuilt, so old rows rerun as they ran and old saved caches still match.
    former_values: ClassVar[dict[str, Any]] = {}

    def __post_init__(self):
        self.validate()

    def validate(self) -> None:
        """Raise PolicyConfigError naming the parameter and what would be accepted."""
        for spec in self.parameters():
            given = getattr(self, spec.name)
            value = check_value(spec, given, PolicyConfigError)
            if value is not given:
                setattr(self, spec.name, value)  # an int given for a float parameter is stored as a float

    @classmethod
    def parameters(cls) -> list[ParameterSpec]:
        return declared(cls)

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


GQA_AGGREGATIONS = ("mean", "max", "sum")


@dataclass
class AttentionScoringConfig(PolicyConfig):
    """The parameters of a policy that scores entries with attention: how a group's query heads combine."""

    gqa_aggregation: str = parameter("mean", help="how the query heads of a GQA group combine into their KV "
                                     "head's scores: mean, max or sum (KVCache-Factory's gqa_score_agg)",
                                     choices=GQA_AGGREGATIONS)
    former_values: ClassVar[dict[str, Any]] = {"gqa_aggregation": "mean"}


def combine_query_heads(scores: torch.Tensor, kv_heads: int, aggregation: str = "mean") -> torch.Tensor:
    """(query_heads, ...) scores -> (kv_heads, ...): each GQA group's query heads (query head h serves
    KV head h // group, as repeat_kv lays them out) combined by `aggregation` (mean, max or sum)."""
    grouped = scores.view(kv_heads, scores.shape[0] // kv_heads, *scores.shape[1:])
    if aggregation == "mean":
        return grouped.mean(dim=1)
    if aggregation == "max":
        return grouped.amax(dim=1)
    if aggregation == "sum":
        return grouped.sum(dim=1)
    raise PolicyConfigError(f"unknown GQA aggregation '{aggregation}': choose one of {', '.join(GQA_AGGREGATIONS)}")


# --- what a policy sees -------------------------------------------------------------------------


@dataclass
class LayerView:
    """One layer of the cache right after a forward step, before eviction. Batch size is 1."""

    layer_idx: int
    n_layers: int
    step: int
    phase: Phase
    keys: torch.Tensor  # (kv_heads, n, head_dim), RoPE already applied
    values: torch.Tensor  # (kv_heads, n, head_dim)
    positions: torch.Tensor  # (kv_heads, n) long: each entry's token position
    n_new: int  # the last n_new entries were appended in this step
    budget: int | None  # what this layer may keep after the step
    attention: torch.Tensor | None  # (query_heads, n_queries, n) softmax weights of the newest queries
    is_last_prefill_chunk: bool = False
    token_ids: torch.Tensor | None = None  # (seen,) long: every token fed so far; token_ids[positions]
    tokenizer: object | None = None  # the model's tokenizer, to read what a token is (read-only)
    attention_sums: torch.Tensor | None = None  # (query_heads, n): `attention` summed over its queries

    @property
    def n_entries(self) -> int:
        return self.keys.shape[1]

    @property
    def kv_heads(self) -> int:
        return self.keys.shape[0]

    def attention_per_kv_head(self, aggregation: str = "mean") -> torch.Tensor:
        """Attention of the query heads of each GQA group combined (mean, max or sum): (kv_heads, n_queries, n)."""
        if self.attention is None:
            raise RuntimeError("this policy did not declare needs_attention = True")
        return combine_query_heads(self.attention, self.kv_heads, aggregation)

    def attention_sums_per_kv_head(self, aggregation: str = "mean") -> torch.Tensor:
        """Each entry's attention summed over the queries, then the query heads of each GQA group
        combined (mean, max or sum): (kv_heads, n). From `attention_sums`, or from the rows when a
        policy received those."""
        sums = self.attention_sums
        if sums is None:
            if self.attention is None:
                raise RuntimeError("this policy did not declare needs_attention = True")
            sums = self.attention.sum(dim=1)
        return combine_query_heads(sums, self.kv_heads, aggregation)


class LayerState:
    """A policy's memory for one layer, kept by the engine between steps.

    `per_entry` tensors have the entry axis at dim 1 (shape (kv_heads, n, ...)) and are gathered
    with the kept indices on every eviction. `extra` holds anything else (counters, flags).
    """

    def __init__(self):
        self.per_entry: dict[str, torch.Tensor] = {}
        self.extra: dict[str, Any] = {}

    def grow(self, name: str, kv_heads: int, n: int, fill: float = 0.0, *, dtype=torch.float32,
             device: torch.device | str = "cpu") -> torch.Tensor:
        """The per-entry tensor `name`, extended with `fill` to cover n entries; returns it."""
        current = self.per_entry.get(name)
        have = 0 if current is None else current.shape[1]
        if have < n:
            extension = torch.full((kv_heads, n - have), fill, dtype=dtype, device=device)
            current = extension if current is None else torch.cat([current, extension], dim=1)
            self.per_entry[name] = current
        return current

    def keep(self, indices: torch.Tensor) -> None:
        """Called by the engine after an eviction: keep only the entries at `indices` (kv_heads, k)."""
        for name, tensor in self.per_entry.items():
            index = indices.to(tensor.device)
            while index.dim() < tensor.dim():
                index = index.unsqueeze(-1)
            self.per_entry[name] = tensor.gather(1, index.expand(-1, -1, *tensor.shape[2:]))


# --- the policy ---------------------------------------------------------------------------------


class Policy(ABC):
    """Base class of every KV-cache policy. See the module docstring for the contract."""

    name: ClassVar[str]
    summary: ClassVar[str]  # one line for `kvstudio policies` and the studio
    Config: ClassVar[type[PolicyConfig]] = PolicyConfig
    needs_attention: ClassVar[bool] = False
    attention_form: ClassVar[Literal["rows", "sums"]] = "rows"  # what select() reads; see the module docstring
    requires_budget: ClassVar[bool] = True  # False only for policies that keep everything
    uniform_budgets: ClassVar[bool] = True  # False when budget_for differs by layer

    def __init__(self, config: PolicyConfig | None = None, **params):
        if config is not None and params:
            raise TypeError("pass either a config or parameters, not both")
        known = [f.name for f in dataclasses.fields(self.Config)]
        unknown = sorted(set(params) - set(known))
        if unknown:  # checked here, not by catching TypeError: validate() may raise one of its own
            raise PolicyConfigError(f"policy '{self.name}' has no parameter {', '.join(map(repr, unknown))}; "
                                    f"its parameters are {', '.join(known)}")
        self.config = config if config is not None else self.Config(**params)
        if self.requires_budget and self.config.budget is None:
            raise PolicyConfigError(f"the {self.name} policy needs --budget N")
        if self.config.rerotate and not self.uniform_budgets:
            raise PolicyConfigError(
                f"policy '{self.name}' gives layers different budgets, so there is no single contiguous "
                "position for the next token; run it without --rerotate"
            )

    def budget_for(self, layer_idx: int, n_layers: int) -> int | None:
        return self.config.budget

    def limit_for(self, layer_idx: int, n_layers: int, phase: Phase) -> int | None:
        """The most entries a layer may hold after a step of `phase`; None for no limit."""
        return self.budget_for(layer_idx, n_layers)

    def attention_queries(self, n_new: int, phase: Phase) -> int:
        """How many of the newest queries' attention rows `select` needs (only if needs_attention).
        Asked once a step: the answer holds for every layer of the step."""
        return n_new if self.needs_attention else 0

    def new_layer_state(self, layer_idx: int) -> LayerState:
        return LayerState()

    @abstractmethod
    def select(self, view: LayerView, state: LayerState) -> torch.Tensor | None:
        """Indices to keep, (kv_heads, k) increasing per row; or None to keep all entries."""

    def describe(self) -> str:
        # A parameter added later shows only where it differs from what every run had before it
        # (former_values): descriptions of runs that could not choose it stay as they were.
        former = self.config.former_values
        shown = ", ".join(f"{k}={v}" for k, v in self.config.as_dict().items()
                          if v not in (None, False) and not (k in former and former[k] == v))
        storage = getattr(self, "storage", None)  # kvstudio.core.storage: a codec names the cache h2o-int4
        name = self.name if storage is None or storage.codec == "fp" else f"{self.name}-{storage.codec}"
        if storage is not None and storage.merge != "none":  # cross-layer merging (storage/minicache.py)
            name += f"+{storage.merge}"
            start = "half" if storage.merge_from is None else storage.merge_from
            shown = ", ".join(filter(None, [shown, f"merge_from={start}, merge_threshold={storage.merge_threshold:g}"]))
        return f"{name}({shown})"


# --- shared selection code ----------------------------------------------------------------------


def keep_all_if_within(view: LayerView) -> bool:
    return view.budget is None or view.n_entries <= view.budget


def keep_top_scores(scores: torch.Tensor, budget: int, always_keep: torch.Tensor | None = None) -> torch.Tensor:
    """Indices of the `budget` highest scores per row, returned in increasing order.

    scores: (kv_heads, n). always_keep: bool (n,) or (kv_heads, n), entries kept whatever their
    score (sinks, an observation window); they count against the budget. Ties go to the earlier
    entry (topk on a stable sort), so results do not depend on the kernel.
    """
    scores = scores.float()
    if always_keep is not None:
        scores = scores.masked_fill(always_keep.expand_as(scores), float("inf"))
    # Every decode step at the budget: one entry per row goes. Below ~1k scores the sort is faster
    # (fewer passes over a handful of cache lines); both give the same indices.
    if scores.shape[-1] == budget + 1 and scores.numel() >= 1024:
        return _all_but_lowest(scores)
    order = torch.sort(scores, dim=-1, descending=True, stable=True).indices
    return order[..., :budget].sort(dim=-1).values


def _all_but_lowest(scores: torch.Tensor) -> torch.Tensor:
    """keep_top_scores(scores, n - 1) without sorting: the entry the stable descending sort ranks
    last goes, i.e. the lowest score, the latest of equal lowest ones; NaN ranks above every number,
    +inf included, as in torch.sort. On a CPU a sort of n entries per row costs several times these
    few passes, and it ran at every decode step of every layer."""
    n = scores.shape[-1]
    nan = scores.isnan()
    ranked = torch.where(nan, float("inf"), scores)
    lowest = ranked == ranked.amin(dim=-1, keepdim=True)
    # Where the lowest is +inf, NaNs tie with it here but rank above it: a +inf goes (a row of NaNs: its last).
    numbers = lowest & ~nan
    lowest = torch.where(numbers.any(dim=-1, keepdim=True), numbers, lowest)
    index = torch.arange(n, device=scores.device)
    last = torch.where(lowest, index, -1).amax(dim=-1, keepdim=True)
    kept = index[:-1]
    return kept + (kept >= last)


def recent_mask(n: int, recent: int, device) -> torch.Tensor:
    """bool (n,): True for the `recent` newest entries."""
    mask = torch.zeros(n, dtype=torch.bool, device=device)
    if recent:
        mask[-recent:] = True
    return mask


def keep_sinks_and_recent(view: LayerView, sink: int) -> torch.Tensor:
    """The first `sink` entries and the most recent (budget - sink), same for every KV head."""
    n, budget = view.n_entries, view.budget
    recent = budget - sink
    index = torch.cat([torch.arange(min(sink, n)), torch.arange(n - recent, n)])
    return index.to(view.keys.device).unsqueeze(0).expand(view.kv_heads, -1)
