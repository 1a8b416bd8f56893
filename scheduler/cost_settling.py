"""Which memory figure the pool plans on for a model, given its in-process measurement.

The rules (why: :mod:`mlink.scheduler.isolated`): a model never measured is measured in a
child process beside its first load, and that isolated figure is what the pool plans on; a
later in-process figure that is quiet (its probes saw no other activity) and agrees with the
known figure within ``tolerance`` confirms it, one that does not is settled by an isolated
measurement (cached per process, so at most one child per model) and flagged. A seeded figure
(``costs=``, stored) counts as known. Without isolation (a factory that does not pickle, a
child that failed) the in-process figure is recorded as before when quiet; when it is not, a
known figure is kept and the measurement flagged.
"""

from __future__ import annotations

import json
import logging
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from mlink.scheduler.isolated import IsolationError, StoredFigures, measure_isolated, picklable
from mlink.scheduler.memory import Measurement, MemoryMeter

log = logging.getLogger(__name__)


def warm(model: Any, device: str, frames: list[np.ndarray]) -> Any:
    """Load ``model`` on ``device`` and run the warm-up batch: what a load costs."""
    model.load(device)
    model.infer(frames)
    return model


def load_and_warm(factory: Callable[[str], Any], name: str, device: str, frames: list[np.ndarray]) -> Any:
    """Create ``name`` and :func:`warm` it: what the child process measures."""
    return warm(factory(name), device, frames)


def device_name(device: str) -> str:
    """The GPU's name for a CUDA device (a figure measured on one GPU model is not another's)."""
    torch = sys.modules.get("torch")
    if not device.startswith("cuda") or torch is None:
        return ""
    try:
        return str(torch.cuda.get_device_name(torch.device(device)))
    except Exception:  # no CUDA here: the figure's key says so
        return "unavailable"


def import_zoo() -> None:
    """Import every zoo backend (what the pool does before its baseline); a child's set-up."""
    from mlink.models.catalog import zoo

    zoo()


class _Isolating:
    """An isolated measurement running in a thread (it waits on a child process); ``join()``
    gives its figure, or None when it failed or there was none to run."""

    def __init__(self, measure: Callable[[], int | None] | None) -> None:
        self.result: int | None = None
        self._thread: threading.Thread | None = None
        if measure is not None:

            def run() -> None:
                self.result = measure()

            self._thread = threading.Thread(target=run, name="mlink-isolated-cost", daemon=True)
            self._thread.start()

    def join(self) -> int | None:
        if self._thread is not None:
            self._thread.join()
        return self.result


class CostSettler:
    """Per model, the figure later loads are checked against and where it came from
    (``"isolated"``, ``"seeded"`` or ``"measured"``), and the rules of the module docstring.
    ``record(name, cost)`` appends to the pool's cost history and returns the index."""

    def __init__(
        self,
        meter: MemoryMeter,
        factory: Callable[[str], Any],
        device: str,
        record: Callable[[str, int], int],
        isolate: bool = True,
        tolerance: float = 0.05,
        timeout: float = 600.0,
        prepared: bool = True,
        probe_s: float = 0.05,
    ) -> None:
        self.meter = meter
        self.factory = factory
        self.device = device
        self.isolate = isolate
        self.tolerance = tolerance
        self.timeout = timeout
        self.probe_s = probe_s  # how long the pool watches for other activity around a load
        self.prepared = prepared  # the pool imported the zoo before its baseline: so does the child
        self.backends: set[str] | None = None  # what the child primes
        self._record = record
        self._lock = threading.Lock()
        self._stable: dict[str, int] = {}
        self._kind: dict[str, str] = {}
        self._isolation_off: str | None = None  # why isolated measurement is not used, once known

    def seed(self, name: str, cost: int) -> None:
        with self._lock:
            self._stable[name], self._kind[name] = cost, "seeded"

    def known(self, name: str) -> bool:
        with self._lock:
            return name in self._stable

    def _agrees(self, measured: int, known: int) -> bool:
        return abs(measured - known) <= max(self.tolerance * known, self.meter.noise_floor)

    def settle(
        self, name: str, m: Measurement, frames: list[np.ndarray], isolating: _Isolating | None = None
    ) -> tuple[int, int, dict[str, Any]]:
        """The cost to plan on after an in-process load measured ``m`` (see the module docstring).

        Returns (cost, its index in the cost history for an unload to correct, or -1, the
        :class:`~mlink.scheduler.pool_records.LoadRecord` fields in_process, noise, stable and
        isolated).
        """
        cost, index, stable, isolated = self._decide(name, m, frames, isolating)
        flags = {"in_process": max(int(m.peak_delta), 0), "noise": m.noise, "stable": stable, "isolated": isolated}
        return cost, index, flags

    def _decide(
        self, name: str, m: Measurement, frames: list[np.ndarray], isolating: _Isolating | None
    ) -> tuple[int, int, bool, bool]:
        """(cost, history index or -1, in-process figure stable, cost measured in isolation)."""
        measured = max(int(m.peak_delta), 0)
        with self._lock:
            known, kind = self._stable.get(name), self._kind.get(name)
        agrees = m.stable and known is not None and self._agrees(measured, known)
        if isolating is None and not agrees:
            isolating = self.start(name, frames)
        isolated = isolating.join() if isolating is not None else None
        if isolated is not None:
            stable = m.stable and self._agrees(measured, isolated)
            with self._lock:
                self._stable[name], self._kind[name] = isolated, "isolated"
            self._record(name, isolated)
            if not stable:
                why = "other activity was charged to it" if measured > isolated else "it missed part of the load"
                log.warning(
                    "pool: %s measured %d B in process (noise %d B) but %d B in isolation: the in-process "
                    "figure is not planned on (%s)",
                    name,
                    measured,
                    m.noise,
                    isolated,
                    why,
                )
            return isolated, -1, stable, True
        if agrees and kind in ("isolated", "seeded"):
            assert known is not None
            self._record(name, known)  # confirmed: keep planning on the checked figure
            return known, -1, True, kind == "isolated"
        if not m.stable and known is not None:
            log.warning(
                "pool: %s measured %d B while other allocations moved memory by %d B; keeping %d B",
                name,
                measured,
                m.noise,
                known,
            )
            return known, -1, False, False
        if m.stable:
            with self._lock:
                self._stable[name], self._kind[name] = measured, "measured"
        else:
            log.warning("pool: %s measured %d B with %d B of noise and nothing better known", name, measured, m.noise)
        return measured, self._record(name, measured), m.stable, False

    def start(self, name: str, frames: list[np.ndarray]) -> _Isolating | None:
        """Start measuring ``name`` in a child process; None when that is not possible here."""
        if not self.isolate or self._isolation_off is not None:
            return None
        if not picklable(self.factory):
            self._isolation_off = "the factory does not pickle"
            log.info("pool: costs measured in process only: %s", self._isolation_off)
            return None
        return _Isolating(lambda: self._isolated_cost(name, frames))

    def _stored(self, name: str, frames: list[np.ndarray]) -> StoredFigures | None:
        """Where ``name``'s isolated figure is kept across starts: ``<home>/costs`` of the
        factory's asset store, keyed by all it depends on; None without a home."""
        home = getattr(getattr(self.factory, "store", None), "home", None)
        if home is None:
            return None
        params = getattr(self.factory, "params", {}).get(name, {})
        versions = {
            m: getattr(sys.modules[m], "__version__", "?") for m in ("torch", "onnxruntime", "cv2") if m in sys.modules
        }
        torch = sys.modules.get("torch")
        key = json.dumps(
            {
                "model": name,
                "params": params,
                "device": self.device,
                "gpu": device_name(self.device),
                "source": self.meter.source,
                "backends": sorted(self.backends) if self.backends is not None else None,
                "warmup": [list(f.shape) for f in frames],
                "versions": versions,
                "threads": torch.get_num_threads() if torch is not None else None,
            },
            sort_keys=True,
            default=str,
        )
        return StoredFigures(Path(home) / "costs", key)

    def _isolated_cost(self, name: str, frames: list[np.ndarray]) -> int | None:
        """``name``'s cost measured in a child process (cached there), or None when it failed."""
        try:
            m = measure_isolated(
                self.meter,
                load_and_warm,
                self.factory,
                name,
                self.device,
                frames,
                backends=sorted(self.backends) if self.backends is not None else None,
                setup=import_zoo if self.prepared else None,
                timeout=self.timeout,
                stored=self._stored(name, frames),
            )
        except IsolationError as exc:
            log.warning("pool: isolated measurement of %s failed (%s); measuring in process", name, exc)
            return None
        return max(int(m.peak_delta), 0)
