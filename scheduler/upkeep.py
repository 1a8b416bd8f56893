"""Link upkeep for the planner: the first training, each period's fine-tuning, the eval window.

- :func:`train_links`: links trained on a share of the first profile, the rest held out (the
  links never train on it) for accuracies; :func:`initial_links`: period 0's links and
  held-out tuples, trained or given;
- :func:`fine_tune_links`: each period's new tuples split in half; one half fine-tunes the links
  (when ``links.fine_tune``), the other is returned to join the evaluation window;
- :func:`slide_window`: the evaluation window keeps the most recent held-out tuples.

Failures here are reported in the period report and logged, never raised: the links' problems
must not stop serving.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping

from mlink.links import LinkError, LinkSet, TrainConfig, TupleSet
from mlink.scheduler.options import PlannerOptions
from mlink.scheduler.plans import PeriodReport

log = logging.getLogger(__name__)


def train_links(
    tuples: TupleSet | None,
    *,
    heldout_share: float,
    seed: int,
    config: TrainConfig | None = None,
    progress: bool = False,
) -> tuple[LinkSet | None, TupleSet | None, str]:
    """(links, held-out tuples, why there are none): links trained on ``tuples`` less a seeded
    ``heldout_share``; (None, None, why) when there are too few tuples or training failed."""
    if tuples is None or len(tuples) < 4 or len(tuples.models) < 2:
        why = "no links: fewer than two models or four frames could be profiled"
        log.error("planner: %s", why)
        return None, None, why
    train, test = tuples.split(heldout_share, seed)
    try:
        links = LinkSet.train(train, val_share=0.2, config=config, progress=progress or None)
    except (LinkError, ValueError) as exc:
        why = f"links could not be trained: {exc}"
        log.error("planner: %s", why)
        return None, None, why
    return links, test, ""


def initial_links(
    links: LinkSet | None,
    heldout: TupleSet | None,
    tuples: TupleSet | None,
    options: PlannerOptions,
    report: PeriodReport,
) -> tuple[LinkSet | None, TupleSet | None]:
    """Period 0's (links, held-out tuples): trained on the profiled ``tuples`` when there are no
    links (as they were when training fails); given links keep their held-out tuples, or hold
    out ``tuples`` (restricted to their nodes) when they have none."""
    if links is None:
        trained, held, note = train_links(
            tuples,
            heldout_share=options.heldout_share,
            seed=options.seed,
            config=options.train_config,
            progress=options.progress,
        )
        report.fine_tune_note = note
        if trained is None:
            return None, heldout
        report.trained = True
        return trained, held
    if heldout is None and tuples is not None:
        return links, tuples.restrict(links.specs)
    return links, heldout


def fine_tune_links(
    links: LinkSet,
    parts: Mapping[str, TupleSet],
    report: PeriodReport,
    *,
    fine_tune: bool,
    epochs: int | None,
    seed: int,
    taught: list[TupleSet] | None = None,
) -> TupleSet | None:
    """Fine-tune ``links`` on half of a period's profiled ``parts`` ({model: tuples}); return the
    other half (held out, for the evaluation window), or None when there is none.

    ``taught`` (emptied here) holds real outputs of only some models since the last period
    (a hybrid plan's rotation): every real execution teaches the links between the nodes it
    holds (``LinkSet.fine_tune(partial=True)``), whether or not the profile was complete.

    Links need complete tuples: when a model of the links could not be profiled, nothing is
    fine-tuned or held out. ``report`` gets ``fine_tuned`` and ``fine_tune_note``.
    """
    if fine_tune:
        _fine_tune_partial(links, taught or [], epochs, report)
    if taught:
        taught.clear()
    link_models = set(links.models)
    missing = sorted(link_models - set(parts))
    if missing:
        report.fine_tune_note = (
            f"not fine-tuned: {', '.join(missing)} could not be profiled (links need complete tuples)"
        )
        return None
    new = TupleSet.merge(parts[m] for m in link_models).restrict(links.specs)
    if len(new) >= 2:
        tune, held = new.split(0.5, seed)
    else:
        tune, held = new, None
    if fine_tune:
        try:
            links.fine_tune(tune, epochs=epochs)
            report.fine_tuned = True
        except Exception as exc:  # the links' problem must not stop serving
            log.exception("planner: fine-tuning failed")
            report.fine_tune_note = f"fine-tuning failed: {type(exc).__name__}: {exc}"
    else:
        report.fine_tune_note = "fine-tuning off (links.fine_tune: false)"
    return held


def _fine_tune_partial(links: LinkSet, taught: list[TupleSet], epochs: int | None, report: PeriodReport) -> None:
    for part in taught:
        if len(part) == 0 or len(part.models) < 2:
            continue
        try:
            links.fine_tune(part.restrict(links.specs), epochs=epochs, partial=True)
            report.partial_fine_tunes += 1
        except Exception as exc:  # the links' problem must not stop serving
            log.exception("planner: fine-tuning on rotation outputs failed")
            report.fine_tune_note = f"fine-tuning on rotation outputs failed: {type(exc).__name__}: {exc}"


def slide_window(window: TupleSet | None, held: TupleSet, cap: int) -> TupleSet:
    """``window`` with ``held`` appended (a new set; ``held`` alone when their nodes differ),
    keeping the last ``cap`` tuples."""
    if window is None or set(window.specs) != set(held.specs):
        window = held
    else:
        window = window.copy()
        try:
            window.extend(held)
        except ValueError:
            window = held
    if len(window) > cap:
        window = window.tail(cap)
    return window
