"""Saved caches of the layer store's first layout keep loading: tests/data/old_layout_int4.kvcache was
written by the code of before (tests/data/make_old_layout_cache.py says how), with a full-precision
incomplete key group and key groups numbered by position. Today's store reads its encoded entries
exactly as that code decoded them, settles the window into groups and the 8-bit tail, and goes on."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from kvstudio.core.persist.saved_cache import load_saved_cache, policy_from_header, read_header, write_saved_cache
from kvstudio.core.recording.events import Recorder
from kvstudio.core.runtime.engine import GenerationSettings
from kvstudio.core.runtime.run_state import restore
from kvstudio.core.runtime.session import RunSession
from kvstudio.core.storage.layer_stores import LAYOUT

DATA = Path(__file__).resolve().parent / "data"
OLD = DATA / "old_layout_int4.kvcache"


def _restored(engine, path):
    header = read_header(path)
    _, state, _ = load_saved_cache(path, engine.loaded, policy_from_header(header))
    run = RunSession(engine, engine.new_cache(policy_from_header(header)), Recorder())
    restore(run, state)
    return header, state, run.cache


def test_a_cache_saved_in_the_first_layout_loads_as_that_code_read_it(llama_engine):
    expected = json.loads((DATA / "old_layout_int4.json").read_text())
    header, _, cache = _restored(llama_engine, OLD)
    assert header["codec"] == "int4" and header["storage"]["group_size"] == 4
    for layer in cache.layers:
        old = expected["layers"][str(layer.layer_idx)]
        store = layer.store
        assert store.positions().tolist() == old["positions"]
        assert torch.equal(store.values()[0], torch.tensor(old["values"]))  # values: the same layout
        keys, old_keys = store.keys()[0], torch.tensor(old["keys"])
        seen = max(max(row) for row in old["positions"]) + 1
        grouped = torch.tensor(old["positions"]) < seen - old["key_window"]
        assert old["key_window"] == 3  # the file has a full-precision incomplete group to convert
        assert torch.equal(keys[grouped], old_keys[grouped])  # encoded entries: exactly as before
        # The window's keys, held in 8 bits per token now: within a step of 8 bits of their range.
        window = (keys[~grouped] - old_keys[~grouped]).abs().max()
        assert 0 < window <= (old_keys.max() - old_keys.min()) / 255
        assert store.tails["key"].lengths == [3] * len(old["positions"])
        assert store.byte_count() == layer.byte_count() > 0


def test_a_converted_cache_continues_and_saves_in_todays_layout(llama_engine, tmp_path):
    expected = json.loads((DATA / "old_layout_int4.json").read_text())
    header, state, _ = _restored(llama_engine, OLD)
    settings = GenerationSettings(max_new_tokens=4, chunk_size=8, ignore_eos=True, memory_sample_hz=0)
    then = llama_engine.generate(None, policy_from_header(header), settings, start=state, resume=True,
                                 keep_state=True)
    assert then.token_ids == expected["continued"]  # the same greedy continuation as the code of before
    path = tmp_path / "today.kvcache"
    write_saved_cache(path, then.state, llama_engine.loaded, policy_from_header(header), settings)
    _, again, cache = _restored(llama_engine, path)
    assert [layer.storage["store"]["layout"] for layer in again.layers] == [LAYOUT] * len(again.layers)
    assert all("tail.key.fields.codes" in snapshot.tensors for snapshot in again.layers)
    assert [layer.store.positions().tolist() for layer in cache.layers] == [
        snapshot.tensors["positions"].tolist() for snapshot in again.layers]
    # Today's layout continues bit-identically from its file, as every saved cache does.
    more = GenerationSettings(max_new_tokens=3, chunk_size=8, ignore_eos=True, memory_sample_hz=0)
    direct = llama_engine.generate(None, policy_from_header(header), more, start=then.state, resume=True)
    reloaded = llama_engine.generate(None, policy_from_header(header), more, start=again, resume=True)
    assert reloaded.token_ids == direct.token_ids and reloaded.text == direct.text
