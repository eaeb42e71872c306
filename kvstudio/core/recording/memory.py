"""Memory figures a run records, and the sampler that reads them between steps.

The cache's bytes come from the cache's own tensors (exact). The rest comes from the system:
the process's resident set (psutil), and on CUDA torch's allocator (allocated, reserved, peak)
plus the whole device's used/total (NVML where it is installed, else the CUDA driver), which
includes other processes and the CUDA context torch does not count.

`MemorySampler` reads on its own thread at a fixed rate, so a long forward step (a prefill chunk
of several seconds) still shows its curve, not just the two ends.
"""

from __future__ import annotations

import os
import threading
import time
from dataclasses import dataclass
from typing import Callable

import psutil
import torch

from kvstudio.core.recording.events import MemoryEvent

_PROCESS = psutil.Process(os.getpid())
_STATM: tuple[int, int] | None = None  # (pid, descriptor of /proc/self/statm), Linux only


def process_resident_bytes() -> int:
    """The resident set, read after every step: on Linux from a /proc/self/statm kept open (2 us; psutil
    opens the file each time, 15 us), else through psutil."""
    global _STATM
    pid = os.getpid()
    if _STATM is None or _STATM[0] != pid:  # opened again in a forked child: the descriptor is the parent's file
        try:
            _STATM = (pid, os.open("/proc/self/statm", os.O_RDONLY))
        except OSError:
            _STATM = (pid, -1)
    if _STATM[1] < 0:
        return (_PROCESS if _PROCESS.pid == pid else psutil.Process(pid)).memory_info().rss
    return int(os.pread(_STATM[1], 64, 0).split()[1]) * _PAGE_BYTES


_PAGE_BYTES = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


@dataclass(frozen=True)
class SystemMemory:
    process_bytes: int  # resident set of this process
    cuda_allocated: int = 0  # torch's caching allocator: bytes in live tensors
    cuda_reserved: int = 0  # ... and bytes it holds from the driver
    cuda_peak: int = 0  # the most allocated since the run reset the peak
    device_used: int = 0  # the whole GPU, every process (0 without CUDA)
    device_total: int = 0


def read_system_memory(device: torch.device, devices: list[torch.device] | None = None) -> SystemMemory:
    """The process, and on CUDA the allocator's and the whole device's figures: summed over `devices`
    when the model is spread over several GPUs (a device map), else `device`'s."""
    process = process_resident_bytes()
    cuda = [d for d in (devices or [device]) if d.type == "cuda"]
    if not cuda:
        return SystemMemory(process)
    readings = [(torch.cuda.memory_allocated(d), torch.cuda.memory_reserved(d), torch.cuda.max_memory_allocated(d),
                 *_device_used_total(d)) for d in cuda]
    return SystemMemory(process, *(sum(column) for column in zip(*readings)))


def system_reading(device: torch.device, phase: str, source: str = "timer", step: int = 0,
                   seconds: float = 0.0) -> MemoryEvent:
    """A reading outside a run (a model load): no cache, the rest as in a run."""
    return MemoryEvent(step, seconds, time.perf_counter(), phase, source, 0, (), **vars(read_system_memory(device)))


def reset_peak(device: torch.device, devices: list[torch.device] | None = None) -> None:
    """Start a run's CUDA peak from what is allocated now (on every device the model uses)."""
    for each in devices or [device]:
        if each.type == "cuda":
            torch.cuda.reset_peak_memory_stats(each)


def _device_used_total(device: torch.device) -> tuple[int, int]:
    handle = _nvml_handle(device.index if device.index is not None else torch.cuda.current_device())
    if handle is not None:
        import pynvml

        info = pynvml.nvmlDeviceGetMemoryInfo(handle)
        return int(info.used), int(info.total)
    free, total = torch.cuda.mem_get_info(device)
    return total - free, total


_nvml_handles: dict[int, object] = {}


def _nvml_handle(index: int):
    """NVML's handle for a GPU, or None where pynvml (the nvidia-ml-py package) is not installed.
    Note: NVML counts GPUs in PCI order, CUDA by speed unless CUDA_DEVICE_ORDER=PCI_BUS_ID; with
    one GPU (or that variable set) they agree."""
    if index in _nvml_handles:
        return _nvml_handles[index]
    try:
        import pynvml

        pynvml.nvmlInit()
        handle = pynvml.nvmlDeviceGetHandleByIndex(index)
    except Exception:  # not installed, no driver, or no such device: fall back to the CUDA driver
        handle = None
    _nvml_handles[index] = handle
    return handle


class MemorySampler:
    """Calls `sample()` every `interval_s` on a daemon thread until stopped. A context manager."""

    def __init__(self, interval_s: float, sample: Callable[[], None]):
        self.interval_s = interval_s
        self.sample = sample
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="kvstudio-memory", daemon=True)
        self.failure: BaseException | None = None

    def _loop(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                self.sample()
            except Exception as error:  # a failed reading must not kill the run; keep the reason
                self.failure = error
                return

    def __enter__(self) -> "MemorySampler":
        if self.interval_s > 0:
            self._thread.start()
        return self

    def __exit__(self, *exc) -> bool:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()
        return False
