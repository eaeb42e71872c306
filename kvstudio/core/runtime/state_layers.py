"""Layers that are not attention (linear attention, convolution state: Qwen3-Next, LFM2): transformers'
own cache layers, inside a PolicyCache.

Such a layer holds no entries: its state has absorbed every token it was fed (a recurrent matrix, the
last few inputs of a convolution), so there is nothing a policy could evict, and eviction never
touches it. KV Studio puts transformers' own layer object where the model expects it (the model
calls `update_conv_state`, `update_recurrent_state`, ... on the cache, which hands them to that
layer), the policy acts on the attention layers only, and the views count the state's bytes and
show the layer as state. A layer that is both at once ("hybrid": Falcon-H1) is refused at load.
"""

from __future__ import annotations

from transformers import DynamicCache

from kvstudio.core.models.layer_kinds import STATE, LayerKind


def state_layers(config, kinds: list[LayerKind]) -> dict[int, object]:
    """transformers' own cache layers for the state layers of a model, by layer index (empty for a model
    of attention layers only): built the way transformers builds them, from the model's config."""
    indices = [i for i, kind in enumerate(kinds) if kind.kind == STATE]
    if not indices:
        return {}
    built = DynamicCache(config=config).layers
    return {i: built[i] for i in indices}


def state_bytes(layer) -> int:
    """The bytes of a state layer's conv and recurrent states (0 before its first update)."""
    tensors = [*layer.conv_states.values(), *layer.recurrent_states.values()]
    return sum(t.numel() * t.element_size() for t in tensors if t is not None)
