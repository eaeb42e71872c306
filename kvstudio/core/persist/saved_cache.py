"""The saved-cache file: a run's whole state on disk, to restore in another process and continue
bit-identically. Never pickle: tensors go into safetensors, everything else into JSON.

Layout (integers little-endian):

    b"KVSCACHE"          8 bytes, says what the file is
    version              u32, FORMAT_VERSION of the writer
    header length        u64
    body length          u64
    header               UTF-8 JSON: format version, model and tokenizer fingerprints, policy name and
                         parameters, storage (codec, group size, residual, tier, recall, block size),
                         chunk size, token counts, generation settings, per-layer policy state and
                         store numbers that are not tensors, sizes; readable without the body (listing)
    body                 zstandard-compressed safetensors: per layer what its store holds (keys and
                         values, or a codec's codes, scales, windows and group table; host-tier
                         entries and block summaries), positions (re-rotation positions), policy
                         state tensors; the tokens, last logits and sampler RNG state
    checksum             32 bytes: SHA-256 of everything before it

Files are written atomically (a temporary file renamed over the target): a reader never sees half
of one. Reading refuses, each with its own message: not a saved cache, another format version,
truncated, corrupt (checksum), and, against the model and policy at hand (`check_compatible`):
another model, tokenizer, storage (a cache saved under int4 never restores into an int8 or fp run),
policy or parameters, or chunk size. A refusal says what is wrong with the file, not what to do:
that depends on where it was used (a prompt cache replaces the file itself; `cache load` and the
studio cannot), so each caller adds its own words (`what_to_do`).
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
from typing_extensions import NotRequired, TypedDict

from kvstudio.core.io.atomic import atomic_write, check_writable_folder
from kvstudio.core.io.shapes import FiniteNumber, Integer, shape_problem
from kvstudio.core.errors import SavedCacheError  # noqa: F401  (raised here; callers name it from here too)
from kvstudio.core.policies import available_policies, completed_record, source_of
from kvstudio.core.spec import CacheSpec
from kvstudio.core.storage import CodecError, StorageConfig, storage_of
from kvstudio.core.persist.fingerprint import model_fingerprint, tokenizer_sha256
from kvstudio.core.runtime.layer_tensors import CODEC, describe_storage, storage_key  # noqa: F401
from kvstudio.core.runtime.run_state import LayerSnapshot, RunState

MAGIC = b"KVSCACHE"
FORMAT_VERSION = 1
SUFFIX = ".kvcache"
PREVIEW_CHARS = 200
ZSTD_LEVEL = 3
_PREFIX = struct.Struct("<8sIQQ")  # magic, version, header length, body length
_CHECKSUM_BYTES = 32


def what_to_do(error: SavedCacheError, delete: str, again: str) -> str:
    """The refusal followed by what the user can do about the file, in the words of where it was used:
    `delete` says how to delete it there, `again` how to make the cache again there."""
    if error.problem in ("truncated", "corrupt"):
        return f"{error}; it cannot be used: {delete} and {again}"
    if error.problem is not None and error.problem.startswith("format version"):
        return f"{error}; open it with the KV Studio that wrote it, or {again} with this one"
    return str(error)


@dataclass
class SavedCacheInfo:
    path: Path
    file_bytes: int
    memory_bytes: int  # keys and values in memory, as the run held them
    seconds: float


# --- the header's shape: what reading, listing and restoring rely on (checked when it is read) ----------


class _Model(TypedDict):
    name: str
    spec: str
    config_sha256: str
    weights_sha256: str
    dtype: str


class _Tokenizer(TypedDict):
    sha256: str


class _Policy(TypedDict):
    name: str
    parameters: dict[str, Any]
    describe: str
    source: NotRequired[str | None]


class _Tokens(TypedDict):
    fed: Integer
    prompt: Integer


class _Layer(TypedDict):
    cache: list[str]
    state: list[str]
    state_on_device: dict[str, bool]
    extra: Any  # a policy's own state, decoded against the body's tensors (a bad one: "corrupt")
    extra_tensors: Integer
    storage: NotRequired[dict[str, Any]]


class _Body(TypedDict):
    raw_bytes: Integer


class _Header(TypedDict):
    format: str
    created: str
    model: _Model
    tokenizer: _Tokenizer
    policy: _Policy
    codec: str
    storage: NotRequired[dict[str, str | Integer | FiniteNumber | bool | None] | None]
    storage_counters: NotRequired[dict[str, Any]]
    chunk_size: Integer | None
    generation: NotRequired[dict[str, Any] | None]
    tokens: _Tokens
    prompt_preview: NotRequired[str]
    generated_text: NotRequired[str]
    steps: Integer
    cache_bytes: Integer
    peak_bytes: Integer
    peak_kept_per_layer: list[Integer]
    prefill_seconds: FiniteNumber
    layers: list[_Layer]
    body: _Body


# --- writing ------------------------------------------------------------------------------------


def build_header(state: RunState, loaded, policy, settings=None, prompt_text: str | None = None) -> dict:
    return {
        "format": "kvstudio-saved-cache",
        "version": FORMAT_VERSION,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "model": model_fingerprint(loaded),
        "tokenizer": {"sha256": tokenizer_sha256(loaded.tokenizer), "vocab_size": len(loaded.tokenizer)},
        "policy": {"name": policy.name, "parameters": _plain(policy.config.as_dict()),
                   "describe": policy.describe(), "source": source_of(policy.name)},
        "codec": state.codec,
        "storage": state.storage or _legacy_storage(state.codec),
        "storage_counters": state.storage_counters,
        "chunk_size": None if settings is None else settings.chunk_size,
        "generation": None if settings is None else _plain(vars(settings)),
        "tokens": {"fed": len(state.token_ids), "prompt": state.prompt_tokens, "generated": len(state.generated),
                   "pending": state.pending},
        "prompt_preview": (prompt_text if prompt_text is not None
                           else loaded.tokenizer.decode(state.token_ids[:PREVIEW_CHARS]))[:PREVIEW_CHARS],
        "generated_text": state.generated_text,
        "steps": state.steps,
        "cache_bytes": state.cache_bytes,
        "kept_per_layer": state.kept_per_layer,
        "peak_bytes": state.peak_bytes,
        "peak_kept_per_layer": state.peak_kept_per_layer,
        "prefill_seconds": state.prefill_seconds,
    }


def write_saved_cache(path: str | Path, state: RunState, loaded, policy, settings=None,
                      prompt_text: str | None = None) -> SavedCacheInfo:
    """Write `state` to `path` atomically. Raises SavedCacheError (the folder, a policy state that
    cannot be stored); an interrupted write leaves any previous file as it was."""
    import zstandard
    from safetensors.torch import save

    started = time.perf_counter()
    path = Path(path).expanduser()
    check_writable_folder(path, SavedCacheError)
    header = build_header(state, loaded, policy, settings, prompt_text)
    tensors, layers = _state_tensors(state)
    header["layers"] = layers
    raw = save(tensors)
    body = zstandard.ZstdCompressor(level=ZSTD_LEVEL).compress(raw)
    header["body"] = {"compression": "zstd", "raw_bytes": len(raw)}
    header_bytes = json.dumps(header, allow_nan=True).encode()
    content = _PREFIX.pack(MAGIC, FORMAT_VERSION, len(header_bytes), len(body)) + header_bytes + body

    def write(stream):
        stream.write(content)
        stream.write(hashlib.sha256(content).digest())

    atomic_write(path, write, binary=True, error=SavedCacheError)
    return SavedCacheInfo(path, len(content) + _CHECKSUM_BYTES, state.cache_bytes, time.perf_counter() - started)


def _state_tensors(state: RunState) -> tuple[dict[str, torch.Tensor], list[dict]]:
    tensors: dict[str, torch.Tensor] = {"run.token_ids": torch.tensor(state.token_ids, dtype=torch.long),
                                        "run.generated": torch.tensor(state.generated, dtype=torch.long)}
    if state.logits is not None:
        tensors["run.logits"] = state.logits
    if state.rng_state is not None:
        tensors["run.rng_state"] = state.rng_state
    layers = []
    for index, layer in enumerate(state.layers):
        for name, tensor in layer.tensors.items():
            tensors[f"layer.{index}.{name}"] = tensor
        for name, tensor in layer.policy_tensors.items():
            tensors[f"layer.{index}.state.{name}"] = tensor
        extra_tensors: list[torch.Tensor] = []
        extra = _encode(layer.policy_extra, extra_tensors, f"layer {index}")
        for n, tensor in enumerate(extra_tensors):
            tensors[f"layer.{index}.extra.{n}"] = tensor
        layers.append({"cache": sorted(layer.tensors), "state": sorted(layer.policy_tensors),
                       "state_on_device": layer.policy_on_device, "extra": extra,
                       "extra_tensors": len(extra_tensors), "storage": layer.storage})
    return {name: t.detach().cpu().contiguous() for name, t in tensors.items()}, layers


def _encode(value: Any, tensors: list[torch.Tensor], where: str):
    """JSON for a LayerState.extra value; tensors (and generator states) go to `tensors` by index."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, torch.Tensor):
        tensors.append(value.detach().cpu())
        return {"tensor": len(tensors) - 1, "device": value.device.type}
    if isinstance(value, torch.Generator):
        tensors.append(value.get_state())
        return {"generator": len(tensors) - 1, "device": str(value.device)}
    if isinstance(value, (list, tuple)):
        return {"tuple" if isinstance(value, tuple) else "list": [_encode(v, tensors, where) for v in value]}
    if isinstance(value, dict):
        return {"dict": [[_encode(k, tensors, where), _encode(v, tensors, where)] for k, v in value.items()]}
    raise SavedCacheError(f"the policy state of {where} holds a {type(value).__name__}, which a saved cache cannot "
                          "store (it stores tensors, generators, numbers, text, lists and dicts of these)")


def _decode(value: Any, tensors: dict[int, torch.Tensor], device: torch.device):
    if not isinstance(value, dict):
        return value
    if "tensor" in value:
        tensor = tensors[value["tensor"]].clone()
        return tensor.to(device) if value["device"] != "cpu" else tensor
    if "generator" in value:
        generator = torch.Generator(device=value["device"])
        generator.set_state(tensors[value["generator"]].clone())
        return generator
    if "list" in value:
        return [_decode(v, tensors, device) for v in value["list"]]
    if "tuple" in value:
        return tuple(_decode(v, tensors, device) for v in value["tuple"])
    return {_decode(k, tensors, device): _decode(v, tensors, device) for k, v in value["dict"]}


def _plain(data: dict) -> dict:
    """JSON-safe copy of settings and parameters (tuples become lists)."""
    return json.loads(json.dumps(data, default=str))


# --- reading ------------------------------------------------------------------------------------


def read_header(path: str | Path) -> dict:
    """The header alone, without reading or checking the body (fast: for listings)."""
    path = Path(path).expanduser()
    try:
        with open(path, "rb") as stream:
            prefix = stream.read(_PREFIX.size)
            # the size is known without reading the body: a truncated file is refused here already
            _check_prefix(path, prefix, os.fstat(stream.fileno()).st_size)
            header_bytes = stream.read(_PREFIX.unpack(prefix)[2])
    except OSError as error:
        raise SavedCacheError(f"cannot read {path}: {error.strerror or error}", "unreadable") from error
    return _parse_header(path, header_bytes)


def read_saved_cache(path: str | Path, device: torch.device | str = "cpu") -> tuple[dict, RunState]:
    """(header, state) of a saved cache, every byte checked. Raises SavedCacheError saying which
    check failed: not a saved cache, another version, truncated, corrupt."""
    import zstandard
    from safetensors.torch import load

    path = Path(path).expanduser()
    try:
        data = path.read_bytes()
    except OSError as error:
        raise SavedCacheError(f"cannot read {path}: {error.strerror or error}", "unreadable") from error
    _check_prefix(path, data[:_PREFIX.size], len(data))
    _, _, header_length, body_length = _PREFIX.unpack(data[:_PREFIX.size])
    end = _PREFIX.size + header_length + body_length
    view = memoryview(data)  # slices of a view copy nothing: the body may be hundreds of MB
    if hashlib.sha256(view[:end]).digest() != data[end:end + _CHECKSUM_BYTES]:
        raise _checksum_mismatch(path)
    header = _parse_header(path, data[_PREFIX.size:_PREFIX.size + header_length])
    try:
        raw = zstandard.ZstdDecompressor().decompress(view[_PREFIX.size + header_length:end],
                                                     max_output_size=header["body"]["raw_bytes"])
        tensors = load(raw)
        state = _state_from(header, tensors, torch.device(device))
    except (zstandard.ZstdError, KeyError, ValueError, RuntimeError, IndexError, TypeError, AttributeError) as error:
        # The header's shape was checked; what is left is the body, and a policy state that does not fit it.
        raise SavedCacheError(f"{path} is corrupt: its body cannot be read ({type(error).__name__}: {error})",
                              "corrupt") from error
    return header, state


def checked_header(path: str | Path) -> dict:
    """The header of a saved cache whose checksum was checked too, reading the file in pieces (a
    listing checks every file without holding one in memory); raises SavedCacheError as above."""
    header = read_header(path)  # the prefix, the size and the header
    path = Path(path).expanduser()
    digest = hashlib.sha256()
    try:
        with open(path, "rb") as stream:
            left = os.fstat(stream.fileno()).st_size - _CHECKSUM_BYTES
            while left > 0:
                piece = stream.read(min(left, 1 << 20))
                if not piece:
                    break
                digest.update(piece)
                left -= len(piece)
            stored = stream.read(_CHECKSUM_BYTES)
    except OSError as error:
        raise SavedCacheError(f"cannot read {path}: {error.strerror or error}", "unreadable") from error
    if left or digest.digest() != stored:
        raise _checksum_mismatch(path)
    return header


def _checksum_mismatch(path: Path) -> SavedCacheError:
    return SavedCacheError(f"{path} is corrupt: its checksum does not match its content (a damaged disk or copy)",
                           "corrupt")


def _check_prefix(path: Path, prefix: bytes, total: int | None) -> None:
    if len(prefix) < _PREFIX.size:
        if MAGIC.startswith(prefix[:len(MAGIC)]):
            raise SavedCacheError(f"{path} is truncated: {len(prefix)} bytes, not even a header (it was not "
                                  "completely written or copied)", "truncated")
        raise SavedCacheError(f"{path} is not a KV Studio saved cache", "not a saved cache")
    magic, version, header_length, body_length = _PREFIX.unpack(prefix)
    if magic != MAGIC:
        raise SavedCacheError(f"{path} is not a KV Studio saved cache", "not a saved cache")
    if version != FORMAT_VERSION:
        raise SavedCacheError(f"{path} was written in saved-cache format version {version}; this KV Studio reads "
                              f"version {FORMAT_VERSION}", f"format version {version}")
    if total is not None:
        expected = _PREFIX.size + header_length + body_length + _CHECKSUM_BYTES
        if total < expected:
            raise SavedCacheError(f"{path} is truncated: {total} of {expected} bytes (it was not completely written "
                                  "or copied)", "truncated")
        if total > expected:
            raise SavedCacheError(f"{path} is corrupt: {total - expected} bytes follow its end", "corrupt")


def _parse_header(path: Path, header_bytes: bytes) -> dict:
    try:
        header = json.loads(header_bytes.decode())
        if header.get("format") != "kvstudio-saved-cache":
            raise ValueError("not a saved-cache header")
    except (UnicodeDecodeError, ValueError, AttributeError, RecursionError) as error:
        raise SavedCacheError(f"{path} is corrupt: its header cannot be read ({error})", "corrupt") from error
    problem = shape_problem(header, _Header)
    if problem is not None:  # the checksum held, so the file was written this way: not by KV Studio
        raise SavedCacheError(f"{path} is corrupt: its header is not what KV Studio writes ({problem})", "corrupt")
    return header


def _state_from(header: dict, tensors: dict[str, torch.Tensor], device: torch.device) -> RunState:
    layers = []
    for index, layer in enumerate(header["layers"]):
        extra_tensors = {n: tensors[f"layer.{index}.extra.{n}"] for n in range(layer["extra_tensors"])}
        layers.append(LayerSnapshot(
            tensors={name: tensors[f"layer.{index}.{name}"] for name in layer["cache"]},
            policy_tensors={name: tensors[f"layer.{index}.state.{name}"] for name in layer["state"]},
            policy_on_device=layer["state_on_device"],
            policy_extra=_decode(layer["extra"], extra_tensors, device),
            storage=layer.get("storage", {}),
        ))
    return RunState(
        token_ids=tensors["run.token_ids"].tolist(), prompt_tokens=header["tokens"]["prompt"],
        generated=tensors["run.generated"].tolist(), logits=tensors.get("run.logits"),
        rng_state=tensors.get("run.rng_state"), steps=header["steps"], layers=layers, codec=header["codec"],
        storage=header_storage(header), storage_counters=header.get("storage_counters", {}),
        peak_bytes=header["peak_bytes"], peak_kept_per_layer=header["peak_kept_per_layer"],
        prefill_seconds=header["prefill_seconds"], generated_text=header.get("generated_text", ""),
    )


# --- using --------------------------------------------------------------------------------------


def check_compatible(header: dict, loaded, policy=None, chunk_size: int | None = None, path: str | Path = "") -> None:
    """Refuse a saved cache made by another model, tokenizer, codec, policy or chunk size, saying which."""
    name = f"{path}: " if path else ""
    saved, here = header["model"], model_fingerprint(loaded)
    if saved.get("adapter", "") != here["adapter"]:  # files from before adapters were recorded: the base model
        made = f"with the LoRA adapter {saved['adapter']} applied" if saved.get("adapter") else "on the base model"
        now = f"has the adapter {here['adapter']} applied" if here["adapter"] else "is the base model"
        todo = (f"apply that adapter first (kvstudio run --adapter, or the model panel's Apply…)" if saved.get("adapter")
                else "remove the adapter first (the model panel's Remove)")
        raise SavedCacheError(f"{name}wrong adapter: the cache was computed {made} and this model {now}; {todo}, or "
                              "compute the cache again")
    for key, what in (("config_sha256", "configuration"), ("weights_sha256", "weights")):
        if saved.get(key) != here[key]:
            raise SavedCacheError(f"{name}wrong model: the cache was saved with {saved.get('name')} and this is "
                                  f"{here['name']} (their {what} differ); use that model or compute the cache again")
    if header["tokenizer"]["sha256"] != tokenizer_sha256(loaded.tokenizer):
        raise SavedCacheError(f"{name}wrong tokenizer: the cache was saved with another tokenizer than "
                              f"{here['name']}'s; compute the cache again")
    if saved.get("dtype") != here["dtype"]:
        raise SavedCacheError(f"{name}wrong model dtype: the cache holds {saved.get('dtype')} tensors and the model "
                              f"runs in {here['dtype']}; load it with --dtype {saved.get('dtype')}")
    if policy is not None:
        saved_storage, run_storage = header_storage(header), storage_key(storage_of(policy))
        if saved_storage != run_storage:
            raise SavedCacheError(f"{name}wrong storage: the cache was stored as {describe_storage(saved_storage)} and "
                                  f"this run stores {describe_storage(run_storage)}; use the same storage options "
                                  "or compute the cache again")
        saved_policy = header["policy"]
        if saved_policy["name"] != policy.name:
            raise SavedCacheError(f"{name}wrong policy: the cache was computed under '{saved_policy['name']}', this run "
                                  f"uses '{policy.name}'; use that policy or compute the cache again")
        given = _plain(policy.config.as_dict())
        saved_parameters = completed_record(saved_policy["name"], saved_policy["parameters"])
        if saved_parameters != given:
            differ = ", ".join(f"{k} {saved_parameters.get(k)} (saved) vs {given.get(k)}"
                               for k in sorted(set(given) | set(saved_parameters))
                               if saved_parameters.get(k) != given.get(k))
            raise SavedCacheError(f"{name}wrong policy parameters for '{policy.name}': {differ}; compute the cache "
                                  "again")
    if chunk_size is not None and header.get("chunk_size") not in (None, chunk_size):
        raise SavedCacheError(f"{name}wrong chunk size: the cache was prefilled in chunks of {header['chunk_size']} "
                              f"and this run uses {chunk_size}, which would evict differently; use "
                              f"--chunk-size {header['chunk_size']}")


def policy_from_header(header: dict):
    """The policy a saved cache was computed under, from the registry (a plugin's must be loaded:
    a name in a file never loads code), with the storage it was stored in."""
    saved = header["policy"]
    if saved["name"] not in available_policies():
        where = f" (it came from plugin {saved['source']})" if saved.get("source") not in (None, "built-in") else ""
        raise SavedCacheError(f"the cache was computed under policy '{saved['name']}', which is not loaded{where}; "
                              "load its plugin (--plugins DIR) and try again")
    try:
        return CacheSpec(saved["name"], completed_record(saved["name"], saved["parameters"]),
                         StorageConfig(**header_storage(header))).build()
    except TypeError as error:  # a storage field this KV Studio does not have
        raise SavedCacheError(f"the cache's storage {header_storage(header)} is not one this KV Studio knows "
                              f"({error})", "corrupt") from error
    except CodecError as error:
        raise SavedCacheError(f"the cache was stored with {describe_storage(header_storage(header))}, which cannot "
                              f"be used here: {error}") from error


def _legacy_storage(codec: str) -> dict:
    """The storage of a file written before storage was saved: its codec, on the device tier."""
    return storage_key(StorageConfig(codec=codec))


def header_storage(header: dict) -> dict:
    """The storage a saved cache was stored in (codec, group size, residual, tier, recall, block size)."""
    return header.get("storage") or _legacy_storage(header.get("codec", CODEC))


def load_saved_cache(path: str | Path, loaded, policy=None, chunk_size: int | None = None) -> tuple[dict, RunState, float]:
    """(header, state, seconds) of a saved cache checked against the model (and policy, chunk size)."""
    started = time.perf_counter()
    header = read_header(path)
    check_compatible(header, loaded, policy, chunk_size, path)
    header, state = read_saved_cache(path, loaded.device)
    return header, state, time.perf_counter() - started
