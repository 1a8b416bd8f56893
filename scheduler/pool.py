"""The model pool: the one place that loads and unloads models, and keeps the budget as measured.

Client-driven load/unload races are a known failure of inference servers (Triton #3583, Ray
PR #65825); in mlink the planner tells the pool *what* should be loaded (:meth:`ModelPool.apply`)
and the pool alone does it, one operation at a time, so every load is measured on its own.

Budget accounting. The budget is the memory the pool may spend on models, in bytes above the
process's baseline (taken at construction, after the zoo's backends were imported and
:meth:`MemoryMeter.prepare` paid the process's one-time costs such as the CUDA context). What
is charged against it is, with ``accounting="measured"`` (the default on a GPU), the larger of
the loaded models' costs added up and the meter's reading above the baseline; with
``accounting="costs"`` (the default on the CPU), the costs alone: on the CPU every part of the
process (imports, frame buffers, link training) shares the meter, so its reading above the
baseline is not the models' doing. A model's cost is the *peak* delta across its load plus a
warm-up inference on a synthetic frame, measured in a child process where nothing else
allocates (:mod:`mlink.scheduler.cost_settling`), remembered and seedable from a profile.

Admission: :meth:`ModelPool.load` raises :class:`BudgetExceeded` (and loads nothing) when the
known cost plus what is charged now exceeds the budget. When the cost is unknown (or has grown)
the load is measured, and if its measured peak did not fit the model is unloaded again and the
load refused, with the measured cost recorded for the next plan. (The peak did happen, briefly:
a pool can only know an unknown cost by paying it; profile costs in isolation to avoid that.)

Pinning: in-flight inferences hold ``with pool.pin(name) as model:``. An unload of a pinned
model stops admitting new pins (they raise :class:`ModelNotLoaded`, so serving falls back to
prediction instead of starving the unload), waits up to ``pin_timeout`` seconds for the pins to
be released, and if they are not, gives up with :class:`ModelPinned` and leaves the model loaded
and pinnable again.

Failures: a load that raises (missing asset, out of memory, a broken adapter) never escapes
:meth:`load`/:meth:`apply`: the model is unloaded as far as it got, marked unavailable with the
reason (:meth:`unavailable`), logged, and ``on_failure(name, reason)`` is called (outside the
pool's locks) so the planner can re-plan without it.

Unload verification: after an unload (and :func:`release_memory`) the freed memory is compared
with what the model's load left resident (the delta after the warm-up's garbage was released;
the peak cost also holds transient activations that are gone by then); when more than
``sticky_tolerance`` of it (and more than ``sticky_floor`` bytes) did not come back, the unload
is recorded in :attr:`sticky` and logged. After a clean (not sticky) unload, the little that
stayed is taken off that load's recorded cost: it is the process's (a backend's first-use
set-up, allocator slack), and the next load will not need it again. The raw figures stay in
:attr:`load_records`.

The exceptions and records the pool raises and keeps are in :mod:`mlink.scheduler.pool_records`
(and importable from here).
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from typing import Any, Literal

import numpy as np

from mlink.scheduler.cost_settling import CostSettler, warm
from mlink.scheduler.memory import MemoryMeter
from mlink.scheduler.model_calls import CallLock, TakingTurns
from mlink.scheduler.pool_records import (
    ApplyReport,
    BudgetExceeded,
    LoadRecord,
    ModelNotLoaded,
    ModelPinned,
    UnloadRecord,
)
from mlink.scheduler.priming import synthetic_frame

log = logging.getLogger(__name__)

MiB = 1 << 20


@dataclass
class _Slot:
    model: Any = None
    loaded: bool = False
    pins: int = 0
    draining: bool = False
    resident: int = 0
    cost_index: int = -1  # this load's entry in the cost history


def _default_factory(name: str) -> Any:
    from mlink.models.catalog import create_model

    return create_model(name)


class ModelPool:
    """Loads, measures, pins and unloads models under a memory budget (see the module docstring)."""

    def __init__(
        self,
        budget: int,
        device: str = "cpu",
        meter: MemoryMeter | None = None,
        factory: Callable[[str], Any] | None = None,
        *,
        costs: Mapping[str, int] | None = None,
        on_failure: Callable[[str, str], None] | None = None,
        accounting: Literal["measured", "costs"] | None = None,
        warmup_frame: np.ndarray | None = None,
        warmup_batch: int = 1,
        pin_timeout: float = 30.0,
        sticky_tolerance: float = 0.25,
        sticky_floor: int = 8 * MiB,
        cost_window: int = 3,
        prepare: bool = True,
        models: Iterable[str] | None = None,
        isolate: bool = True,
    ) -> None:
        if budget < 0:
            raise ValueError(f"budget must be >= 0, got {budget}")
        self.budget = int(budget)
        self.device = device
        self.meter = meter if meter is not None else MemoryMeter(device)
        self.factory = factory if factory is not None else _default_factory
        self.on_failure = on_failure
        self.accounting = accounting or ("measured" if self.meter.gpu else "costs")
        self.warmup_frame = warmup_frame if warmup_frame is not None else synthetic_frame()
        # The warm-up batch should be the serving batch: activations grow with it, and the
        # cost is the peak of load + warm-up.
        self.warmup_batch = max(1, int(warmup_batch))
        self.pin_timeout = pin_timeout
        self.sticky_tolerance = sticky_tolerance
        self.sticky_floor = sticky_floor
        self.cost_window = max(1, cost_window)

        self._op_lock = threading.RLock()  # one load/unload/apply at a time
        self._cond = threading.Condition(threading.Lock())  # slots, pins, tables
        self._slots: dict[str, _Slot] = {}
        self._cost_history: dict[str, list[int]] = {}
        self.settler = CostSettler(self.meter, self.factory, device, self._record_cost, isolate, prepared=prepare)
        self._unavailable: dict[str, str] = {}
        self._pending_failures: list[tuple[str, str]] = []

        self.calls, self.high_water = CallLock(), 0  # inferences take turns; highest charged + cost of any load
        self.loads: Counter[str] = Counter()  # per model, successful loads
        self.load_failures: Counter[str] = Counter()
        self.refusals: Counter[str] = Counter()
        self.unloads: Counter[str] = Counter()  # per reason
        self.load_seconds: dict[str, list[float]] = {}
        self.load_records: list[LoadRecord] = []
        self.unload_records: list[UnloadRecord] = []
        self.sticky: list[UnloadRecord] = []

        for name, cost in (costs or {}).items():
            self._record_cost(name, int(cost))
            self.settler.seed(name, int(cost))
        if prepare:
            # Import the backends before the baseline (importing torch alone is ~370 MB of
            # process memory that no model should be charged) and pay their one-time costs.
            from mlink.models.catalog import model_info, zoo

            zoo()
            backends = None
            if models is not None:
                backends = set()
                for name in models:
                    with contextlib.suppress(Exception):  # an unknown name fails at load, with a reason
                        backends.add(model_info(name).backend)
            self.settler.backends = backends
            self.meter.prepare(backends)
        else:
            self.meter.release()
        self.baseline = self.meter.used()

    # -- queries ---------------------------------------------------------------------------
    def cost(self, name: str) -> int | None:
        """The cost estimate: the largest of the last ``cost_window`` measurements (or seed)."""
        with self._cond:
            hist = self._cost_history.get(name)
            return max(hist[-self.cost_window :]) if hist else None

    def costs(self) -> dict[str, int]:
        with self._cond:
            return {n: max(h[-self.cost_window :]) for n, h in sorted(self._cost_history.items()) if h}

    def cost_history(self, name: str) -> list[int]:
        with self._cond:
            return list(self._cost_history.get(name, []))

    def loaded(self) -> frozenset[str]:
        with self._cond:
            return frozenset(n for n, s in self._slots.items() if s.loaded)

    def is_loaded(self, name: str) -> bool:
        with self._cond:
            slot = self._slots.get(name)
            return bool(slot and slot.loaded and not slot.draining)

    def unavailable(self) -> dict[str, str]:
        """Models whose last load failed, with the reason."""
        with self._cond:
            return dict(self._unavailable)

    def unavailable_reason(self, name: str) -> str | None:
        with self._cond:
            return self._unavailable.get(name)

    def clear_unavailable(self, name: str | None = None) -> None:
        """Let :meth:`apply` try a failed model again (e.g. after its asset was installed)."""
        with self._cond:
            if name is None:
                self._unavailable.clear()
            else:
                self._unavailable.pop(name, None)

    def committed(self) -> int:
        """The loaded models' costs added up."""
        with self._cond:
            names = [n for n, s in self._slots.items() if s.loaded]
        return sum(self.cost(n) or 0 for n in names)

    def measured(self) -> int:
        """The meter's reading above the pool's baseline (may be negative after a release)."""
        return self.meter.used() - self.baseline

    def charged(self) -> int:
        """What counts against the budget now (see the module docstring)."""
        committed = self.committed()
        if self.accounting == "costs":
            return committed
        return max(committed, self.measured())

    def metrics(self) -> dict[str, Any]:
        """A snapshot for /metrics (mlink_model_loaded, _memory_bytes, _load_seconds, _unloads_total...)."""
        loaded = self.loaded()
        with self._cond:
            pins = {n: s.pins for n, s in self._slots.items() if s.pins}
            seconds = {n: list(v) for n, v in self.load_seconds.items()}
        return {
            "device": self.device,
            "source": self.meter.source,
            "budget_bytes": self.budget,
            "baseline_bytes": self.baseline,
            "charged_bytes": self.charged(),
            "committed_bytes": self.committed(),
            "loaded": sorted(loaded),
            "costs": self.costs(),
            "pins": pins,
            "loads": dict(self.loads),
            "load_failures": dict(self.load_failures),
            "refusals": dict(self.refusals),
            "unloads": dict(self.unloads),
            "load_seconds": seconds,
            "unavailable": self.unavailable(),
            "sticky": [asdict(r) for r in self.sticky],
        }

    # -- pinning ---------------------------------------------------------------------------
    @contextmanager
    def pin(self, name: str) -> Iterator[Any]:
        """Hold ``name`` loaded for the block and yield the model; raises :class:`ModelNotLoaded`."""
        with self._cond:
            slot = self._slots.get(name)
            if slot is None or not slot.loaded:
                raise ModelNotLoaded(f"model {name} is not loaded")
            if slot.draining:
                raise ModelNotLoaded(f"model {name} is being unloaded")
            slot.pins += 1
            model = slot.model
        try:
            yield TakingTurns(model, self.calls)  # its infer() holds self.calls: calls interleave per batch
        finally:
            with self._cond:
                slot.pins -= 1
                self._cond.notify_all()

    def pins(self, name: str) -> int:
        with self._cond:
            slot = self._slots.get(name)
            return slot.pins if slot else 0

    # -- loading ---------------------------------------------------------------------------
    def load(self, name: str) -> bool:
        """Load ``name`` (measured); True when loaded, False when the load failed.

        Raises :class:`BudgetExceeded` when it does not fit (nothing stays loaded). A failure
        marks the model unavailable and calls ``on_failure``; it is never raised.
        """
        try:
            with self._op_lock:
                return self._load(name)
        finally:
            self._fire_failures()

    def _load(self, name: str) -> bool:
        with self._cond:
            slot = self._slots.setdefault(name, _Slot())
            if slot.loaded:
                return True
        charged = self.charged()
        known = self.cost(name)
        if known is not None and charged + known > self.budget:
            self.refusals[name] += 1
            raise BudgetExceeded(name, known, charged, self.budget, measured=False)

        frames = [self.warmup_frame] * self.warmup_batch
        isolating = self.settler.start(name, frames) if not self.settler.known(name) else None  # beside the load
        try:
            model = slot.model = self.factory(name)
            _, m = self.meter.measure_call(lambda: warm(model, self.device, frames), probe_s=self.settler.probe_s)
        except Exception as exc:  # AssetError, ModelError, MemoryError, torch OOM, adapter bugs
            self._fail(name, slot, exc)
            return False

        cost, cost_index, flags = self.settler.settle(name, m, frames, isolating)
        self.high_water = max(self.high_water, charged + cost)  # this load's measured peak, refused or not
        self.meter.release()
        resident = self.meter.used() - m.before if m.source == self.meter.source else m.delta
        record = LoadRecord(name, cost, int(m.delta), int(resident), m.seconds, m.source, time.time(), **flags)
        with self._cond:
            self.load_records.append(record)
            self.load_seconds.setdefault(name, []).append(m.seconds)
        if charged + cost > self.budget:
            # Measured over budget: take it out again before anything else runs on it.
            self._drop(slot)
            self.refusals[name] += 1
            log.warning(
                "pool: %s measured %d B, over the budget (%d B charged, %d B budget); unloaded",
                name,
                cost,
                charged,
                self.budget,
            )
            raise BudgetExceeded(name, cost, charged, self.budget, measured=True)
        with self._cond:
            slot.loaded = True
            slot.draining = False
            slot.resident = record.resident
            slot.cost_index = cost_index
            self._unavailable.pop(name, None)
            self.loads[name] += 1
        log.info(
            "pool: loaded %s on %s: %d B peak, %d B resident, %.2f s (%s)",
            name,
            self.device,
            cost,
            m.delta,
            m.seconds,
            m.source,
        )
        return True

    def _fail(self, name: str, slot: _Slot, exc: BaseException) -> None:
        reason = f"{type(exc).__name__}: {exc}"
        try:
            self._drop(slot)
        except Exception as drop_exc:  # a half-loaded adapter may fail to unload too
            log.warning("pool: unloading %s after a failed load also failed: %s", name, drop_exc)
        with self._cond:
            slot.loaded = False
            self._unavailable[name] = reason
            self.load_failures[name] += 1
            self._pending_failures.append((name, reason))
        log.error("pool: load of %s failed, marked unavailable: %s", name, reason)

    def _drop(self, slot: _Slot) -> None:
        """Unload the adapter and drop the instance itself (a fresh one is made per load), so no
        reference a half-finished load left inside it can keep memory alive; then release."""
        model, slot.model = slot.model, None
        try:
            if model is not None and getattr(model, "loaded", True):
                model.unload()
        finally:
            del model
            self.meter.release()

    def _fire_failures(self) -> None:
        with self._cond:
            pending, self._pending_failures = self._pending_failures, []
        if self.on_failure is None:
            return
        for name, reason in pending:
            try:
                self.on_failure(name, reason)
            except Exception:  # the planner's problem must not become the pool's
                log.exception("pool: on_failure callback for %s raised", name)

    def _record_cost(self, name: str, cost: int) -> int:
        with self._cond:
            hist = self._cost_history.setdefault(name, [])
            hist.append(cost)
            return len(hist) - 1

    # -- unloading -------------------------------------------------------------------------
    def unload(self, name: str, reason: str = "plan", timeout: float | None = None) -> UnloadRecord | None:
        """Unload ``name`` once no inference pins it; None when it was not loaded.

        Waits up to ``timeout`` (default ``pin_timeout``) seconds for pins, refusing new ones
        meanwhile; then raises :class:`ModelPinned` and the model stays loaded.
        """
        with self._op_lock:
            return self._unload(name, reason, self.pin_timeout if timeout is None else timeout)

    def _unload(self, name: str, reason: str, timeout: float) -> UnloadRecord | None:
        deadline = time.monotonic() + timeout
        with self._cond:
            slot = self._slots.get(name)
            if slot is None or not slot.loaded:
                return None
            slot.draining = True
            while slot.pins > 0:
                left = deadline - time.monotonic()
                if left <= 0:
                    slot.draining = False
                    raise ModelPinned(
                        f"model {name} still pinned by {slot.pins} in-flight call(s) after {timeout:.1f} s"
                    )
                self._cond.wait(left)
        cost = self.cost(name) or 0
        resident = slot.resident
        self.meter.release()
        before = self.meter.used()
        try:
            self._drop(slot)
        finally:
            with self._cond:
                slot.loaded = False
                slot.draining = False
        after = self.meter.used()
        freed = before - after
        sticky = resident - freed > max(self.sticky_tolerance * resident, self.sticky_floor)
        record = UnloadRecord(name, reason, cost, resident, freed, sticky, time.time())
        retained = resident - freed
        with self._cond:
            hist = self._cost_history.get(name, [])
            if not sticky and retained > 0 and 0 <= slot.cost_index < len(hist):
                # What stayed after a clean unload is the process's (a backend's one-time
                # set-up, allocator slack), not the model's: the next load will not need it.
                hist[slot.cost_index] = max(hist[slot.cost_index] - retained, 0)
            slot.cost_index = -1
            self.unloads[reason] += 1
            self.unload_records.append(record)
            if sticky:
                self.sticky.append(record)
        if sticky:
            log.warning(
                "pool: unload of %s freed %d B of the %d B its load left resident; %d B stayed (sticky)",
                name,
                freed,
                resident,
                resident - freed,
            )
        else:
            log.info("pool: unloaded %s (%s): freed %d B of %d B resident", name, reason, freed, resident)
        return record

    # -- applying a plan -------------------------------------------------------------------
    def apply(self, active: Iterable[str], reason: str = "plan") -> ApplyReport:
        """Make the loaded set ``active``: unload the rest first, then load what is missing.

        At most one load and one unload per model per call. Models marked unavailable are not
        retried (see :meth:`clear_unavailable`); refusals, failures and pinned models are
        reported, never raised.
        """
        target = frozenset(active)
        report = ApplyReport(target=target)
        try:
            with self._op_lock:
                current = self.loaded()
                for name in sorted(current - target):
                    try:
                        self._unload(name, reason, self.pin_timeout)
                        report.unloaded.append(name)
                    except ModelPinned as exc:
                        report.pinned[name] = str(exc)
                report.kept = sorted(current & target)
                for name in sorted(target - current):
                    why = self.unavailable_reason(name)
                    if why is not None:
                        report.failed[name] = f"unavailable: {why}"
                        continue
                    try:
                        if self._load(name):
                            report.loaded.append(name)
                        else:
                            report.failed[name] = self.unavailable_reason(name) or "load failed"
                    except BudgetExceeded as exc:
                        report.refused[name] = str(exc)
        finally:
            self._fire_failures()
        return report

    def close(self) -> None:
        """Unload everything (reason ``shutdown``), waiting for pins as usual."""
        with self._op_lock:
            for name in sorted(self.loaded()):
                try:
                    self._unload(name, "shutdown", self.pin_timeout)
                except ModelPinned as exc:
                    log.warning("pool: %s", exc)
