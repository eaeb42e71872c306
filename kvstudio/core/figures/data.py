"""What each view draws, computed from a run's events: the live views update these event by event,
and the figure writer (render.py) builds them from a stored recording at once. One computation, so a
figure from `kvstudio runs plot` shows what the studio showed.

Positions: the n-th token of the run (prompt first, then generated text) has position n.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from kvstudio.core.errors import KVStudioError
from kvstudio.core.recording.event_types import EVICTED_FLOOR, TOP_EVICTED, WINDOW

EVICTED, UNSEEN = -1.0, -2.0  # markers in an attention image (weights are >= 0)
LOG_DECADES = 3.0  # the log scale shows this many decades below the top weight


# -- the token map -----------------------------------------------------------------------------------


# "All layers" by tier: a token shows the liveliest tier any layer gives it, lowest first.
TIER_PRECEDENCE = ("unfed", "evicted", "window", "host", "device", "retained", "recalled")
EVICTED_BEFORE_RESTORE = -2  # evicted_step of an entry gone before the saved cache a run restored


class TokenMap:
    """Per token: its text, whether it was fed yet, and per layer how many KV heads evicted it and when."""

    def __init__(self, n_layers: int, kv_heads: int, prompt_tokens, fed_before: int = 0):
        self.tokens: list[str] = list(prompt_tokens)
        self.prompt_count = len(self.tokens)
        self.n_layers, self.kv_heads = max(n_layers, 1), max(kv_heads, 1)
        self.fed = fed_before  # tokens the model has been fed (restored from a saved cache included)
        capacity = max(2 * len(self.tokens), 64)
        self.evicted_heads = np.zeros((self.n_layers, capacity), dtype=np.int16)
        self.evicted_step = np.full((self.n_layers, capacity), -1, dtype=np.int32)  # when its last head went
        # True where the entry's last head went because it left a sliding layer's window (not the policy)
        self.left_window = np.zeros((self.n_layers, capacity), dtype=bool)
        self.recalled: dict[int, np.ndarray] = {}  # layer -> positions recalled at its latest recall
        self.retained: dict[int, set[int]] = {}  # layer -> positions MiniCache's retention rule kept unmerged
        self.storage_tier = "device"  # "host": evicted entries live on in host memory
        # Layers that hold entries (state layers hold recurrent state instead: they neither hold nor evict)
        self.attention_layers = np.ones(self.n_layers, dtype=bool)
        # With --measure-loss, per layer: the latest step measured, and the shares of its attention the
        # evicted tokens recorded there would have received (StepEvent.evicted_attention)
        self.would_attend_step = np.full(self.n_layers, -1, dtype=np.int64)
        self.would_attend: list[dict[int, float]] = [{} for _ in range(self.n_layers)]
        self.would_attend_floor = np.full(self.n_layers, EVICTED_FLOOR)  # what a token not listed got less than

    @classmethod
    def for_run(cls, run) -> TokenMap:
        token_map = cls(run.n_layers, run.n_kv_heads, run.prompt_tokens, getattr(run, "restored_tokens", 0))
        token_map.storage_tier = getattr(run, "storage_tier", "device")
        for layer in getattr(run, "state_layers", ()):
            if layer < token_map.n_layers:
                token_map.attention_layers[layer] = False
        # A run that goes on from a saved cache: what was evicted before the save is evicted here too.
        for layer, missing in enumerate(getattr(run, "restored_missing_heads", ())[:token_map.n_layers]):
            missing = np.asarray(missing, dtype=np.int16)
            token_map._ensure_capacity(len(missing))
            token_map.evicted_heads[layer, :len(missing)] = missing
            token_map.evicted_step[layer, :len(missing)][missing > 0] = EVICTED_BEFORE_RESTORE
        return token_map

    def add(self, events: dict) -> None:
        """Take new events by kind: tokens, steps, evictions, recalls, merges (any may be missing)."""
        self.tokens.extend(token.text for token in events.get("tokens", ()))
        for step in events.get("steps", ()):
            self.fed += step.input_tokens
            self._note_would_attend(step)
        self._ensure_capacity(len(self.tokens))
        for eviction in events.get("evictions", ()):
            if eviction.positions.size:
                self._ensure_capacity(int(eviction.positions.max()) + 1)
            self.evicted_heads[eviction.layer, eviction.positions] += 1
            self.evicted_step[eviction.layer, eviction.positions] = eviction.step
            self.left_window[eviction.layer, eviction.positions] = eviction.reason == WINDOW
        for recall in events.get("recalls", ()):
            self.recalled[recall.layer] = np.unique(recall.positions)
        for merge in events.get("merges", ()):
            for layer, positions in enumerate(merge.retained):
                if len(positions):
                    self.retained.setdefault(layer, set()).update(positions.tolist())

    def _note_would_attend(self, step) -> None:
        losses, tops = getattr(step, "attention_loss", ()), getattr(step, "evicted_attention", ())
        for layer, top in enumerate(tops[:self.n_layers]):
            if layer < len(losses) and losses[layer] is None:
                continue  # the layer did not attend this step: its latest figures stand
            self.would_attend_step[layer] = step.step
            self.would_attend[layer] = {int(position): float(share) for position, share in top}
            # A full list was cut at its last entry: a token left out got at most that
            self.would_attend_floor[layer] = (min(share for _, share in top) if len(top) >= TOP_EVICTED
                                              else EVICTED_FLOOR)

    def would_attend_text(self, position: int, layer: int | None) -> str | None:
        """What an evicted token would have received at the latest measured step, in words (None when
        the run did not measure its loss). Layer None: the layer that would have given it the most."""
        layers = [layer] if layer is not None else [i for i in range(self.n_layers)
                                                    if self.evicted_heads[i, position] > 0]
        layers = [i for i in layers if self.would_attend_step[i] >= 0]
        if not layers:
            return None
        shares = {i: self.would_attend[i].get(position) for i in layers}
        listed = {i: share for i, share in shares.items() if share is not None}
        if listed:
            best = max(listed, key=listed.get)
            most = "" if layer is not None or len(layers) == 1 else " (the most of the layers that evicted it)"
            return (f"would have received {listed[best]:.1%} of layer {best}'s attention at step "
                    f"{self.would_attend_step[best]}{most}")
        floor = max(float(self.would_attend_floor[i]) for i in layers)
        if layer is not None:
            return (f"would have received under {floor:.1%} of layer {layer}'s attention at step "
                    f"{self.would_attend_step[layer]}")
        return f"would have received under {floor:.1%} of the attention of each layer that evicted it"

    def _ensure_capacity(self, positions: int) -> None:
        if positions > self.evicted_heads.shape[1]:
            grown = np.zeros((self.n_layers, positions * 2), dtype=np.int16)
            grown[:, : self.evicted_heads.shape[1]] = self.evicted_heads
            steps = np.full((self.n_layers, positions * 2), -1, dtype=np.int32)
            steps[:, : self.evicted_step.shape[1]] = self.evicted_step
            window = np.zeros((self.n_layers, positions * 2), dtype=bool)
            window[:, : self.left_window.shape[1]] = self.left_window
            self.evicted_heads, self.evicted_step, self.left_window = grown, steps, window

    @property
    def fed_count(self) -> int:
        return min(self.fed, len(self.tokens))

    @property
    def entry_layers(self) -> int:
        """Layers that hold entries (all but state layers)."""
        return max(int(self.attention_layers.sum()), 1)

    def layers_holding(self) -> np.ndarray:
        """Per token: how many layers still hold it (a layer holds it while one of its KV heads does);
        state layers are not counted."""
        held = self.evicted_heads[:, : len(self.tokens)] < self.kv_heads
        return (held & self.attention_layers[:, None]).sum(axis=0)

    def heads_holding(self, layer: int) -> np.ndarray:
        """Per token: how many KV heads of `layer` still hold it."""
        return self.kv_heads - self.evicted_heads[layer, : len(self.tokens)]

    def held_fractions(self, layer: int | None = None) -> np.ndarray:
        """Per token, in [0, 1], what decides its colour: the share of layers (layer None) or of the
        layer's KV heads holding it; NaN for a token not fed yet."""
        if layer is None:
            fractions = self.layers_holding() / self.entry_layers
        else:
            fractions = self.heads_holding(layer) / self.kv_heads
        fractions = fractions.astype(np.float64)
        fractions[self.fed_count:] = np.nan
        return fractions

    def tiers(self, layer: int | None) -> list[str]:
        """Per token of `layer`: device, retained (held unmerged under MiniCache), host, recalled,
        evicted (by the policy), window (left a sliding layer's window), or unfed. Layer None: across all layers, where the token lives at its most alive (a
        token any layer recalled is "recalled", else one any layer holds on the device is "device", ...)."""
        if layer is None:
            per_layer = np.array([self.tiers(index) for index in range(self.n_layers)], dtype=object)
            if not per_layer.size:
                return []
            rank = {tier: order for order, tier in enumerate(TIER_PRECEDENCE)}
            ranks = np.vectorize(rank.__getitem__, otypes=[int])(per_layer)
            return [TIER_PRECEDENCE[r] for r in ranks.max(axis=0)]
        on_device = self.heads_holding(layer) > 0
        gone = "host" if self.storage_tier == "host" else "evicted"
        tiers = np.where(on_device, "device", gone).astype(object)
        tiers[~on_device & self.left_window[layer, :len(tiers)]] = "window"
        recalled = self.recalled.get(layer)
        if recalled is not None and len(recalled):
            tiers[recalled[recalled < len(tiers)]] = "recalled"
        retained = [p for p in self.retained.get(layer, ()) if p < len(tiers) and tiers[p] == "device"]
        tiers[retained] = "retained"
        tiers[self.fed_count:] = "unfed"
        return list(tiers)

    def gone_count(self, layer: int | None = None) -> int:
        """Tokens fed and evicted from every layer (layer None) or from `layer`."""
        return int((self.held_fractions(layer) == 0).sum())

    def describe(self, position: int, layer: int | None = None) -> str:
        """One token in words, for a hover: position, text, who holds it, when it was evicted."""
        text = self.tokens[position]
        part = "prompt" if position < self.prompt_count else "generated"
        lines = [f"position {position} ({part}): {text!r}"]
        if position >= self.fed_count:
            lines.append("not fed to the model yet" if position < self.prompt_count
                         else "sampled, never fed to the model (a next step would feed it)")
            return "\n".join(lines)
        steps = self.evicted_step[:, position]
        if layer is None:
            holding = int(self.layers_holding()[position])
            state = self.n_layers - self.entry_layers
            kind = " attention" if state else ""
            lines.append(f"held by {holding} of {self.entry_layers}{kind} layers"
                         + (f" ({state} state layers absorbed it)" if state else ""))
            gone = self.evicted_heads[:, position] >= self.kv_heads
            window = self.left_window[:, position]
            evicted, left = np.flatnonzero(gone & ~window), np.flatnonzero(gone & window)
            if evicted.size:
                lines.append(f"evicted from {_layer_list(evicted)} {_when(steps[evicted])}")
                would = self.would_attend_text(position, None)
                lines += [would] if would else []
            if left.size:
                lines.append(f"left the sliding window of {_layer_list(left)} {_when(steps[left])}")
        elif not self.attention_layers[layer]:
            lines.append(f"layer {layer} holds recurrent or convolution state, not entries: the token was absorbed "
                         "into it")
        else:
            heads = int(self.heads_holding(layer)[position])
            lines.append(f"layer {layer}: held by {heads} of {self.kv_heads} KV heads")
            if heads == 0 and self.left_window[layer, position]:
                lines.append(f"left the layer's sliding window {_when(steps[layer:layer + 1])}: it can never be "
                             "attended there again")
            elif heads < self.kv_heads:
                lines.append(f"evicted {_when(steps[layer:layer + 1])}")
                would = self.would_attend_text(position, layer)
                lines += [would] if would else []
        return "\n".join(lines)


def _when(steps: np.ndarray) -> str:
    """'at step 12', 'at steps 3-9', or 'before the saved cache this run went on from'."""
    during = steps[steps != EVICTED_BEFORE_RESTORE]
    before = "before the saved cache this run went on from" if len(during) < len(steps) else ""
    if not len(during):
        return before
    first, last = int(during.min()), int(during.max())
    when = f"at step {first}" if first == last else f"at steps {first}-{last}"
    return f"{when} (some {before})" if before else when


def _layer_list(layers: np.ndarray) -> str:
    if len(layers) > 6:
        return f"{len(layers)} layers"
    return ("layer " if len(layers) == 1 else "layers ") + ", ".join(str(int(i)) for i in layers)


# -- the attention map -------------------------------------------------------------------------------


def attention_row(event, head: int | None, width: int) -> np.ndarray:
    """One image row: weight per token position; EVICTED where seen but not held, UNSEEN beyond."""
    weights, positions = event.weights, event.positions  # (heads, n), (kv_heads, n)
    heads, kv_heads = weights.shape[0], positions.shape[0]
    group = heads // kv_heads
    row = np.full(width, UNSEEN, dtype=np.float32)
    seen = int(positions.max()) + 1 if positions.size else 0
    row[:seen] = EVICTED
    if head is not None:
        row[positions[head // group]] = weights[head]
        return row
    total = np.zeros(seen, dtype=np.float32)
    held = np.zeros(seen, dtype=bool)
    for h in range(heads):  # positions differ per KV head: place each head's weights, then average
        total[positions[h // group]] += weights[h]
        held[positions[h // group]] = True
    row[:seen][held] = total[held] / heads
    return row


def stack_rows(rows: list[np.ndarray]) -> np.ndarray:
    """Rows of different widths as one (steps, positions) image, padded with UNSEEN."""
    if not rows:
        return np.zeros((0, 0), dtype=np.float32)
    width = max(len(row) for row in rows)
    image = np.full((len(rows), width), UNSEEN, dtype=np.float32)
    for index, row in enumerate(rows):
        image[index, : len(row)] = row
    return image


def attention_image(events: list, layer: int, head: int | None) -> np.ndarray:
    """The attention map of `layer`: one row per recorded step (its newest query), over positions."""
    rows = [attention_row(e, head, int(e.positions.max()) + 1 if e.positions.size else 0)
            for e in events if e.layer == layer]
    return stack_rows(rows)


def recorded_layers(events: list) -> list[int]:
    return sorted({int(e.layer) for e in events})


def attention_top(image: np.ndarray) -> float:
    """The weight the colour scale tops out at: the 99th percentile of held weights (a few huge
    sink weights would otherwise leave everything else dark)."""
    held = image[image >= 0]
    return float(np.percentile(held, 99)) if held.size else 1.0


def scale_attention(image: np.ndarray, top: float, log: bool = False) -> np.ndarray:
    """Weights -> [0, 1] for colouring (linear up to `top`, or log over LOG_DECADES decades below
    it); the EVICTED and UNSEEN markers stay as they are."""
    top = max(top, 1e-12)
    weights = np.clip(image, 0, None)
    if log:
        floor = top * 10 ** -LOG_DECADES
        scaled = (np.log10(np.maximum(weights, floor)) - np.log10(floor)) / LOG_DECADES
    else:
        scaled = weights / top
    return np.where(image < 0, image, np.clip(scaled, 0, 1)).astype(np.float32)


def attention_row_bytes(query_heads: int, kv_heads: int, entries: int) -> int:
    """What one recorded attention row costs: float32 weights per query head and int64 positions per
    KV head, for each held entry."""
    return entries * (4 * query_heads + 8 * kv_heads)


# -- occupancy, evictions, memory ---------------------------------------------------------------------


@dataclass
class Occupancy:
    per_layer: list[int]  # entries held per layer now (mid-step readings included)
    budgets: list[float]  # per layer; NaN where the layer has none
    totals: list[int]  # entries held over all layers, after each step
    windows: list[float] = None  # per layer: a sliding layer's window; NaN for a global one

    @property
    def has_windows(self) -> bool:
        return bool(self.windows) and not np.all(np.isnan(self.windows))


def layer_windows(run) -> list[float]:
    """Per layer of a run: its sliding window, NaN where it has none (runs recorded before windows: all NaN)."""
    windows = tuple(getattr(run, "windows", ()) or ())
    if len(windows) != run.n_layers:
        windows = (None,) * run.n_layers
    return [float(w) if w is not None else np.nan for w in windows]


def layer_budgets(run) -> list[float]:
    """Per layer of a run: its budget, NaN where it has none (and on state layers, which hold no entries)."""
    state = set(getattr(run, "state_layers", ()) or ())
    return [float(b) if b is not None and i not in state else np.nan for i, b in enumerate(run.budgets)]


def state_layers_text(run) -> str:
    """'Layers 0, 2 hold recurrent or convolution state (no entries).', or '' when there are none."""
    state = list(getattr(run, "state_layers", ()) or ())
    if not state:
        return ""
    return (f"{_layer_list(np.array(state)).capitalize()} hold{'s' if len(state) == 1 else ''} recurrent or convolution "
            "state, not entries (their bytes: show bytes).")


def occupancy(runs: list, steps: list, memory: list) -> Occupancy:
    run = runs[-1]
    per_layer = list(steps[-1].kept_per_layer) if steps else [0] * run.n_layers
    # Readings carry the entries held as the layers fill: one taken during a step later than the last
    # finished one (a long first chunk) is the newer count, so the bars move within a chunk.
    last_step = steps[-1].step if steps else -1
    for reading in memory:
        kept = getattr(reading, "kept_per_layer", ())
        if kept and reading.step > last_step:
            per_layer = list(kept)
    budgets = layer_budgets(run)
    return Occupancy(per_layer, budgets, [sum(s.kept_per_layer) for s in steps], layer_windows(run))


def eviction_points(evictions: list, layer: int) -> tuple[np.ndarray, np.ndarray]:
    """(steps, positions) of every eviction in `layer`, over its KV heads."""
    chosen = [e for e in evictions if e.layer == layer]
    if not chosen:
        return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64)
    steps = np.concatenate([np.full(e.positions.shape, e.step, dtype=np.int64) for e in chosen])
    return steps, np.concatenate([e.positions.astype(np.int64) for e in chosen])


def padded_range(values, floor_at_zero: bool = True) -> tuple[float, float]:
    """A y range that shows `values` sensibly: from zero for counts, and never a sliver around a
    flat line (34559.6..34560.4), never an empty -0.5..0.5."""
    values = np.asarray(values, dtype=np.float64)
    values = values[np.isfinite(values)]
    if not values.size:
        return 0.0, 1.0
    low, high = float(values.min()), float(values.max())
    if floor_at_zero:
        low = min(low, 0.0)
    span = high - low
    if span <= 0:
        span = abs(high) or 1.0
        return (low if floor_at_zero else low - span * 0.1), high + span * 0.1
    return low, high + span * 0.08


def memory_series(memory: list) -> dict[str, np.ndarray]:
    """Seconds since the run started, and the cache's and the process's bytes at each reading."""
    return {"seconds": np.array([m.seconds for m in memory], dtype=np.float64),
            "cache_bytes": np.array([m.cache_bytes for m in memory], dtype=np.float64),
            "host_cache_bytes": np.array([getattr(m, "host_cache_bytes", 0) for m in memory], dtype=np.float64),
            "process_bytes": np.array([m.process_bytes for m in memory], dtype=np.float64),
            "phase": np.array([m.phase for m in memory], dtype=object)}


def check_layer(layer: int, n_layers: int) -> None:
    if not 0 <= layer < n_layers:
        raise KVStudioError(f"layer {layer} is out of range: the model has layers 0-{n_layers - 1}")
