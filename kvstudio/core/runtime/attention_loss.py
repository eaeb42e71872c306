"""What a policy loses while it runs: the attention mass that falls on entries it evicted.

The "attention loss" of the Cold Compress study (Answer.AI, 2024), which tracks perplexity: beside
the policy's cache a shadow cache keeps every key the run computed, never evicting. At each step,
for each layer, the newest query's softmax is computed over the shadow's keys (the attention it
would pay with a full cache, under the layer's own logit rule: causal, window, soft-cap, sinks) and
the mass on entries the layer no longer holds is that layer's loss: 0 when nothing it would attend
to is gone, 1 when everything is. Averaged over the query heads.

Keys are the run's own (computed under the policy, from hidden states the evictions already
changed), so this measures what the compressed run's queries miss now, not the divergence from a
full-cache run. The step is measured before its own eviction: the query attended to what the cache
held when it ran.

Per evicted token, what it would have received: the same step's mass on each entry the layer no
longer holds (averaged over the query heads, so a layer's tokens add up to its loss), kept for the
`TOP_EVICTED` largest of at least `EVICTED_FLOOR` per layer and step (`evicted_attention`; the
token map's hover reads it). The last step's figure, not a sum over steps: the token map says what
an evicted token would get now, and a top-k per step is a few numbers, where every evicted token's
mass at every step would be a second cache of floats.

It costs a full cache of keys (no values) beside the policy's: bytes are reported as
`shadow_bytes`. Not with re-rotation (the shadow holds keys at their original positions) nor from a
saved cache (the keys evicted before it was saved are gone).
"""

from __future__ import annotations

import torch

from kvstudio.core.errors import KVStudioError
from kvstudio.core.recording.event_types import EVICTED_FLOOR, TOP_EVICTED
from kvstudio.core.runtime.attention import LogitRule, attention_rows


class AttentionLossMeter:
    """The shadow keys of every layer and the loss of each layer in the current step."""

    def __init__(self, n_layers: int):
        self.n_layers = n_layers
        self._keys: list[torch.Tensor | None] = [None] * n_layers  # (kv_heads, capacity, d), doubling
        self._positions: list[torch.Tensor | None] = [None] * n_layers  # (capacity,) long
        self._held = [0] * n_layers
        self._step: list[torch.Tensor | None] = [None] * n_layers  # 0-dim float32 per layer
        # Per layer this step: (masses, positions) of the evicted entries that would get the most
        self._top: list[tuple[torch.Tensor, torch.Tensor] | None] = [None] * n_layers
        self.evicted_attention: tuple = ()  # the step end_step closed: _read_top's

    def observe(self, layer_idx: int, query: torch.Tensor, key: torch.Tensor, rule: LogitRule,
                scaling: float | None) -> None:
        """A layer's attention ran: `query` (1, heads, q, d) its queries, `key` (1, kv_heads, k, d) the
        keys it saw, this step's q new ones last; `rule` the layer's logits (its key positions are the
        entries attention saw)."""
        q_len = query.shape[2]
        keys, positions = self._append(layer_idx, key[0, :, -q_len:].detach(), rule.query_positions)
        shadow = LogitRule(positions[None], rule.query_positions, rule.window, rule.softcap, rule.sinks)
        with torch.no_grad():
            weights = attention_rows(query.detach(), keys[None], scaling, 1, shadow)[:, 0]  # (heads, n)
            seen = rule.key_positions if rule.key_positions is not None else positions[None]
            # The shadow holds every token from the run's start in order: entry i is token position i,
            # so the positions attention saw index it directly (no read of the device).
            held = torch.zeros(seen.shape[0], keys.shape[1], dtype=torch.bool, device=keys.device)
            held.scatter_(1, seen.to(keys.device), True)  # (rows, n): which shadow entries attention saw
            heads = weights.shape[0]
            if held.shape[0] != heads:
                held = held.repeat_interleave(heads // held.shape[0], dim=0)
            lost = weights.masked_fill(held, 0.0).mean(dim=0)  # (n,): each entry's share of the layer's attention
            self._step[layer_idx] = lost.sum()
            self._top[layer_idx] = torch.topk(lost, min(TOP_EVICTED, lost.shape[0]))

    def _append(self, layer_idx: int, new_keys: torch.Tensor, new_positions: torch.Tensor):
        keys, positions, have = self._keys[layer_idx], self._positions[layer_idx], self._held[layer_idx]
        n = new_keys.shape[1]
        if keys is None or have + n > keys.shape[1]:
            capacity = max(2 * (keys.shape[1] if keys is not None else 0), have + n, 64)
            grown = new_keys.new_empty(new_keys.shape[0], capacity, new_keys.shape[2])
            grown_positions = torch.empty(capacity, dtype=torch.long, device=new_keys.device)
            if keys is not None:
                grown[:, :have], grown_positions[:have] = keys[:, :have], positions[:have]
            keys, positions = self._keys[layer_idx], self._positions[layer_idx] = grown, grown_positions
        keys[:, have:have + n] = new_keys
        positions[have:have + n] = new_positions.to(positions.device)
        self._held[layer_idx] = have + n
        return keys[:, :have + n], positions[:have + n]

    def end_step(self) -> list[float | None]:
        """Each layer's loss this step (None for a layer that did not attend), read in one copy; the
        step's evicted tokens' figures go to `evicted_attention`."""
        measured = [i for i, value in enumerate(self._step) if value is not None]
        values = torch.stack([self._step[i] for i in measured]).tolist() if measured else []
        losses: list[float | None] = [None] * self.n_layers
        for i, value in zip(measured, values):
            losses[i] = round(float(value), 6)
        self.evicted_attention = self._read_top()
        self._step = [None] * self.n_layers
        self._top = [None] * self.n_layers
        return losses

    def _read_top(self) -> tuple:
        """Per layer, ((position, share), ...) of the evicted tokens this step would have attended most,
        largest first, those under EVICTED_FLOOR left out; () for a layer not measured."""
        top: list[tuple] = [()] * self.n_layers
        measured = [i for i, pair in enumerate(self._top) if pair is not None]
        if not measured:
            return tuple(top)
        masses = torch.cat([self._top[i].values for i in measured]).tolist()
        indices = torch.cat([self._top[i].indices for i in measured]).tolist()
        at = 0
        for i in measured:
            count = self._top[i].values.shape[0]
            # Shadow entry k is token position k (the shadow holds every token in order).
            top[i] = tuple((index, round(mass, 6)) for index, mass in zip(indices[at:at + count], masses[at:at + count])
                           if mass >= EVICTED_FLOOR)
            at += count
        return tuple(top)

    def byte_count(self) -> int:
        """What the shadow holds: every key of every layer (capacity included)."""
        return sum(k.numel() * k.element_size() + p.numel() * 8 for k, p in zip(self._keys, self._positions)
                   if k is not None)


def mean_loss(steps) -> float | None:
    """The run's attention loss: the mean over the steps that produced a token (the prompt's last step
    and every decode step) of the mean over layers; None when nothing was measured."""
    values = [sum(v) / len(v) for v in ([x for x in step.attention_loss if x is not None]
                                        for step in steps if step.token_id is not None and step.attention_loss)
              if v]
    return round(sum(values) / len(values), 6) if values else None


def per_layer_loss(steps) -> list[float]:
    """Each layer's loss averaged over the steps that produced a token."""
    rows = [step.attention_loss for step in steps if step.token_id is not None and step.attention_loss]
    if not rows:
        return []
    return [round(sum(r[i] for r in rows if r[i] is not None) / max(sum(r[i] is not None for r in rows), 1), 6)
            for i in range(len(rows[0]))]


def new_loss_meter(cache, start=None) -> AttentionLossMeter:
    """The meter of a run with --measure-loss, refused where the shadow could not be complete."""
    if cache.policy.config.rerotate:
        raise KVStudioError("--measure-loss compares keys at their original positions and --rerotate moves them: "
                            "use one or the other")
    if start is not None:
        raise KVStudioError("--measure-loss needs every key of the run, and a saved cache no longer has the evicted "
                            "ones: run it from the prompt (without --from or --prompt-cache)")
    return AttentionLossMeter(cache.n_layers)


def loss_summary(meter: AttentionLossMeter | None, steps) -> dict:
    """The GenerationResult fields of a run's measured loss ({} without --measure-loss)."""
    if meter is None:
        return {}
    return {"attention_loss": mean_loss(steps), "attention_loss_per_layer": per_layer_loss(steps),
            "shadow_bytes": meter.byte_count()}
