"""A LoRA adapter is part of a saved cache's identity: the file names the adapter its keys and values
were computed through, and restoring it into the base model (or the base model's cache into an
adapted one) is refused in words saying what to do."""

from __future__ import annotations

import pytest

from kvstudio.core.persist.saved_cache import SavedCacheError, load_saved_cache, read_header, write_saved_cache
from kvstudio.core.runtime.engine import GenerationSettings
from kvstudio.core.spec import create_policy
from kvstudio.core.train import lora
from kvstudio.core.train.session import FinetuneSession

from .test_finetune_session import passkey_data, settings


def test_a_cache_saved_with_an_adapter_records_it_and_the_base_model_refuses_it(tmp_path, llama_engine):
    out = tmp_path / "adapter"
    FinetuneSession(llama_engine, create_policy("full"), passkey_data(llama_engine), settings(steps=1), out).run()
    policy = create_policy("window", budget=16)
    generation = GenerationSettings(max_new_tokens=3, chunk_size=8, memory_sample_hz=0)
    loaded = llama_engine.loaded
    lora.load_adapter(loaded, out)
    try:
        adapted = llama_engine.generate(list(range(5, 40)), policy, generation, keep_state=True)
        path = write_saved_cache(tmp_path / "adapted.kvcache", adapted.state, loaded, policy, generation).path
        assert read_header(path)["model"]["adapter"] == loaded.adapter == "adapter/step-000001"
        load_saved_cache(path, loaded, policy)  # the same adapter applied: restores
    finally:
        lora.detach(loaded)
    with pytest.raises(SavedCacheError, match="wrong adapter: the cache was computed with the LoRA adapter "
                                              "adapter/step-000001 applied and this model is the base model"):
        load_saved_cache(path, loaded, policy)
    base = llama_engine.generate(list(range(5, 40)), policy, generation, keep_state=True)
    base_path = write_saved_cache(tmp_path / "base.kvcache", base.state, loaded, policy, generation).path
    assert read_header(base_path)["model"]["adapter"] == ""
    lora.load_adapter(loaded, out)
    try:
        with pytest.raises(SavedCacheError, match="computed on the base model and this model has the adapter"):
            load_saved_cache(base_path, loaded, policy)
    finally:
        lora.detach(loaded)
