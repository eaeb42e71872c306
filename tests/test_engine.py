"""The generation loop against transformers' own, on real (tiny) models."""

from __future__ import annotations

import threading

import pytest
import torch

from kvstudio.core.runtime.engine import CancelToken, GenerationSettings, TextStream
from kvstudio.core.errors import KVStudioError, PromptError
from kvstudio.core.recording.events import Recorder
from kvstudio.core.spec import create_policy

from .helpers import random_ids


def test_full_policy_is_token_identical_to_generate(tiny_engine):
    prompt = random_ids(40, seed=1)
    expected = tiny_engine.model.generate(
        torch.tensor([prompt]), max_new_tokens=24, min_new_tokens=24, do_sample=False
    )[0, len(prompt):].tolist()
    result = tiny_engine.generate(prompt, create_policy("full"), GenerationSettings(max_new_tokens=24))
    assert result.token_ids == expected
    assert result.evictions == 0
    assert result.kept_per_layer == [len(prompt) + 23] * tiny_engine.loaded.n_layers


@pytest.mark.parametrize("chunk_size", [1, 7, 32])
def test_chunked_prefill_matches_one_shot_logits(tiny_engine, chunk_size):
    # Tolerance: fp32, chunking only changes the blocking of the same sums: 1e-5 absolute on logits
    # of magnitude ~1 for these tiny models.
    prompt = random_ids(100, seed=2)
    one_shot = tiny_engine.prompt_logits(prompt, create_policy("full"), chunk_size=len(prompt))
    chunked = tiny_engine.prompt_logits(prompt, create_policy("full"), chunk_size=chunk_size)
    torch.testing.assert_close(chunked, one_shot, atol=1e-5, rtol=1e-5)


def test_evicting_policy_changes_logits_so_the_comparison_can_fail(llama_engine):
    prompt = random_ids(100, seed=2)
    full = llama_engine.prompt_logits(prompt, create_policy("full"), chunk_size=16)
    window = llama_engine.prompt_logits(prompt, create_policy("window", budget=8), chunk_size=16)
    assert (full - window).abs().max() > 1e-3


def test_bounded_cache_under_window(llama_engine):
    result = llama_engine.generate(random_ids(90, seed=3), create_policy("window", budget=10),
                                   GenerationSettings(max_new_tokens=12, chunk_size=8))
    assert result.kept_per_layer == [10] * 4
    # The most ever held is the budget plus one chunk, never the whole prompt.
    assert result.peak_kept_per_layer == [18] * 4
    # 90 prompt + 11 decoded tokens fed, 10 kept: 91 entries evicted per layer per KV head.
    assert result.evictions == 91 * 4 * 2


def test_sampling_is_reproducible_with_a_seed(llama_engine):
    prompt = random_ids(20, seed=4)
    settings = GenerationSettings(max_new_tokens=30, temperature=1.0, top_p=0.9, top_k=50, seed=7)
    first = llama_engine.generate(prompt, create_policy("full"), settings).token_ids
    second = llama_engine.generate(prompt, create_policy("full"), settings).token_ids
    other = llama_engine.generate(prompt, create_policy("full"),
                                  GenerationSettings(max_new_tokens=30, temperature=1.0, seed=8)).token_ids
    greedy = llama_engine.generate(prompt, create_policy("full"), GenerationSettings(max_new_tokens=30)).token_ids
    assert first == second
    assert first != other
    assert first != greedy


def test_top_k_one_is_greedy(llama_engine):
    prompt = random_ids(20, seed=5)
    sampled = llama_engine.generate(prompt, create_policy("full"),
                                    GenerationSettings(max_new_tokens=15, temperature=2.0, top_k=1, seed=1))
    greedy = llama_engine.generate(prompt, create_policy("full"), GenerationSettings(max_new_tokens=15))
    assert sampled.token_ids == greedy.token_ids


def test_stop_string_cuts_the_text(llama_engine):
    prompt = random_ids(20, seed=6)
    free = llama_engine.generate(prompt, create_policy("full"), GenerationSettings(max_new_tokens=30))
    stop = free.text[10:13]
    assert stop, "the tiny model produced too little text for this test"
    stopped = llama_engine.generate(prompt, create_policy("full"),
                                    GenerationSettings(max_new_tokens=30, stop_strings=(stop,)))
    assert stopped.stop_reason == "stop_string"
    assert stopped.text == free.text[: free.text.index(stop)]


def test_eos_ends_generation(llama_engine):
    prompt = random_ids(20, seed=6)
    free = llama_engine.generate(prompt, create_policy("full"), GenerationSettings(max_new_tokens=12))
    # Make the model's 5th token the end-of-sequence token and the run must stop there.
    llama_engine.eos_ids.add(free.token_ids[4])
    try:
        stopped = llama_engine.generate(prompt, create_policy("full"), GenerationSettings(max_new_tokens=12))
    finally:
        llama_engine.eos_ids.discard(free.token_ids[4])
    assert stopped.stop_reason == "eos"
    assert stopped.token_ids == free.token_ids[: free.token_ids.index(free.token_ids[4]) + 1]


def test_cancel_stops_within_one_step(llama_engine):
    cancel = CancelToken()
    seen = []

    def on_text(piece):
        seen.append(piece)
        if len(seen) == 3:
            cancel.cancel()

    result = llama_engine.generate(random_ids(30, seed=7), create_policy("full"),
                                   GenerationSettings(max_new_tokens=200), cancel=cancel, on_text=on_text)
    assert result.stop_reason == "cancelled"
    # The step that produced the third piece finishes; nothing after it runs.
    assert len(result.token_ids) < 10
    assert len(result.steps) == len(result.token_ids)


def test_cancel_from_another_thread_during_prefill(llama_engine):
    cancel = CancelToken()
    cancel.cancel()
    result = llama_engine.generate(random_ids(300, seed=8), create_policy("full"),
                                   GenerationSettings(max_new_tokens=5, chunk_size=1), cancel=cancel)
    assert result.stop_reason == "cancelled"
    assert result.token_ids == [] and result.steps == []


def test_recorder_sees_tokens_steps_evictions_and_watched_attention(llama_engine):
    recorder = Recorder(watch_layers=(1,))
    result = llama_engine.generate(random_ids(40, seed=9), create_policy("streaming_llm", budget=12, sink=2),
                                   GenerationSettings(max_new_tokens=6, chunk_size=16), recorder=recorder)
    tokens = recorder.all("tokens")
    assert [t.token_id for t in tokens] == result.token_ids
    steps = recorder.all("steps")
    assert [s.phase for s in steps] == ["prefill"] * 3 + ["decode"] * 5
    assert all(max(s.kept_per_layer) <= 12 for s in steps)
    evictions = recorder.all("evictions")
    assert sum(len(e.positions) for e in evictions) == result.evictions == recorder.evicted_total
    # Sinks are never evicted; every evicted position was really fed.
    assert all(e.positions.min() >= 2 and e.positions.max() < 45 for e in evictions)
    attention = recorder.all("attention")
    assert {a.layer for a in attention} == {1} and len(attention) == len(steps)
    for event in attention:
        assert event.weights.shape[0] == 4  # query heads
        assert event.weights.shape[1] == event.positions.shape[1]
        assert abs(event.weights.sum(axis=1) - 1).max() < 1e-5
    assert recorder.all("prefill")[-1].tokens_done == 40
    since, cursor = recorder.since("tokens", 10**9)
    assert since == [] and cursor >= len(tokens)


def test_recorder_is_readable_while_a_run_writes(llama_engine):
    recorder = Recorder()
    reads = []
    done = threading.Event()

    def reader():
        cursor = 0
        while not done.is_set():
            new, cursor = recorder.since("steps", cursor)
            reads.extend(new)

    thread = threading.Thread(target=reader)
    thread.start()
    result = llama_engine.generate(random_ids(30, seed=10), create_policy("full"),
                                   GenerationSettings(max_new_tokens=20), recorder=recorder)
    done.set()
    thread.join()
    reads.extend(recorder.since("steps", 0)[0][len(reads):])
    assert [s.step for s in reads] == list(range(len(result.steps)))


def test_recorder_reads_what_is_new_in_order_after_the_ring_dropped_old_events():
    from kvstudio.core.recording.events import PrefillProgressEvent

    recorder = Recorder(capacity=5)
    for done in range(1, 13):
        recorder.record(PrefillProgressEvent(done, 12))
    new, cursor = recorder.since("prefill", 3)  # events 4-7 were dropped by the ring
    assert [e.tokens_done for e in new] == [8, 9, 10, 11, 12] and cursor == 12
    assert [e.tokens_done for e in recorder.since("prefill", 10)[0]] == [11, 12]
    assert recorder.since("prefill", 12)[0] == []


def test_bad_settings_and_prompts_are_reported(llama_engine):
    with pytest.raises(KVStudioError, match="--chunk-size"):
        llama_engine.generate([1, 2], create_policy("full"), GenerationSettings(chunk_size=0))
    with pytest.raises(KVStudioError, match="--top-p"):
        llama_engine.generate([1, 2], create_policy("full"), GenerationSettings(top_p=0))
    with pytest.raises(PromptError, match="empty"):
        llama_engine.generate([], create_policy("full"))
    with pytest.raises(PromptError, match="chat template"):
        llama_engine.generate("hi", create_policy("full"), GenerationSettings(chat_template=True))


def test_text_stream_never_splits_a_character(llama_engine):
    # The byte tokenizer spreads "é" over 2 tokens and "✓" over 3; no piece may hold half of one.
    text = "héllo ✓ done"
    stream = TextStream(llama_engine.tokenizer)
    pieces = [stream.push(token) for token in llama_engine.tokenizer(text)["input_ids"]]
    assert "".join(pieces) == text
    assert "\ufffd" not in "".join(pieces)
    assert pieces.count("") == 1 + 2  # held back: 1 byte of "é", 2 bytes of "✓"


class _CountingTokenizer:
    """The real tokenizer, counting how many token ids `decode` is handed in all."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.decoded = 0

    def decode(self, ids, **kwargs):
        self.decoded += len(ids)
        return self.tokenizer.decode(ids, **kwargs)


def test_text_stream_decodes_each_token_a_bounded_number_of_times(llama_engine):
    """Streaming n tokens decodes O(n) ids in all, not O(n^2): no re-decoding the whole text per token."""
    text = "Streaming text: héllo ✓ wörld, " * 40
    ids = llama_engine.tokenizer(text)["input_ids"]
    counting = _CountingTokenizer(llama_engine.tokenizer)
    stream = TextStream(counting)
    pieces = [stream.push(token) for token in ids]
    assert "".join(pieces) == stream.emitted == llama_engine.tokenizer.decode(ids, skip_special_tokens=True)
    assert counting.decoded <= 8 * len(ids)  # re-decoding everything would be len(ids)^2 / 2 = 350k here


@pytest.mark.slow
def test_text_stream_pieces_join_to_the_one_shot_decode_on_the_default_model(default_engine):
    from pydoc_data.topics import topics

    tokenizer = default_engine.tokenizer
    text = topics["if"][:1500] + " naïve café ✓ 日本語 🙂"
    ids = tokenizer(text)["input_ids"]
    stream = TextStream(tokenizer)
    pieces = [stream.push(token) for token in ids]
    assert "".join(pieces) == tokenizer.decode(ids, skip_special_tokens=True)


def test_a_stop_string_spread_over_several_tokens_is_found(llama_engine):
    stream = TextStream(llama_engine.tokenizer)
    found = []
    for token in llama_engine.tokenizer("one two END three")["input_ids"]:
        piece = stream.push(token)
        found.append(stream.found_stop(("END",), piece))
    # The byte tokenizer gives one token a byte: found exactly at the "D", and only there.
    assert found.index(True) == len("one two END") - 1 and sum(found) == 1


def test_a_text_stream_goes_on_from_restored_text(llama_engine):
    """A stream restored with the ids and text of an earlier one emits what a single stream would,
    also when the restore falls in the middle of a character's bytes."""
    tokenizer = llama_engine.tokenizer
    ids = tokenizer("say ✓ then é and more")["input_ids"]
    whole = TextStream(tokenizer)
    expected = [whole.push(token) for token in ids]
    cut = len(tokenizer("say ")["input_ids"]) + 1  # after the first byte of "✓"
    first = TextStream(tokenizer)
    for token in ids[:cut]:
        first.push(token)
    restored = TextStream(tokenizer)
    restored.ids, restored.emitted = list(ids[:cut]), first.emitted
    rest = [restored.push(token) for token in ids[cut:]]
    assert first.emitted + "".join(rest) == "".join(expected)
    assert restored.emitted == "".join(expected)
