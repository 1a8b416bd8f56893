"""This process's memory as Linux reports it, and giving freed memory back so it can be measured.

Readers (cheap enough to sample every few milliseconds): :func:`statm` (resident and anonymous
resident bytes from ``/proc/self/statm``), :func:`rss` (RSS; psutil off Linux), the kernel's RSS
high-water mark (:func:`reset_hwm`, :func:`read_hwm`) and the cgroup's memory limit
(:func:`cgroup_limit`).

Before a baseline and after an unload, :func:`release_memory` runs ``gc.collect()``,
``malloc_trim(0)`` (glibc: hand freed heap back to the OS, or the RSS never drops) and, when
torch has initialised CUDA, ``torch.cuda.empty_cache()`` (the caching allocator keeps freed
blocks otherwise). Without these, CPU measurements are not repeatable and an unload looks sticky.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import gc
import os
import sys
from typing import Any

import psutil

# -- releasing memory -------------------------------------------------------------------------

_M_MMAP_THRESHOLD = -3  # glibc mallopt parameter


@functools.cache
def _libc() -> Any:
    """glibc through ctypes, set up once (None where there is no malloc_trim)."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        lib = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        lib.malloc_trim.argtypes = [ctypes.c_size_t]
        lib.malloc_trim.restype = ctypes.c_int
        # A fixed mmap threshold: glibc raises it dynamically after a large block is
        # freed, after which same-sized blocks come from the heap, stay resident in
        # fragments, and the same model measured 30 or 39 MB from one load to the next.
        lib.mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
        lib.mallopt(_M_MMAP_THRESHOLD, 128 * 1024)
        return lib
    except (OSError, AttributeError):  # musl and others have no malloc_trim
        return None


_M_ARENA_MAX = -8  # glibc mallopt parameter


def single_arena() -> bool:
    """One malloc arena for the whole process (a measuring child only, before its threads
    start): with one arena per thread, where a model's blocks land depends on which thread
    allocated first, and the same model measured in four fresh processes spread 5.6%
    (mobilenet_v2) and 8.0% (yolox_nano); with one arena 0.5% and 5.8%. False where there is
    no glibc."""
    lib = _libc()
    if lib is None:
        return False
    return bool(lib.mallopt(_M_ARENA_MAX, 1))


def _malloc_trim() -> bool:
    lib = _libc()
    if lib is None:
        return False
    lib.malloc_trim(0)
    return True


def torch_cuda_initialized() -> bool:
    """True when torch is imported and has initialised CUDA (never imports torch to ask)."""
    torch = sys.modules.get("torch")
    if torch is None:
        return False
    try:
        return bool(torch.cuda.is_available() and torch.cuda.is_initialized())
    except Exception:
        return False


def release_memory() -> None:
    """gc, glibc ``malloc_trim`` and torch's CUDA cache: give freed memory back so it is measurable."""
    gc.collect()
    if torch_cuda_initialized():
        import torch

        torch.cuda.synchronize()
        torch.cuda.empty_cache()
    _malloc_trim()


# -- /proc readers (Linux) ---------------------------------------------------------------------

_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def statm() -> tuple[int, int] | None:
    """(rss, anonymous rss) in bytes from /proc/self/statm (microseconds); None off Linux."""
    try:
        with open("/proc/self/statm", "rb") as f:
            fields = f.read().split()
    except OSError:
        return None
    resident, shared = int(fields[1]), int(fields[2])  # shared = RssFile + RssShmem
    return resident * _PAGE, (resident - shared) * _PAGE


def rss() -> int:
    """RSS in bytes; /proc/self/statm on Linux, psutil elsewhere."""
    st = statm()
    return st[0] if st is not None else int(psutil.Process().memory_info().rss)


def reset_hwm() -> bool:
    """Reset the kernel's RSS high-water mark (Linux >= 4.0); False where not allowed."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def read_hwm() -> int | None:
    """The RSS high-water mark (``VmHWM``) in bytes; None where it cannot be read."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def cgroup_limit() -> int | None:
    """The memory limit of this process's cgroup (v2, else v1); None when unlimited or unknown."""
    for path in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        try:
            with open(path) as f:
                raw = f.read().strip()
        except OSError:
            continue
        if raw.isdigit() and int(raw) < (1 << 60):
            return int(raw)
    return None
