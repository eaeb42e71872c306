"""Cross-layer merging (MiniCache, core/storage/minicache.py): SLERP, the merge and its restoration,
composition with policies and codecs, honest bytes, refusals, and the --merge options."""

from __future__ import annotations

import json
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from kvstudio.core.runtime.engine import GenerationSettings
from kvstudio.core.errors import KVStudioError
from kvstudio.core.spec import create_policy
from kvstudio.core.storage import StorageConfig, attach
from kvstudio.core.storage.minicache import _Range, angular_distance, merge_states, slerp, split_magnitude
from kvstudio.core.runtime.layer_tensors import unsaveable_reason

from .helpers import random_ids, run_cli

# --- SLERP --------------------------------------------------------------------------------------

finite = st.floats(-10, 10, allow_nan=False, allow_infinity=False)


def _unit(values: list[float]) -> torch.Tensor:
    vector = torch.tensor(values, dtype=torch.float32)
    return vector / vector.norm()


vectors = st.lists(finite, min_size=8, max_size=8).filter(lambda v: math.sqrt(sum(x * x for x in v)) > 1e-2)


@settings(max_examples=200, deadline=None)
@given(vectors, vectors, st.floats(0, 1))
def test_slerp_stays_on_the_unit_sphere_and_is_symmetric(a, b, t):
    u_a, u_b = _unit(a), _unit(b)
    shared = slerp(u_a, u_b, t)
    assert abs(float(shared.norm()) - 1) < 1e-4
    assert torch.allclose(shared, slerp(u_b, u_a, 1 - t), atol=1e-5)


@settings(max_examples=200, deadline=None)
@given(vectors, vectors)
def test_slerp_endpoints_are_the_two_directions(a, b):
    u_a, u_b = _unit(a), _unit(b)
    if float(angular_distance(u_a, u_b)) > 0.999:  # opposite: no unique great circle, the endpoints still hold below
        return
    assert torch.allclose(slerp(u_a, u_b, 0.0), u_a, atol=1e-4)
    assert torch.allclose(slerp(u_a, u_b, 1.0), u_b, atol=1e-4)


def test_slerp_halfway_bisects_the_angle():
    u_a, u_b = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0])
    assert torch.allclose(slerp(u_a, u_b, 0.5), torch.tensor([1.0, 1.0]) / math.sqrt(2), atol=1e-6)
    assert float(angular_distance(u_a, u_b)) == pytest.approx(0.5)


# --- one merge ----------------------------------------------------------------------------------

def test_identical_layers_merge_losslessly_and_magnitudes_restore_exactly():
    generator = torch.Generator().manual_seed(0)
    states = torch.randn(3, 10, 16, generator=generator) * torch.rand(3, 10, 1, generator=generator) * 5
    both = torch.ones(3, 10, dtype=torch.bool)
    merged = merge_states(states, states.clone(), both, 0.6, 2.0, _Range())  # threshold > 1: merge everything
    assert bool(merged.merged.all())
    assert torch.allclose(merged.restored_a, states, atol=1e-5)
    assert torch.allclose(merged.restored_b, states, atol=1e-5)

    other = torch.randn(3, 10, 16, generator=generator) * 3
    merged = merge_states(states, other, both, 0.6, 2.0, _Range())
    assert torch.allclose(merged.restored_a.norm(dim=-1), states.norm(dim=-1), rtol=1e-5)
    assert torch.allclose(merged.restored_b.norm(dim=-1), other.norm(dim=-1), rtol=1e-5)
    # One direction is shared: both restored states point the same way.
    assert torch.allclose(split_magnitude(merged.restored_a)[1], split_magnitude(merged.restored_b)[1], atol=1e-5)


def test_the_retention_rule_keeps_the_farthest_pairs_apart():
    a = torch.tensor([[[1.0, 0.0], [1.0, 0.0], [1.0, 0.0], [1.0, 0.0]]])
    b = torch.tensor([[[1.0, 0.0], [1.0, 0.1], [0.0, 1.0], [-1.0, 0.1]]])  # distance 0, small, 1/2, nearly 1
    both = torch.ones(1, 4, dtype=torch.bool)
    merged = merge_states(a, b, both, 0.6, 0.3, _Range())  # bound 0.3 of the way from d_min to d_max
    assert merged.retained.tolist() == [[False, False, True, True]]
    assert merged.merged.tolist() == [[True, True, False, False]]
    everything = merge_states(a, b, both, 0.6, 0.0, _Range())
    assert bool(everything.retained.all()) and not bool(everything.merged.any())
    absent = merge_states(a, b, torch.tensor([[True, False, True, True]]), 0.6, 2.0, _Range())
    assert absent.merged.tolist() == [[True, False, True, True]]  # a token one layer does not hold stays unmerged


# --- runs ---------------------------------------------------------------------------------------

PROMPT = random_ids(150, seed=3)


def _run(engine, policy_name: str, budget: int | None = None, new_tokens: int = 12, chunk: int = 48, **storage):
    policy = create_policy(policy_name, **({} if budget is None else {"budget": budget}))
    if storage:
        attach(policy, StorageConfig(**storage))
    return engine.generate(PROMPT, policy, GenerationSettings(max_new_tokens=new_tokens, chunk_size=chunk,
                                                              memory_sample_hz=0), keep_cache=True)


@pytest.mark.parametrize("policy_name, budget, codec", [("full", None, "fp"), ("h2o", 64, "fp"),
                                                        ("streaming_llm", 64, "int8")])
def test_a_threshold_that_retains_everything_is_the_unmerged_run(llama_engine, policy_name, budget, codec):
    plain = _run(llama_engine, policy_name, budget, codec=codec)
    retained = _run(llama_engine, policy_name, budget, codec=codec, merge="minicache", merge_from=0,
                    merge_threshold=0.0)
    assert retained.token_ids == plain.token_ids
    for a, b in zip(plain.cache.layers, retained.cache.layers):
        assert torch.equal(a.keys, b.keys) and torch.equal(a.values, b.values)
    assert retained.peak_cache_bytes == plain.peak_cache_bytes
    merging = retained.storage["merging"]
    # Threshold 0: every entry the pairs' layers hold was kept apart by the retention rule, none merged.
    assert sum(merging["merged_entries_per_layer"]) == 0
    assert merging["retained_entries_per_layer"] == merging["held_entries_per_layer"] and sum(
        merging["held_entries_per_layer"]) > 0


def test_merging_everything_stores_one_direction_per_pair_and_counts_bytes_honestly(llama_engine):
    plain = _run(llama_engine, "full")
    merged = _run(llama_engine, "full", merge="minicache", merge_from=0, merge_threshold=2.0)
    cache = merged.cache
    head_dim, element = 16, 4  # tiny-llama, float32
    # Every entry of both pairs is merged: per kind, one row in the earlier layer (the shared direction
    # times its magnitude) and one magnitude in the later one, instead of a full row in each.
    ratio = (2 * head_dim + 2) * element / (4 * head_dim * element)
    assert sum(cache.bytes_per_layer()) == pytest.approx(ratio * sum(plain.cache.bytes_per_layer()), rel=1e-6)
    assert cache.current_bytes == sum(cache.bytes_per_layer())
    assert merged.storage["merging"]["merge_storage"] == "held"
    saved = merged.storage["merging"]["saved_bytes_per_layer"]
    assert sum(saved) == sum(plain.cache.bytes_per_layer()) - sum(cache.bytes_per_layer())
    # Held, not estimated: the later layers' row pools hold no row at the end, and what they allocate
    # went back down after each chunk's merge: room for one step's entries (1 token x 2 KV heads).
    for b in (1, 3):
        for pool in cache.layers[b].store.pools.values():
            assert pool.live == 0 and pool.rows.shape[0] == 2
    shared = merged.storage["merging"]["shared_bytes_per_layer"]
    assert shared[0] > 0 and shared[2] > 0 and shared[1] == shared[3] == 0  # held in the earlier layer
    # Each layer reads its own magnitudes along one shared direction.
    for a, b in ((0, 1), (2, 3)):
        direction_a = split_magnitude(cache.layers[a].keys)[1]
        direction_b = split_magnitude(cache.layers[b].keys)[1]
        assert torch.allclose(direction_a, direction_b, atol=1e-5)


def test_only_positions_both_layers_hold_are_merged_under_eviction(llama_engine):
    # One prefill chunk and no decoding: every eviction happens before the step's merge, and the random
    # policy keeps different positions in each layer and head.
    result = _run(llama_engine, "random", 48, new_tokens=1, chunk=200, merge="minicache", merge_from=0,
                  merge_threshold=2.0)
    cache = result.cache
    differ = False
    for a, b in ((0, 1), (2, 3)):
        positions_a, positions_b = cache.layers[a].positions, cache.layers[b].positions
        held_by_partner = torch.stack([torch.isin(positions_b[h], positions_a[h]) for h in range(positions_b.shape[0])])
        merged_b = cache.merging.side(b).merged_mask("key")
        assert torch.equal(merged_b, held_by_partner)
        differ |= not bool(held_by_partner.all())
    assert differ  # the test saw positions kept in one layer only
    assert cache.current_bytes == sum(cache.bytes_per_layer())


@pytest.mark.parametrize("policy_name, budget, codec", [("snapkv", 48, "int4"), ("pyramidkv", 48, "fp"),
                                                        ("window", 40, "int8")])
def test_merging_composes_with_policies_and_codecs(llama_engine, policy_name, budget, codec):
    plain = _run(llama_engine, policy_name, budget, codec=codec)
    merged = _run(llama_engine, policy_name, budget, codec=codec, merge="minicache", merge_from=1, merge_threshold=0.5)
    assert len(merged.token_ids) == len(plain.token_ids)
    assert merged.cache.current_bytes == sum(merged.cache.bytes_per_layer())
    assert sum(merged.cache.bytes_per_layer()) < sum(plain.cache.bytes_per_layer())
    summary = merged.storage["merging"]
    assert summary["pairs"] == [[1, 2]]  # layer 3 has no partner: unmerged
    # The summary's counts are of the same entries, held now: merged and retained never add past held.
    for merged_count, retained, held in zip(summary["merged_entries_per_layer"], summary["retained_entries_per_layer"],
                                            summary["held_entries_per_layer"]):
        assert merged_count + retained <= held


def test_refusals_are_clear(llama_engine):
    with pytest.raises(KVStudioError, match="--merge-from 3"):
        _run(llama_engine, "full", merge="minicache", merge_from=3)
    with pytest.raises(KVStudioError, match="--merge must be one of"):
        StorageConfig(merge="average").validate()
    with pytest.raises(KVStudioError, match="--rerotate"):
        policy = create_policy("streaming_llm", budget=32, rerotate=True)
        attach(policy, StorageConfig(merge="minicache"))
        llama_engine.new_cache(policy)
    assert unsaveable_reason(StorageConfig(merge="minicache")) is None  # saved since merged stores are held
    assert unsaveable_reason(StorageConfig()) is None


def test_run_reports_merge_settings_and_bytes(capsys, tmp_path):
    out = tmp_path / "run.json"
    code, stdout, stderr = run_cli(capsys, "run", "--model", "tiny-llama", "--policy", "h2o", "--budget", "32",
                                   "--merge", "minicache", "--merge-from", "2", "--merge-threshold", "0.5",
                                   "--prompt", "a prompt long enough to evict a few entries from the cache " * 2,
                                   "--max-new-tokens", "4", "--no-history", "--json", str(out))
    assert code == 0, stderr
    assert "h2o+minicache" in stdout and "merging: pairs 2+3" in stdout
    storage = json.loads(out.read_text())["storage"]
    assert storage["merge"] == "minicache" and storage["merge_from"] == 2 and storage["merging"]["pairs"] == [[2, 3]]
    code, _, stderr = run_cli(capsys, "run", "--model", "tiny-llama", "--merge", "minicache", "--merge-t", "2",
                              "--prompt", "x", "--no-history")
    assert code == 2 and "--merge-t must be between 0 and 1" in stderr


def test_eval_variants_carry_merge_settings():
    from kvstudio.cli.eval import parse_assignments
    from kvstudio.core.evaluate.sweep import make_policy

    variant = parse_assignments(["merge=minicache,merge_from=2,merge_threshold=0.1"], "--variant")
    policy = make_policy("h2o", 64, {}, variant)
    assert (policy.storage.merge, policy.storage.merge_from, policy.storage.merge_threshold) == ("minicache", 2, 0.1)
    assert "+minicache" in policy.describe()


@pytest.mark.parametrize("option, value", [("--merge-from", "2"), ("--merge-threshold", "0.5"), ("--merge-t", "0.3")])
def test_merge_settings_without_merging_are_refused(capsys, option, value):
    """Given without --merge minicache, a merge setting would be ignored and the run plain: it is refused."""
    code, _, stderr = run_cli(capsys, "run", "--model", "tiny-llama", "--policy", "h2o-int8", "--budget", "8",
                              option, value, "--prompt", "x", "--max-new-tokens", "1", "--no-history")
    assert code == 2 and f"{option} needs --merge minicache (or --policy h2o-int8+minicache)" in stderr
    assert len(stderr.strip().splitlines()) == 1
    code, stdout, stderr = run_cli(capsys, "run", "--model", "tiny-llama", "--policy", "h2o-int8+minicache",
                                   "--budget", "8", option, value, "--prompt", "x", "--max-new-tokens", "1",
                                   "--no-history")
    assert code == 0, stderr
    assert "h2o-int8+minicache" in stdout
    code, _, stderr = run_cli(capsys, "eval", "needle", "--model", "tiny-llama", "--policies", "full", "--lengths",
                              "256", "--no-history", "--variant", f"codec=int8,{option.lstrip('-').replace('-', '_')}={value}")
    assert code == 2 and "needs merge=minicache in the same variant" in stderr


def test_the_run_records_merged_and_retained_entries_for_the_views(llama_engine):
    from kvstudio.core.recording.events import Recorder

    recorder = Recorder()
    policy = attach(create_policy("full"), StorageConfig(merge="minicache", merge_from=2, merge_threshold=0.0))
    llama_engine.generate(PROMPT, policy, GenerationSettings(max_new_tokens=3, chunk_size=64), recorder=recorder)
    merges = recorder.all("merges")
    assert len(merges) == len(recorder.all("steps"))
    first = merges[0]  # threshold 0: the first chunk's 64 tokens all retained, in layers 2 and 3 only
    assert [len(r) for r in first.retained] == [0, 0, 64, 64]
    assert first.merged_entries_per_layer == (0, 0, 0, 0)
    assert all(reading.shared_cache_bytes == 0 for reading in recorder.all("memory"))

    recorder = Recorder()
    policy = attach(create_policy("full"), StorageConfig(merge="minicache", merge_from=2, merge_threshold=2.0))
    result = llama_engine.generate(PROMPT, policy, GenerationSettings(max_new_tokens=3, chunk_size=64),
                                   recorder=recorder, keep_cache=True)
    last = recorder.all("merges")[-1]
    assert last.merged_entries_per_layer[:2] == (0, 0) and last.merged_entries_per_layer[2] > 0
    assert recorder.all("memory")[-1].shared_cache_bytes == result.cache.shared_bytes() > 0


def test_stored_runs_keep_their_merge_events(llama_engine):
    from kvstudio.core.recording.events import Recorder
    from kvstudio.core.recording.packing import pack_events, unpack_events

    recorder = Recorder()
    policy = attach(create_policy("full"), StorageConfig(merge="minicache", merge_from=0, merge_threshold=0.3))
    llama_engine.generate(PROMPT, policy, GenerationSettings(max_new_tokens=2, chunk_size=64), recorder=recorder)
    restored = unpack_events(pack_events(recorder))
    for before, after in zip(recorder.all("merges"), restored.all("merges"), strict=True):
        assert before.merged_entries_per_layer == after.merged_entries_per_layer
        assert [r.tolist() for r in before.retained] == [r.tolist() for r in after.retained]
    assert restored.all("memory")[-1].shared_cache_bytes == recorder.all("memory")[-1].shared_cache_bytes > 0


@pytest.mark.parametrize("codec", ["int8", "int4"])
def test_a_codec_encodes_the_merged_states(llama_engine, codec):
    # Chunks of 48 encode whole groups of 16 inside the step that adds them: those groups must be
    # encoded again with the merged rows, or the two layers would decode unrelated directions.
    result = _run(llama_engine, "full", codec=codec, group_size=16, merge="minicache", merge_from=0,
                  merge_threshold=2.0)
    for a, b in ((0, 1), (2, 3)):
        direction_a = split_magnitude(result.cache.layers[a].keys)[1]
        direction_b = split_magnitude(result.cache.layers[b].keys)[1]
        cosine = (direction_a * direction_b).sum(dim=-1)
        assert float(cosine.mean()) > (0.99 if codec == "int8" else 0.9)


@pytest.mark.parametrize("policy_name", ["h2o", "random"])
def test_the_held_store_reads_what_the_restored_states_would_be(llama_engine, monkeypatch, policy_name):
    # The later layer of a pair holds magnitudes and reads directions from its partner (storage/linked.py);
    # the codec path instead rewrites both layers' rows with their restored states. Under per-layer
    # eviction (the partner evicts entries the later layer still reads, which it must copy out first)
    # the two must read the same keys and values and generate the same tokens.
    from kvstudio.core.storage.linked import LinkedStore
    from kvstudio.core.storage.minicache import MiniCacheMerging

    settings = dict(budget=40, new_tokens=16, chunk=32, merge="minicache", merge_from=0, merge_threshold=2.0)
    held = _run(llama_engine, policy_name, **settings)
    monkeypatch.setattr(MiniCacheMerging, "holds_links", lambda self, layer_idx, codec: False)
    rewritten = _run(llama_engine, policy_name, **settings)
    assert held.token_ids == rewritten.token_ids
    copied_out = 0
    for index, (a, b) in enumerate(zip(held.cache.layers, rewritten.cache.layers)):
        assert torch.equal(a.positions, b.positions)
        assert torch.allclose(a.keys, b.keys, atol=1e-5) and torch.allclose(a.values, b.values, atol=1e-5)
        if isinstance(a.store, LinkedStore):
            partner = held.cache.layers[index - 1].positions
            merged = held.cache.merging.side(index).merged_mask("key")
            alone = torch.stack([~torch.isin(a.positions[h], partner[h]) for h in range(partner.shape[0])])
            copied_out += int((merged & alone).sum())
            assert not bool((a.store.linked("key") & alone).any())  # nothing links to a row that is gone
    if policy_name == "random":  # its layers keep different positions (h2o's here keep the same ones)
        assert copied_out > 0  # the partner did evict entries this layer still read
    assert sum(held.cache.bytes_per_layer()) < sum(rewritten.cache.layers[i].store.byte_count() for i in range(4))
