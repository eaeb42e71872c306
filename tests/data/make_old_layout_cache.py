"""Writes old_layout_int4.kvcache and old_layout_int4.json: a saved cache in the layer store's first
layout (keys of an incomplete group in a full-precision window, key groups numbered by position), as
KV Studio wrote it at commit fc38b11, before the layout that encodes the incomplete group per token.

Run at that commit (`git worktree add /tmp/old fc38b11`, then `PYTHONPATH=/tmp/old python
tests/data/make_old_layout_cache.py`): with today's code it writes today's layout instead. The JSON
holds what that code decoded from the cache (per layer: positions, keys and values) and the tokens it
continued with, so tests/test_saved_cache_layouts.py can check that today's code reads the file alike.
"""

from __future__ import annotations

import json
from pathlib import Path

from kvstudio.core.models.loading import load_model
from kvstudio.core.persist.saved_cache import load_saved_cache, policy_from_header, read_header, write_saved_cache
from kvstudio.core.recording.events import Recorder
from kvstudio.core.runtime.engine import Engine, GenerationSettings
from kvstudio.core.runtime.run_state import restore
from kvstudio.core.runtime.session import RunSession
from kvstudio.core.spec import create_policy
from kvstudio.core.storage import StorageConfig, attach

HERE = Path(__file__).resolve().parent
PROMPT = [(7 * i + 3) % 251 for i in range(29)]  # 31 tokens fed: 3 keys a layer wait in the window


def main() -> None:
    engine = Engine(load_model("tiny-llama", device="cpu", dtype="auto"))
    policy = attach(create_policy("h2o", budget=14), StorageConfig(codec="int4", group_size=4))
    settings = GenerationSettings(max_new_tokens=3, chunk_size=8, ignore_eos=True, memory_sample_hz=0)
    result = engine.generate(PROMPT, policy, settings, keep_state=True)
    path = HERE / "old_layout_int4.kvcache"
    write_saved_cache(path, result.state, engine.loaded, policy, settings)
    header = read_header(path)
    _, state, _ = load_saved_cache(path, engine.loaded, policy_from_header(header))
    run = RunSession(engine, engine.new_cache(policy_from_header(header)), Recorder())
    restore(run, state)
    held = {str(layer.layer_idx): {"positions": layer.store.positions().tolist(),
                                   "keys": layer.store.keys()[0].tolist(), "values": layer.store.values()[0].tolist(),
                                   "key_window": layer.store.window_length("key")}
            for layer in run.cache.layers}
    then = engine.generate(None, policy_from_header(header), GenerationSettings(max_new_tokens=4, chunk_size=8,
                           ignore_eos=True, memory_sample_hz=0), start=state, resume=True)
    (HERE / "old_layout_int4.json").write_text(json.dumps({"layers": held, "continued": then.token_ids}))


if __name__ == "__main__":
    main()
