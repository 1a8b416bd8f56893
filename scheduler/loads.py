"""Load bookkeeping: the planner's hands on the pool, every load and unload counted.

The pool (:class:`~mlink.scheduler.pool.ModelPool`) is the only thing that loads or unloads;
:class:`LoadBook` is how the planner asks it to, one model at a time, and keeps count.

Costs and the budget
--------------------
Costs are the pool's measurements (peak across load + warm-up at the serving batch, the largest
of the last three loads). The same model measures a little differently from load to load (up to
~20% on the CPU meter, much less under NVML), so selection charges each cost plus
``cost_margin`` (default 10%; or the spread of the model's last five measurements when that is
larger, up to 50%: :meth:`LoadBook.margin`), and profiling makes room for a model's cost plus
that margin (capped at the whole budget) before loading it: the pool's admission check then
holds for the load as measured, not only for the last figure.

Once per period
---------------
Loads and unloads are counted per model per period (from the pool's own records of completed
operations) and kept to at most one of each: within a period, a model that was loaded and
unloaded again cannot be chosen for loading (it is *spent*, deferred to the next period; it can
only happen when the budget forced it out during profiling), and a model that was unloaded and
loaded again is kept (*pinned in*). To make room, models the next plan is unlikely to need
(not :attr:`LoadBook.likely`) are unloaded first, those loaded only for profiling before those
that were already serving, the largest first.
"""

from __future__ import annotations

import logging
import math
from collections import Counter
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

from mlink.links import TupleSet
from mlink.scheduler.plans import PeriodReport
from mlink.scheduler.pool import ModelPool
from mlink.scheduler.pool_records import ApplyReport, BudgetExceeded, ModelNotLoaded, ModelPinned
from mlink.scheduler.profiler import Frame, profile

log = logging.getLogger(__name__)


class LoadBook:
    """Loads and unloads through ``pool`` for the models of ``universe``, counted per period.

    ``report``: the period report that profiling evictions and the charged peak are written to.
    """

    def __init__(self, pool: ModelPool, universe: Sequence[str], cost_margin: float = 0.1) -> None:
        self.pool = pool
        self.universe = tuple(universe)
        self.cost_margin = cost_margin
        self.loads: Counter[str] = Counter()  # completed loads per model in this period
        self.unloads: Counter[str] = Counter()
        self.loaded_in_period: set[str] = set()
        self.likely: frozenset[str] = frozenset()  # models the next plan probably keeps
        self.peak_charged = 0  # the pool's charged bytes, highest seen after any load
        self.report: PeriodReport | None = None

    def new_period(self) -> None:
        """Forget the counts: a new period (or serving after period 0's measuring loads)."""
        self.loads.clear()
        self.unloads.clear()
        self.loaded_in_period.clear()

    def counts(self) -> tuple[dict[str, int], dict[str, int]]:
        """(loads, unloads) per model of the universe in this period."""
        return {m: self.loads[m] for m in self.universe}, {m: self.unloads[m] for m in self.universe}

    # -- counting --------------------------------------------------------------------------
    def note_charged(self) -> None:
        charged = int(self.pool.charged())
        self.peak_charged = max(self.peak_charged, charged)
        if self.report is not None:
            self.report.peak_charged = max(self.report.peak_charged, charged)

    def _count_load(self, name: str) -> None:
        self.loads[name] += 1
        self.loaded_in_period.add(name)
        self.note_charged()

    def unload(self, name: str, reason: str) -> bool:
        """Unload ``name`` (counted); False when in-flight work kept it pinned."""
        try:
            rec = self.pool.unload(name, reason=reason)
        except ModelPinned as exc:
            log.warning("planner: %s", exc)
            return False
        if rec is not None:
            self.unloads[name] += 1
        return True

    def apply(self, target: Iterable[str], reason: str) -> ApplyReport:
        """:meth:`ModelPool.apply`, its completed loads and unloads counted."""
        rep = self.pool.apply(frozenset(target), reason=reason)
        for m in rep.unloaded:
            self.unloads[m] += 1
        for m in rep.loaded:
            self._count_load(m)
        return rep

    # -- once per period -------------------------------------------------------------------
    def spent(self) -> set[str]:
        """Models that may not be loaded again this period (loaded, then unloaded)."""
        loaded = self.pool.loaded()
        return {m for m in self.universe if self.loads[m] >= 1 and m not in loaded}

    def pinned_in(self) -> set[str]:
        """Loaded models that may not be unloaded again this period (unloaded, then loaded)."""
        loaded = self.pool.loaded()
        return {m for m in self.universe if self.unloads[m] >= 1 and m in loaded}

    def evict_order(self, protect: set[str]) -> list[str]:
        """Loaded models that may be unloaded to make room, the first to go first."""
        loaded = [m for m in self.pool.loaded() if m not in protect]
        temp = self.loaded_in_period

        def rank(m: str) -> tuple[int, int, str]:
            # (likely to be served, loaded only for this period) -> the order they go in
            group = {(False, True): 0, (False, False): 1, (True, False): 2, (True, True): 3}[
                (m in self.likely, m in temp)
            ]
            return (group, -(self.pool.cost(m) or 0), m)

        # Never unload twice in a period: a model unloaded and reloaded stays.
        return sorted((m for m in loaded if self.unloads[m] == 0), key=rank)

    # -- costs -----------------------------------------------------------------------------
    def margin(self, name: str) -> float:
        """The share added to ``name``'s cost: ``cost_margin``, or the spread of its recent
        measurements ((max - min) / max of the last five) when that is larger, at most 50%."""
        hist = [h for h in self.pool.cost_history(name)[-5:] if h > 0]
        spread = (max(hist) - min(hist)) / max(hist) if len(hist) >= 2 else 0.0
        return min(max(self.cost_margin, spread), 0.5)

    def costs(self) -> dict[str, int]:
        """Costs as selection sees them: the pool's measured cost plus :meth:`margin`."""
        served = set(self.universe)
        return {m: math.ceil(c * (1.0 + self.margin(m))) for m, c in self.pool.costs().items() if m in served}

    # -- loading for profiling -------------------------------------------------------------
    def make_room(self, name: str, cost: int, protect: set[str], report: PeriodReport | None) -> bool:
        """Unload models (:meth:`evict_order`) until ``name``'s cost plus its margin fits."""
        # Room for the cost plus the margin (a load can measure more than last time), but
        # never more than the whole budget: a model that fits alone is always loadable.
        need = int(cost * (1.0 + self.margin(name)))
        if need > self.pool.budget:
            log.warning(
                "planner: %s costs %d B, within the budget of %d B only without its margin: its peak may pass the budget",
                name,
                cost,
                self.pool.budget,
            )
            need = self.pool.budget
        while self.pool.charged() + need > self.pool.budget:
            order = self.evict_order(protect)
            if not order:
                return False
            victim = order[0]
            if self.unload(victim, "profile"):
                if report is not None:
                    report.evicted.append(victim)
            else:
                protect = protect | {victim}
        return True

    def measure_unknown(self, report: PeriodReport, unload: bool) -> None:
        """Load the models whose cost is still unknown (measured); unloaded after with ``unload``."""
        for m in self.universe:
            if self.pool.cost(m) is None and self.pool.unavailable_reason(m) is None and m not in report.skipped:
                why = self.ensure_loaded(m, report)
                if why is not None:
                    report.skipped[m] = why
                elif unload:
                    self.unload(m, "measure")

    def ensure_loaded(self, name: str, report: PeriodReport | None) -> str | None:
        """Load ``name`` for profiling within the budget; None when loaded, else why not."""
        if self.pool.is_loaded(name):
            return None
        why = self.pool.unavailable_reason(name)
        if why is not None:
            return f"unavailable: {why}"
        if name in self.spent():
            return "already loaded and unloaded this period"
        for attempt in range(2):
            cost = self.pool.cost(name) or 0
            if cost > self.pool.budget:
                return f"its cost {cost} B exceeds the budget {self.pool.budget} B on its own"
            if not self.make_room(name, cost, {name}, report):
                return f"no room: {cost} B needed, {self.pool.charged()} B charged by models that cannot be unloaded, budget {self.pool.budget} B"
            try:
                if self.pool.load(name):
                    self._count_load(name)
                    return None
                return f"load failed: {self.pool.unavailable_reason(name)}"
            except BudgetExceeded as exc:
                # Its cost grew (measured): the pool recorded it; make room for it and retry once.
                log.info("planner: %s", exc)
                if attempt == 1:
                    return str(exc)
        return "refused"

    @contextmanager
    def _use_loaded(self, name: str) -> Iterator[Any]:
        with self.pool.pin(name) as model:
            yield model

    def profile(
        self,
        frames: Iterable[Frame],
        order: Sequence[str],
        served: Mapping[str, Sequence[str]],
        report: PeriodReport,
        *,
        batch_size: int,
        keep: bool = True,
    ) -> dict[str, TupleSet]:
        """Run ``frames`` (read once per model) through each model of ``order``, one after another, loaded within the
        budget (models that cannot be are reported in ``report.skipped``); unloaded after each
        unless ``keep``."""
        parts: dict[str, TupleSet] = {}
        for name in order:
            why = self.ensure_loaded(name, report)
            if why is not None:
                report.skipped[name] = why
                continue
            try:
                parts[name] = profile(
                    frames, {name: served[name]}, self._use_loaded, batch_size=batch_size, progress=False
                )
                report.profiled.append(name)
            except ModelNotLoaded as exc:
                report.skipped[name] = str(exc)
            except Exception as exc:  # the model failed on these frames: it cannot be profiled now
                log.warning("planner: profiling %s failed: %s", name, exc)
                report.skipped[name] = f"{type(exc).__name__}: {exc}"
            if not keep:
                self.unload(name, "profile")
        return parts
