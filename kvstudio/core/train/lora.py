"""LoRA (Hu et al. 2021, arXiv:2106.09685) on a loaded model with peft, and adapter folders.

peft injects its LoRA layers into the loaded model's own modules, so the engine, which calls the
loaded model, runs with the adapter without knowing about it. `attach`/`load_adapter` inject;
`detach` takes the LoRA layers out again and leaves the base model as it was.

A checkpoint folder holds what peft writes (adapter_model.safetensors, adapter_config.json), plus
`kvstudio_adapter.json` (the base model's fingerprint, so an adapter is never applied to another
model, and the session's settings) and, for resuming, `optimizer.safetensors` and `state.json`.
A session's output folder holds `step-NNNNNN/` checkpoints and `latest.json` naming the newest;
a checkpoint is written under a temporary name and renamed whole, and `latest.json` is replaced
atomically after it, so an interruption at any point leaves the previous checkpoint in use.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import warnings
import weakref
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from kvstudio.core.io.atomic import atomic_write
from kvstudio.core.errors import KVStudioError

ADAPTER_INFO = "kvstudio_adapter.json"
LATEST = "latest.json"
KEEP_CHECKPOINTS = 2  # the newest two stay, so a bad newest one still leaves one behind

# The PeftModel that injected LoRA into a given base model, to take it out again.
_attached: "weakref.WeakKeyDictionary[torch.nn.Module, object]" = weakref.WeakKeyDictionary()


class AdapterError(KVStudioError):
    """An adapter that cannot be used with this model, or LoRA settings that cannot apply."""


@dataclass
class LoraSettings:
    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    target_modules: tuple[str, ...] = ()  # empty: the attention projections the model has
    qlora: bool = False  # 4-bit base weights (bitsandbytes, CUDA): the model must be loaded in 4 bit

    def validate(self) -> None:
        if self.rank < 1:
            raise AdapterError(f"--rank must be at least 1, got {self.rank}")
        if self.alpha <= 0:
            raise AdapterError(f"--lora-alpha must be positive, got {self.alpha}")
        if not 0 <= self.dropout < 1:
            raise AdapterError(f"--lora-dropout must be in [0, 1), got {self.dropout}")


def attention_projections(model: torch.nn.Module) -> list[str]:
    """Names of the Linear layers inside attention blocks (q/k/v/o, or a fused qkv): LoRA's
    usual targets, found by looking rather than by a table per architecture."""
    names = set()
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and ("attn" in name or "attention" in name):
            names.add(name.rsplit(".", 1)[-1])
    return sorted(names)


def fingerprint(loaded) -> dict:
    """What an adapter must match: the architecture and the shapes its LoRA layers attach to."""
    config = loaded.config
    return {"name": loaded.name, "model_type": config.model_type, "n_layers": loaded.n_layers,
            "hidden_size": config.hidden_size, "n_heads": loaded.n_heads, "n_kv_heads": loaded.n_kv_heads,
            "vocab_size": config.vocab_size}


def check_qlora(loaded, settings: LoraSettings) -> None:
    if not settings.qlora:
        return
    if loaded.device.type != "cuda":
        raise AdapterError("QLoRA needs CUDA (4-bit base weights through bitsandbytes); this model is on "
                           f"{loaded.device}: train without --qlora (LoRA on full-precision weights)")
    if loaded.quantization != "4bit":
        raise AdapterError("QLoRA trains on 4-bit base weights: load the model with --quantize 4bit")


def attach(loaded, settings: LoraSettings):
    """Inject fresh LoRA layers (base weights frozen); returns the PeftModel."""
    from peft import LoraConfig, get_peft_model

    settings.validate()
    check_qlora(loaded, settings)
    detach(loaded)
    targets = list(settings.target_modules) or attention_projections(loaded.model)
    if not targets:
        raise AdapterError(f"found no attention projections in {loaded.name}: name --target-modules")
    if settings.qlora:
        from peft import prepare_model_for_kbit_training

        prepare_model_for_kbit_training(loaded.model, use_gradient_checkpointing=False)
    config = LoraConfig(r=settings.rank, lora_alpha=settings.alpha, lora_dropout=settings.dropout,
                        target_modules=targets, bias="none", task_type="CAUSAL_LM")
    try:
        with warnings.catch_warnings():  # peft asks a deprecated transformers property; not ours to fix
            warnings.simplefilter("ignore", FutureWarning)
            peft_model = get_peft_model(loaded.model, config)
    except ValueError as error:  # peft: target modules not found in the model
        raise AdapterError(f"cannot apply LoRA to {loaded.name}: {str(error).splitlines()[0]} "
                           f"(its attention projections: {', '.join(attention_projections(loaded.model))})") from error
    _attached[loaded.model] = peft_model
    return peft_model


def detach(loaded) -> None:
    """Take any LoRA layers out of the loaded model (the base weights were never changed)."""
    peft_model = _attached.pop(loaded.model, None)
    if peft_model is not None:
        peft_model.unload()
    loaded.adapter = ""
    loaded.model.eval()


def attached(loaded):
    """The PeftModel currently injected into the loaded model, or None."""
    return _attached.get(loaded.model)


def resolve(folder: str | Path) -> Path:
    """A checkpoint folder from what a user named: a checkpoint itself, or a session's output
    folder (its newest checkpoint). AdapterError when it is neither."""
    folder = Path(folder).expanduser()
    if not folder.is_dir():
        raise AdapterError(f"adapter folder not found: {folder}")
    if (folder / "adapter_config.json").is_file():
        return folder
    latest = folder / LATEST
    if latest.is_file():
        try:
            name = json.loads(latest.read_text(encoding="utf-8"))["folder"]
        except (OSError, ValueError, KeyError) as error:
            raise AdapterError(f"{latest} is unreadable ({error}); name a step-NNNNNN folder inside it") from error
        checkpoint = folder / name
        if (checkpoint / "adapter_config.json").is_file():
            return checkpoint
        raise AdapterError(f"{latest} names {name}, which holds no adapter")
    raise AdapterError(f"{folder} holds no adapter (no adapter_config.json or {LATEST}): name the folder "
                       "a fine-tune session wrote")


def read_info(checkpoint: Path) -> dict:
    path = checkpoint / ADAPTER_INFO
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise AdapterError(f"{path} is unreadable: {error}") from error


def check_matches(loaded, checkpoint: Path) -> dict:
    """The adapter's info; AdapterError when it was trained on another model."""
    info = read_info(checkpoint)
    trained_on = info.get("model")
    if trained_on:
        mine = fingerprint(loaded)
        different = [k for k in mine if k != "name" and trained_on.get(k) != mine[k]]
        if different:
            detail = ", ".join(f"{k} {trained_on.get(k)} vs {mine[k]}" for k in different)
            raise AdapterError(f"the adapter in {checkpoint} was trained on {trained_on.get('name')}, not "
                               f"{loaded.name} ({detail}): load that model, or train an adapter for this one")
    return info


def adapter_name(checkpoint: Path) -> str:
    """How runs name the adapter they used: its session folder and checkpoint ("passkey/step-000040")."""
    return f"{checkpoint.parent.name}/{checkpoint.name}"


def load_adapter(loaded, folder: str | Path, trainable: bool = False):
    """Inject a saved adapter into the loaded model; returns (PeftModel, checkpoint folder, info)."""
    from peft import PeftModel

    checkpoint = resolve(folder)
    info = check_matches(loaded, checkpoint)
    detach(loaded)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            peft_model = PeftModel.from_pretrained(loaded.model, str(checkpoint), is_trainable=trainable)
    except (RuntimeError, ValueError, KeyError, OSError) as error:  # shapes or names that do not fit
        detach(loaded)
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise AdapterError(f"the adapter in {checkpoint} does not fit {loaded.name}: {first}") from error
    _attached[loaded.model] = peft_model
    if not trainable:  # generation runs now use it: the history and summaries name it (LoadedModel.identity)
        loaded.adapter = adapter_name(checkpoint)
        loaded.model.eval()
    return peft_model, checkpoint, info


# -- checkpoints ------------------------------------------------------------------------------------


@dataclass
class Checkpoint:
    step: int
    folder: Path


def save_checkpoint(peft_model, out_dir: Path, step: int, info: dict, state: dict,
                    optimizer_tensors: dict[str, torch.Tensor] | None = None) -> Checkpoint:
    """Write step-NNNNNN/ whole under a temporary name, rename it, then point latest.json at it."""
    from safetensors.torch import save_file

    out_dir.mkdir(parents=True, exist_ok=True)
    name = f"step-{step:06d}"
    target = out_dir / name
    staging = Path(tempfile.mkdtemp(prefix=f".{name}.", suffix=".tmp", dir=out_dir))
    try:
        peft_model.save_pretrained(str(staging), safe_serialization=True)
        (staging / ADAPTER_INFO).write_text(json.dumps(info, indent=1), encoding="utf-8")
        (staging / "state.json").write_text(json.dumps(state), encoding="utf-8")
        if optimizer_tensors:
            save_file({k: v.detach().contiguous().cpu() for k, v in optimizer_tensors.items()},
                      str(staging / "optimizer.safetensors"))
        for written in staging.iterdir():  # on disk before the rename makes it visible
            with open(written, "rb") as stream:
                os.fsync(stream.fileno())
        if target.exists():  # the same step saved again (a resumed session): replace it
            shutil.rmtree(target)
        os.replace(staging, target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    atomic_write(out_dir / LATEST, lambda stream: json.dump({"step": step, "folder": name}, stream))
    _prune(out_dir, keep=name)
    return Checkpoint(step, target)


def _prune(out_dir: Path, keep: str) -> None:
    checkpoints = sorted(p for p in out_dir.glob("step-[0-9]*") if p.is_dir())
    for old in checkpoints[:-KEEP_CHECKPOINTS]:
        if old.name != keep:
            shutil.rmtree(old, ignore_errors=True)


def read_state(checkpoint: Path) -> tuple[dict, dict[str, torch.Tensor]]:
    """The session state and optimizer tensors saved with a checkpoint (for resume)."""
    from safetensors.torch import load_file

    try:
        state = json.loads((checkpoint / "state.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise AdapterError(f"{checkpoint} cannot be resumed: its state.json is missing or unreadable "
                           f"({error})") from error
    optimizer_file = checkpoint / "optimizer.safetensors"
    tensors = load_file(str(optimizer_file)) if optimizer_file.is_file() else {}
    return state, tensors


def settings_dict(settings: LoraSettings) -> dict:
    data = asdict(settings)
    data["target_modules"] = list(settings.target_modules)
    return data
