"""The one pair of functions that read and write a cache layer's stored tensors.

A saved cache holds each layer as the layer stores it: full-precision keys and values plus each
entry's token position (and, with re-rotation, the position its key is rotated at), read from and
written back into the layer's store (core.storage). Quantized codecs and the host tier hold other
tensors: this is the only place that needs to learn them; until it does, `unsaveable_reason` refuses
such caches, and `CODEC` in a file says which storage it was written with.
"""

from __future__ import annotations

import torch

CODEC = "fp"  # full precision, the model's dtype: what PolicyLayer stores today


def layer_codec(layer) -> str:
    """The storage codec of a layer's cache ("fp", "int8", ...; core.storage)."""
    storage = getattr(layer.cache, "storage", None)
    return CODEC if storage is None else storage.codec


def unsaveable_reason(storage) -> str | None:
    """Why a cache cannot be saved yet, or None. Only `fp` storage on the device is: a quantized
    store would have to save its packed groups, scales and residual window (saving what attention
    decodes and encoding it again on restore would not continue bit-identically), and the host tier
    its blocks and summaries. Until this module learns them, such caches are refused, not misread.
    `storage`: a StorageConfig (`PolicyCache.storage`, or `core.storage.storage_of(policy)`)."""
    if storage.codec != CODEC:
        return f"caches stored with codec '{storage.codec}' cannot be saved yet (only '{CODEC}')"
    if storage.tier != "device":
        return f"caches with the {storage.tier} tier cannot be saved yet"
    if getattr(storage, "merge", "none") != "none":  # the merged flags and distance ranges are not saved yet
        return f"caches merged across layers (--merge {storage.merge}) cannot be saved yet"
    return None


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
    positions = tensors["positions"].to(device)
    rope_positions = tensors["rope_positions"].to(device) if "rope_positions" in tensors else positions
    layer.lazy_initialization(keys, values)
    layer.store.append(keys[0], values[0], positions, rope_positions)  # into the layer's own buffers


def layer_bytes(tensors: dict[str, torch.Tensor]) -> int:
    """What a layer's keys and values take in memory, as the cache counts it."""
    return sum(tensors[name].nbytes for name in ("keys", "values") if name in tensors)
