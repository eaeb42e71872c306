"""Model specs: tiny models, local folders, the HF cache, devices, dtypes and quantization."""

from __future__ import annotations

import pytest
import torch

from kvstudio.core.runtime.engine import Engine, GenerationSettings
from kvstudio.core.errors import ModelLoadError
from kvstudio.core.models.loading import load_model
from kvstudio.core.models.tiny import TINY_FAMILIES
from kvstudio.core.spec import create_policy


def test_tiny_models_are_deterministic_and_of_their_family():
    for family in TINY_FAMILIES:
        first, second = load_model(f"tiny-{family}"), load_model(f"tiny-{family}")
        assert family.replace("2", "").replace("3", "") in first.model.config.model_type
        assert first.n_kv_heads < first.n_heads  # GQA
        for a, b in zip(first.model.parameters(), second.model.parameters()):
            assert torch.equal(a, b)


def test_local_folder_loads_and_generates_the_same(tmp_path, llama_engine):
    llama_engine.model.save_pretrained(tmp_path / "tiny")
    llama_engine.tokenizer.save_pretrained(tmp_path / "tiny")
    loaded = load_model(str(tmp_path / "tiny"))
    assert loaded.name == str(tmp_path / "tiny")
    prompt = [5, 6, 7, 8, 9]
    theirs = Engine(loaded).generate(prompt, create_policy("full"), GenerationSettings(max_new_tokens=8))
    ours = llama_engine.generate(prompt, create_policy("full"), GenerationSettings(max_new_tokens=8))
    assert theirs.token_ids == ours.token_ids


@pytest.mark.parametrize("spec, message", [
    ("tiny-gpt9", "unknown tiny model 'tiny-gpt9'"),
    ("nobody/no-such-model-xyz", "not in the Hugging Face cache"),
    ("./missing/folder", "model folder not found"),
])
def test_bad_specs_get_a_clear_message(spec, message):
    with pytest.raises(ModelLoadError, match=message):
        load_model(spec)


def test_folder_without_config_is_refused(tmp_path):
    with pytest.raises(ModelLoadError, match="no config.json"):
        load_model(str(tmp_path))


def test_hub_id_in_the_local_cache_loads_offline(tmp_path, monkeypatch, llama_engine):
    """A model laid out as the HF cache lays it out is found by its hub id, without network."""
    snapshot = tmp_path / "hub" / "models--someone--tiny-model" / "snapshots" / "abc123"
    llama_engine.model.save_pretrained(snapshot)
    llama_engine.tokenizer.save_pretrained(snapshot)
    (tmp_path / "hub" / "models--someone--tiny-model" / "refs").mkdir()
    (tmp_path / "hub" / "models--someone--tiny-model" / "refs" / "main").write_text("abc123")
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(tmp_path / "hub"))
    loaded = load_model("someone/tiny-model")
    assert loaded.n_layers == 4


def test_device_dtype_and_quantization_errors():
    with pytest.raises(ModelLoadError, match="unknown dtype"):
        load_model("tiny-llama", dtype="float8")
    with pytest.raises(ModelLoadError, match="unknown device"):
        load_model("tiny-llama", device="toaster")
    if not torch.cuda.is_available():
        with pytest.raises(ModelLoadError, match="needs a CUDA GPU"):
            load_model("tiny-llama", quantization="4bit")
        with pytest.raises(ModelLoadError, match="sees no CUDA GPU"):
            load_model("tiny-llama", device="cuda")


def test_bfloat16_on_cpu_runs():
    loaded = load_model("tiny-qwen2", dtype="bfloat16")
    assert next(loaded.model.parameters()).dtype == torch.bfloat16
    result = Engine(loaded).generate([1, 2, 3, 4], create_policy("window", budget=3),
                                     GenerationSettings(max_new_tokens=5))
    assert len(result.token_ids) == 5 and result.kept_per_layer == [3] * 4
