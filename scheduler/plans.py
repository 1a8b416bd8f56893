"""What the planner decides and reports: plans, period reports, and what one call returned.

A :class:`Plan` is immutable and complete for serving: which models are loaded (``active``),
what every served output is expected to achieve, and, for each predicted output, the active
models whose links predict it (``sources``), so the serving step never looks them up again.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class Plan:
    """What to load and what to expect, for one stretch of time."""

    id: int
    active: frozenset[str]
    served: Mapping[str, tuple[str, ...]]  # {model: outputs}: the universe and its nodes
    expected: Mapping[str, float]  # per model: 1.0 executed, p(h_{A,j}) predicted
    expected_nodes: Mapping[str, float]  # per node "model:output"
    sources: Mapping[
        str, tuple[str, ...]
    ]  # per predicted node: the active models its links use (serving reads them here)
    objective: float  # Eq. 1: mean of ``expected``
    budget: int
    cost: float  # the active models' measured costs added up
    selector: str
    created_at: float
    next_reselect_at: float  # when the next period's profiling starts
    reason: str  # initial | period | failure | refused
    period: int
    unavailable: Mapping[str, str] = field(default_factory=dict)  # models that failed to load
    deferred: tuple[str, ...] = ()  # models that may not load again this period
    candidate_objective: float | None = None  # the re-selected set's objective, when hysteresis kept this one

    @property
    def models(self) -> tuple[str, ...]:
        return tuple(self.served)

    @property
    def predicted(self) -> frozenset[str]:
        return frozenset(self.served) - self.active

    def to_json(self) -> dict[str, Any]:
        return {
            "plan_id": self.id,
            "period": self.period,
            "reason": self.reason,
            "selector": self.selector,
            "active": sorted(self.active),
            "predicted": sorted(self.predicted),
            "objective": round(self.objective, 6),
            "candidate_objective": None if self.candidate_objective is None else round(self.candidate_objective, 6),
            "expected": {m: round(v, 6) for m, v in self.expected.items()},
            "expected_nodes": {k: round(v, 6) for k, v in self.expected_nodes.items()},
            "sources": {k: list(v) for k, v in self.sources.items()},
            "budget_bytes": self.budget,
            "cost_bytes": int(self.cost) if math.isfinite(self.cost) else None,
            "budget_used": (self.cost / self.budget) if self.budget > 0 and math.isfinite(self.cost) else None,
            "unavailable": dict(self.unavailable),
            "deferred": list(self.deferred),
            "created_at": self.created_at,
            "next_reselect_at": self.next_reselect_at,
        }


@dataclass
class PeriodReport:
    """What one period's re-profiling and re-selection did (period 0: :meth:`~mlink.scheduler.planner.Planner.initial`)."""

    period: int
    started_at: float  # the period boundary (profiling frames were buffered from here)
    ran_at: float
    frames: int
    profiled: list[str] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)  # model -> why it was not profiled
    fine_tuned: bool = False
    fine_tune_note: str = ""
    partial_fine_tunes: int = 0  # fine-tunings on rotation outputs (some models only) before this period's
    trained: bool = False
    eval_tuples: int = 0
    profile_s: float = 0.0
    fine_tune_s: float = 0.0
    measure_s: float = 0.0
    select_s: float = 0.0
    apply_s: float = 0.0
    total_s: float = 0.0
    candidate: dict[str, Any] | None = None
    current_objective: float | None = None  # the previous plan re-evaluated with fresh numbers
    switched: bool = False
    plan_id: int | None = None
    loads: dict[str, int] = field(default_factory=dict)  # completed loads per model in this period
    unloads: dict[str, int] = field(default_factory=dict)
    evicted: list[str] = field(default_factory=list)  # unloaded to make room while profiling
    measured: dict[str, int] = field(default_factory=dict)  # period 0, relative budget: measuring loads
    failures: dict[str, str] = field(default_factory=dict)
    replans: int = 0
    peak_charged: int = 0  # the pool's charged bytes, highest seen after any load
    budget: int = 0

    def to_json(self) -> dict[str, Any]:
        d = dict(self.__dict__)
        for k in ("profile_s", "fine_tune_s", "measure_s", "select_s", "apply_s", "total_s"):
            d[k] = round(d[k], 4)
        return d


@dataclass
class Tick:
    """What :meth:`~mlink.scheduler.planner.Planner.on_frames` decided: the plan to serve these frames with, and more."""

    plan: Plan
    buffered: int = 0  # frames of this call taken for the period's profiling
    collecting: bool = False  # a period's profiling buffer is being filled
    period: PeriodReport | None = None  # set when a period's work ran inside this call
    replanned: bool = False  # a failure led to a new plan in this call
