"""One period's work as a value: what the pipeline thread hands the period worker, and back.

A period (:meth:`Planner.run_period <mlink.scheduler.planner.Planner.run_period>`) is three
steps, split so that the slow ones can run beside serving
(:mod:`~mlink.scheduler.period_worker`):

1. **profile** (:meth:`Planner.profile_period`): the buffered frames through every model;
2. **learn** (:func:`learn`): fine-tune the links and re-measure accuracies, on the job's own
   links (a *copy* when serving goes on meanwhile: the pipeline keeps predicting with the old
   ones) and a new :class:`~mlink.scheduler.accuracy.LinkAccuracy`, warmed here so that the
   selection at apply time reads cached figures;
3. **apply** (:meth:`Planner.finish_period`): on the pipeline thread, between two batches: swap
   in the job's links, evaluation tuples and accuracies, re-select, apply the plan.

:class:`PeriodJob` holds everything the steps share; nothing in it is read by serving until
step 3 swaps it in. :func:`learn` is pure of threads and pools.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from mlink.links import LinkSet, TupleSet
from mlink.scheduler.accuracy import LinkAccuracy
from mlink.scheduler.options import PlannerOptions
from mlink.scheduler.plans import PeriodReport
from mlink.scheduler.profiler import Frame
from mlink.scheduler.upkeep import fine_tune_links, slide_window


@dataclass
class PeriodJob:
    """One period between :meth:`Planner.begin_period` and :meth:`Planner.finish_period`."""

    report: PeriodReport
    frames: list[Frame]
    order: list[str]  # models to profile, in this order
    now: float  # when the period began (the planner's clock)
    t_start: float  # time.perf_counter() at the beginning, for report.total_s
    links: LinkSet | None  # the links this period fine-tunes (a copy when serving goes on)
    eval_tuples: TupleSet | None  # the evaluation window, slid by learn()
    taught: list[TupleSet]  # rotation outputs since the last period (partial fine-tuning)
    seed: int
    parts: dict[str, TupleSet] = field(default_factory=dict)  # profiled tuples per model
    accuracy: LinkAccuracy | None = None  # set by learn(): the figures the selection reads
    cancel: threading.Event = field(default_factory=threading.Event)  # stop between models
    error: str | None = None  # what went wrong in the worker (the period then applies nothing new)


def learn(
    job: PeriodJob,
    served: Mapping[str, Sequence[str]],
    options: PlannerOptions,
    heldout_n: int,
    *,
    warm: bool = False,
) -> None:
    """Step 2: fine-tune ``job.links`` on half the profiled tuples, slide the evaluation window
    with the other half, and measure a new :class:`LinkAccuracy` on it (``warm``: every subset's
    figures now, so the selection at apply time does not compute them on the pipeline thread)."""
    report = job.report
    t0 = time.perf_counter()
    if job.links is None:
        report.fine_tune_note = "no links"
    else:
        held = fine_tune_links(
            job.links,
            job.parts,
            report,
            fine_tune=options.fine_tune,
            epochs=options.fine_tune_epochs,
            seed=job.seed,
            taught=job.taught,
        )
        if held is not None:
            cap = options.eval_window or max(heldout_n, 50)
            job.eval_tuples = slide_window(job.eval_tuples, held, cap)
    report.fine_tune_s = time.perf_counter() - t0
    job.accuracy = LinkAccuracy(job.links, job.eval_tuples, served)
    report.eval_tuples = job.accuracy.n
    if warm:
        job.accuracy.table()
