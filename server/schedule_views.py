"""What the snapshot publishes about plans over time: the plan's JSON, the history of plans, and
the links' accuracy as measured while serving.

An operator asks two things the current plan alone does not answer: *why did the schedule
change* (the last plans, each with its reason) and *are the predictions as good as the
held-out figures said* (the audits rotation makes: every prediction of a hybrid plan that a real
execution of the same model on the same frame could check, see
:class:`~mlink.scheduler.hybrid.LinkAudit`). Both are built here on the pipeline thread when the
daemon publishes (every plan, and every refresh, about once a second), never on a request path.
A published view is a fresh object only when its content changed, so the Redis publisher
(:mod:`mlink.server.snapshot_publish`) re-encodes it only then.

A node no audit checked says so (``n`` 0, no figures): a figure is never made up for it.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any

from mlink.links import node_model

if TYPE_CHECKING:
    from mlink.scheduler.hybrid import LinkAudit
    from mlink.scheduler.plans import Plan
    from mlink.scheduler.rotation import Rotation

HISTORY = 20  # plans kept in the published history
SERIES = 120  # points kept per node in the measured series
SUMMARY_KEYS = (
    *("plan_id", "created_at", "period", "reason", "selector", "active", "predicted"),
    *("objective", "budget_used", "cost_bytes", "budget_bytes"),
)


def plan_json(plan: Plan | None, rotation: Rotation | None) -> dict[str, Any] | None:
    """The body of ``plan`` in ``/api/v1/schedule``, with the hybrid modes when rotation runs."""
    if plan is None:
        return None
    return {**plan.to_json(), "hybrid": rotation.to_json()} if rotation is not None else plan.to_json()


def _r(x: float) -> float:
    return round(float(x), 6)


class PlanHistory:
    """The last ``keep`` plans, oldest first, each as its summary (id, time, reason, models,
    objective, budget used). A plan replaced under the same id (rotation choosing the hybrid
    modes of a new plan) replaces its entry."""

    def __init__(self, keep: int = HISTORY) -> None:
        self._rows: deque[dict[str, Any]] = deque(maxlen=keep)
        self._last: Plan | None = None
        self.view: tuple[dict[str, Any], ...] = ()

    def note(self, plan: Plan | None, body: dict[str, Any] | None) -> tuple[dict[str, Any], ...]:
        if plan is None or body is None or plan is self._last:
            return self.view
        row = {k: body.get(k) for k in SUMMARY_KEYS}
        if self._rows and self._rows[-1]["plan_id"] == plan.id:
            self._rows[-1] = row
        else:
            self._rows.append(row)
        self._last = plan
        self.view = tuple(self._rows)
        return self.view


class MeasuredAccuracy:
    """Per output node: the audits so far (``n``, mean expected, mean measured, ``drift`` =
    measured - expected), and a bounded series of the means over each interval between two
    publishes that saw new audits (``[t, n, expected, measured]``), so a chart shows how the
    measured accuracy moves rather than a mean that settles."""

    def __init__(self, keep: int = SERIES, clock: Callable[[], float] = time.time) -> None:
        self.keep = keep
        self.clock = clock
        self._audit: LinkAudit | None = None
        self._seen: dict[str, tuple[float, float, float]] = {}  # node -> (expected, measured, n) at the last sample
        self._series: dict[str, deque[list[float]]] = {}
        self._key: tuple[Any, ...] | None = None
        self.view: dict[str, Any] | None = None

    def update(self, audit: LinkAudit | None, nodes: Iterable[str]) -> dict[str, Any]:
        names = tuple(sorted(set(nodes)))
        key = (id(audit), audit.audits if audit is not None else 0, names)
        if self.view is not None and key == self._key:
            return self.view
        if audit is not self._audit:  # a new rotation (a new planner): its audits start at zero
            self._audit, self._seen = audit, {}
        per = _per_node(audit)
        now = self.clock()
        for node, (e, m, n) in per.items():
            e0, m0, n0 = self._seen.get(node, (0.0, 0.0, 0.0))
            if n > n0:
                dn = n - n0
                points = self._series.setdefault(node, deque(maxlen=self.keep))
                points.append([round(now, 3), int(dn), _r((e - e0) / dn), _r((m - m0) / dn)])
        self._seen = per
        rows = {}
        for node in sorted(set(names) | set(per)):
            e, m, n = per.get(node, (0.0, 0.0, 0.0))
            row: dict[str, Any] = {"model": node_model(node), "n": int(n)}
            if n:
                row.update(expected=_r(e / n), measured=_r(m / n), drift=_r((m - e) / n))
            else:  # never checked: no figure
                row.update(expected=None, measured=None, drift=None)
            rows[node] = row
        self.view = {
            "source": "rotation" if audit is not None else None,
            "audits": audit.audits if audit is not None else 0,
            "correction": _r(audit.drift()) if audit is not None else None,
            "nodes": rows,
            "series": {k: [list(p) for p in v] for k, v in sorted(self._series.items())},
        }
        self._key = key
        return self.view


def _per_node(audit: LinkAudit | None) -> dict[str, tuple[float, float, float]]:
    """The audit's sums per node, over every set of active models it was checked under."""
    out: dict[str, tuple[float, float, float]] = {}
    if audit is None:
        return out
    for (node, _active), (e, m, n) in list(audit.sums.items()):
        e0, m0, n0 = out.get(node, (0.0, 0.0, 0.0))
        out[node] = (e0 + e, m0 + m, n0 + n)
    return out


class ScheduleViews:
    """The daemon's holder of both, and the one call its publish makes (pipeline thread)."""

    def __init__(self) -> None:
        self.history = PlanHistory()
        self.measured = MeasuredAccuracy()

    def of(self, plan: Plan | None, rotation: Rotation | None) -> dict[str, Any]:
        """The snapshot's ``plan_json``, ``history`` and ``measured`` for ``plan``."""
        body = plan_json(plan, rotation)
        nodes = plan.expected_nodes if plan is not None else ()
        return {
            "plan_json": body,
            "history": self.history.note(plan, body),
            "measured": self.measured.update(rotation.audit if rotation is not None else None, nodes),
        }
