"""Layers that are not attention (Qwen3-Next's linear attention, LFM2's convolutions): transformers'
own cache layers inside a PolicyCache. The policy acts on the attention layers only, the state layers'
bytes are counted, and what cannot hold state (saved caches, merging) says so in one line."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from kvstudio.core.errors import KVStudioError, PolicyError
from kvstudio.core.figures.data import TokenMap, occupancy
from kvstudio.core.models.loading import LoadedModel
from kvstudio.core.models.tiny import byte_tokenizer
from kvstudio.core.models.tiny_families import build_family_model
from kvstudio.core.recording.events import Recorder
from kvstudio.core.runtime.engine import Engine, GenerationSettings
from kvstudio.core.runtime.layer_tensors import STATE_LAYERS_UNSAVEABLE, cache_unsaveable_reason
from kvstudio.core.spec import create_policy
from kvstudio.core.storage import StorageConfig

PROMPT = torch.randint(0, 256, (30,), generator=torch.Generator().manual_seed(2)).tolist()
SETTINGS = dict(max_new_tokens=3, chunk_size=8, ignore_eos=True)


@pytest.fixture(scope="module")
def lfm2():
    model = build_family_model("lfm2")  # layers 0 and 2: convolution state; 1 and 3: attention
    return Engine(LoadedModel(model, byte_tokenizer(), "tiny lfm2", "lfm2", torch.device("cpu"), torch.float32))


def test_the_policy_acts_on_attention_layers_and_state_bytes_are_counted(lfm2):
    assert lfm2.loaded.state_layers == (0, 2)
    recorder = Recorder(capacity=None)
    result = lfm2.generate(PROMPT, create_policy("h2o", budget=12), GenerationSettings(**SETTINGS), recorder=recorder)
    assert result.kept_per_layer[0] == result.kept_per_layer[2] == 0
    assert result.kept_per_layer[1] == result.kept_per_layer[3] == 12
    cache = lfm2.new_cache(create_policy("full"))
    assert [type(layer).__name__ for layer in cache.layers][0] == "LinearAttentionLayer"
    lfm2.generate(PROMPT, create_policy("full"), GenerationSettings(**SETTINGS), cache=cache)
    per_layer = cache.bytes_per_layer()
    state = per_layer[0]
    # a convolution state: (1, hidden, kernel) floats, whatever the prompt's length
    assert state == 64 * lfm2.model.config.conv_L_cache * 4 and per_layer[2] == state
    entries = per_layer[1]
    # keys + values, 2 KV heads of 16, fp32, for the prompt and the 2 generated tokens fed back (the 3rd is not)
    assert entries == 2 * 2 * 16 * 4 * (len(PROMPT) + 2)
    assert cache.current_bytes == sum(per_layer)
    run = recorder.all("runs")[-1]
    assert run.state_layers == (0, 2)


def test_views_say_state_layers_hold_state(lfm2):
    recorder = Recorder(capacity=None)
    lfm2.generate(PROMPT, create_policy("h2o", budget=12), GenerationSettings(**SETTINGS), recorder=recorder)
    run = recorder.all("runs")[-1]
    token_map = TokenMap.for_run(run)
    token_map.add({kind: recorder.all(kind) for kind in ("tokens", "steps", "evictions")})
    assert token_map.entry_layers == 2 and set(token_map.layers_holding()[:token_map.fed_count]) <= {0, 2}
    assert "of 2 attention layers (2 state layers absorbed it)" in token_map.describe(0)
    assert "holds recurrent or convolution state" in token_map.describe(0, layer=0)
    data = occupancy(recorder.all("runs"), recorder.all("steps"), recorder.all("memory"))
    assert np.isnan(data.budgets[0]) and data.budgets[1] == 12


def test_what_cannot_hold_state_says_so(lfm2):
    assert cache_unsaveable_reason(lfm2.new_cache(create_policy("full"))) == STATE_LAYERS_UNSAVEABLE
    result = lfm2.generate(PROMPT, create_policy("full"), GenerationSettings(**SETTINGS), keep_state=True)
    assert result.state is None  # nothing half-saved
    policy = create_policy("full")
    policy.storage = StorageConfig(merge="minicache")
    with pytest.raises(PolicyError, match="layers \\[0, 2\\] of this model hold recurrent or convolution state"):
        lfm2.new_cache(policy)


def test_cache_save_from_the_cli_refuses_in_one_line(tmp_path, capsys):
    from kvstudio.cli.dispatch import main

    folder = tmp_path / "lfm2"
    build_family_model("lfm2").save_pretrained(folder)
    byte_tokenizer().save_pretrained(folder)
    capsys.readouterr()  # the save's progress bars
    assert main(["cache", "save", str(tmp_path / "c.kvcache"), "--model", str(folder), "--prompt", "hello there",
                 "--max-new-tokens", "1"]) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if "error" in line]
    assert len(errors) == 1 and "state layers cannot be saved yet" in errors[0], errors
    assert not (tmp_path / "c.kvcache").exists()


def test_a_batch_of_a_model_with_state_layers_is_refused_in_one_line(lfm2):
    from kvstudio.core.runtime.batch import BatchRow, generate_batch

    with pytest.raises(KVStudioError, match="state layers \\(0, 2\\), which batched runs do not support yet"):
        generate_batch(lfm2, [BatchRow(PROMPT, create_policy("full")), BatchRow(PROMPT[:10], create_policy("full"))])
