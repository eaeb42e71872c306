"""Stop inside a prefill chunk (core/runtime/layer_hooks.py): a cancel requested while a chunk is between two
decoder layers ends the run there, without running the chunk's later layers, and frees the cache the
half-fed chunk left uneven. Progress moves layer by layer within a chunk. Real tiny-llama (4 layers)."""

from __future__ import annotations

from kvstudio.core.runtime.engine import CancelToken, GenerationSettings
from kvstudio.core.recording.events import Recorder
from kvstudio.core.runtime.layer_hooks import decoder_layers
from kvstudio.core.spec import create_policy

from .helpers import random_ids


def test_a_cancel_between_layers_ends_the_chunk_there_and_frees_the_cache(llama_engine):
    layers = decoder_layers(llama_engine.model, 4)
    assert len(layers) == 4
    cancel = CancelToken()
    chunk = {"number": 0}  # which forward step of the run is in progress (counted at layer 0)
    ran: list[tuple[int, int]] = []  # (chunk, layer) for every layer that finished

    def count_chunk(_module, _args):
        chunk["number"] += 1

    def stop_in_second_chunk(_module, _args):
        if chunk["number"] == 2:  # the second chunk reaches layer 1: Stop, as the GUI's button does
            cancel.cancel()

    # Registered before the run's own hooks, so these run first, like a Stop arriving at that moment.
    handles = [layers[0].register_forward_pre_hook(count_chunk),
               layers[1].register_forward_pre_hook(stop_in_second_chunk)]
    handles += [layer.register_forward_hook(lambda _m, _a, _o, index=index: ran.append((chunk["number"], index)))
                for index, layer in enumerate(layers)]
    recorder = Recorder()
    try:
        result = llama_engine.generate(random_ids(48, seed=3), create_policy("h2o", budget=12),
                                       GenerationSettings(max_new_tokens=5, chunk_size=16), recorder=recorder,
                                       cancel=cancel, keep_cache=True)
    finally:
        for handle in handles:
            handle.remove()
    assert result.stop_reason == "cancelled" and result.token_ids == []
    # The first chunk ran through all four layers; the second only through layer 0: layers 1-3 never ran.
    assert ran == [(1, 0), (1, 1), (1, 2), (1, 3), (2, 0)]
    assert len(result.steps) == 1  # the abandoned step is not recorded as a step
    # The half-fed chunk left layer 0 holding tokens the others lack: the cache is emptied, not kept uneven.
    assert result.kept_per_layer == [0, 0, 0, 0] and result.cache.current_bytes == 0
    assert sum(result.cache.bytes_per_layer()) == 0
    assert result.state is None  # nothing to save or continue from
    # Progress says where it stopped: 16 of 48 tokens through every layer (layer 1 of the next never ran).
    progress = recorder.all("prefill")
    assert (progress[-1].tokens_done, progress[-1].tokens_total) == (16, 48)
    # The run's hooks are gone: the same model runs to its end afterwards.
    again = llama_engine.generate(random_ids(48, seed=3), create_policy("h2o", budget=12),
                                  GenerationSettings(max_new_tokens=5, chunk_size=16))
    assert again.stop_reason == "max_new_tokens" and len(again.token_ids) == 5


def test_prefill_progress_moves_layer_by_layer_within_a_chunk(tiny_engine):
    """On every tiny family: their decoder layers are found and hooked."""
    recorder = Recorder()
    tiny_engine.generate(random_ids(40, seed=4), create_policy("full"),
                          GenerationSettings(max_new_tokens=2, chunk_size=16), recorder=recorder)
    progress = [(p.tokens_done, p.chunk_tokens, p.layers_done, p.layers_total) for p in recorder.all("prefill")]
    # Each chunk: layers 1, 2, 3 of 4 done (its tokens 16, 16, 8), then the chunk's end (no chunk in progress).
    expected = []
    for done, size in ((0, 16), (16, 16), (32, 8)):
        expected += [(done, size, layer, 4) for layer in (1, 2, 3)] + [(done + size, 0, 0, 0)]
    assert progress == expected
    # Decoding adds no progress events.
    assert all(p.tokens_total == 40 for p in recorder.all("prefill"))
