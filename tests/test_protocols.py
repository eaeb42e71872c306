"""The three protocols: where the question is when the policy compresses, and one compressed context
serving several questions."""

from __future__ import annotations

import json

import pytest

from kvstudio.core.errors import KVStudioError
from kvstudio.core.evaluate.protocols import CompressedContexts, protocol_settings
from kvstudio.core.evaluate.results import format_summary
from kvstudio.core.evaluate.sweep import Sweep, SweepSpec
from kvstudio.core.evaluate.tasks import TaskOptions, generation_samples
from kvstudio.core.runtime.engine import GenerationSettings
from kvstudio.core.spec import create_policy

from .conftest import engine_for

BUDGET, WINDOW = 40, 8


@pytest.fixture(scope="module")
def needle():
    engine = engine_for("tiny-llama")
    sample = generation_samples("needle", engine.tokenizer, TaskOptions(lengths=(400,), depths=(0.5,)))[0]
    return engine, sample


def snapkv():
    return create_policy("snapkv", budget=BUDGET, observation_window=WINDOW)


def run(engine, sample, protocol, **options):
    settings = protocol_settings(protocol, GenerationSettings(max_new_tokens=2, chunk_size=64, memory_sample_hz=0),
                                 sample.ids, sample.question_start)
    return engine.generate(sample.ids, snapkv(), settings, keep_cache=True, **options)


def kept(result):
    return [result.cache.positions(layer).tolist() for layer in range(result.cache.n_layers)]


def test_samples_say_where_their_question_begins(needle):
    engine, sample = needle
    question = engine.tokenizer.decode(sample.ids[sample.question_start:])
    assert question.lstrip().startswith("What is the special magic number")
    assert sample.extra["needle_position"] < sample.question_start


def test_question_aware_compresses_once_with_the_question_in_the_window(needle):
    engine, sample = needle
    result = run(engine, sample, "question-aware")
    assert [s.input_tokens for s in result.steps if s.phase == "prefill"] == [len(sample.ids)]
    one_chunk = engine.generate(sample.ids, snapkv(), GenerationSettings(max_new_tokens=2, chunk_size=len(sample.ids),
                                                                         memory_sample_hz=0), keep_cache=True)
    assert kept(result) == kept(one_chunk)


def test_question_agnostic_compresses_the_context_before_the_question(needle):
    engine, sample = needle
    split = sample.question_start
    result = run(engine, sample, "question-agnostic")
    prefill = [s.input_tokens for s in result.steps if s.phase == "prefill"]
    assert prefill == [split]  # the context, in one chunk
    assert result.steps[1].phase == "decode" and result.steps[1].input_tokens == len(sample.ids) - split
    context_only = engine.generate(sample.ids[:split], snapkv(), GenerationSettings(max_new_tokens=0,
                                   chunk_size=split, memory_sample_hz=0), keep_cache=True)
    question = list(range(split, len(sample.ids)))
    generated = [len(sample.ids)]  # the second token was fed; the last one never is
    for layer, positions in enumerate(kept(result)):
        for head, row in enumerate(positions):
            # What the context alone kept, then the whole question (SnapKV does not compress while decoding).
            assert row == kept(context_only)[layer][head] + question + generated
    assert kept(result) != kept(run(engine, sample, "question-aware"))  # the question changes what stays


def test_one_compressed_context_serves_several_questions(needle):
    engine, sample = needle
    contexts = CompressedContexts()
    settings = protocol_settings("question-agnostic", GenerationSettings(max_new_tokens=3, memory_sample_hz=0),
                                 sample.ids, sample.question_start)
    first, _, reused_first = contexts.generate(engine, "snapkv", sample.ids, snapkv(), settings, keep_cache=True)
    other_question = sample.ids[:sample.question_start] + engine.tokenizer(" Which city?",
                                                                            add_special_tokens=False)["input_ids"]
    other_settings = protocol_settings("question-agnostic", settings, other_question, sample.question_start)
    second, peak, reused_second = contexts.generate(engine, "snapkv", other_question, snapkv(), other_settings,
                                                    keep_cache=True)
    assert (reused_first, reused_second) == (False, True) and peak > 0
    direct = engine.generate(other_question, snapkv(), other_settings, keep_cache=True)  # no saved context
    assert second.token_ids == direct.token_ids and kept(second) == kept(direct)
    again, _, _ = contexts.generate(engine, "snapkv", sample.ids, snapkv(), settings, keep_cache=True)
    assert again.token_ids == first.token_ids


def test_sweeps_record_and_show_their_protocol(tmp_path):
    engine = engine_for("tiny-llama")
    spec = SweepSpec("needle", "tiny-llama", ("snapkv",), (BUDGET,), TaskOptions(lengths=(400,), depths=(0.5,)),
                     policy_options={"observation_window": WINDOW}, chunk_size=64)
    bounded_key = spec.fingerprint()
    spec.protocol = "question-aware"
    assert spec.fingerprint() != bounded_key  # another store: its cells differ
    records = Sweep(engine, spec, tmp_path / "aware.jsonl").run().records
    assert records[0]["protocol"] == "question-aware"
    table = format_summary(records + [dict(records[0], protocol=None, score=0.0)])  # a cell stored before protocols
    assert "question-aware" in table and "bounded" in table and "protocol" in table.splitlines()[0]
    with pytest.raises(KVStudioError, match="feeds a text"):
        SweepSpec("perplexity", "tiny-llama", ("full",), (), protocol="question-aware").validate()
    with pytest.raises(KVStudioError, match="unknown protocol"):
        protocol_settings("sideways", GenerationSettings(), [1, 2], 1)
    assert json.loads(json.dumps(spec.to_dict()))["protocol"] == "question-aware"
