"""GPU memory through NVML (``nvidia-ml-py``): this process's and the whole device's.

This process's used GPU memory comes from ``nvmlDeviceGetComputeRunningProcesses``
(``usedGpuMemory`` of the entry with our pid), with the device-level
``nvmlDeviceGetMemoryInfo().used`` as a cross-check. Inside a container NVML reports host pids,
so our pid may be missing from the list; then the device-level figure is used instead
(``source == "nvml-device"``; deltas stay right as long as nothing else on the device changes
its allocation during a measurement).
"""

from __future__ import annotations

import contextlib
import os
import re
from typing import Any


def cuda_index(device: str) -> int:
    """``"cuda"`` -> 0, ``"cuda:N"`` -> N; ValueError for anything else."""
    if device == "cuda":
        return 0
    m = re.fullmatch(r"cuda:(\d+)", device)
    if not m:
        raise ValueError(f"not a CUDA device: {device!r}")
    return int(m.group(1))


class Nvml:
    """This process's and the device's GPU memory through NVML (``nvidia-ml-py``)."""

    def __init__(self, device: str) -> None:
        import pynvml  # raises ImportError without nvidia-ml-py

        self.nv = pynvml
        pynvml.nvmlInit()  # raises NVMLError (library not found, driver not loaded, ...)
        try:
            self.handle = self._handle(cuda_index(device))
            self.pid = os.getpid()
            self.total = int(pynvml.nvmlDeviceGetMemoryInfo(self.handle).total)
        except Exception:
            pynvml.nvmlShutdown()
            raise

    def _handle(self, cuda_index: int) -> Any:
        # CUDA numbers the devices that CUDA_VISIBLE_DEVICES lets through; NVML ignores that
        # variable and numbers every device. Map cuda:N to the Nth visible entry.
        nv = self.nv
        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
        if visible is not None and visible.strip() != "":
            entries = [e.strip() for e in visible.split(",") if e.strip()]
            if cuda_index >= len(entries):
                raise RuntimeError(f"cuda:{cuda_index} is not visible (CUDA_VISIBLE_DEVICES={visible})")
            entry = entries[cuda_index]
            if entry.isdigit():
                return nv.nvmlDeviceGetHandleByIndex(int(entry))
            return nv.nvmlDeviceGetHandleByUUID(entry.encode())
        count = nv.nvmlDeviceGetCount()
        if cuda_index >= count:
            raise RuntimeError(f"cuda:{cuda_index} does not exist ({count} NVIDIA devices)")
        return nv.nvmlDeviceGetHandleByIndex(cuda_index)

    def _processes(self) -> list[Any]:
        nv = self.nv
        try:
            return list(nv.nvmlDeviceGetComputeRunningProcesses(self.handle))
        except nv.NVMLError:
            # Older drivers lack the _v3 entry point the default binding calls.
            return list(nv.nvmlDeviceGetComputeRunningProcesses_v2(self.handle))

    def _process_used(self) -> int | None:
        """usedGpuMemory of our pid; None when NVML does not list us or cannot say."""
        try:
            procs = self._processes()
        except Exception:
            return None
        mine = [p.usedGpuMemory for p in procs if int(p.pid) == self.pid]
        if not mine or any(u is None for u in mine):
            # Not listed: no CUDA context yet, or NVML reports host pids (a container), or
            # the driver cannot attribute memory per process (WDDM, some vGPU/MIG setups).
            return None
        return int(sum(mine))

    def device_used(self) -> int:
        return int(self.nv.nvmlDeviceGetMemoryInfo(self.handle).used)

    def used(self) -> tuple[int, str]:
        """(bytes, source): our pid's GPU memory ("nvml"), else the device's used memory ("nvml-device")."""
        value = self._process_used()
        if value is not None:
            return value, "nvml"
        return self.device_used(), "nvml-device"

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.nv.nvmlShutdown()
