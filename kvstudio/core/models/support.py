"""Whether KV Studio can run a model exactly, decided when it loads: one clear line when it cannot.

A model is refused when
- some of its layers are neither attention nor a state KV Studio leaves to transformers' own cache
  layers (linear attention and convolution state, as in Qwen3-Next and LFM2, are left to them:
  core/runtime/state_layers.py; SSM and hybrid layers are refused), or are chunked attention
  (Llama 4): KV Studio would be silently different there;
- its attention never goes through transformers' attention interface (Falcon, Bloom, GPT-Neo, MPT
  ... run their own attention code): KV Studio's function, and so the policy, would never run. This
  is checked twice: transformers' own test of the modeling code, then one two-token forward that
  counts the layers calling a probe registered in the interface.
"""

from __future__ import annotations

import torch

from kvstudio.core.errors import ModelLoadError
from kvstudio.core.models.layer_kinds import (CHUNKED, NONE, STATE, SUPPORTED_STATE_TYPES, layer_kinds, text_config,
                                              unsupported_state_types)

PROBE_NAME = "kvstudio_probe"


def _model_type(model) -> str:
    return getattr(text_config(model.config), "model_type", None) or type(model).__name__


def _layer_list(indices: list[int]) -> str:
    return ", ".join(str(i) for i in indices)


def kinds_refusal(model) -> str | None:
    """Why the model's layer kinds cannot be computed exactly, or None."""
    family = _model_type(model)
    kinds = layer_kinds(model.config)
    unsupported = unsupported_state_types(kinds)
    state = [i for i, k in enumerate(kinds) if k.kind == STATE and k.transformers_type in unsupported]
    state += [i for i, k in enumerate(kinds) if not k.is_attention and k.kind not in (NONE, STATE)]
    if state:
        names = sorted({kinds[i].transformers_type for i in state})
        return (f"{family} is not supported: layers {_layer_list(sorted(state))} are {'/'.join(names)} layers, which "
                f"KV Studio cannot hold yet (it leaves {' and '.join(SUPPORTED_STATE_TYPES)} layers to transformers' own "
                "cache layers)")
    chunked = [i for i, k in enumerate(kinds) if k.kind == CHUNKED]
    if chunked:
        return (f"{family} is not supported: layers {_layer_list(chunked)} use chunked attention "
                f"(chunk {kinds[chunked[0]].window}), which KV Studio does not compute yet")
    if all(k.kind == NONE for k in kinds):
        return f"{family} is not supported: it has no attention layers"
    return None


def _probe(module, query, key, value, attention_mask, *args, **kwargs):
    """Counts the layers that call it; returns zeros of attention's output shape."""
    _calls.add(getattr(module, "layer_idx", None))
    return query.new_zeros(query.shape[0], query.shape[2], query.shape[1], value.shape[-1]), None


_calls: set = set()


def attention_refusal(model) -> str | None:
    """Why KV Studio's attention function would not run in some layer, or None."""
    from transformers import AttentionInterface, AttentionMaskInterface
    from transformers.masking_utils import sdpa_mask

    family = _model_type(model)
    own = (f"{family} is not supported: its attention layers run their own attention code instead of transformers' "
           "attention interface, so KV Studio's attention function (and the policy) would never run")
    can_set = getattr(type(model), "_can_set_attn_implementation", None)
    if can_set is not None and not can_set():
        return own
    previous = text_config(model.config)._attn_implementation
    AttentionInterface.register(PROBE_NAME, _probe)
    AttentionMaskInterface.register(PROBE_NAME, sdpa_mask)
    try:
        model.set_attn_implementation(PROBE_NAME)
        if text_config(model.config)._attn_implementation != PROBE_NAME:
            return own
        _calls.clear()
        device = next(model.parameters()).device
        with torch.inference_mode():
            model(input_ids=torch.zeros(1, 2, dtype=torch.long, device=device), use_cache=False)
        kinds = layer_kinds(model.config)
        wanted = {i for i, k in enumerate(kinds) if k.is_attention}
        missing = sorted(wanted - _calls)
        if missing:
            return (f"{family} is not supported: layers {_layer_list(missing)} do not call transformers' attention "
                    "interface, so KV Studio's attention function (and the policy) would not run there")
    finally:
        _calls.clear()
        model.set_attn_implementation(previous)
    return None


def check_supported(model) -> None:
    """Raise ModelLoadError with one line when KV Studio cannot run `model` exactly."""
    reason = kinds_refusal(model) or attention_refusal(model)
    if reason is not None:
        raise ModelLoadError(reason)
