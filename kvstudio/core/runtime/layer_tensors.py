"""The one pair of functions that read and write a cache layer's stored tensors.

A saved cache holds each layer as the layer stores it, read from and written back into the layer's
store (core.storage): under `fp` the keys and values as the model made them; under a quantized
codec the codes, scales and zero points of every entry, the full-precision windows (with the token
position each starts at) and the group table (per-group key scales, the slot of each group, which
group owns each slot); with the host tier also the host entries and their blocks' Quest summaries.
Each entry's token position (and the position its key is rotated at) comes along. Restoring the
very state, not what attention decodes from it, is what makes a continuation bit-identical: encoding
decoded keys again would round differently. Numbers beside the tensors (window starts, slot owners,
byte counts) go to the file's JSON header.

A file's `storage` header (codec, group size, residual, tier, recall, block size: `storage_key`)
must equal the run's, or the cache is refused.
"""

from __future__ import annotations

import torch
from kvstudio.core.storage.host import HostTier

CODEC = "fp"  # full precision, the model's dtype: the storage of a file written before codecs were saved
STORAGE_FIELDS = ("codec", "group_size", "residual", "tier", "recall", "block_size")
MERGE_FIELDS = ("merge", "merge_from", "merge_threshold", "merge_t")  # only when merging: older keys stay equal
_STORE_PARTS = ("window.", "table.", "tail.")  # a quantized store's tensors that are not per-entry rows
_HOST = "host."
_MERGE = "merge."  # cross-layer merging: which entries a layer holds merged (storage/minicache.py)
_FP_ROWS = {"keys", "values"}  # fp keys and values: saved with the batch axis, as files always held them


def storage_key(storage) -> dict:
    """What a saved cache's storage must match: a StorageConfig's fields that change what is held."""
    fields = STORAGE_FIELDS + (MERGE_FIELDS if getattr(storage, "merge", "none") != "none" else ())
    return {name: getattr(storage, name) for name in fields}


def layer_codec(layer) -> str:
    """The storage codec of a layer's cache ("fp", "int8", ...; core.storage)."""
    storage = getattr(layer.cache, "storage", None)
    return CODEC if storage is None else storage.codec


def unsaveable_reason(storage) -> str | None:
    """Why a cache cannot be saved, or None. `storage`: a StorageConfig (`PolicyCache.storage`, or
    `core.storage.storage_of(policy)`)."""
    if storage.codec.startswith("bnb-"):
        return (f"caches stored with codec '{storage.codec}' are not saved: bitsandbytes codecs need CUDA and "
                "saving their blocks is not built; use --codec int8 or int4 to save a quantized cache")
    return None


STATE_LAYERS_UNSAVEABLE = ("saved caches hold attention entries, and this model's recurrent or convolution state layers "
                           "cannot be saved yet")


def cache_unsaveable_reason(cache) -> str | None:
    """Why a PolicyCache cannot be saved (its storage, or layers that hold state), or None."""
    if len(cache.attention_layers) < len(cache.layers):
        return STATE_LAYERS_UNSAVEABLE
    return unsaveable_reason(cache.storage)


def layer_state(layer) -> tuple[dict[str, torch.Tensor], dict]:
    """(tensors copied to the CPU, JSON-safe numbers) of everything a layer holds; ({}, {}) when empty.
    Per-entry rows keep their plain names (keys, values, positions, rope_positions under fp)."""
    if not layer.is_initialized:
        return {}, {}
    store_tensors, store_numbers = layer.store.state()
    tensors = {name.removeprefix("entries."): tensor for name, tensor in store_tensors.items()}
    for name in _FP_ROWS.intersection(tensors):  # (1, kv_heads, n, head_dim), as attention reads them
        tensors[name] = tensors[name].unsqueeze(0)
    numbers = {"store": store_numbers, "bytes": layer.store.byte_count(), "kept": layer.store.entry_count()}
    if layer.host is not None:
        tensors.update({_HOST + name: tensor for name, tensor in layer.host.state().items()})
        numbers["host_bytes"] = layer.host.byte_count()
    if layer.merge is not None:
        merge_tensors, numbers["merge"] = layer.merge.state()
        tensors.update({_MERGE + name: tensor for name, tensor in merge_tensors.items()})
    return tensors, numbers


def layer_tensors(layer) -> dict[str, torch.Tensor]:
    """A layer's stored tensors, copied to the CPU (the run may go on changing the layer)."""
    return layer_state(layer)[0]


def restore_layer(layer, tensors: dict[str, torch.Tensor], device: torch.device, numbers: dict | None = None) -> None:
    """Put saved tensors (and their numbers) back into a fresh layer, on `device`; the inverse of `layer_state`."""
    if not tensors:
        return
    store_tensors, host_tensors, merge_tensors = {}, {}, {}
    for name, tensor in tensors.items():
        if name.startswith(_HOST):
            host_tensors[name.removeprefix(_HOST)] = tensor
        elif name.startswith(_MERGE):
            merge_tensors[name.removeprefix(_MERGE)] = tensor
        elif name.startswith(_STORE_PARTS):
            store_tensors[name] = tensor
        else:
            store_tensors["entries." + name] = tensor[0] if name in _FP_ROWS else tensor
    # Something in the model's dtype: fp keys, a linked layer's own rows (storage/linked.py), a codec's window.
    like = tensors["keys"][0] if "keys" in tensors else tensors.get("key_rows", tensors.get("window.key"))
    layer.lazy_initialization(like[:, :0].to(device), like[:, :0].to(device))
    layer.store.load_state(store_tensors, (numbers or {}).get("store", {}), device)
    if layer.merge is not None and merge_tensors:
        layer.merge.load_state(merge_tensors, (numbers or {}).get("merge", {}), device)
    if host_tensors:
        storage = layer.cache.storage
        layer.host = HostTier(storage.block_size, storage.recall, device)
        layer.host.load_state(host_tensors)


def layer_bytes(tensors: dict[str, torch.Tensor], numbers: dict | None = None) -> int:
    """What a layer holds in memory, as the cache counts it (the store's own count when saved with it)."""
    if numbers and "bytes" in numbers:
        return numbers["bytes"]
    return sum(tensors[name].nbytes for name in ("keys", "values") if name in tensors)


def describe_storage(storage: dict) -> str:
    """'int4 (group 64, residual 0) on the device tier', for messages."""
    text = storage["codec"] if storage["codec"] == CODEC else \
        f"{storage['codec']} (group {storage['group_size']}, residual {storage['residual']})"
    if storage.get("merge", "none") != "none":
        start = "half depth" if storage["merge_from"] is None else f"layer {storage['merge_from']}"
        text += f", {storage['merge']} from {start} (threshold {storage['merge_threshold']:g}, t {storage['merge_t']:g})"
    if storage["tier"] == "host":
        return f"{text} with the host tier (recall {storage['recall']} blocks of {storage['block_size']})"
    return f"{text} on the {storage['tier']} tier"
