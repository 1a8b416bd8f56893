"""What the HTTP API reads: immutable snapshots the pipeline publishes.

The pipeline thread owns the planner, the pool and the links, and fine-tunes the links during a
period. Readers (the API handlers and ``/metrics``) never call into them: after every plan
(the initial one, a period's, a re-plan after a failed load, a reload's) the pipeline builds a
:class:`Snapshot` from that state on its own thread and swaps it in with one reference
assignment. A handler takes ``daemon.snapshot`` once and answers from that object only, so every
field of one response comes from the same plan, pool state and link figures.

Contents are computed when published, never when read: the link matrix on the planner's
evaluation tuples and the single-link accuracies (both cached per :class:`LinkAccuracy`
object, which the planner replaces whenever links are fine-tuned or the evaluation tuples
change), the plan's JSON, the pool's figures and the ``/api/v1/models`` rows. Between plans the
worker re-publishes about once a second so the pool's memory figures stay current (the link
figures are carried over). A reload publishes the new camera list. Dicts inside a snapshot are
never mutated after it is published; readers must not mutate them either.

Per-frame counters (frames and outputs served) change every batch; they are published as a
separate :class:`ServedCounts` after each batch, by the same single-assignment rule.
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from types import MappingProxyType
from typing import TYPE_CHECKING, Any

from mlink.models.catalog import model_info
from mlink.models.placement import latest_placement
from mlink.server.overlay import hex_colour, model_colours

if TYPE_CHECKING:
    from mlink.scheduler.planner import Planner
    from mlink.scheduler.plans import Plan
    from mlink.scheduler.pool import ModelPool


@dataclass(frozen=True)
class LinkViews:
    """The link figures of one :class:`LinkAccuracy` object (the same links, the same tuples)."""

    matrix: dict[str, Any] | None  # ``LinkMatrix.to_json()``, the body of /api/v1/links
    single: tuple[tuple[str, str, float], ...]  # (source model, target model, p(g_ij)), NaN left out


NO_LINKS = LinkViews(None, ())


@dataclass(frozen=True)
class Snapshot:
    """One consistent view of the daemon for readers; see the module docstring.

    ``version`` grows by one with every publish (a new plan, a pool refresh, a reload);
    ``plan`` None: nothing planned yet (``pool`` and ``links`` are empty then too).
    """

    version: int
    published_at: float  # unix seconds
    reason: str  # start | plan | refresh | reload
    cameras: tuple[str, ...]  # stream ids of the running config, in config order
    models: tuple[dict[str, Any], ...]  # the /api/v1/models rows
    plan: Plan | None = None
    plan_json: dict[str, Any] | None = None
    pool: dict[str, Any] | None = None  # ``ModelPool.metrics()`` when published
    links: LinkViews = NO_LINKS
    period: int = 0  # the planner's period count
    history: tuple[dict[str, Any], ...] = ()  # the last plans' summaries, oldest first (server/schedule_views.py)
    measured: dict[str, Any] | None = None  # the links' accuracy as rotation measured it, per output node

    @property
    def plan_id(self) -> int | None:
        return self.plan.id if self.plan is not None else None

    def next(self, reason: str, **changes: Any) -> Snapshot:
        """The next version, with ``changes``; everything else carried over."""
        return replace(self, version=self.version + 1, published_at=time.time(), reason=reason, **changes)


@dataclass(frozen=True)
class ServedCounts:
    """Frames served per camera and outputs per (model, provenance), as of one batch."""

    frames: Mapping[str, int] = field(default_factory=lambda: MappingProxyType({}))
    outputs: Mapping[tuple[str, str], int] = field(default_factory=lambda: MappingProxyType({}))

    @classmethod
    def of(cls, frames: Mapping[str, int], outputs: Mapping[tuple[str, str], int]) -> ServedCounts:
        return cls(MappingProxyType(dict(frames)), MappingProxyType(dict(outputs)))


def model_rows(entries: Sequence[Any], plan: Plan | None, pool: ModelPool | None) -> tuple[dict[str, Any], ...]:
    """The /api/v1/models rows for the config's model ``entries`` (pipeline thread only).

    ``executes_on`` is the device the model ran on at its latest load on the pool's device
    (None: not loaded yet), ``fallback`` why that is not the pool's device (a CUDA site whose
    ONNX Runtime has no CUDA provider, OpenCV's HOG): see :mod:`mlink.models.placement`.
    ``colour``: the model's colour in the snapshots (:func:`mlink.server.overlay.model_colours`),
    which the dashboard uses too, so a model looks the same on both.
    """
    colours = model_colours(entry.name for entry in entries)
    rows = []
    for entry in entries:
        info = model_info(entry.name)
        placed = latest_placement(entry.name, pool.device) if pool is not None else None
        rows.append(
            {
                "name": entry.name,
                "task": info.task,
                "backend": info.backend,
                "outputs": list(entry.served),
                "loaded": bool(pool is not None and pool.is_loaded(entry.name)),
                "active": bool(plan and entry.name in plan.active),
                "memory_bytes": (pool.cost(entry.name) if pool is not None else None),
                "load_seconds": (
                    next(reversed(pool.load_seconds.get(entry.name) or []), None) if pool is not None else None
                ),
                "expected_accuracy": (plan.expected.get(entry.name) if plan else None),
                "unavailable": (pool.unavailable_reason(entry.name) if pool is not None else None),
                "executes_on": placed.executes_on if placed is not None else None,
                "fallback": placed.fallback if placed is not None else None,
                "colour": hex_colour(colours[entry.name]),
            }
        )
    return tuple(rows)


def link_views(planner: Planner) -> LinkViews:
    """The link matrix and single-link accuracies of the planner's links (pipeline thread only:
    this evaluates the links on the planner's evaluation tuples)."""
    accuracy = planner.accuracy
    single = (
        tuple((src, dst, float(acc)) for (src, dst), acc in sorted(accuracy.single().items()) if not math.isnan(acc))
        if accuracy is not None
        else ()
    )
    matrix = None
    if planner.links is not None and planner.eval_tuples is not None:
        matrix = planner.links.matrix(planner.eval_tuples).to_json()
    return LinkViews(matrix, single)
