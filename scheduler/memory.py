"""The memory meter: how much memory this process uses, and what a callable costs.

A model's cost is *measured*, never read from a spec sheet: the scheduler's budget promise is
only as good as its meter. Two sources:

- **GPU** (device ``cuda``/``cuda:N`` and NVML answers): this process's used GPU memory from
  ``nvmlDeviceGetComputeRunningProcesses`` (``usedGpuMemory`` of the entry with our pid), with
  the device-level ``nvmlDeviceGetMemoryInfo().used`` as a cross-check. Inside a container NVML
  reports host pids, so our pid may be missing from the list; then the device-level figure is
  used instead (``source == "nvml-device"``; deltas stay right as long as nothing else on the
  device changes its allocation during a measurement).
- **CPU** (device ``cpu``, or NVML unavailable): this process's memory. Default source
  ``"anon"``: resident anonymous memory (RSS minus file-backed and shared-memory pages, from
  ``/proc/self/statm``), where model weights, activations and runtime buffers live. Also
  ``"uss"`` (psutil's unique set size) and ``"rss"``. Why not USS by default: USS counts a
  library page as ours only while no other process maps it, so it jumps by tens to hundreds of
  MB when another process starts or stops using torch (measured on a shared host: -50 MB and
  +386 MB across one load/unload). RSS counts the library code pages a first call pulls in
  (about 30 MB for a first torchvision model) which are file cache, not model memory. Anonymous
  RSS moved by less than 0.2 MB across repeated load/unload cycles.

``measure(fn)`` reports the delta across a call *and its peak*: a background thread samples the
usage every few milliseconds (``statm`` costs microseconds; a USS read walks the whole address
space, about 10 ms with torch imported, too slow to sample, so with ``"uss"`` the sampler reads
RSS). The kernel's RSS high-water mark (``VmHWM``, reset through ``/proc/self/clear_refs``) is
read at the end and catches peaks between samples; for ``"anon"`` the file pages the call added
are subtracted from it. The peak delta is the largest of these. On CUDA the peak also includes
torch's ``max_memory_reserved`` delta (the caching allocator's peak), which sampling can miss.

Before a baseline and after an unload, :meth:`MemoryMeter.release` runs ``gc.collect()``,
``malloc_trim(0)`` (glibc: hand freed heap back to the OS, or the RSS never drops) and, when
torch has initialised CUDA, ``torch.cuda.empty_cache()`` (the caching allocator keeps freed
blocks otherwise). Without these, CPU measurements are not repeatable and an unload looks sticky.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
import logging
import os
import re
import sys
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterable, TypeVar

import psutil

from mlink.configs.budget import resolve_budget
from mlink.models.protobuf import field

log = logging.getLogger(__name__)

T = TypeVar("T")


# -- releasing memory -------------------------------------------------------------------------

_libc: Any = None
_libc_checked = False


_M_MMAP_THRESHOLD = -3  # glibc mallopt parameter


def _malloc_trim() -> bool:
    global _libc, _libc_checked
    if not _libc_checked:
        _libc_checked = True
        if sys.platform.startswith("linux"):
            try:
                lib = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
                lib.malloc_trim.argtypes = [ctypes.c_size_t]
                lib.malloc_trim.restype = ctypes.c_int
                # A fixed mmap threshold: glibc raises it dynamically after a large block is
                # freed, after which same-sized blocks come from the heap, stay resident in
                # fragments, and the same model measured 30 or 39 MB from one load to the next.
                lib.mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
                lib.mallopt(_M_MMAP_THRESHOLD, 128 * 1024)
                _libc = lib
            except (OSError, AttributeError):  # musl and others have no malloc_trim
                _libc = None
    if _libc is None:
        return False
    _libc.malloc_trim(0)
    return True


def _torch_cuda_initialized() -> bool:
    torch = sys.modules.get("torch")  # never import torch just to ask
    if torch is None:
        return False
    try:
        return bool(torch.cuda.is_available() and torch.cuda.is_initialized())
    except Exception:
        return False


def release_memory() -> None:
    """gc, glibc ``malloc_trim`` and torch's CUDA cache: give freed memory back so it is measurable."""
    gc.collect()
    if _torch_cuda_initialized():
        import torch

        torch.cuda.synchronize()
        torch.cuda.empty_cache()
    _malloc_trim()


def tiny_onnx_model() -> bytes:
    """A serialised ONNX model ``y = Relu(x)``, x: float[4] (opset 13), written without ``onnx``."""
    shape = field(1, field(1, 4))  # TensorShapeProto.dim { dim_value: 4 }
    typ = field(1, field(1, 1) + field(2, shape))  # TypeProto.tensor_type float
    vi_in = field(1, b"x") + field(2, typ)
    vi_out = field(1, b"y") + field(2, typ)
    node = field(1, b"x") + field(2, b"y") + field(4, b"Relu")
    graph = field(1, node) + field(2, b"prime") + field(11, vi_in) + field(12, vi_out)
    opset = field(1, b"") + field(2, 13)
    return field(1, 8) + field(8, opset) + field(7, graph)


def _prime_onnxruntime() -> None:
    import numpy as np
    import onnxruntime as ort

    session = ort.InferenceSession(tiny_onnx_model(), providers=["CPUExecutionProvider"])
    session.run(None, {"x": np.array([-1.0, 1.0, -2.0, 2.0], dtype=np.float32)})


def _prime_torch(device: str = "cpu") -> None:
    """Run a small convnet at a real input size (224x224, batch 1 and 4) on ``device``.

    The first real-size inference of a process allocates torch's intra-op thread pool, per-thread
    malloc arenas and oneDNN scratch buffers; a 64x64 toy input left part of that to be charged to
    the first real model (mobilenet_v2 measured 20% above its later loads). On CUDA the first
    convolution and matmul create the cuDNN and cuBLAS handles and workspaces: on an H100 the
    first torch model of a process was charged about 200 MiB for them, which then stayed
    resident after its unload (reported as sticky).
    """
    import torch

    net = torch.nn.Sequential(
        torch.nn.Conv2d(3, 32, 3, stride=2, padding=1),
        torch.nn.BatchNorm2d(32),
        torch.nn.ReLU6(),
        torch.nn.Conv2d(32, 32, 3, padding=1, groups=32),
        torch.nn.Conv2d(32, 64, 1),
        torch.nn.AdaptiveAvgPool2d(1),
        torch.nn.Flatten(),
        torch.nn.Linear(64, 10),
    ).eval().to(device)
    for batch in (1, 4):
        with torch.inference_mode():
            net(torch.zeros(batch, 3, 224, 224, device=device)).softmax(1)
        with torch.no_grad():
            net(torch.zeros(batch, 3, 224, 224, device=device))
    if device != "cpu":
        torch.cuda.synchronize(device)


# -- /proc helpers (Linux) ---------------------------------------------------------------------

_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def _statm() -> tuple[int, int] | None:
    """(rss, anonymous rss) in bytes from /proc/self/statm (microseconds); None off Linux."""
    try:
        with open("/proc/self/statm", "rb") as f:
            fields = f.read().split()
    except OSError:
        return None
    resident, shared = int(fields[1]), int(fields[2])  # shared = RssFile + RssShmem
    return resident * _PAGE, (resident - shared) * _PAGE


def _rss_fast() -> int:
    """RSS in bytes; /proc/self/statm on Linux, psutil elsewhere."""
    st = _statm()
    return st[0] if st is not None else int(psutil.Process().memory_info().rss)


def _reset_hwm() -> bool:
    """Reset the kernel's RSS high-water mark (Linux >= 4.0); False where not allowed."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _read_hwm() -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _cgroup_limit() -> int | None:
    for path in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        try:
            with open(path) as f:
                raw = f.read().strip()
        except OSError:
            continue
        if raw.isdigit() and int(raw) < (1 << 60):
            return int(raw)
    return None


# -- NVML --------------------------------------------------------------------------------------


def _cuda_index(device: str) -> int:
    if device == "cuda":
        return 0
    m = re.fullmatch(r"cuda:(\d+)", device)
    if not m:
        raise ValueError(f"not a CUDA device: {device!r}")
    return int(m.group(1))


class _Nvml:
    """This process's and the device's GPU memory through NVML (``nvidia-ml-py``)."""

    def __init__(self, device: str) -> None:
        import pynvml  # raises ImportError without nvidia-ml-py

        self.nv = pynvml
        pynvml.nvmlInit()  # raises NVMLError (library not found, driver not loaded, ...)
        try:
            self.handle = self._handle(_cuda_index(device))
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
        try:
            self.nv.nvmlShutdown()
        except Exception:
            pass


# -- the meter ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Measurement:
    """What :meth:`MemoryMeter.measure` saw across one call (bytes, seconds)."""

    before: int
    after: int
    peak: int  # the largest usage seen, same scale as before/after
    delta: int  # after - before
    peak_delta: int  # max(delta, peak - before, allocator/high-water peaks): the cost
    seconds: float
    samples: int
    source: str
    parts: tuple[int, ...] = ()  # the peak estimates max() chose from (end, sampled, high-water/allocator)


CPU_SOURCES = ("anon", "uss", "rss")


class MemoryMeter:
    """This process's memory on ``device``: GPU memory through NVML, else anonymous RSS/USS/RSS.

    ``source`` says which: ``"nvml"`` (our pid's GPU memory), ``"nvml-device"`` (device-level
    used memory: our pid is not visible to NVML), ``"anon"``, ``"uss"`` or ``"rss"`` (see the
    module docstring). ``prefer`` picks a CPU source (default ``"anon"`` where
    ``/proc/self/statm`` exists, else USS, else RSS) or ``"nvml"``. ``nvml_error`` keeps the
    reason a CUDA device fell back to a CPU source.
    """

    def __init__(self, device: str = "cpu", sample_interval: float = 0.002, prefer: str | None = None) -> None:
        if prefer not in (None, "nvml", *CPU_SOURCES):
            raise ValueError(f"unknown memory source {prefer!r}; use nvml, {', '.join(CPU_SOURCES)}")
        self.device = device
        self.sample_interval = sample_interval
        self.nvml_error: str | None = None
        self._nvml: _Nvml | None = None
        self._proc = psutil.Process()
        if device.startswith("cuda") and prefer in (None, "nvml"):
            try:
                self._nvml = _Nvml(device)
            except Exception as exc:  # ImportError, NVMLError, no such device
                self.nvml_error = f"{type(exc).__name__}: {exc}"
                log.warning("memory meter: NVML unavailable for %s (%s); measuring process memory", device, self.nvml_error)
        if self._nvml is not None:
            self.source = self._nvml.used()[1]
            return
        wanted = [prefer] if prefer in CPU_SOURCES else []
        for source in [*wanted, *CPU_SOURCES]:
            if self._cpu_read(source) is not None:
                self.source = source
                break

    @property
    def gpu(self) -> bool:
        return self._nvml is not None

    # -- reading ---------------------------------------------------------------------------
    def _cpu_read(self, source: str) -> int | None:
        if source == "anon":
            st = _statm()
            return st[1] if st is not None else None
        if source == "uss":
            try:
                return int(self._proc.memory_full_info().uss)
            except (psutil.AccessDenied, AttributeError, NotImplementedError, OSError):
                return None
        return _rss_fast()

    def used(self) -> int:
        """Bytes this process uses now, from :attr:`source`."""
        if self._nvml is not None:
            value, source = self._nvml.used()
            self.source = source
            return value
        value = self._cpu_read(self.source)
        if value is None:  # the source went away (permissions): RSS always answers
            self.source = "rss"
            value = _rss_fast()
        return value

    def device_used(self) -> int | None:
        """Device-level used GPU memory (every process), the NVML cross-check; None on CPU."""
        return self._nvml.device_used() if self._nvml is not None else None

    def total(self) -> int:
        """Device memory (GPU), else system memory capped by a cgroup limit."""
        if self._nvml is not None:
            return self._nvml.total
        total = int(psutil.virtual_memory().total)
        limit = _cgroup_limit()
        return min(total, limit) if limit else total

    def budget(self, spec: int | float | str, models_cost: int | None = None) -> int:
        """Bytes from a size, a share of :meth:`total` or of ``models_cost`` (see :func:`resolve_budget`)."""
        return resolve_budget(spec, self.total(), models_cost)

    def snapshot(self) -> dict[str, Any]:
        """Process and device figures together, for logs, metrics and the GPU check."""
        snap: dict[str, Any] = {"device": self.device, "used": self.used(), "source": self.source, "total": self.total()}
        if self._nvml is not None:
            snap["device_used"] = self._nvml.device_used()
            # Our process can never use more than the whole device; if it seems to, NVML's
            # per-process figure is wrong for this setup and should not be trusted.
            snap["consistent"] = snap["used"] <= snap["device_used"]
        if self.nvml_error:
            snap["nvml_error"] = self.nvml_error
        return snap

    # -- preparing and releasing -----------------------------------------------------------
    def release(self) -> None:
        """Give freed memory back (gc, malloc_trim, torch CUDA cache) before reading a baseline."""
        release_memory()

    def prepare(self, backends: Iterable[str] | None = None) -> None:
        """Pay the process's one-time costs now, so they are not charged to the first model.

        On CUDA: create the CUDA context (hundreds of MB per process) and, when torch is among
        the backends, run the small convnet there (cuDNN and cuBLAS handles and workspaces, about
        200 MiB on an H100 that the first torch model was charged otherwise). On the CPU, per backend
        (``backends``: zoo backend names such as ``"torch"``, ``"onnxruntime"``; default: those
        already imported): run a tiny torch convolution (starts the intra-op thread pool and
        oneDNN: about 30 MB that never comes back) and a tiny ONNX Runtime session (builds the
        kernel registries: about 9 MB). Without this the first model of each backend is charged
        for them, 10-40% over its later loads. Then :meth:`release`.
        """
        wanted = set(backends) if backends is not None else {b for b in ("torch", "onnxruntime") if b in sys.modules}
        if self.device.startswith("cuda"):
            try:
                import torch

                if torch.cuda.is_available():
                    torch.empty(1, device=self.device)
                    torch.cuda.synchronize(self.device)
                    if "torch" in wanted:
                        _prime_torch(self.device)
            except Exception as exc:  # no torch, or no CUDA in this torch
                log.info("memory meter: could not create a CUDA context on %s: %s", self.device, exc)
        else:
            for backend, prime in (("onnxruntime", _prime_onnxruntime), ("torch", _prime_torch)):
                if backend in wanted:
                    try:
                        prime()
                    except Exception as exc:  # not installed, or broken: the first model pays
                        log.info("memory meter: could not prime %s: %s", backend, exc)
        self.release()

    # -- measuring -------------------------------------------------------------------------
    def measure(self, fn: Callable[[], T], release_before: bool = True) -> tuple[T, int, int]:
        """Run ``fn`` and return ``(result, delta_bytes, peak_delta_bytes)``; see :meth:`measure_call`."""
        result, m = self.measure_call(fn, release_before=release_before)
        return result, m.delta, m.peak_delta

    def measure_call(self, fn: Callable[[], T], release_before: bool = True) -> tuple[T, Measurement]:
        """Run ``fn`` while sampling memory; the peak delta is the cost of whatever ``fn`` loaded.

        Exceptions from ``fn`` propagate (the sampler is stopped first). Allocations by other
        threads of this process during the call are charged to it too: the pool serialises
        loads, but concurrent inference adds noise (conservatively, upwards).
        """
        if release_before:
            self.release()
        nvml = self._nvml
        # Sampled series: on the GPU (per-process or device-level used, device-level used);
        # on the CPU the fast RSS (USS is too slow to sample, see the module docstring).
        if nvml is not None:
            dev_before = nvml.device_used()
            before, src_before = nvml.used()
            self.source = src_before
            first = (before, dev_before)
        else:
            st0 = _statm()
            before = self.used()
            rss0 = st0[0] if st0 is not None else _rss_fast()
            # Sample what can be read fast: the source itself for anon/rss, RSS for USS.
            anon = self.source == "anon"
            first = (st0[1] if anon and st0 is not None else rss0, 0)
        peak = list(first)
        count = [0]
        stop = threading.Event()

        def sample() -> tuple[int, int]:
            if nvml is not None:
                value, src = nvml.used()
                # A process figure is only comparable with a process baseline.
                return (value if src == src_before else 0), nvml.device_used()
            if anon:
                st = _statm()
                return (st[1] if st is not None else 0), 0
            return _rss_fast(), 0

        def sampler() -> None:
            while not stop.is_set():
                try:
                    a, b = sample()
                except Exception:
                    return
                count[0] += 1
                peak[0] = max(peak[0], a)
                peak[1] = max(peak[1], b)
                stop.wait(self.sample_interval)

        torch_cuda = nvml is not None and _torch_cuda_initialized()
        reserved_before = 0
        if torch_cuda:
            import torch

            reserved_before = int(torch.cuda.memory_reserved(self.device))
            torch.cuda.reset_peak_memory_stats(self.device)
        hwm_ok = nvml is None and _reset_hwm()

        thread = threading.Thread(target=sampler, name="mlink-memory-sampler", daemon=True)
        start = time.perf_counter()
        thread.start()
        try:
            result = fn()
        finally:
            stop.set()
            thread.join()
        seconds = time.perf_counter() - start

        if nvml is not None:
            if _torch_cuda_initialized():
                import torch

                torch.cuda.synchronize(self.device)
            after, src_after = nvml.used()
            dev_after = nvml.device_used()
            self.source = src_after
            if src_after == src_before:
                delta = after - before
                peak_deltas = [delta, peak[0] - first[0]]
                if src_before == "nvml-device":
                    peak_deltas.append(peak[1] - first[1])
            else:
                # The source switched during the call (typically: fn created our CUDA context,
                # and only now does NVML list our pid). Only the device-level series spans it.
                before, after = dev_before, dev_after
                self.source = "nvml-device"
                delta = dev_after - dev_before
                peak_deltas = [delta, peak[1] - first[1]]
            if _torch_cuda_initialized():
                import torch

                if not torch_cuda:
                    reserved_before = 0  # fn initialised CUDA: the allocator's whole peak is its
                peak_deltas.append(int(torch.cuda.max_memory_reserved(self.device)) - reserved_before)
        else:
            hwm = _read_hwm() if hwm_ok else None
            st1 = _statm()
            after = self.used()
            delta = after - before
            peak_deltas = [delta, peak[0] - first[0]]
            if hwm is not None:
                hwm_delta = hwm - rss0
                if anon and st0 is not None and st1 is not None:
                    # VmHWM is an RSS peak; take out the file pages the call paged in (they stay
                    # resident after it, so the end figures show how many).
                    file_growth = (st1[0] - st1[1]) - (st0[0] - st0[1])
                    hwm_delta -= max(file_growth, 0)
                peak_deltas.append(hwm_delta)
        peak_delta = max(peak_deltas)
        m = Measurement(
            before=before,
            after=after,
            peak=before + peak_delta,
            delta=delta,
            peak_delta=peak_delta,
            seconds=seconds,
            samples=count[0],
            source=self.source,
            parts=tuple(int(x) for x in peak_deltas),
        )
        return result, m

    def close(self) -> None:
        if self._nvml is not None:
            self._nvml.close()
            self._nvml = None

    def __repr__(self) -> str:
        return f"MemoryMeter(device={self.device!r}, source={self.source!r})"
