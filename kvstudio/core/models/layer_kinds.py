"""What kind of attention each decoder layer computes, read from the model's config.

transformers declares layer kinds in `config.layer_types` (Gemma 2/3, GPT-OSS, Cohere 2, Exaone 4,
Qwen 2/3 with `use_sliding_window` and `max_window_layers`, hybrids), or, without `layer_types`, by
`sliding_window` being set (Mistral, Starcoder2: then every layer slides). `DynamicCache(config=...)`
builds its layers from the same reading (`cache_utils.get_layer_types_and_kwargs`), so a layer KV
Studio calls sliding is one transformers' own cache keeps as a sliding window.

A sliding layer with window W lets the query at position p see the entries at positions p-W+1..p
(transformers' `kv_idx > q_idx - W`); an entry whose position is at most (next position - W) can never
be attended again.
"""

from __future__ import annotations

from dataclasses import dataclass

FULL, SLIDING, CHUNKED, STATE, NONE = "full", "sliding", "chunked", "state", "none"

# transformers' layer_types names, by what KV Studio does with them.
_ATTENTION = {"full_attention": FULL, "attention": FULL, "sliding_attention": SLIDING,
              "chunked_attention": CHUNKED}
_STATE = {"linear_attention", "conv", "mamba", "hybrid", "hybrid_sliding", "recurrent", "mamba2", "ssm"}
_NONE = {"dummy", "moe", "mlp"}


@dataclass(frozen=True)
class LayerKind:
    kind: str  # full | sliding | chunked | state (linear attention, SSM, convolution) | none (no cache)
    window: int | None = None  # sliding: W; chunked: the chunk size
    transformers_type: str = "full_attention"
    rope: bool = True  # False: the layer's keys carry no rotary position (Cohere 2 / Exaone 4 global, SmolLM3 NoPE)

    @property
    def is_attention(self) -> bool:
        return self.kind in (FULL, SLIDING, CHUNKED)


def text_config(config):
    getter = getattr(config, "get_text_config", None)
    return getter(decoder=True) if getter is not None else config


def _types_and_windows(config) -> tuple[list[str], list[int | None]]:
    try:
        from transformers.cache_utils import get_layer_types_and_kwargs
    except ImportError:  # before transformers had it: the same reading, by hand
        get_layer_types_and_kwargs = None
    if get_layer_types_and_kwargs is not None:
        types, kwargs = get_layer_types_and_kwargs(config)
        return list(types), [k.get("sliding_window") for k in kwargs]
    n = config.num_hidden_layers
    types = getattr(config, "layer_types", None)
    if types is None:
        window = getattr(config, "sliding_window", None)
        chunk = getattr(config, "attention_chunk_size", None)
        types = ["sliding_attention" if window is not None else "chunked_attention" if chunk is not None
                 else "full_attention"] * n
    windows = [getattr(config, "sliding_window", None) if t == "sliding_attention"
               else getattr(config, "attention_chunk_size", None) if t == "chunked_attention" else None
               for t in types]
    return list(types), windows


def _nope_layers(config, kinds: list[str]) -> set[int]:
    """Layers whose attention applies no RoPE (read from each family's modeling code)."""
    family = getattr(config, "model_type", "")
    if family in ("cohere2", "exaone4") and getattr(config, "sliding_window", None) is not None:
        return {i for i, name in enumerate(kinds) if name != "sliding_attention"}
    flags = getattr(config, "no_rope_layers", None)  # SmolLM3: 1 = RoPE, 0 = NoPE
    if flags is not None:
        return {i for i, use in enumerate(flags) if not use}
    return set()


def layer_kinds(config) -> list[LayerKind]:
    """One LayerKind per decoder layer."""
    import dataclasses

    config = text_config(config)
    types, _ = _types_and_windows(config)
    nope = _nope_layers(config, types)
    return [dataclasses.replace(kind, rope=False) if i in nope else kind
            for i, kind in enumerate(_kinds(config))]


def _kinds(config) -> list[LayerKind]:
    kinds = []
    for name, window in zip(*_types_and_windows(config)):
        if name in _ATTENTION:
            kind = _ATTENTION[name]
            kinds.append(LayerKind(kind, window if kind != FULL else None, name))
        elif name in _NONE:
            kinds.append(LayerKind(NONE, None, name))
        else:  # linear attention, SSM and convolution layers, and any kind not known here
            kinds.append(LayerKind(STATE if name in _STATE else name, None, name))
    return kinds


def describe_kinds(kinds: list[LayerKind]) -> str:
    """'4 layers: 2 sliding (window 8), 2 global', '30 layers, all global'."""
    n = len(kinds)
    groups: dict[str, int] = {}
    for kind in kinds:
        label = {FULL: "global", SLIDING: f"sliding (window {kind.window})",
                 CHUNKED: f"chunked (chunk {kind.window})", STATE: "state (not attention)",
                 NONE: "without a cache"}.get(kind.kind, kind.kind)
        groups[label] = groups.get(label, 0) + 1
    if len(groups) == 1:
        return f"{n} layers, all {next(iter(groups))}"
    return f"{n} layers: " + ", ".join(f"{count} {label}" for label, count in groups.items())


def kinds_record(kinds: list[LayerKind]) -> dict:
    """For --json and run records: the summary line and each layer's kind and window."""
    return {"summary": describe_kinds(kinds), "layers": [{"kind": k.kind, "window": k.window} for k in kinds]}


# The kinds of transformers' layer_types KV Studio leaves to transformers' own layers.
SUPPORTED_STATE_TYPES = ("conv", "linear_attention")


def unsupported_state_types(kinds: list[LayerKind]) -> list[str]:
    """The state layers' transformers types that KV Studio cannot hold (none when it can run the model)."""
    available = _state_layer_classes()
    return sorted({k.transformers_type for k in kinds if k.kind == STATE and k.transformers_type not in available})


def _state_layer_classes() -> dict[str, type]:
    """transformers' own cache layer for each supported state type (an older release may lack them)."""
    try:
        from transformers.cache_utils import DYNAMIC_LAYER_TYPE_MAPPING, LinearAttentionCacheLayerMixin
    except ImportError:
        return {}
    return {name: cls for name, cls in DYNAMIC_LAYER_TYPE_MAPPING.items()
            if name in SUPPORTED_STATE_TYPES and issubclass(cls, LinearAttentionCacheLayerMixin)}
