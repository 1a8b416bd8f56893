"""The planner: which models to load for each period, re-profiled and re-selected periodically.

A state machine with no threads of its own: the daemon calls :meth:`Planner.initial` once and
then :meth:`Planner.on_frames` with every batch of incoming frames; each call returns the plan
to serve those frames with (and, when a period's work ran inside the call, what it did). The
pool (:class:`~mlink.scheduler.pool.ModelPool`) is the only thing that loads or unloads; the
planner tells it what to do, one model at a time, through its
:class:`~mlink.scheduler.loads.LoadBook`. Frames always come from the caller.

Where each part lives: options in :mod:`~mlink.scheduler.options`, model-level accuracies in
:mod:`~mlink.scheduler.accuracy`, plan records in :mod:`~mlink.scheduler.plans`, the selector
glue in :mod:`~mlink.scheduler.selector`, load bookkeeping and cost margins in
:mod:`~mlink.scheduler.loads`, link training and fine-tuning in :mod:`~mlink.scheduler.upkeep`.

The budget is resolved by :func:`mlink.configs.budget.resolve_site_budget`. A budget relative
to the models' cost (``"0.5x"``) is resolved once, from period 0's measurements, and then stays
fixed: a promise that drifted with every measurement would not be one.

Periods
-------
Time is cut into periods of ``scheduler.period_s``. At each period boundary the planner starts
buffering the next ``ceil(profile_share * period_s * frame rate)`` frames (the frame rate is the
site's streams' sampling rates added up; paper: 1% of an hour), at least two. When the buffer is
full (or half a period has passed with at least one frame), :meth:`Planner.run_period`:

1. **profile**: the buffered frames through **all** models, one after another
   (:func:`~mlink.scheduler.profiler.profile`, as ``mlink profile``): first the models already
   loaded (no load), then the others, each loaded through the pool within the budget, making
   room by unloading first the models the next plan is unlikely to need (a model that does not
   fit even alone is skipped and reported); likely ones last, so they are still loaded at apply;
2. **learn**: half the new tuples fine-tune the links (when ``links.fine_tune``), half join a
   sliding window of held-out tuples (the last ``eval_window``; initially the held-out set) on
   which accuracies are re-measured (a new :class:`~mlink.scheduler.accuracy.LinkAccuracy`);
3. **apply**: re-select (``scheduler.selector``) with hysteresis
   (:func:`~mlink.scheduler.selection.keep_or_switch`: ``switch_margin``, ``min_residency_s``,
   against the current plan re-evaluated) and apply the plan to the pool once.

The steps are :meth:`begin_period`, :meth:`profile_period`,
:func:`~mlink.scheduler.period_job.learn` and :meth:`finish_period` over a
:class:`~mlink.scheduler.period_job.PeriodJob`; :meth:`run_period` runs them inline, and
:class:`~mlink.scheduler.period_worker.PeriodWorker` runs the first two beside serving, on a
copy of the links, so that only the apply happens between two of the pipeline's batches.

Loads and unloads are kept to at most one of each per model per period (see
:mod:`~mlink.scheduler.loads`). Period 0 (:meth:`Planner.initial`) measures every cost; when the
budget is a share of the models' cost (``"0.5x"``) it is unknown until then, so each model is
measured alone and unloaded, and a chosen model is loaded a second time to serve.

Failures: a load that fails (missing asset, out of memory) makes the pool mark the model
unavailable and call back; the planner re-selects without it (selection's ``exclude``) and
applies again, never raising. An unavailable model's outputs are still served, predicted by
its ensembles from whatever is active. ``on_frames`` also re-plans for failures reported
between calls (a failing load from elsewhere).
"""

from __future__ import annotations

import copy
import logging
import math
import time
from collections.abc import Callable, Iterable, Sequence
from typing import Any

from mlink.configs.budget import check_holds_a_model, resolve_site_budget
from mlink.configs.schema import SiteConfig
from mlink.links import LinkSet, TupleSet
from mlink.scheduler.accuracy import LinkAccuracy
from mlink.scheduler.loads import LoadBook
from mlink.scheduler.options import PlannerOptions
from mlink.scheduler.period_job import PeriodJob, learn
from mlink.scheduler.plans import PeriodReport, Plan, Tick
from mlink.scheduler.pool import ModelPool
from mlink.scheduler.profiler import Frame, head
from mlink.scheduler.selection import Selection, evaluate, keep_or_switch
from mlink.scheduler.selector import select_models
from mlink.scheduler.serving import FrameResult, serve
from mlink.scheduler.site import site_served
from mlink.scheduler.upkeep import initial_links

log = logging.getLogger(__name__)

Clock = Callable[[], float]


class Planner:
    """Plans, re-profiles and re-selects for one site; see the module docstring.

    ``cfg``: the site (its models and what they serve). ``pool``: the only thing that loads;
    the planner owns its budget and sets it. ``links`` None: :meth:`initial` profiles
    ``profile_frames`` frames and trains links on a share of them, holding out
    ``heldout_share``. ``heldout``: tuples the links never trained on; the accuracies are
    measured on them (and later on a window of each period's new tuples). ``options``: what
    to do (:class:`PlannerOptions`; default: from ``cfg``). ``first_plan_id``: a daemon that
    replaces its planner keeps plan ids unique.
    """

    def __init__(
        self,
        cfg: SiteConfig,
        pool: ModelPool,
        links: LinkSet | None = None,
        heldout: TupleSet | None = None,
        *,
        options: PlannerOptions | None = None,
        clock: Clock = time.time,
        first_plan_id: int = 1,
    ) -> None:
        self.cfg = cfg
        self.options = options if options is not None else PlannerOptions.from_site(cfg)
        self.pool = pool
        self.links = links
        self.heldout = heldout
        self.clock = clock
        self.served = site_served(cfg)
        self.universe = tuple(self.served)
        self.book = LoadBook(pool, self.universe, self.options.cost_margin)
        self.budget: int = int(pool.budget)
        self.plan: Plan | None = None
        self.accuracy = LinkAccuracy(links, heldout, self.served)
        self.eval_tuples: TupleSet | None = heldout
        self.profiled: TupleSet | None = None  # the initial phase's profile (the daemon stores it)
        self.taught: list[TupleSet] = []  # real outputs of part of the models (rotation): next period's fine-tuning
        self.reports: list[PeriodReport] = []
        self.period = 0
        self._next_id = int(first_plan_id)
        self._next_at = math.inf
        self._collect_from: float | None = None
        self._buffer: list[Frame] = []
        self._frames_seen = 0
        self._frames_last_period = 0
        self._active_since = -math.inf
        self._pending_failures: list[tuple[str, str]] = []
        self.job: PeriodJob | None = None  # the period between begin_period and finish_period
        self._chain_failures(pool)

    def _chain_failures(self, pool: ModelPool) -> None:
        """Hear of the pool's failed loads. A planner that had this pool before (a reload that
        kept it) is replaced, not chained, so failures do not pile up in planners no one calls."""
        prior = pool.on_failure
        prior = getattr(prior, "_mlink_prior", prior)

        def on_failure(name: str, reason: str) -> None:
            self._pending_failures.append((name, reason))
            if prior is not None:
                prior(name, reason)

        on_failure._mlink_prior = prior  # type: ignore[attr-defined]
        pool.on_failure = on_failure

    # -- public state --------------------------------------------------------------------------
    @property
    def next_reselect_at(self) -> float:
        return self._next_at

    @property
    def collecting(self) -> bool:
        return self._collect_from is not None

    @property
    def peak_charged(self) -> int:
        """The pool's charged bytes, the highest seen after any load the planner asked for."""
        return self.book.peak_charged

    def profile_target(self) -> int:
        """How many frames a period's profiling buffers."""
        opts = self.options
        if opts.frame_rate:
            expected = opts.frame_rate * opts.period_s
        else:
            expected = float(self._frames_last_period or self._frames_seen)
        n = math.ceil(opts.profile_share * expected - 1e-9)
        return int(min(max(n, opts.min_profile_frames), opts.max_profile_frames))

    # -- selection -----------------------------------------------------------------------------
    def _select(self, accuracy: LinkAccuracy | None = None) -> Selection:
        """The selector's choice under this period's constraints (unavailable, deferred, kept)."""
        unavailable = set(self.pool.unavailable())
        return select_models(
            self.options.selector,
            self.book.costs(),  # margins already added, per model
            accuracy if accuracy is not None else self.accuracy,
            self.budget,
            models=self.universe,
            exclude=unavailable | self.book.spent(),
            forced=self.book.pinned_in() - unavailable,
            cost_margin=0.0,
        )

    def _evaluate(self, active: Iterable[str], selector: str = "evaluated") -> Selection:
        unavailable = set(self.pool.unavailable())
        costs = {m: c for m, c in self.book.costs().items() if m not in unavailable}
        return evaluate(active, costs, self.accuracy, self.budget, models=self.universe, selector=selector)

    def _make_plan(self, sel: Selection, reason: str, now: float, candidate: Selection | None = None) -> Plan:
        active = frozenset(sel.active)
        acc = self.accuracy
        plan = Plan(
            id=self._next_id,
            active=active,
            served=dict(self.served),
            expected={m: (1.0 if m in active else float(sel.expected.get(m, acc(active, m)))) for m in self.universe},
            expected_nodes=acc.nodes(active),
            sources={
                k: tuple(acc.sources(active, k)) for m in self.universe if m not in active for k in acc.node_nodes(m)
            },
            objective=float(sel.objective),
            budget=int(self.budget),
            cost=float(sum(self.pool.cost(m) or 0 for m in active)),
            selector=sel.selector,
            created_at=now,
            next_reselect_at=self._next_at,
            reason=reason,
            period=self.period,
            unavailable=self.pool.unavailable(),
            deferred=tuple(sorted(self.book.spent())),
            candidate_objective=(candidate.objective if candidate is not None and candidate.active != active else None),
        )
        self._next_id += 1
        return plan

    def _apply(
        self, sel: Selection, reason: str, now: float, report: PeriodReport | None, candidate: Selection | None = None
    ) -> Plan:
        """Make the pool hold ``sel.active``; re-select on failures and refusals; never raises."""
        previous = self.plan.active if self.plan is not None else None
        for _ in range(len(self.universe) + 2):
            target = frozenset(sel.active) | self.book.pinned_in()
            rep = self.book.apply(target, reason)
            self._drain_failures(report)
            if rep.ok:
                break
            log.warning(
                "planner: applying %s: refused %s, failed %s, pinned %s; re-selecting",
                sorted(target),
                rep.refused,
                rep.failed,
                rep.pinned,
            )
            if report is not None:
                report.replans += 1
            reason = "failure" if rep.failed else "refused"
            sel = self._select()
            candidate = None
        loaded = self.pool.loaded()
        if not set(sel.active) <= loaded:
            sel = self._evaluate(frozenset(sel.active) & loaded, selector=sel.selector)
        plan = self._make_plan(sel, reason, now, candidate)
        if previous is None or plan.active != previous:
            self._active_since = now
        self.plan = plan
        self.book.note_charged()
        log.info(
            "planner: plan %d (%s): active %s, objective %.4f, cost %.0f of %d B",
            plan.id,
            reason,
            sorted(plan.active),
            plan.objective,
            plan.cost,
            plan.budget,
        )
        return plan

    def _drain_failures(self, report: PeriodReport | None) -> list[tuple[str, str]]:
        pending, self._pending_failures = self._pending_failures, []
        if report is not None:
            for name, why in pending:
                report.failures[name] = why
        return pending

    def _begin(self, report: PeriodReport) -> PeriodReport:
        self.book.report = report
        self.book.new_period()
        return report

    def _finish(self, report: PeriodReport, plan: Plan, t_start: float) -> None:
        report.plan_id = plan.id
        report.loads, report.unloads = self.book.counts()
        report.total_s = time.perf_counter() - t_start
        self.reports.append(report)
        del self.reports[: max(0, len(self.reports) - self.options.history)]

    # -- the initial phase -----------------------------------------------------------------------
    def initial(self, frames: Iterable[Frame] | None = None, now: float | None = None) -> Plan:
        """Period 0: measure costs (and profile, train links if there are none), select, apply.

        ``frames``: what to profile when there are no links or no held-out tuples (at most
        ``profile_frames`` of them are used); see :mod:`~mlink.scheduler.profiler` for what
        iterables it takes.
        """
        now = self.clock() if now is None else now
        t_start = time.perf_counter()
        report = self._begin(PeriodReport(period=0, started_at=now, ran_at=now, frames=0, budget=self.budget))
        measuring, total = self._initial_budget()
        if (self.links is None or self.heldout is None) and frames is None:
            raise ValueError("the initial phase needs frames to profile: no links or no held-out tuples were given")
        t0 = time.perf_counter()
        tuples = self._profile_initial(frames, report, keep=not measuring) if frames is not None else None
        self.profiled = tuples
        self.book.measure_unknown(report, unload=measuring)
        report.profile_s = time.perf_counter() - t0
        self._settle_budget(report, total, measuring)
        report.budget = self.budget
        t0 = time.perf_counter()
        self.links, self.heldout = initial_links(self.links, self.heldout, tuples, self.options, report)
        self.eval_tuples = self.heldout
        report.fine_tune_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        self.accuracy = LinkAccuracy(self.links, self.eval_tuples, self.served)  # replaced whenever either changes
        report.eval_tuples = self.accuracy.n
        self._next_at = now + self.options.period_s
        self._drain_failures(report)
        sel = self._select()
        report.measure_s = self.accuracy.seconds
        report.select_s = time.perf_counter() - t0 - self.accuracy.seconds
        report.candidate = sel.to_json()
        self.book.likely = frozenset(sel.active)
        t0 = time.perf_counter()
        plan = self._apply(sel, "initial", now, report)
        report.apply_s = time.perf_counter() - t0
        report.switched = True
        self._finish(report, plan, t_start)
        return plan

    def _initial_budget(self) -> tuple[bool, int]:
        """Set the budget when it can be known now; (whether costs must be measured first, the
        device's memory)."""
        total = self.pool.meter.total()
        budget = resolve_site_budget(self.options.budget, total, self.pool.costs(), self.universe)
        if budget is None:
            # A share of costs nobody has measured yet: measure each model alone (one at a
            # time, unloaded after) under the device's memory, then set the real budget.
            self.pool.budget = max(self.pool.budget, total)
            return True, total
        self.budget = self.pool.budget = budget
        return False, total

    def _settle_budget(self, report: PeriodReport, total: int, measuring: bool) -> None:
        costs = {m: c for m, c in self.pool.costs().items() if m in self.served}
        if not measuring:  # a budget in bytes or a device share: refused if no served model fits in it
            return check_holds_a_model(self.budget, costs)
        # Those loads only measured costs (each model alone, unloaded after): not held back from loading.
        report.measured = {m: self.book.loads[m] for m in self.universe if self.book.loads[m]}
        self.book.new_period()
        budget = resolve_site_budget(self.options.budget, total, costs)
        assert budget is not None  # the costs that could be measured are all given
        self.budget = self.pool.budget = budget

    def _profile_initial(self, frames: Iterable[Frame], report: PeriodReport, keep: bool) -> TupleSet | None:
        opts = self.options
        first = head(frames, opts.profile_frames)
        parts = self.book.profile(first, self.universe, self.served, report, batch_size=opts.batch_size, keep=keep)
        if not parts:
            return None
        tuples = TupleSet.merge(parts.values())
        report.frames = len(tuples)
        return tuples

    # -- periods -------------------------------------------------------------------------------
    def on_frames(self, frames: Sequence[Frame], now: float | None = None, *, run: bool = True) -> Tick:
        """Account for incoming frames; returns the plan to serve them with.

        Buffers profiling frames from each period boundary on; with ``run`` (default) the
        period's work (:meth:`run_period`) runs inside this call once the buffer is full,
        otherwise the caller calls :meth:`run_period` when ``tick.collecting`` and the buffer is
        full (``planner.period_due``).
        """
        if self.plan is None:
            raise RuntimeError("call Planner.initial() before on_frames()")
        now = self.clock() if now is None else now
        tick = Tick(plan=self.plan)
        if self._pending_failures and self.job is None:  # a period in flight re-plans when it applies
            self._replan_failures(now)
            tick.replanned = True
        self._frames_seen += len(frames)
        if self._collect_from is None and now >= self._next_at:
            self._collect_from = self._next_at
            while self._next_at <= now:
                self._next_at += self.options.period_s
            self._frames_last_period, self._frames_seen = self._frames_seen, 0
        if self._collect_from is not None:
            need = self.profile_target() - len(self._buffer)
            if need > 0:
                took = list(frames[:need])
                self._buffer.extend(took)
                tick.buffered = len(took)
            tick.collecting = True
            if run and self.period_due(now):
                tick.period = self.run_period(now)
                tick.collecting = False
        tick.plan = self.plan
        return tick

    def period_due(self, now: float | None = None) -> bool:
        if self._collect_from is None:
            return False
        now = self.clock() if now is None else now
        full = len(self._buffer) >= self.profile_target()
        stale = bool(self._buffer) and now >= self._collect_from + self.options.period_s / 2
        return full or stale

    def run_period(self, now: float | None = None) -> PeriodReport:
        """Re-profile the buffered frames, fine-tune and re-measure, re-select, apply once: the
        three steps of :mod:`~mlink.scheduler.period_job` one after another, in this thread."""
        job = self.begin_period(now)
        self.profile_period(job)
        learn(job, self.served, self.options, len(self.heldout) if self.heldout is not None else 0)
        return self.finish_period(job)

    def begin_period(self, now: float | None = None, *, copy_links: bool = False) -> PeriodJob:
        """Take the buffered frames, start a period (the pipeline's thread). ``copy_links``: the job
        fine-tunes a copy (serving predicts with these until :meth:`finish_period`)."""
        if self.plan is None:
            raise RuntimeError("call Planner.initial() before run_period()")
        now = self.clock() if now is None else now
        t_start = time.perf_counter()
        frames, self._buffer = self._buffer, []
        started = self._collect_from if self._collect_from is not None else now
        self._collect_from = None
        self.period += 1
        report = self._begin(
            PeriodReport(period=self.period, started_at=started, ran_at=now, frames=len(frames), budget=self.budget)
        )
        self._drain_failures(report)
        taught, self.taught = self.taught, []
        links = copy.deepcopy(self.links) if copy_links else self.links
        seed = self.options.seed + self.period
        job = PeriodJob(report, frames, self._profile_order(), now, t_start, links, self.eval_tuples, taught, seed)
        self.job = job
        return job

    def profile_period(self, job: PeriodJob) -> None:
        """Step 1: the job's frames through each model of ``job.order`` (loaded models first, no
        load; then the rest, likely ones last), one model at a time, until ``job.cancel``."""
        t0 = time.perf_counter()
        for name in job.order if job.frames else ():
            if job.cancel.is_set():
                job.report.skipped[name] = "cancelled"
                continue
            part = self.book.profile(job.frames, [name], self.served, job.report, batch_size=self.options.batch_size)
            job.parts.update(part)
        job.report.profile_s = time.perf_counter() - t0

    def finish_period(self, job: PeriodJob, now: float | None = None) -> PeriodReport:
        """Step 3 (the pipeline thread, between two batches): swap in the job's links, window and
        accuracies, re-select with hysteresis, apply once."""
        now = job.now if now is None else now
        report = job.report
        if job.accuracy is not None:  # learned: else (a failed worker) the old figures stay
            self.links, self.eval_tuples, self.accuracy = job.links, job.eval_tuples, job.accuracy
        chosen, candidate = self._reselect(report, now)
        t0 = time.perf_counter()
        plan = self._apply(chosen, "period", now, report, candidate=candidate)
        report.apply_s = time.perf_counter() - t0
        self._finish(report, plan, job.t_start)
        self.job = None
        return report

    def _profile_order(self) -> list[str]:
        loaded = self.pool.loaded()
        rest = [m for m in self.universe if m not in loaded]
        rest.sort(key=lambda m: (m in self.book.likely, -(self.pool.cost(m) or 0), m))
        return [m for m in self.universe if m in loaded] + rest

    def _reselect(self, report: PeriodReport, now: float) -> tuple[Selection, Selection]:
        """(the plan to apply, the selector's candidate): hysteresis against the current plan."""
        assert self.plan is not None
        self._drain_failures(report)
        t0, measured = time.perf_counter(), self.accuracy.seconds  # a warmed accuracy measured some already
        candidate = self._select()
        current = self._evaluate(self.plan.active, selector=self.plan.selector)
        residency_ok = now - self._active_since >= self.options.min_residency_s
        chosen = keep_or_switch(current, candidate, self.options.switch_margin, residency_ok)
        report.measure_s = self.accuracy.seconds
        report.select_s = time.perf_counter() - t0 - (self.accuracy.seconds - measured)
        report.candidate = candidate.to_json()
        report.current_objective = current.objective
        report.switched = chosen.active != self.plan.active
        self.book.likely = frozenset(candidate.active) | frozenset(chosen.active)
        return chosen, candidate

    def _replan_failures(self, now: float) -> Plan:
        report = self.book.report
        failures = self._drain_failures(report)
        log.warning("planner: re-planning after failed loads: %s", dict(failures))
        plan = self._apply(self._select(), "failure", now, report)
        if report is not None:  # the period's counts include this re-plan's loads
            report.loads, report.unloads = self.book.counts()
            report.replans += 1
        return plan

    # -- serving convenience -------------------------------------------------------------------
    def serve(self, frames: Sequence[Any]) -> list[FrameResult]:
        """:func:`mlink.scheduler.serving.serve` with this planner's plan, pool, links, accuracies."""
        if self.plan is None:
            raise RuntimeError("call Planner.initial() before serve()")
        return serve(
            frames, self.plan, self.pool, self.links, batch_size=self.options.batch_size, accuracy=self.accuracy.node
        )
