"""Periods beside serving: a planner's re-profiling, fine-tuning and re-measuring in a worker thread.

Inline (:meth:`Planner.run_period <mlink.scheduler.planner.Planner.run_period>` inside the
pipeline's step), a period stops serving for as long as it lasts: nothing is served while every
model profiles the buffered frames and the links fine-tune, so the cameras' queues overflow and
drop frames. :class:`PeriodWorker` splits it (:mod:`~mlink.scheduler.period_job`):

- the pipeline thread calls :meth:`PeriodWorker.poll` between two batches. When a period is due
  it *begins* it (takes the buffered frames, copies the links) and starts the worker; when the
  worker is done it *applies* it (swaps in the new links and accuracies, re-selects, loads and
  unloads) before the next batch; a new plan is then visible to whoever looks at
  ``planner.plan`` (the daemon's hybrid rotation, its snapshots);
- the worker thread *profiles* (each model on the buffered frames: the pool's
  :class:`~mlink.scheduler.model_calls.CallLock` makes its calls and serving's take turns per
  batch), *learns* on the copy (serving keeps predicting with the old links), warms the new
  accuracies, and *stages* (:func:`stage`): loads back what profiling unloaded and what the next
  plan likely needs, where it fits, so that applying loads as little as possible.

Memory: a model the period must profile is loaded through the pool like any other, so the pool's
admission check holds at every instant (``charged + cost <= budget``; the pool's ``high_water``
records the highest it reached). To make room the worker unloads models as the inline period
does (the ones the next plan is unlikely to need first; serving models last), rather than
reserving room in the selection all the time: a reserve as large as the dearest model left out
would cost the plan a model for the whole hour to spare a few seconds of profiling, and skipping
models that do not fit beside the serving set would leave exactly the predicted models, whose
links most need checking, never profiled. While a serving model is out, its outputs are served
predicted (:func:`~mlink.scheduler.serving.serve` falls back for a missing model): every frame is
still served. :func:`stage` loads it back before the period is applied.

``background=False`` runs the period inline (the same steps, in the pipeline thread): where the
order of events must be reproducible (``scheduler.period_worker: false``).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Mapping
from typing import Any

from mlink.scheduler.period_job import PeriodJob, learn
from mlink.scheduler.planner import Planner
from mlink.scheduler.plans import PeriodReport

log = logging.getLogger(__name__)

Counts = Callable[[], Mapping[str, int]]


def stage(planner: Planner, job: PeriodJob) -> None:
    """Worker, after learning: load back the serving models that profiling unloaded, then the
    likely next plan's, each where it fits once models nobody needs are unloaded (never the
    serving ones), so that :meth:`Planner.finish_period` loads little on the pipeline thread."""
    plan, pool, book = planner.plan, planner.pool, planner.book
    if plan is None or job.accuracy is None:
        return
    likely = planner._select(job.accuracy).active
    keep = set(plan.active) | set(likely)
    for m in sorted(plan.active) + sorted(set(likely) - set(plan.active)):
        if job.cancel.is_set() or pool.is_loaded(m) or m in book.spent() or pool.unavailable_reason(m) is not None:
            continue
        if book.make_room(m, pool.cost(m) or 0, keep, None):
            why = book.ensure_loaded(m, job.report)
            if why is not None:
                log.info("period %d: %s not staged: %s", job.report.period, m, why)


class PeriodWorker:
    """Runs ``planner``'s periods beside serving (module docstring); :meth:`poll` from the pipeline.

    ``counts()``: the caller's running totals (e.g. ``{"served": ..., "dropped": ...}``); each
    period's :attr:`runs` entry says how much each grew between the period's start and its
    apply. ``hold``: cleared, a finished period waits before it is applied (a test, or an
    operator, can look at serving meanwhile); set by default.
    """

    def __init__(self, planner: Planner, *, background: bool = True, counts: Counts | None = None) -> None:
        self.planner = planner
        self.background = background
        self.counts = counts
        self.hold = threading.Event()
        self.hold.set()
        self.started = threading.Event()  # set while a period is in flight (begun, not applied)
        self.worked = threading.Event()  # ... and its worker's part is done (it may wait on hold)
        self.at_start: dict[str, int] = {}  # counts() when the period in flight began
        self.runs: list[dict[str, Any]] = []  # the last 50 periods: mode, seconds, growth of counts
        self._job: PeriodJob | None = None
        self._done = threading.Event()
        self._thread: threading.Thread | None = None
        self._t0 = 0.0

    @property
    def busy(self) -> bool:
        """A period is in flight (begun, not yet applied)."""
        return self._job is not None

    def poll(self, now: float | None = None) -> PeriodReport | None:
        """Between two batches (the pipeline thread): apply a finished period, or start a due
        one; the applied period's report (inline: the period that ran), else None."""
        if self._job is not None:
            return self._apply() if self._done.is_set() else None
        if not self.planner.period_due(now):
            return None
        self._mark()
        if not self.background:
            report = self.planner.run_period(now)
            self._record(report, "inline")
            return report
        job = self._job = self.planner.begin_period(now, copy_links=True)
        self._done.clear()
        self.worked.clear()
        self.started.set()
        self._thread = threading.Thread(target=self._work, args=(job,), name="mlink-period", daemon=True)
        self._thread.start()
        return None

    def _work(self, job: PeriodJob) -> None:
        planner = self.planner
        try:
            planner.profile_period(job)
            heldout = len(planner.heldout) if planner.heldout is not None else 0
            learn(job, planner.served, planner.options, heldout, warm=True)
            stage(planner, job)
        except Exception as exc:  # the period's problem must not stop serving: apply what is known
            log.exception("period %d failed in the worker", job.report.period)
            job.error = f"{type(exc).__name__}: {exc}"
            job.accuracy = None  # keep the old links and figures
        finally:
            self.worked.set()
            self.hold.wait()
            self._done.set()

    def _apply(self) -> PeriodReport:
        job, self._job = self._job, None
        assert job is not None
        report = self.planner.finish_period(job, now=self.planner.clock())
        if job.error:
            report.fine_tune_note = f"period failed in the worker: {job.error}"
        self._record(report, "worker")
        self.started.clear()
        self.worked.clear()
        return report

    def _mark(self) -> None:
        self._t0 = time.monotonic()
        self.at_start = dict(self.counts()) if self.counts is not None else {}

    def _record(self, report: PeriodReport, mode: str) -> None:
        after = dict(self.counts()) if self.counts is not None else {}
        grown = {k: after.get(k, 0) - v for k, v in self.at_start.items()}
        self.runs.append(
            {"period": report.period, "mode": mode, "seconds": time.monotonic() - self._t0, "during": grown}
        )
        del self.runs[:-50]

    def wait(self, timeout: float | None = None) -> bool:
        """Wait for the worker's part of a period in flight (True when none is left running)."""
        thread = self._thread
        if thread is not None:
            thread.join(timeout)
        return thread is None or not thread.is_alive()

    def close(self, timeout: float = 600.0) -> None:
        """Stop (a reload, a shutdown): the period in flight stops between two models and is not
        applied; waits for the worker so nothing else loads through the pool meanwhile."""
        job = self._job
        if job is not None:
            job.cancel.set()
            self.hold.set()
            if not self.wait(timeout):
                log.warning("period %d: the worker did not stop within %.0f s", job.report.period, timeout)
            self.planner.job = None
        self._job = None
        self.started.clear()
