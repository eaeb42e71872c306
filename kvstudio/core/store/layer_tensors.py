"""The one pair of functions that read and write a cache layer's stored tensors.

A saved cache holds each layer as the layer stores it. Today a `PolicyLayer` stores full-precision
keys and values plus each entry's token position (and, with re-rotation, the position its key is
rotated at). When storage codecs arrive (int8/int4 with scales, preallocated buffers), the layer
holds other tensors: this is the only place that needs to learn them, and `CODEC` says which
storage a file was written with, so a file from another codec is refused rather than misread.
"""

from __future__ import annotations

import torch

CODEC = "fp"  # full precision, the model's dtype: what PolicyLayer stores today


def layer_codec(layer) -> str:
    """The storage codec of a layer; every layer is "fp" until codecs exist."""
    return getattr(layer, "codec_name", CODEC)


def layer_tensors(layer) -> dict[str, torch.Tensor]:
    """A layer's stored tensors, copied to the CPU (the run may go on changing the layer)."""
    if not layer.is_initialized:
        return {}
    tensors = {"keys": layer.keys, "values": layer.values, "positions": layer.positions}
    if layer.rope_positions is not layer.positions:  # re-rotated: keys sit at other positions
        tensors["rope_positions"] = layer.rope_positions
    return {name: tensor.detach().to("cpu", copy=True).contiguous() for name, tensor in tensors.items()}


def restore_layer(layer, tensors: dict[str, torch.Tensor], device: torch.device) -> None:
    """Put saved tensors back into a fresh layer, on `device`; the inverse of `layer_tensors`."""
    if not tensors:
        return
    keys = tensors["keys"].to(device)
    values = tensors["values"].to(device)
    layer.lazy_initialization(keys, values)
    layer.keys, layer.values = keys, values
    layer.positions = tensors["positions"].to(device)
    layer.rope_positions = tensors["rope_positions"].to(device) if "rope_positions" in tensors else layer.positions


def layer_bytes(tensors: dict[str, torch.Tensor]) -> int:
    """What a layer's keys and values take in memory, as the cache counts it."""
    return sum(tensors[name].nbytes for name in ("keys", "values") if name in tensors)
