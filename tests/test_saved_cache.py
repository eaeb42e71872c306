"""Saved caches: save a run, restore it in a new process, continue bit-identically; prefix reuse;
every file that must be refused is refused with a message saying why."""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from kvstudio.core.runtime.engine import GenerationSettings
from kvstudio.core.recording.events import Recorder
from kvstudio.core.models.loading import LoadedModel, load_model
from kvstudio.core.models.tiny import byte_tokenizer
from kvstudio.core.plugins.loader import PluginManager
from kvstudio.core.spec import create_policy
from kvstudio.core.persist.saved_cache import (SavedCacheError, check_compatible, checked_header, load_saved_cache,
                                             read_header, read_saved_cache, write_saved_cache)

from .helpers import random_ids

REPO = Path(__file__).resolve().parents[1]
PROMPT = random_ids(22, seed=3)
FIRST, THEN = 3, 4  # tokens generated before the save, and after the restore

# Every built-in policy, with parameters that make it evict on a 22-token prompt in chunks of 8.
POLICIES = [
    ("full", {}),
    ("window", {"budget": 10}),
    ("streaming_llm", {"budget": 10, "sink": 2}),
    ("streaming_llm", {"budget": 10, "sink": 2, "rerotate": True}),
    ("h2o", {"budget": 10}),
    ("tova", {"budget": 10}),
    ("snapkv", {"budget": 12, "observation_window": 4, "compress_every": 2}),
    ("pyramidkv", {"budget": 12, "observation_window": 4, "compress_every": 2}),
    ("knorm", {"budget": 10}),
    ("random", {"budget": 10, "random_seed": 7}),
    ("separators", {"budget": 10, "sink": 2, "recent": 3}),  # the plugin in plugins/keep_separators.py
]
SAMPLING = [{"temperature": 0.0}, {"temperature": 0.9, "top_p": 0.9, "top_k": 40, "seed": 11}]
# Caches held through a codec or the host tier (core.storage): saved as their stores hold them.
STORED = [
    ("h2o", {"budget": 10}, {"codec": "int4", "group_size": 4}),
    ("full", {}, {"codec": "int8", "group_size": 4, "residual": 3}),
    ("h2o", {"budget": 10}, {"tier": "host", "recall": 1, "block_size": 4}),
    ("h2o", {"budget": 10}, {"codec": "int4", "group_size": 4, "tier": "host", "recall": 2, "block_size": 2}),
]
# Caches merged across layers (MiniCache): under fp the later layer of a pair links to its partner
# (storage/linked.py); under a codec both hold restored states. Saved with the merged flags.
MERGED = [
    ("h2o", {"budget": 10}, {"merge": "minicache", "merge_from": 0, "merge_threshold": 2.0}),
    ("random", {"budget": 10, "random_seed": 7}, {"merge": "minicache", "merge_from": 1, "merge_threshold": 0.3}),
    ("full", {}, {"merge": "minicache", "merge_from": 0, "merge_threshold": 0.5}),
    ("h2o", {"budget": 10}, {"codec": "int4", "group_size": 4, "merge": "minicache", "merge_from": 0,
                             "merge_threshold": 2.0, "tier": "host", "recall": 1, "block_size": 4}),
]

# The restoring process: loads every saved file, continues THEN tokens, reports what it saw.
CHILD = r"""
import json, sys
from kvstudio.core.runtime.engine import Engine, GenerationSettings
from kvstudio.core.recording.events import Recorder
from kvstudio.core.models.loading import load_model
from kvstudio.core.plugins.loader import PluginManager
from kvstudio.core.persist.saved_cache import load_saved_cache, policy_from_header, read_header

PluginManager([sys.argv[2]], entry_points_enabled=False).load()
device, dtype = sys.argv[3], sys.argv[4]
engine = Engine(load_model("tiny-llama", device=device, dtype=dtype))
out = {}
for path, then in json.loads(sys.argv[1]).items():
    header = read_header(path)
    policy = policy_from_header(header)
    _, state, _ = load_saved_cache(path, engine.loaded, policy)
    generation = header["generation"]
    settings = GenerationSettings(max_new_tokens=then, chunk_size=generation["chunk_size"],
                                  temperature=generation["temperature"], top_p=generation["top_p"],
                                  top_k=generation["top_k"], seed=generation["seed"])
    recorder = Recorder()
    result = engine.generate(None, policy, settings, start=state, resume=True, recorder=recorder, keep_cache=True)
    out[path] = {
        "tokens": result.token_ids,
        "logprobs": [s.logprob for s in result.steps if s.token_id is not None],
        "positions": [result.cache.positions(i).tolist() for i in range(engine.loaded.n_layers)],
        "evictions": [[e.step, e.layer, e.kv_head, e.positions.tolist()] for e in recorder.all("evictions")],
        "recalls": [[r.step, r.layer, r.positions.tolist()] for r in recorder.all("recalls")],
        "storage": {k: result.storage[k] for k in ("peak_cache_bytes", "peak_host_bytes", "recalled")},
    }
print(json.dumps(out))
"""


@pytest.fixture(scope="module")
def plugins():
    manager = PluginManager([REPO / "plugins"], entry_points_enabled=False)
    manager.load()
    yield manager
    manager.unload()


def _settings(sampling: dict, new_tokens: int, chunk_size: int = 8) -> GenerationSettings:
    return GenerationSettings(max_new_tokens=new_tokens, chunk_size=chunk_size, memory_sample_hz=0, **sampling)


def _evictions(recorder: Recorder, from_step: int = 0) -> list:
    return [[e.step, e.layer, e.kv_head, e.positions.tolist()] for e in recorder.all("evictions")
            if e.step >= from_step]


def test_every_policy_continues_bit_identically_in_a_new_process(llama_engine, plugins, tmp_path):
    _check_continuations(llama_engine, POLICIES, tmp_path)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_continuations_are_bit_identical_on_cuda_in_bfloat16(plugins, tmp_path):
    from kvstudio.core.runtime.engine import Engine

    engine = Engine(load_model("tiny-llama", device="cuda", dtype="bfloat16"))
    _check_continuations(engine, [p for p in POLICIES if p[0] in ("h2o", "snapkv", "streaming_llm", "random")],
                         tmp_path, device=("cuda", "bfloat16"))


def test_quantized_and_host_tier_caches_continue_bit_identically_in_a_new_process(llama_engine, tmp_path):
    _check_continuations(llama_engine, STORED, tmp_path)


def test_merged_caches_continue_bit_identically_in_a_new_process(llama_engine, tmp_path):
    _check_continuations(llama_engine, MERGED, tmp_path)


def _check_continuations(engine, policies, tmp_path, device=("cpu", "auto")):
    """Run N + M tokens in one go; run N, save; restore in a child process, continue M; compare."""
    from kvstudio.core.storage import StorageConfig, attach

    expected, files = {}, {}
    for index, (name, params, *storage) in enumerate(policies):
        for sampling in SAMPLING:
            policy = create_policy(name, **params)
            if storage:
                attach(policy, StorageConfig(**storage[0]))
            recorder = Recorder()
            whole = engine.generate(PROMPT, policy, _settings(sampling, FIRST + THEN), recorder=recorder,
                                          keep_cache=True)
            first = engine.generate(PROMPT, policy, _settings(sampling, FIRST), keep_state=True)
            assert first.token_ids == whole.token_ids[:FIRST]
            path = tmp_path / f"{index}-{sampling['temperature']}.kvcache"
            write_saved_cache(path, first.state, engine.loaded, policy, _settings(sampling, FIRST))
            files[str(path)] = THEN
            expected[str(path)] = {
                "tokens": whole.token_ids[FIRST:],
                "logprobs": [s.logprob for s in whole.steps if s.token_id is not None][FIRST:],
                "positions": [whole.cache.positions(i).tolist() for i in range(4)],
                "evictions": _evictions(recorder, from_step=first.state.steps),
                "recalls": [[r.step, r.layer, r.positions.tolist()] for r in recorder.all("recalls")
                            if r.step >= first.state.steps],
                "storage": {k: whole.storage[k] for k in ("peak_cache_bytes", "peak_host_bytes", "recalled")},
                "label": f"{name} {params} {storage} {sampling}",
            }
    child = subprocess.run([sys.executable, "-c", CHILD, json.dumps(files), str(REPO / "plugins"), *device], cwd=REPO,
                           env=os.environ | {"PYTHONPATH": str(REPO)}, capture_output=True, text=True, timeout=300)
    assert child.returncode == 0, child.stderr
    got = json.loads(child.stdout.strip().splitlines()[-1])
    evicting = 0
    for path, want in expected.items():
        label = want.pop("label")
        assert got[path] == want, label  # ==: exact floats, tokens, kept positions, eviction events
        evicting += bool(want["evictions"])
    assert evicting >= len(policies)  # the comparison covered decode-time evictions too
    if any(len(policy) > 2 and policy[2].get("tier") == "host" for policy in policies):
        assert any(want["recalls"] for want in expected.values())  # ... and recalls after the restore


@pytest.mark.parametrize("name, params", [("h2o", {"budget": 16}), ("snapkv", {"budget": 20, "observation_window": 4}),
                                          ("full", {})])
def test_prefix_reuse_equals_a_full_prefill_with_the_same_chunks(llama_engine, name, params):
    engine = llama_engine
    document, question = random_ids(40, seed=5), random_ids(11, seed=6)
    policy = create_policy(name, **params)
    saved = []
    engine.generate(document + random_ids(5, seed=9), policy, _settings({}, 0), on_prefill_state=saved.append)
    boundary = next(s for s in saved if len(s.token_ids) == 40)  # the last chunk boundary before the end
    recorder, fresh_recorder = Recorder(), Recorder()
    reused = engine.generate(document + question, policy, _settings({}, 6), start=boundary,
                                   recorder=recorder, keep_cache=True)
    fresh = engine.generate(document + question, policy, _settings({}, 6), recorder=fresh_recorder,
                                  keep_cache=True)
    assert reused.restored_tokens == 40 and reused.token_ids == fresh.token_ids
    assert [s.logprob for s in reused.steps if s.token_id is not None] == \
        [s.logprob for s in fresh.steps if s.token_id is not None]
    assert all(torch.equal(reused.cache.positions(i), fresh.cache.positions(i)) for i in range(4))
    assert all(torch.equal(reused.cache.layers[i].keys, fresh.cache.layers[i].keys) for i in range(4))
    assert _evictions(recorder) == _evictions(fresh_recorder, from_step=boundary.steps)
    assert len(reused.steps) < len(fresh.steps)  # the document's chunks were not computed again


# --- refusals -------------------------------------------------------------------------------------


@pytest.fixture
def saved(llama_engine, tmp_path):
    policy = create_policy("h2o", budget=16)
    result = llama_engine.generate(PROMPT, policy, _settings({}, 3), keep_state=True)
    path = tmp_path / "a.kvcache"
    write_saved_cache(path, result.state, llama_engine.loaded, policy, _settings({}, 3))
    return path, policy, result.state


def _refused(path, loaded, policy=None, chunk_size=None) -> str:
    with pytest.raises(SavedCacheError) as error:
        load_saved_cache(path, loaded, policy, chunk_size)
    return str(error.value)


def test_truncated_corrupt_wrong_version_and_foreign_files_are_refused(saved, llama_engine, tmp_path):
    path, policy, _ = saved
    data = path.read_bytes()
    cut = tmp_path / "cut.kvcache"
    cut.write_bytes(data[: len(data) // 2])
    assert "is truncated" in _refused(cut, llama_engine.loaded, policy)
    cut.write_bytes(data[:5])
    assert "is truncated" in _refused(cut, llama_engine.loaded, policy)
    flipped = bytearray(data)
    flipped[-100] ^= 0xFF  # a byte of the compressed body
    bad = tmp_path / "bad.kvcache"
    bad.write_bytes(bytes(flipped))
    assert "is corrupt: its checksum does not match" in _refused(bad, llama_engine.loaded, policy)
    newer = bytearray(data)
    newer[8:12] = struct.pack("<I", 99)
    bad.write_bytes(bytes(newer))
    assert "format version 99; this KV Studio reads version 1" in _refused(bad, llama_engine.loaded, policy)
    other = tmp_path / "notes.kvcache"
    other.write_text("just some text that is long enough to have a header")
    assert "is not a KV Studio saved cache" in _refused(other, llama_engine.loaded)



def test_a_listing_check_names_what_is_wrong_with_each_file(saved, tmp_path):
    """read_header sees truncation from the size alone; checked_header also checks every byte, in pieces."""
    path = saved[0]
    data = path.read_bytes()
    assert checked_header(path) == read_header(path)
    cases = {"cut": (data[:-10], "truncated"), "flipped": (data[:-100] + bytes([data[-100] ^ 0xFF]) + data[-99:],
                                                             "corrupt"),
             "longer": (data + b"x", "corrupt"), "newer": (data[:8] + struct.pack("<I", 2) + data[12:], "format version 2"),
             "text": (b"just some text that is long enough to have a header", "not a saved cache")}
    for name, (content, problem) in cases.items():
        bad = tmp_path / f"{name}.kvcache"
        bad.write_bytes(content)
        with pytest.raises(SavedCacheError) as error:
            checked_header(bad)
        assert error.value.problem == problem, name
        assert "delete it" not in str(error.value) and "computed again" not in str(error.value)
    with pytest.raises(SavedCacheError, match="is truncated"):
        read_header(tmp_path / "cut.kvcache")  # without reading the body


def test_wrong_model_tokenizer_policy_codec_and_chunk_size_are_refused(saved, llama_engine, tmp_path):
    path, policy, state = saved
    loaded = llama_engine.loaded
    qwen = load_model("tiny-qwen2", device="cpu")
    assert "wrong model: the cache was saved with tiny-llama and this is tiny-qwen2" in _refused(path, qwen, policy)
    retrained = load_model("tiny-llama", device="cpu")  # same architecture, other weights
    with torch.no_grad():
        retrained.model.model.embed_tokens.weight.add_(0.01)
    assert "wrong model" in _refused(path, retrained, policy) and "weights differ" in _refused(path, retrained, policy)
    tokenizer = byte_tokenizer()
    tokenizer.add_tokens(["<extra>"])
    other_tokenizer = LoadedModel(loaded.model, tokenizer, loaded.spec, loaded.name, loaded.device, loaded.dtype)
    assert "wrong tokenizer" in _refused(path, other_tokenizer, policy)
    assert "wrong policy: the cache was computed under 'h2o', this run uses 'tova'" in _refused(
        path, loaded, create_policy("tova", budget=16))
    assert "wrong policy parameters for 'h2o': budget 16 (saved) vs 32" in _refused(
        path, loaded, create_policy("h2o", budget=32))
    assert "wrong chunk size" in _refused(path, loaded, policy, chunk_size=16)
    check_compatible(read_header(path), loaded, policy, 8)  # and the right ones pass


def test_a_cache_stored_in_one_storage_never_restores_into_another(llama_engine, tmp_path):
    from kvstudio.core.storage import StorageConfig, attach

    loaded = llama_engine.loaded

    def h2o(**storage):
        return attach(create_policy("h2o", budget=16), StorageConfig(**storage))

    int4 = h2o(codec="int4", group_size=4)
    path = tmp_path / "int4.kvcache"
    result = llama_engine.generate(PROMPT, int4, _settings({}, 2), keep_state=True)
    write_saved_cache(path, result.state, loaded, int4, _settings({}, 2))
    header = read_header(path)
    assert header["codec"] == "int4" and header["storage"]["group_size"] == 4
    stored = "stored as int4 (group 4, residual 0) on the device tier"
    assert f"wrong storage: the cache was {stored} and this run stores int8 (group 4, residual 0)" in _refused(
        path, loaded, h2o(codec="int8", group_size=4))
    assert f"{stored} and this run stores fp on the device tier" in _refused(path, loaded, h2o())
    assert "this run stores int4 (group 8, residual 0)" in _refused(path, loaded, h2o(codec="int4", group_size=8))
    assert "this run stores int4 (group 4, residual 0) with the host tier (recall 1 blocks of 16)" in _refused(
        path, loaded, h2o(codec="int4", group_size=4, tier="host", recall=1))
    check_compatible(header, loaded, h2o(codec="int4", group_size=4), 8)
    # The state itself refuses another storage too (the studio continues from states in memory).
    with pytest.raises(SavedCacheError, match="wrong storage: the state was stored as int4"):
        llama_engine.generate(None, h2o(codec="int8", group_size=4), _settings({}, 1), start=result.state,
                              resume=True)


def test_a_quantized_cache_file_holds_codes_not_decoded_keys(llama_engine, tmp_path):
    from kvstudio.core.storage import StorageConfig, attach

    policy = attach(create_policy("h2o", budget=16), StorageConfig(codec="int4", group_size=4, tier="host",
                                                                   recall=1, block_size=4))
    result = llama_engine.generate(PROMPT, policy, _settings({}, 2), keep_state=True, keep_cache=True)
    path = tmp_path / "int4.kvcache"
    info = write_saved_cache(path, result.state, llama_engine.loaded, policy, _settings({}, 2))
    _, state = read_saved_cache(path)
    layer = state.layers[0]
    assert "keys" not in layer.tensors and layer.tensors["key.codes"].dtype == torch.uint8
    assert layer.tensors["key.codes"].shape[-1] == 8  # 16 channels, two codes a byte
    # Residual 0: no full-precision window; each head's keys are in groups of 4 or its 8-bit tail.
    assert layer.tensors["window.key"].shape[1] == 0 and layer.tensors["window.value"].shape[1] == 0
    tails = layer.storage["store"]["tail.key"]["lengths"]
    assert max(tails) < 4 and layer.tensors["tail.key.fields.codes"].dtype == torch.uint8
    assert layer.tensors["table.key.fields.scale"].dtype == torch.float16
    slots = layer.tensors["key.slot"]
    assert slots.dtype == torch.int16 and [int((row < 0).sum()) for row in slots] == tails
    assert layer.tensors["host.keys"].shape[1] == 23 - 16 and "host.block_max" in layer.tensors
    assert layer.storage["store"]["window.key.start"] == 23 and layer.storage["bytes"] == \
        result.cache.layers[0].byte_count()
    assert info.memory_bytes == result.cache.current_bytes  # what the store holds, not decoded keys


def test_bnb_caches_are_refused_with_a_reason():
    from kvstudio.core.storage import StorageConfig
    from kvstudio.core.runtime.layer_tensors import unsaveable_reason

    reason = unsaveable_reason(StorageConfig(codec="bnb-int4"))
    assert "bitsandbytes codecs need CUDA" in reason and "use --codec int8 or int4" in reason
    assert unsaveable_reason(StorageConfig(codec="int4", tier="host")) is None


def test_a_failed_write_leaves_the_previous_file_whole(saved, llama_engine, tmp_path):
    path, policy, state = saved
    before = path.read_bytes()
    state.layers[0].policy_extra["unsavable"] = object()
    with pytest.raises(SavedCacheError, match="policy state of layer 0 holds a object"):
        write_saved_cache(path, state, llama_engine.loaded, policy)
    assert path.read_bytes() == before and sorted(p.name for p in tmp_path.iterdir()) == ["a.kvcache"]
    read_saved_cache(path)  # still whole
    with pytest.raises(SavedCacheError, match="folder does not exist"):
        write_saved_cache(tmp_path / "missing" / "b.kvcache", state, llama_engine.loaded, policy)


def test_policy_state_of_every_kind_round_trips(saved, llama_engine, tmp_path):
    path, policy, state = saved
    generator = torch.Generator().manual_seed(3)
    state.layers[1].policy_extra.update({"counts": {3: True, "x": (1, 2.5, None)}, "rng": generator,
                                         "seen": torch.arange(4), "steps": [1, 2]})
    write_saved_cache(path, state, llama_engine.loaded, policy)
    _, restored = read_saved_cache(path)
    extra = restored.layers[1].policy_extra
    assert extra["counts"] == {3: True, "x": (1, 2.5, None)} and extra["steps"] == [1, 2]
    assert torch.equal(extra["seen"], torch.arange(4))
    assert torch.equal(torch.rand(3, generator=extra["rng"]), torch.rand(3, generator=generator))
    assert torch.equal(restored.layers[0].policy_tensors["accumulated"], state.layers[0].policy_tensors["accumulated"])


def test_a_continued_runs_token_map_starts_from_the_restored_cache(llama_engine):
    """Continuing from a saved cache, the token map shows what the saved cache had evicted too (it
    once drew every restored token as held), and says so on hover."""
    import numpy as np

    from kvstudio.core.figures.data import TokenMap

    def token_map(recorder: Recorder) -> TokenMap:
        drawn = TokenMap.for_run(recorder.all("runs")[-1])
        drawn.add({kind: recorder.all(kind) for kind in ("tokens", "steps", "evictions")})
        return drawn

    policy = create_policy("h2o", budget=10)
    whole_recorder, continued_recorder = Recorder(), Recorder()
    llama_engine.generate(PROMPT, policy, _settings({}, FIRST + THEN), recorder=whole_recorder)
    first = llama_engine.generate(PROMPT, policy, _settings({}, FIRST), keep_state=True)
    llama_engine.generate(None, policy, _settings({}, THEN), start=first.state, resume=True,
                          recorder=continued_recorder)
    whole, continued = token_map(whole_recorder), token_map(continued_recorder)
    fed = min(whole.fed_count, continued.fed_count)
    assert fed >= len(PROMPT)
    for layer in range(4):
        assert np.array_equal(whole.heads_holding(layer)[:fed], continued.heads_holding(layer)[:fed]), layer
    assert continued.gone_count() == whole.gone_count() > 0
    gone = int(np.flatnonzero(continued.held_fractions() == 0)[0])
    assert "before the saved cache this run went on from" in continued.describe(gone)
    # Stored in the history and opened again (Runs > Open views), the map is the same.
    from kvstudio.core.recording.packing import pack_events, unpack_events

    reopened = token_map(unpack_events(pack_events(continued_recorder)))
    assert np.array_equal(reopened.held_fractions(), continued.held_fractions())
