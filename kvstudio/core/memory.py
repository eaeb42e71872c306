"""Memory figures a run records: the cache's exact bytes, the process, and CUDA when present."""

from __future__ import annotations

import os

import psutil
import torch

_PROCESS = psutil.Process(os.getpid())


def process_resident_bytes() -> int:
    return _PROCESS.memory_info().rss


def cuda_bytes(device: torch.device) -> tuple[int, int]:
    """(allocated, reserved) on a CUDA device; (0, 0) elsewhere."""
    if device.type != "cuda":
        return 0, 0
    return torch.cuda.memory_allocated(device), torch.cuda.memory_reserved(device)
