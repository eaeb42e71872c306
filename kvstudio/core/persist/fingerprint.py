"""Cheap fingerprints of a model and a tokenizer: a saved cache is only valid for the model that
computed it, and reading the whole of a model's weights on every run would cost more than the
prefill a saved cache avoids.

- `config_sha256`: SHA-256 of the model config as sorted JSON, without the keys that name where or
  how it was loaded (`_name_or_path`, `_attn_implementation`, `transformers_version`, every key
  starting with "_"): the same architecture and sizes give the same hash wherever the folder is.
- `weights_sha256`: SHA-256 over every parameter and buffer in name order: its name, shape and
  dtype, and a strided sample of at most `SAMPLE_PER_TENSOR` of its values (as float32). A model
  fine-tuned or converted differently changes almost every tensor, so a sample finds it; a change
  confined to unsampled values would not be found (documented limit; the cost is milliseconds).
- `tokenizer_sha256`: SHA-256 of the tokenizer's class, its vocabulary (token -> id, sorted), its
  special tokens and its chat template.

Model fingerprints are computed each time they are asked for (a fine-tune session changes a loaded
model in place); tokenizer fingerprints are kept while the tokenizer lives.
"""

from __future__ import annotations

import hashlib
import json
import weakref

import torch

SAMPLE_PER_TENSOR = 1024
_tokenizer_fingerprints: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def config_sha256(config) -> str:
    # Not what a cache depends on, and written into a live config by save_pretrained (seen: a
    # session's model gained "dtype" and "architectures" after an adapter was saved): the dtype is
    # compared on its own, the architecture is model_type's.
    data = {k: v for k, v in config.to_dict().items()
            if not k.startswith("_") and k not in ("transformers_version", "dtype", "torch_dtype", "architectures")}
    return hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()


def weights_sha256(model: torch.nn.Module) -> str:
    digest = hashlib.sha256()
    tensors = dict(model.named_parameters())
    tensors.update(dict(model.named_buffers()))
    with torch.no_grad():
        for name in sorted(tensors):
            tensor = tensors[name].detach()
            digest.update(f"{name}:{tuple(tensor.shape)}:{tensor.dtype}".encode())
            flat = tensor.reshape(-1)
            step = max(1, flat.numel() // SAMPLE_PER_TENSOR)
            digest.update(flat[::step][:SAMPLE_PER_TENSOR].float().cpu().numpy().tobytes())
    return digest.hexdigest()


def model_fingerprint(loaded) -> dict:
    """{name, spec, adapter, config_sha256, weights_sha256, dtype, n_layers, n_kv_heads, head_dim} of a
    LoadedModel; `adapter` names the LoRA checkpoint applied ("" for the base model): part of a saved
    cache's identity, its keys and values were computed through it."""
    # Computed every time (milliseconds), never kept: the same model object changes under a
    # fine-tune session (an adapter applied, weights trained), and a kept fingerprint went stale.
    model = loaded.model
    hashes = {"config_sha256": config_sha256(model.config), "weights_sha256": weights_sha256(model)}
    return {"name": loaded.name, "spec": loaded.spec, "adapter": getattr(loaded, "adapter", ""), **hashes,
            "dtype": str(loaded.dtype).removeprefix("torch."), "n_layers": loaded.n_layers,
            "n_kv_heads": loaded.n_kv_heads, "head_dim": loaded.head_dim}


def tokenizer_sha256(tokenizer) -> str:
    try:
        return _tokenizer_fingerprints[tokenizer]
    except (KeyError, TypeError):
        pass
    data = {
        "class": type(tokenizer).__name__,
        "vocab": sorted(tokenizer.get_vocab().items(), key=lambda item: item[1]),
        "special": {k: str(v) for k, v in sorted(getattr(tokenizer, "special_tokens_map", {}).items())},
        "chat_template": str(getattr(tokenizer, "chat_template", None)),
    }
    value = hashlib.sha256(json.dumps(data, default=str).encode()).hexdigest()
    try:
        _tokenizer_fingerprints[tokenizer] = value
    except TypeError:  # not weak-referenceable: recompute next time
        pass
    return value
