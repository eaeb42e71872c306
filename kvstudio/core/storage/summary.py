"""What a run reports about its storage (GenerationResult.storage, the summary, --json)."""

from __future__ import annotations


def summarize(cache) -> dict:
    storage = cache.storage
    return {
        "codec": storage.codec, "group_size": storage.group_size, "residual": storage.residual,
        "tier": storage.tier, "recall": storage.recall, "block_size": storage.block_size,
        "describe": storage.describe(),
        "peak_cache_bytes": cache.peak_bytes,  # on the device: what the codec really stores
        "peak_host_bytes": cache.peak_host_bytes,
        "host_bytes_per_layer": cache.host_bytes_per_layer(),
        "recalled": cache.recalled_total,
        "relative_error": cache.codec_error() if storage.measure_error else {},
        "merge": storage.merge, "merge_from": storage.merge_from, "merge_threshold": storage.merge_threshold,
        "merge_t": storage.merge_t,
        # Cross-layer merging (storage/minicache.py): pairs, and per layer saved / shared / retained figures.
        "merging": cache.merging.summary(cache) if getattr(cache, "merging", None) is not None else {},
    }
