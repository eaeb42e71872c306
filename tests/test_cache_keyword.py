"""KV Studio passes the cache under the name the installed transformers takes: no FutureWarning from
its own calls (transformers 5.24 deprecates `past_key_values`; 5.40 removes it, after which it would be
silently ignored and the policy would never run)."""

from __future__ import annotations

import inspect
import warnings

from kvstudio.core.runtime.cache_keyword import cache_keyword
from kvstudio.core.runtime.engine import GenerationSettings
from kvstudio.core.spec import create_policy


def test_keyword_follows_the_models_signature(llama_engine):
    parameters = inspect.signature(llama_engine.model.forward).parameters
    expected = "cache" if "cache" in parameters else "past_key_values"
    assert cache_keyword(llama_engine.model) == expected == llama_engine.cache_keyword


def test_a_run_raises_no_future_warning(llama_engine):
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        for policy in (create_policy("full"), create_policy("h2o", budget=12)):
            result = llama_engine.generate(list(range(40)), policy,
                                           GenerationSettings(max_new_tokens=4, chunk_size=16))
            assert len(result.token_ids) == 4
