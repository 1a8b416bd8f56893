"""Measuring a call where nothing else allocates: in a fresh child process.

Why. The meter (:mod:`mlink.scheduler.memory`) reads process-wide figures, anonymous RSS on the
CPU and NVML's per-process GPU memory on CUDA, so whatever any other thread allocates during a
measurement is charged to the model being measured. On a GPU host decoding 16 cameras the
meter charged mobilenet_v2 293.6 MB instead of 148.9 MB (issue 13); on 2 CPU cores with 8
threads decoding vtest, one in-process measurement read hog_people at 1.79x and yolox_nano at
1.11-1.19x their idle figures, and mobilenet_v2 at 0.95x (a baseline read while a decoder held
frames makes it low). The noise cannot be seen from inside either: sampling anonymous RSS for
50 ms with the 8 decoders running moved 0 B on almost every probe, so "measure when it is quiet"
has nothing to go by, and repeating in process keeps meeting the same steady load.

What isolation does not remove: on the CPU the same model measured in two fresh processes
differs by up to ~7-10% (mobilenet_v2 69.4 and 64.6 MB, yolox_nano 27.1 and 30.0 MB, idle,
allocator layout), which is why a figure is measured once per process and cached.

So the figure the planner plans on is measured in a child (``spawn``: a fresh interpreter, no
thread of ours, no CUDA state inherited) that runs ``setup`` (the imports the parent paid
before its baseline), primes the same backends (:meth:`~mlink.scheduler.memory.MemoryMeter.prepare`: on CUDA the
child's own context and cuDNN/cuBLAS workspaces, which the child's baseline then excludes),
and measures ``fn(*args)`` with a :class:`~mlink.scheduler.memory.MemoryMeter` of the same
source. Only the :class:`~mlink.scheduler.memory.Measurement` comes back (``isolated=True``);
what ``fn`` returns (a loaded model) stays in the child and dies with it.

The figure depends only on what is measured, so it is cached per process, keyed by the pickled
call, device, source and backends: a model is isolated once, however many pools load it.
Limits: on CUDA where NVML cannot see our pids (``nvml-device``), the child reads device-level
memory and the parent's work still shows (the child's measurement says so through its
``source``); ``fn`` and ``args`` must pickle (module-level functions, picklable factories).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import multiprocessing
import os
import pickle
import sys
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

from mlink.scheduler.memory import CPU_SOURCES, Measurement, MemoryMeter
from mlink.scheduler.procmem import single_arena

log = logging.getLogger(__name__)

_cache: dict[str, Measurement] = {}
_cache_lock = threading.Lock()


class IsolationError(RuntimeError):
    """The child could not measure the call (it raised, died, or ran past the timeout)."""


def picklable(*objs: Any) -> bool:
    """True when every object pickles (what a spawned child needs of a call)."""
    try:
        pickle.dumps(objs)
    except Exception:
        return False
    return True


def _child_main(
    conn: Any,
    device: str,
    prefer: str | None,
    backends: list[str] | None,
    torch_threads: int | None,
    setup: Callable[[], Any] | None,
    fn: Callable[..., Any],
    args: tuple[Any, ...],
    repeats: int,
) -> None:
    """In the child: set up as the parent did, prime, measure ``fn(*args)``, send the Measurement."""
    try:
        single_arena()  # before any thread: a figure that does not depend on thread timing
        if torch_threads is not None:
            import torch

            torch.set_num_threads(torch_threads)  # per-thread arenas and scratch scale with it
        if setup is not None:
            setup()
        meter = MemoryMeter(device, prefer=prefer)
        meter.prepare(backends)
        figures = []
        for _ in range(repeats):
            result, m = meter.measure_call(lambda: fn(*args))
            figures.append(m)
            del result  # the model goes: the next round loads it afresh
            meter.release()
        # The last round: the first also pays the model's own one-time set-up in a process
        # (seen: hog_people 4.3 then 3.5 MB, mobilenet_v2 73.1 then 70.7 MB), which a pool
        # that loads it again does not pay again.
        conn.send(("ok", dataclasses.replace(figures[-1], isolated=True)))
        meter.close()
    except BaseException as exc:  # everything goes back as a reason
        conn.send(("error", f"{type(exc).__name__}: {exc}"))
    finally:
        conn.close()


def measure_in_child(
    device: str,
    fn: Callable[..., Any],
    args: Sequence[Any] = (),
    *,
    prefer: str | None = None,
    backends: Iterable[str] | None = None,
    setup: Callable[[], Any] | None = None,
    timeout: float = 600.0,
    cache: bool = True,
    repeats: int = 2,
    stored: StoredFigures | None = None,
) -> Measurement:
    """Measure ``fn(*args)`` in a spawned child that does nothing else; see the module docstring.

    ``prefer``: the meter source (the parent meter's CPU source; None/"nvml" on CUDA).
    ``backends`` are primed in the child before its baseline (default: those ``setup`` imported).
    The child runs the call ``repeats`` times (dropping what it returned and releasing in
    between) and reports the last round. Raises :class:`IsolationError` when the child fails
    or takes longer than ``timeout`` s. ``stored``: figures kept on disk from earlier starts
    (looked up first, written after a measurement).
    """
    if stored is not None and (hit := stored.get()) is not None:
        return hit
    args = tuple(args)
    wanted = sorted(backends) if backends is not None else None
    torch_threads = None
    if "torch" in sys.modules:
        torch_threads = int(sys.modules["torch"].get_num_threads())
    try:
        blob = pickle.dumps((device, prefer, wanted, torch_threads, setup, fn, args, repeats))
    except Exception as exc:
        raise IsolationError(f"the call does not pickle, so it cannot run in a child: {exc}") from exc
    key = hashlib.sha256(blob).hexdigest()
    if cache:
        with _cache_lock:
            hit = _cache.get(key)
        if hit is not None:
            return hit
    ctx = multiprocessing.get_context("spawn")
    parent_conn, child_conn = ctx.Pipe(duplex=False)
    proc = ctx.Process(
        target=_child_main,
        args=(child_conn, device, prefer, wanted, torch_threads, setup, fn, args, max(1, repeats)),
        name="mlink-isolated-measure",
        daemon=True,
    )
    start = time.perf_counter()
    proc.start()
    child_conn.close()
    try:
        if not parent_conn.poll(timeout):
            raise IsolationError(f"no measurement from the child after {timeout:.0f} s")
        status, payload = parent_conn.recv()
    except EOFError as exc:
        raise IsolationError(f"the child died before measuring (exit code {proc.exitcode})") from exc
    finally:
        parent_conn.close()
        proc.join(5.0)
        if proc.is_alive():
            proc.kill()
            proc.join()
    if status != "ok":
        raise IsolationError(f"the child failed: {payload}")
    m: Measurement = payload
    log.info(
        "memory meter: isolated measurement on %s: %d B peak (%s, child took %.1f s)",
        device,
        m.peak_delta,
        m.source,
        time.perf_counter() - start,
    )
    if cache:
        with _cache_lock:
            _cache[key] = m
    if stored is not None:
        stored.put(m)
    return m


class StoredFigures:
    """An isolated figure kept on disk across starts, under a key that names everything it
    depends on (model, params, device, warm-up shapes, library versions; the caller builds it).

    Why: isolating costs a child process per model (about 5 s each on a CPU, more with a CUDA
    context), which a restart of the same site would pay again for the same figure. A file that
    is missing, unreadable or not a measurement is measured again, never trusted.
    """

    def __init__(self, folder: Path, key: str) -> None:
        self.path = folder / f"{hashlib.sha256(key.encode()).hexdigest()[:32]}.json"
        self.key = key

    def get(self) -> Measurement | None:
        try:
            data = json.loads(self.path.read_text())
            if data.pop("key") != self.key:
                return None
            data["parts"] = tuple(data.get("parts", ()))
            return Measurement(**data)
        except (OSError, ValueError, TypeError, KeyError):
            return None

    def put(self, m: Measurement) -> None:
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            tmp = self.path.with_suffix(f".{os.getpid()}.tmp")
            tmp.write_text(json.dumps({"key": self.key, **dataclasses.asdict(m)}))
            os.replace(tmp, self.path)
        except OSError as exc:  # a read-only home measures again next start; nothing else changes
            log.info("memory meter: isolated figure not stored (%s)", exc)


def measure_isolated(
    meter: MemoryMeter,
    fn: Callable[..., Any],
    *args: Any,
    backends: Iterable[str] | None = None,
    setup: Callable[[], Any] | None = None,
    timeout: float = 600.0,
    stored: StoredFigures | None = None,
) -> Measurement:
    """Measure ``fn(*args)`` in a child process, as ``meter`` would (same device and source).

    The child primes ``backends`` after ``setup`` (e.g. the imports this process paid before
    its baseline) so their one-time costs are not charged. See :func:`measure_in_child`.
    """
    prefer = meter.source if meter.source in CPU_SOURCES else None
    return measure_in_child(
        meter.device, fn, args, prefer=prefer, backends=backends, setup=setup, timeout=timeout, stored=stored
    )


def clear_cache() -> None:
    """Forget the isolated figures (tests; a changed model on disk)."""
    with _cache_lock:
        _cache.clear()
