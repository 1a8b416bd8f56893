"""The memory meter: how much memory this process uses, and what a callable costs.

A model's cost is *measured*, never read from a spec sheet: the scheduler's budget promise is
only as good as its meter. Two sources:

- **GPU** (device ``cuda``/``cuda:N`` and NVML answers): this process's used GPU memory, or the
  device's when NVML does not list our pid (:mod:`mlink.scheduler.nvml`).
- **CPU** (device ``cpu``, or NVML unavailable): this process's memory
  (:mod:`mlink.scheduler.procmem`). Default source ``"anon"``: resident anonymous memory (RSS
  minus file-backed and shared-memory pages, from ``/proc/self/statm``), where model weights,
  activations and runtime buffers live. Also ``"uss"`` (psutil's unique set size) and
  ``"rss"``. Why not USS by default: USS counts a library page as ours only while no other
  process maps it, so it jumps by tens to hundreds of MB when another process starts or stops
  using torch (measured on a shared host: -50 MB and +386 MB across one load/unload). RSS
  counts the library code pages a first call pulls in (about 30 MB for a first torchvision
  model) which are file cache, not model memory. Anonymous RSS moved by less than 0.2 MB across
  repeated load/unload cycles.

``measure(fn)`` reports the delta across a call *and its peak*: a background thread samples the
usage every few milliseconds (``statm`` costs microseconds; a USS read walks the whole address
space, about 10 ms with torch imported, too slow to sample, so with ``"uss"`` the sampler reads
RSS). The kernel's RSS high-water mark (``VmHWM``, reset through ``/proc/self/clear_refs``) is
read at the end and catches peaks between samples; for ``"anon"`` the file pages the call added
are subtracted from it. The peak delta is the largest of these. On CUDA the peak also includes
torch's ``max_memory_reserved`` delta (the caching allocator's peak), which sampling can miss.

:meth:`MemoryMeter.release` gives freed memory back before a baseline and after an unload
(:func:`~mlink.scheduler.procmem.release_memory`); :meth:`MemoryMeter.prepare` pays the
process's one-time costs first (:mod:`mlink.scheduler.priming`).

Other threads. Every figure is process-wide, so another thread allocating during ``measure``
is charged to the call (a model measured under camera ingest read up to 2x its idle cost).
Two defences, both reported in the :class:`Measurement`: ``measure_call(..., probe_s=...)``
watches the usage for a moment before and after the call, while this thread does nothing, and
calls the measurement unstable (``stable=False``, ``noise`` = the movement seen) when it moves;
and :func:`mlink.scheduler.isolated.measure_isolated` measures a call in a child process where nothing else
runs (:mod:`mlink.scheduler.isolated`), which is what the pool plans on. The probe only catches
churn it happens to see (steady decoding moved anonymous RSS by 0 B in most 50 ms probes), so
a quiet probe is no proof of a clean figure; an isolated one is.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, TypeVar

import psutil

from mlink.scheduler import procmem
from mlink.scheduler.nvml import Nvml
from mlink.scheduler.priming import prime_backends

log = logging.getLogger(__name__)

T = TypeVar("T")


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
    noise: int = 0  # the most the usage moved while nothing was measured (probes around the call)
    stable: bool = True  # False: the probes saw other activity, so the figure may be polluted
    isolated: bool = False  # measured in a child process where nothing else ran


CPU_SOURCES = ("anon", "uss", "rss")


class MemoryMeter:
    """This process's memory on ``device``: GPU memory through NVML, else anonymous RSS/USS/RSS.

    ``source`` says which: ``"nvml"`` (our pid's GPU memory), ``"nvml-device"`` (device-level
    used memory: our pid is not visible to NVML), ``"anon"``, ``"uss"`` or ``"rss"`` (see the
    module docstring). ``prefer`` picks a CPU source (default ``"anon"`` where
    ``/proc/self/statm`` exists, else USS, else RSS) or ``"nvml"``. ``nvml_error`` keeps the
    reason a CUDA device fell back to a CPU source.
    """

    #: Movement of the usage, while nothing is measured, that a probe tolerates as noise.
    noise_floor: int = 2 << 20

    def __init__(self, device: str = "cpu", sample_interval: float = 0.002, prefer: str | None = None) -> None:
        if prefer not in (None, "nvml", *CPU_SOURCES):
            raise ValueError(f"unknown memory source {prefer!r}; use nvml, {', '.join(CPU_SOURCES)}")
        self.device = device
        self.sample_interval = sample_interval
        self.nvml_error: str | None = None
        self._nvml: Nvml | None = None
        self._proc = psutil.Process()
        if device.startswith("cuda") and prefer in (None, "nvml"):
            try:
                self._nvml = Nvml(device)
            except Exception as exc:  # ImportError, NVMLError, no such device
                self.nvml_error = f"{type(exc).__name__}: {exc}"
                log.warning(
                    "memory meter: NVML unavailable for %s (%s); measuring process memory", device, self.nvml_error
                )
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
            st = procmem.statm()
            return st[1] if st is not None else None
        if source == "uss":
            try:
                return int(self._proc.memory_full_info().uss)
            except (psutil.AccessDenied, AttributeError, NotImplementedError, OSError):
                return None
        return procmem.rss()

    def used(self) -> int:
        """Bytes this process uses now, from :attr:`source`."""
        if self._nvml is not None:
            value, source = self._nvml.used()
            self.source = source
            return value
        cpu = self._cpu_read(self.source)
        if cpu is None:  # the source went away (permissions): RSS always answers
            self.source = "rss"
            return procmem.rss()
        return cpu

    def device_used(self) -> int | None:
        """Device-level used GPU memory (every process), the NVML cross-check; None on CPU."""
        return self._nvml.device_used() if self._nvml is not None else None

    def total(self) -> int:
        """Device memory (GPU), else system memory capped by a cgroup limit."""
        if self._nvml is not None:
            return self._nvml.total
        total = int(psutil.virtual_memory().total)
        limit = procmem.cgroup_limit()
        return min(total, limit) if limit else total

    def snapshot(self) -> dict[str, Any]:
        """Process and device figures together, for logs, metrics and the GPU check."""
        snap: dict[str, Any] = {
            "device": self.device,
            "used": self.used(),
            "source": self.source,
            "total": self.total(),
        }
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
        procmem.release_memory()

    def prepare(self, backends: Iterable[str] | None = None) -> None:
        """Pay the process's one-time costs now, so they are not charged to the first model.

        ``backends``: zoo backend names such as ``"torch"``, ``"onnxruntime"`` (default: those
        already imported). On CUDA: the CUDA context, and torch's cuDNN/cuBLAS set-up when torch
        is among them; on the CPU: a tiny session of each backend (see
        :mod:`mlink.scheduler.priming`). Then :meth:`release`.
        """
        prime_backends(self.device, backends)
        self.release()

    # -- measuring -------------------------------------------------------------------------
    def measure(self, fn: Callable[[], T], release_before: bool = True) -> tuple[T, int, int]:
        """Run ``fn`` and return ``(result, delta_bytes, peak_delta_bytes)``; see :meth:`measure_call`."""
        result, m = self.measure_call(fn, release_before=release_before)
        return result, m.delta, m.peak_delta

    def measure_call(
        self, fn: Callable[[], T], release_before: bool = True, probe_s: float = 0.0
    ) -> tuple[T, Measurement]:
        """Run ``fn`` while sampling memory; the peak delta is the cost of whatever ``fn`` loaded.

        Exceptions from ``fn`` propagate (the sampler is stopped first). Allocations by other
        threads of this process during the call are charged to it too (see the module
        docstring). With ``probe_s`` > 0 the usage is watched that long before and after the
        call; movement above :attr:`noise_floor` marks the measurement unstable.
        """
        if release_before:
            self.release()
        noise = self._quiet_spread(probe_s)
        probe: _GpuProbe | _CpuProbe = _GpuProbe(self, self._nvml) if self._nvml is not None else _CpuProbe(self)
        sampler = _PeakSampler(probe.sample, probe.first, self.sample_interval)
        start = time.perf_counter()
        with sampler:
            result = fn()
        seconds = time.perf_counter() - start
        before, after, delta, peak_deltas = probe.finish(sampler.peak)
        peak_delta = max(peak_deltas)
        noise = max(noise, self._quiet_spread(probe_s))
        m = Measurement(
            before=before,
            after=after,
            peak=before + peak_delta,
            delta=delta,
            peak_delta=peak_delta,
            seconds=seconds,
            samples=sampler.count,
            source=self.source,
            parts=tuple(int(x) for x in peak_deltas),
            noise=noise,
            stable=noise <= self.noise_floor,
        )
        return result, m

    def _quiet_spread(self, seconds: float) -> int:
        """How far the usage moves over ``seconds`` while this thread only reads it (0: no probe)."""
        if seconds <= 0:
            return 0
        values = [self.used()]
        end = time.perf_counter() + seconds
        while time.perf_counter() < end:
            time.sleep(self.sample_interval)
            values.append(self.used())
        return max(values) - min(values)

    def close(self) -> None:
        if self._nvml is not None:
            self._nvml.close()
            self._nvml = None

    def __repr__(self) -> str:
        return f"MemoryMeter(device={self.device!r}, source={self.source!r})"


# -- one measurement's parts -------------------------------------------------------------------


class _PeakSampler:
    """While entered, a thread calls ``read()`` every ``interval`` seconds and keeps the largest
    of each of its two figures (``peak``, starting from ``first``) and the number of reads."""

    def __init__(self, read: Callable[[], tuple[int, int]], first: tuple[int, int], interval: float) -> None:
        self.read = read
        self.interval = interval
        self.peak = list(first)
        self.count = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="mlink-memory-sampler", daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                a, b = self.read()
            except Exception:
                return
            self.count += 1
            self.peak[0] = max(self.peak[0], a)
            self.peak[1] = max(self.peak[1], b)
            self._stop.wait(self.interval)

    def __enter__(self) -> _PeakSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join()


class _GpuProbe:
    """Baseline, samples and end figures of one measurement through NVML.

    Samples are (this process's figure, the device's used memory); a process figure is only
    comparable with a process baseline, so one read from the other source counts 0.
    """

    def __init__(self, meter: MemoryMeter, nvml: Nvml) -> None:
        self.meter = meter
        self.nvml = nvml
        self.dev_before = nvml.device_used()
        self.before, self.src_before = nvml.used()
        meter.source = self.src_before
        self.first = (self.before, self.dev_before)
        self.torch_cuda = procmem.torch_cuda_initialized()
        self.reserved_before = 0
        if self.torch_cuda:
            import torch

            self.reserved_before = int(torch.cuda.memory_reserved(meter.device))
            torch.cuda.reset_peak_memory_stats(meter.device)

    def sample(self) -> tuple[int, int]:
        value, src = self.nvml.used()
        return (value if src == self.src_before else 0), self.nvml.device_used()

    def finish(self, peak: list[int]) -> tuple[int, int, int, list[int]]:
        """(before, after, delta, the peak estimates) once the call returned."""
        meter, nvml = self.meter, self.nvml
        if procmem.torch_cuda_initialized():
            import torch

            torch.cuda.synchronize(meter.device)
        after, src_after = nvml.used()
        dev_after = nvml.device_used()
        meter.source = src_after
        before = self.before
        if src_after == self.src_before:
            delta = after - before
            peak_deltas = [delta, peak[0] - self.first[0]]
            if self.src_before == "nvml-device":
                peak_deltas.append(peak[1] - self.first[1])
        else:
            # The source switched during the call (typically: fn created our CUDA context,
            # and only now does NVML list our pid). Only the device-level series spans it.
            before, after = self.dev_before, dev_after
            meter.source = "nvml-device"
            delta = dev_after - self.dev_before
            peak_deltas = [delta, peak[1] - self.first[1]]
        if procmem.torch_cuda_initialized():
            import torch

            # fn initialised CUDA: the allocator's whole peak is its
            reserved_before = self.reserved_before if self.torch_cuda else 0
            peak_deltas.append(int(torch.cuda.max_memory_reserved(meter.device)) - reserved_before)
        return before, after, delta, peak_deltas


class _CpuProbe:
    """Baseline, samples and end figures of one measurement of process memory.

    Samples the fast reading of the meter's source (anonymous RSS for ``"anon"``, RSS for
    ``"rss"`` and ``"uss"``); the kernel's RSS high-water mark, less the file pages the call
    paged in, catches peaks between samples.
    """

    def __init__(self, meter: MemoryMeter) -> None:
        self.meter = meter
        self.st0 = procmem.statm()
        self.before = meter.used()
        self.rss0 = self.st0[0] if self.st0 is not None else procmem.rss()
        # Sample what can be read fast: the source itself for anon/rss, RSS for USS.
        self.anon = meter.source == "anon"
        self.first = (self.st0[1] if self.anon and self.st0 is not None else self.rss0, 0)
        self.hwm_ok = procmem.reset_hwm()

    def sample(self) -> tuple[int, int]:
        if self.anon:
            st = procmem.statm()
            return (st[1] if st is not None else 0), 0
        return procmem.rss(), 0

    def finish(self, peak: list[int]) -> tuple[int, int, int, list[int]]:
        """(before, after, delta, the peak estimates) once the call returned."""
        hwm = procmem.read_hwm() if self.hwm_ok else None
        st0, st1 = self.st0, procmem.statm()
        after = self.meter.used()
        delta = after - self.before
        peak_deltas = [delta, peak[0] - self.first[0]]
        if hwm is not None:
            hwm_delta = hwm - self.rss0
            if self.anon and st0 is not None and st1 is not None:
                # VmHWM is an RSS peak; take out the file pages the call paged in (they stay
                # resident after it, so the end figures show how many).
                file_growth = (st1[0] - st1[1]) - (st0[0] - st0[1])
                hwm_delta -= max(file_growth, 0)
            peak_deltas.append(hwm_delta)
        return self.before, after, delta, peak_deltas
