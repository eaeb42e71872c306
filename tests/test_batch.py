"""Batched runs: row r of a batch is the single run of prompt r (tokens, kept positions, logprobs)."""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings as hypothesis_settings
from hypothesis import strategies as st

from kvstudio.core.errors import KVStudioError, PromptError
from kvstudio.core.policies.base import LayerState, LayerView, Policy
from kvstudio.core.recording.events import Recorder
from kvstudio.core.runtime.batch import BatchRow, generate_batch
from kvstudio.core.models.loading import LoadedModel
from kvstudio.core.models.tiny import byte_tokenizer
from kvstudio.core.models.tiny_families import build_family_model
from kvstudio.core.runtime.engine import Engine, GenerationSettings
from kvstudio.core.runtime.session import CancelToken
from kvstudio.core.spec import CacheSpec, create_policy

from .helpers import random_ids

LOGPROB_TOLERANCE = 1e-4  # fp32: the linear layers' products over a packed step round differently in the last bits
LENGTHS = (5, 70, 23, 41)  # prompts of different lengths: one chunk, several, an uneven last chunk

# Every built-in policy with parameters that make it evict on these prompts.
BUILT_IN = [
    ("full", {}),
    ("window", {"budget": 16}),
    ("streaming_llm", {"budget": 16, "sink": 4}),
    ("streaming_llm", {"budget": 16, "sink": 4, "rerotate": True}),
    ("h2o", {"budget": 20}),
    ("tova", {"budget": 20}),
    ("snapkv", {"budget": 24, "observation_window": 8}),
    ("pyramidkv", {"budget": 24, "observation_window": 8}),
    ("knorm", {"budget": 18}),
    ("random", {"budget": 18}),
]
STORAGES = [
    ("h2o-int8", {"budget": 20}),
    ("h2o-int4", {"budget": 20, "storage": {"group_size": 16}}),
    ("h2o", {"budget": 20, "storage": {"tier": "host", "recall": 2, "block_size": 4}}),
    ("snapkv-int8", {"budget": 24, "observation_window": 8, "storage": {"residual": 8}}),
]


def settings(**changes) -> GenerationSettings:
    return GenerationSettings(**({"max_new_tokens": 10, "chunk_size": 16, "memory_sample_hz": 0, "ignore_eos": True}
                                 | changes))


def spec_policy(name: str, parameters: dict) -> Policy:
    return CacheSpec.parse(name, parameters).build()


def held_and_evicted(recorder: Recorder):
    """Every step's kept positions per layer and KV head, and every eviction (the watched rows carry them)."""
    held = [(a.step, a.layer, a.positions.tolist()) for a in recorder.all("attention")]
    evicted = [(e.step, e.layer, e.kv_head, e.positions.tolist(), e.reason) for e in recorder.all("evictions")]
    return held, evicted


def assert_row_is_single_run(engine, row_result, prompt, policy: Policy, run_settings: GenerationSettings):
    single_recorder = Recorder(watch_layers=range(engine.loaded.n_layers))
    single = engine.generate(prompt, policy, run_settings, recorder=single_recorder)
    assert row_result.error is None, row_result.error
    batched = row_result.result
    assert batched.token_ids == single.token_ids
    assert batched.stop_reason == single.stop_reason
    assert batched.text == single.text
    assert held_and_evicted(row_result.recorder) == held_and_evicted(single_recorder)
    assert batched.kept_per_layer == single.kept_per_layer
    assert batched.peak_kept_per_layer == single.peak_kept_per_layer
    assert batched.peak_cache_bytes == single.peak_cache_bytes
    assert [s.phase for s in batched.steps] == [s.phase for s in single.steps]
    batched_logprobs = [s.logprob for s in batched.steps if s.logprob is not None]
    single_logprobs = [s.logprob for s in single.steps if s.logprob is not None]
    assert len(batched_logprobs) == len(single_logprobs) == len(single.token_ids)
    assert max((abs(a - b) for a, b in zip(batched_logprobs, single_logprobs)), default=0.0) <= LOGPROB_TOLERANCE
    return single


def run_batch(engine, prompts, policies, run_settings, **options):
    recorders = [Recorder(watch_layers=range(engine.loaded.n_layers)) for _ in prompts]
    rows = [BatchRow(prompt, policy) for prompt, policy in zip(prompts, policies)]
    return generate_batch(engine, rows, run_settings, recorders=recorders, **options)


@pytest.mark.parametrize("name,parameters", BUILT_IN + STORAGES, ids=lambda v: v if isinstance(v, str) else "")
def test_each_row_is_the_single_run_of_its_prompt(llama_engine, name, parameters):
    prompts = [random_ids(n, seed=i) for i, n in enumerate(LENGTHS)]
    run_settings = settings()
    batch = run_batch(llama_engine, prompts, [spec_policy(name, parameters) for _ in prompts], run_settings)
    evicting = 0
    for row, prompt in zip(batch.rows, prompts):
        single = assert_row_is_single_run(llama_engine, row, prompt, spec_policy(name, parameters), run_settings)
        evicting += single.evictions > 0
    assert evicting or name == "full"  # the comparison covers evictions, not only caches that never fill
    assert batch.max_rows_in_flight == len(prompts)
    # Fewer packed steps than the rows' steps together: the rows really ran side by side.
    assert batch.steps < sum(len(row.result.steps) for row in batch.rows)


_family_engines: dict[str, Engine] = {}


def family_engine(family: str) -> Engine:
    """A tiny model of the conformance matrix's family (core/models/tiny_families.py)."""
    if family not in _family_engines:
        _family_engines[family] = Engine(LoadedModel(build_family_model(family), byte_tokenizer(), f"tiny {family}",
                                                     family, torch.device("cpu"), torch.float32))
    return _family_engines[family]


@pytest.mark.parametrize("family", ["qwen2", "mistral", "gemma2", "gpt_oss"])
def test_rows_are_single_runs_on_other_families(family):
    """Biases (qwen2), sliding windows (mistral: every layer; gemma2 and gpt_oss: alternating),
    soft-capping (gemma2) and sinks (gpt_oss), which take KV Studio's own attention path."""
    engine = family_engine(family)
    prompts = [random_ids(n, seed=10 + i) for i, n in enumerate((9, 60, 33))]
    run_settings = settings(max_new_tokens=6)
    batch = run_batch(engine, prompts, [create_policy("h2o", budget=20) for _ in prompts], run_settings)
    for row, prompt in zip(batch.rows, prompts):
        assert_row_is_single_run(engine, row, prompt, create_policy("h2o", budget=20), run_settings)


def test_rows_may_use_different_policies(llama_engine):
    """Compare's N policies over one prompt in one pass, and different prompts under different caches."""
    prompt = random_ids(57, seed=3)
    caches = [("full", {}), ("h2o", {"budget": 20}), ("snapkv-int8", {"budget": 24, "observation_window": 8}),
              ("streaming_llm", {"budget": 16, "storage": {"tier": "host", "recall": 1, "block_size": 4}})]
    run_settings = settings(max_new_tokens=8)
    batch = run_batch(llama_engine, [prompt] * len(caches), [spec_policy(*cache) for cache in caches], run_settings)
    outputs = set()
    for row, cache in zip(batch.rows, caches):
        single = assert_row_is_single_run(llama_engine, row, prompt, spec_policy(*cache), run_settings)
        outputs.add((tuple(single.token_ids), single.peak_cache_bytes))
    assert len(outputs) > 1  # the policies really differ, so a row that ran its neighbour's policy would show
    assert [row.result.policy for row in batch.rows] == [spec_policy(*cache).describe() for cache in caches]


@hypothesis_settings(max_examples=6, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(lengths=st.lists(st.integers(1, 60), min_size=1, max_size=4), chunk=st.integers(3, 40),
       new_tokens=st.integers(0, 6), max_rows=st.none() | st.integers(1, 3))
def test_random_length_mixes_match_single_runs(llama_engine, lengths, chunk, new_tokens, max_rows):
    prompts = [random_ids(n, seed=100 + i) for i, n in enumerate(lengths)]
    run_settings = settings(chunk_size=chunk, max_new_tokens=new_tokens)
    batch = run_batch(llama_engine, prompts, [create_policy("h2o", budget=12) for _ in prompts], run_settings,
                      max_rows=max_rows)
    for row, prompt in zip(batch.rows, prompts):
        assert_row_is_single_run(llama_engine, row, prompt, create_policy("h2o", budget=12), run_settings)
    assert batch.max_rows_in_flight == min(max_rows or len(prompts), len(prompts))


def test_sampling_is_seeded_per_row(llama_engine):
    """A sampled row's tokens are those of its single run with its seed, whatever its neighbours are."""
    prompts = [random_ids(n, seed=20 + i) for i, n in enumerate((12, 50, 30))]
    sampled = settings(temperature=1.0, top_k=40, max_new_tokens=12)
    rows = [BatchRow(prompt, create_policy("h2o", budget=20), seed=7 + i) for i, prompt in enumerate(prompts)]
    batch = generate_batch(llama_engine, rows, sampled)
    alone = [llama_engine.generate(prompt, create_policy("h2o", budget=20), settings(
        temperature=1.0, top_k=40, max_new_tokens=12, seed=7 + i)).token_ids for i, prompt in enumerate(prompts)]
    assert [row.result.token_ids for row in batch.rows] == alone
    assert len({tuple(tokens) for tokens in alone}) == len(alone)
    # The same first row beside other neighbours: the same tokens.
    other = generate_batch(llama_engine, [rows[0], BatchRow(random_ids(80, seed=99), create_policy("full"), seed=1)],
                           sampled)
    assert other.rows[0].result.token_ids == alone[0]


def test_short_rows_decode_while_long_rows_prefill(llama_engine):
    prompts = [random_ids(4, seed=1), random_ids(90, seed=2)]
    fed = []  # what the model's embedding really received, step by step: no pad token among it
    embedding = llama_engine.model.get_input_embeddings()
    hook = embedding.register_forward_pre_hook(lambda _module, args: fed.append(args[0].shape))
    try:
        batch = run_batch(llama_engine, prompts, [create_policy("full"), create_policy("full")],
                          settings(chunk_size=10, max_new_tokens=20))
    finally:
        hook.remove()
    short, long = (row.result for row in batch.rows)
    assert all(shape[0] == 1 for shape in fed) and len(fed) == batch.steps
    assert sum(shape[1] for shape in fed) == sum(len(p) + 20 - 1 for p in prompts)  # prompts + new tokens, nothing more
    # The short row's decoding took steps that the long row spent reading its prompt: they ran together.
    assert batch.steps < len(short.steps) + len(long.steps)
    assert batch.steps == max(len(short.steps), len(long.steps))
    assert len(short.token_ids) == len(long.token_ids) == 20


def test_memory_is_what_the_rows_hold(llama_engine):
    """Each row is bounded by its own policy; the batch holds the rows' caches, not the longest row times N."""
    prompts = [random_ids(n, seed=i) for i, n in enumerate((10, 200, 60))]
    run_settings = settings(chunk_size=16, max_new_tokens=4)
    batch = run_batch(llama_engine, prompts, [create_policy("h2o", budget=24) for _ in prompts], run_settings)
    peaks = [row.result.peak_cache_bytes for row in batch.rows]
    assert batch.peak_cache_bytes <= sum(peaks)
    assert batch.peak_cache_bytes > max(peaks)
    for row in batch.rows:
        assert max(row.result.peak_kept_per_layer) <= 24 + 16


def test_max_rows_bounds_the_rows_in_flight(llama_engine):
    prompts = [random_ids(n, seed=40 + i) for i, n in enumerate((30, 8, 45, 17, 3))]
    run_settings = settings(max_new_tokens=5)
    started = []
    batch = run_batch(llama_engine, prompts, [create_policy("tova", budget=16) for _ in prompts], run_settings,
                      max_rows=2, on_row_start=started.append)
    assert batch.max_rows_in_flight == 2
    assert started == [0, 1, 2, 3, 4]
    for row, prompt in zip(batch.rows, prompts):
        assert_row_is_single_run(llama_engine, row, prompt, create_policy("tova", budget=16), run_settings)


# --- bad input ------------------------------------------------------------------------------------


def test_an_empty_row_is_refused_naming_it(llama_engine):
    rows = [BatchRow("some text", create_policy("full"), label="A.txt"), BatchRow("", create_policy("full"),
                                                                               label="B.txt")]
    with pytest.raises(PromptError, match=r"row 2 \(B.txt\) is empty"):
        generate_batch(llama_engine, rows, settings())
    with pytest.raises(PromptError, match="no rows"):
        generate_batch(llama_engine, [], settings())


def test_a_row_longer_than_the_context_is_refused(llama_engine):
    context = llama_engine.loaded.config.max_position_embeddings
    rows = [BatchRow(random_ids(8), create_policy("full")), BatchRow(random_ids(context + 1), create_policy("full"))]
    with pytest.raises(PromptError, match=rf"row 2 has {context + 1} tokens, more than the {context}-token context"):
        generate_batch(llama_engine, rows, settings())


def test_a_batch_that_does_not_fit_says_how_many_rows_would(llama_engine):
    prompts = [random_ids(300, seed=i) for i in range(6)]
    rows = [BatchRow(prompt, create_policy("full")) for prompt in prompts]
    from kvstudio.core.runtime.batch_memory import row_cache_bytes, step_bytes

    one = row_cache_bytes(llama_engine.loaded, 300, create_policy("full"), 16, 10)
    available = int((3 * one + step_bytes(llama_engine.loaded, 3 * 16)) / 0.8) + 1  # room for three rows
    with pytest.raises(KVStudioError, match=r"a batch of 6 rows needs .*3 rows at a time would: use --batch-size 3"):
        generate_batch(llama_engine, rows, settings(), max_rows=6, available_bytes=available)
    with pytest.raises(KVStudioError, match=r"not even one row would"):
        generate_batch(llama_engine, rows, settings(), available_bytes=one // 2)
    # Without a batch size, as many rows as fit run at a time; the others start as rows finish.
    batch = generate_batch(llama_engine, rows, settings(max_new_tokens=2), available_bytes=available)
    assert not batch.errors and batch.max_rows_in_flight == 3


class FailsAtStep(Policy):
    """A plugin's policy that raises in its fourth step, as a broken plugin would."""

    name = "fails_at_step"
    summary = "raises at step 3 (tests)"
    requires_budget = False

    def select(self, view: LayerView, state: LayerState):
        if view.step == 3 and view.layer_idx == 2:
            raise ValueError("scores went NaN")
        return None


def test_a_policy_failing_in_one_row_ends_that_row_only(llama_engine):
    prompts = [random_ids(n, seed=60 + i) for i, n in enumerate((20, 50, 35))]
    policies = [create_policy("h2o", budget=20), FailsAtStep(), create_policy("h2o", budget=20)]
    ended = []
    run_settings = settings()
    batch = run_batch(llama_engine, prompts, policies, run_settings, on_row_end=ended.append)
    failed = batch.rows[1]
    assert failed.failed and failed.result is None
    assert "fails_at_step" in str(failed.error) and "scores went NaN" in str(failed.error)
    assert batch.errors == [f"row 2: {failed.error}"]
    for index in (0, 2):
        assert_row_is_single_run(llama_engine, batch.rows[index], prompts[index], create_policy("h2o", budget=20),
                                 run_settings)
    assert sorted(row.index for row in ended) == [0, 1, 2]


def test_cancel_ends_every_row_as_cancelled(llama_engine):
    cancel = CancelToken()
    prompts = [random_ids(n, seed=i) for i, n in enumerate((10, 80))]
    tokens_seen = []

    def on_row_start(index):
        if index == 1:
            cancel.cancel()  # as soon as both rows started: the first step stops between layers

    batch = run_batch(llama_engine, prompts + [random_ids(5)], [create_policy("full")] * 3, settings(),
                      cancel=cancel, max_rows=2, on_row_start=on_row_start, on_row_end=tokens_seen.append)
    assert batch.cancelled
    assert [row.result.stop_reason for row in batch.rows[:2]] == ["cancelled", "cancelled"]
    assert batch.rows[2].failed and "cancelled before it started" in str(batch.rows[2].error)


def test_mla_models_are_refused_in_one_line():
    with pytest.raises(KVStudioError, match="MLA"):
        generate_batch(family_engine("deepseek_v3"), [BatchRow([1, 2, 3], create_policy("full"))], settings())


def test_batched_logits_differ_from_a_neighbours_so_the_comparison_can_fail(llama_engine):
    """The check above is not vacuous: two different prompts give different tokens and positions."""
    a, b = random_ids(40, seed=1), random_ids(40, seed=2)
    batch = run_batch(llama_engine, [a, b], [create_policy("knorm", budget=16)] * 2, settings())
    assert batch.rows[0].result.token_ids != batch.rows[1].result.token_ids
    assert held_and_evicted(batch.rows[0].recorder) != held_and_evicted(batch.rows[1].recorder)
    assert torch.is_inference_mode_enabled() is False


@pytest.mark.parametrize("name,parameters", [("h2o", {"budget": 20}), ("tova", {"budget": 20}),
                                             ("h2o-int8", {"budget": 20})])
def test_decoding_rows_computed_together_are_their_single_runs_bit_for_bit(llama_engine, monkeypatch, name,
                                                                          parameters):
    """Unwatched rows that decode at their budget share one batched matmul per layer
    (attention.decode_attention_group): each row is still its single run."""
    from kvstudio.core.runtime import batch_cache

    grouped = []
    original = batch_cache.decode_attention_group
    monkeypatch.setattr(batch_cache, "decode_attention_group",
                        lambda *args: grouped.append(len(args[0])) or original(*args))
    prompts = [random_ids(n, seed=20 + i) for i, n in enumerate((30, 45, 26, 60))]
    run_settings = settings(max_new_tokens=12)
    rows = [BatchRow(prompt, spec_policy(name, parameters)) for prompt in prompts]
    batch = generate_batch(llama_engine, rows, run_settings)  # recorders that watch no layer
    assert grouped and max(grouped) == len(prompts), grouped  # every row at its budget, in one group
    for row, prompt in zip(batch.rows, prompts):
        recorder = Recorder()
        single = llama_engine.generate(prompt, spec_policy(name, parameters), run_settings, recorder=recorder)
        batched = row.result
        assert batched.token_ids == single.token_ids
        assert max(abs(a.logprob - b.logprob) for a, b in zip(batched.steps, single.steps)
                   if a.logprob is not None) <= LOGPROB_TOLERANCE
        assert held_and_evicted(row.recorder)[1] == held_and_evicted(recorder)[1]
        assert batched.kept_per_layer == single.kept_per_layer and single.evictions > 0


@pytest.mark.parametrize("heads,kv_heads,head_dim,k_len", [(4, 2, 16, 21), (9, 3, 64, 257)])
def test_the_grouped_decode_attention_is_each_rows_own_bit_for_bit(heads, kv_heads, head_dim, k_len):
    """Each row's output and sums from decode_attention_group equal, exactly, those of
    attention_and_sums on that row alone (what a single run's decode step computes)."""
    from kvstudio.core.runtime.attention import LogitRule, attention_and_sums, decode_attention_group

    generator = torch.Generator().manual_seed(7)
    rows = 5
    queries = [torch.randn(1, heads, 1, head_dim, generator=generator) for _ in range(rows)]
    keys = [torch.randn(1, kv_heads, k_len, head_dim, generator=generator) for _ in range(rows)]
    values = [torch.randn(1, kv_heads, k_len, head_dim, generator=generator) for _ in range(rows)]
    outputs, sums = decode_attention_group(queries, keys, values, 0.25)
    for r in range(rows):
        positions = torch.arange(k_len).expand(kv_heads, k_len)  # every stored entry older than the query
        rule = LogitRule(positions, torch.tensor([k_len - 1]))
        output, row_sums = attention_and_sums(queries[r], keys[r], values[r], 0.25, 1, rule=rule)
        assert torch.equal(outputs[r], output) and torch.equal(sums[r], row_sums)
    assert not torch.equal(outputs[0], outputs[1])  # rows differ: a mix-up would show


def test_the_grouped_decode_on_one_thread_is_the_single_runs_attention_on_all(monkeypatch):
    """threads.one_thread runs a batched decode step's attention on one thread: the bits must be those
    of the single run's attention computed on every thread (default-model shapes, 8 rows)."""
    from kvstudio.core.runtime import threads
    from kvstudio.core.runtime.attention import LogitRule, attention_and_sums, decode_attention_group

    if torch.get_num_threads() == 1:
        pytest.skip("torch has one intra-op thread here: one thread against all compares nothing")
    all_threads = torch.get_num_threads()
    monkeypatch.setenv("OMP_WAIT_POLICY", "PASSIVE")
    generator = torch.Generator().manual_seed(5)
    rows, heads, kv_heads, head_dim, k_len = 8, 9, 3, 64, 257
    queries = [torch.randn(1, heads, 1, head_dim, generator=generator) for _ in range(rows)]
    keys = [torch.randn(1, kv_heads, k_len, head_dim, generator=generator) for _ in range(rows)]
    values = [torch.randn(1, kv_heads, k_len, head_dim, generator=generator) for _ in range(rows)]
    with threads.one_thread(torch.device("cpu"), rows * keys[0].numel()):
        assert torch.get_num_threads() == 1
        outputs, sums = decode_attention_group(queries, keys, values, 0.125)
    assert torch.get_num_threads() == all_threads
    rule = LogitRule(torch.arange(k_len).expand(kv_heads, k_len), torch.tensor([k_len - 1]))
    for r in range(rows):
        output, row_sums = attention_and_sums(queries[r], keys[r], values[r], 0.125, 1, rule=rule)
        assert torch.equal(outputs[r], output) and torch.equal(sums[r], row_sums)
    with threads.one_thread(torch.device("cpu"), threads.SMALL_WORK + 1):  # large work keeps the pool
        assert torch.get_num_threads() == all_threads
    monkeypatch.setenv("OMP_WAIT_POLICY", "ACTIVE")  # spinning workers wake at once: nothing to gain
    with threads.one_thread(torch.device("cpu"), 10):
        assert torch.get_num_threads() == all_threads
