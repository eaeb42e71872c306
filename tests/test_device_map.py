"""`--device-map`: a model spread over devices by accelerate, each cache layer on its layer's device.

This machine has one device (the CPU), so the map names a device for every module explicitly, layer
by layer, and offloads the last layer to disk: the load goes through accelerate's dispatch and its
hooks move that layer's weights in for every forward, as they move activations between GPUs, and the
engine must still compute exactly what transformers computes. Several real GPUs are checked only
where one is lent."""

from __future__ import annotations

import json

import pytest
import torch

from kvstudio.cli.dispatch import main
from kvstudio.core.errors import ModelLoadError
from kvstudio.core.evaluate.conformance import check_model
from kvstudio.core.models.loading import load_model
from kvstudio.core.models.tiny import byte_tokenizer
from kvstudio.core.models.tiny_families import build_family_model
from kvstudio.core.runtime.engine import Engine


@pytest.fixture(autouse=True)
def own_cache_folder(tmp_path, monkeypatch):
    monkeypatch.setenv("KVSTUDIO_CACHE_DIR", str(tmp_path / "cache"))  # the disk offload's folder


@pytest.fixture(scope="module")
def mapped(tmp_path_factory):
    """A tiny Mistral (sliding layers) saved as a folder, and a per-layer map of every module."""
    folder = tmp_path_factory.mktemp("models") / "mistral"
    build_family_model("mistral").save_pretrained(folder)
    byte_tokenizer().save_pretrained(folder)
    # layer 3 offloaded to disk: accelerate's hooks then really move its weights in for each forward
    mapping = {"model.embed_tokens": "cpu", **{f"model.layers.{i}": "cpu" for i in range(3)}, "model.layers.3": "disk",
               "model.norm": "cpu", "model.rotary_emb": "cpu", "lm_head": "cpu"}
    path = folder.parent / "map.json"
    path.write_text(json.dumps(mapping))
    return folder, mapping, path


def test_a_mapped_model_is_computed_exactly(mapped):
    folder, mapping, _ = mapped
    loaded = load_model(str(folder), device_map=mapping)
    assert loaded.model.hf_device_map == mapping and loaded.devices == [torch.device("cpu")]
    assert type(loaded.model.model.layers[3]._hf_hook).__name__ == "AlignDevicesHook"
    result = check_model(Engine(loaded), chunk_size=5, decode_steps=3)
    assert result.exact, result.lines()


def test_run_and_check_model_take_the_map(mapped, capsys):
    folder, _, path = mapped
    assert main(["run", "--model", str(folder), "--device-map", str(path), "--policy", "h2o", "--budget", "16",
                 "--prompt", "a prompt long enough to leave the window of eight", "--max-new-tokens", "3"]) == 0
    assert main(["check-model", str(folder), "--device-map", str(path), "--decode-steps", "2"]) == 0
    assert "exact" in capsys.readouterr().out


def test_bad_maps_are_one_line(mapped, tmp_path, capsys):
    folder, _, _ = mapped
    broken = tmp_path / "broken.json"
    broken.write_text("{not json")
    listing = tmp_path / "list.json"
    listing.write_text("[1, 2]")
    for value, words in ((str(tmp_path / "missing.json"), "no such file"), (str(broken), "not a readable JSON"),
                         (str(listing), "one object mapping module names")):
        assert main(["check-model", str(folder), "--device-map", value]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and words in err[0], err
    with pytest.raises(ModelLoadError, match="tiny models are built in memory"):
        load_model("tiny-llama", device_map="auto")
