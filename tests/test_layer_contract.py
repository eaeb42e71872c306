"""PolicyLayer honours the transformers layer contract it inherits from DynamicLayer: reset() empties
it, and what it cannot do raises NotImplementedError with the reason (never an AttributeError)."""

from __future__ import annotations

import pytest

from kvstudio.core.runtime.engine import GenerationSettings
from kvstudio.core.spec import build_policy
from kvstudio.core.storage import LayerStore


def _filled_cache(engine, policy_name="h2o", **params):
    policy = build_policy(policy_name, params)  # a "storage" entry sets how the entries are stored
    result = engine.generate(list(range(3, 60)), policy, GenerationSettings(max_new_tokens=4, chunk_size=16),
                             keep_cache=True)
    cache = result.cache
    assert cache.get_seq_length() > 0 and cache.current_bytes > 0
    return cache


def test_reset_empties_every_layer_and_its_bytes(llama_engine):
    cache = _filled_cache(llama_engine, budget=16)
    cache.reset()
    assert cache.get_seq_length() == 0
    assert all(layer.get_seq_length() == 0 and not layer.is_initialized for layer in cache.layers)
    assert cache.current_bytes == 0 and sum(cache.bytes_per_layer()) == 0
    assert cache.kept_per_layer() == [0] * len(cache.layers)


@pytest.mark.parametrize("call", [lambda c: c.crop(-1), lambda c: c.batch_repeat_interleave(2),
                                  lambda c: c.batch_select_indices(__import__("torch").tensor([0])),
                                  lambda c: c.layers[0].reorder_cache(None), lambda c: c.layers[0].offload()])
def test_what_a_policy_cache_cannot_do_says_why(llama_engine, call):
    cache = _filled_cache(llama_engine, "window", budget=16)
    with pytest.raises(NotImplementedError, match="PolicyCache"):
        call(cache)


@pytest.mark.parametrize("storage, store", [({}, "FpStore"), ({"codec": "int8"}, "QuantizedStore"),
                                            ({"merge": "minicache"}, "LinkedStore")], ids=["fp", "int8", "minicache"])
def test_every_layer_stores_through_the_public_store_contract(llama_engine, storage, store):
    cache = _filled_cache(llama_engine, budget=16, **({"storage": storage} if storage else {}))
    assert all(isinstance(layer.store, LayerStore) for layer in cache.layers)
    assert store in {type(layer.store).__name__ for layer in cache.layers}
    errors = cache.codec_error()  # asked of every store, measured or not
    assert set(errors) == {"key", "value"}


def test_a_store_missing_part_of_the_contract_cannot_be_made():
    class KeysOnly(LayerStore):
        def keys(self):
            return None

    with pytest.raises(TypeError, match="abstract"):
        KeysOnly(None)
