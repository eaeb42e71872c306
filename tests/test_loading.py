"""What the studio prepares before its window opens, so that loading its model does not stall it."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from kvstudio.core.models import loading as models


def test_a_prepared_folder_loads_with_the_tokenizer_already_parsed(tmp_path):
    loaded = models.load_model("tiny-llama")
    loaded.model.save_pretrained(tmp_path)
    loaded.tokenizer.save_pretrained(tmp_path)
    models.prepare_load(str(tmp_path))
    parsed = models._tokenizer_for(tmp_path)
    again = models.load_model(str(tmp_path))
    assert again.tokenizer is parsed  # the load reused it instead of parsing the JSON again
    assert again.tokenizer("abc")["input_ids"] == loaded.tokenizer("abc")["input_ids"]
    # A changed tokenizer file is parsed afresh.
    os.utime(tmp_path / "tokenizer.json", (1, 1))
    assert models.load_model(str(tmp_path)).tokenizer is not parsed


def test_preparing_imports_the_architecture_code_in_a_fresh_process():
    code = ("import sys\n"
            "from kvstudio.core.models.loading import prepare_load\n"
            "assert 'transformers.models.qwen2.modeling_qwen2' not in sys.modules\n"
            "prepare_load('tiny-qwen2')\n"
            "assert 'transformers.models.qwen2.modeling_qwen2' in sys.modules\n"
            "prepare_load('/no/such/folder')  # never raises: the load reports what is wrong\n")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=300)


@pytest.mark.parametrize("spec", ["/no/such/folder", "tiny-nonsense", "default"])
def test_preparing_never_raises(spec):
    models.prepare_load(spec)


def test_the_model_line_names_its_layer_kinds_when_they_are_not_all_global():
    import torch

    from kvstudio.core.models.loading import LoadedModel
    from kvstudio.core.models.tiny_families import build_family_model

    mixed = LoadedModel(build_family_model("gemma3_text"), None, "folder", "g3", torch.device("cpu"), torch.float32)
    assert "(4 layers: 3 sliding (window 8), 1 global; 4 query / 2 KV heads)" in mixed.describe()
    plain = LoadedModel(build_family_model("llama"), None, "folder", "l", torch.device("cpu"), torch.float32)
    assert "(4 layers, 4 query / 2 KV heads)" in plain.describe()
