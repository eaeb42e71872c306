"""Where a model runs and in what precision: devices, dtypes and bitsandbytes weight quantization."""

from __future__ import annotations

import importlib.util

import torch

from kvstudio.core.errors import ModelLoadError


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


def quantization_config(quantization: str | None, device: torch.device):
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
