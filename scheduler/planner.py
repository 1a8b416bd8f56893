"""The planner: which models to load for each period, re-profiled and re-selected periodically.

A state machine with no threads of its own: the daemon calls :meth:`Planner.initial` once and
then :meth:`Planner.on_frames` with every batch of incoming frames; each call returns the plan
to serve those frames with (and, when a period's work ran inside the call, what it did). The
pool (:class:`~mlink.scheduler.pool.ModelPool`) is the only thing that loads or unloads; the
planner tells it what to do, one model at a time.

Model-level accuracies from node-level links
--------------------------------------------
A model may serve several outputs (nodes ``"model:output"``); links and ensembles are per node,
selection is per model. :class:`LinkAccuracy` defines

- p(h_{A,j}) for a *model* j not in the active set A: the mean, over j's served nodes, of the
  node ensemble's accuracy on held-out tuples (:meth:`LinkSet.ensemble_accuracy`, each node with
  its own metric against model j's own output); 1.0 for j in A; a node without links (its model
  was never profiled) counts 0;
- the single-link accuracy the paper's greedy uses, p(g_ij) = p(h_{{i},j}): model i alone active
  predicting model j (all of i's nodes feed j's node ensembles, whose selections pick what helps).

Values are computed lazily and cached per (the ensemble's active source models, node): two sets
A that contain the same sources of a node's ensemble share the figure. For 3-6 models all
subsets cost a few dozen evaluations on a few hundred tuples, well under a second. Eq. 1 is then
the mean over models, as in :mod:`mlink.scheduler.selection`. Link costs c(h_{A,j}) are not
charged against the budget: every link of the site stays in host memory all the time (loaded
once, run on the CPU), so it does not depend on A and is not part of the memory the pool spends
on models.

Costs and the budget
--------------------
Costs are the pool's measurements (peak across load + warm-up at the serving batch, the largest
of the last three loads). The same model measures a little differently from load to load (up to
~20% on the CPU meter, much less under NVML), so selection charges each cost plus
``cost_margin`` (default 10%; or the spread of the model's last five measurements when that is
larger, up to 50%), and profiling makes room for a model's cost plus that margin (capped at the
whole budget) before loading it: the pool's admission check then holds for the load as
measured, not only for the last figure. A budget relative to the models' cost
(``"0.5x"``) is resolved once, from period 0's measurements, and then stays fixed: a promise
that drifted with every measurement would not be one.

Periods
-------
Time is cut into periods of ``scheduler.period_s``. At each period boundary the planner starts
buffering the next ``ceil(profile_share * period_s * frame rate)`` frames (the frame rate is the
site's streams' sampling rates added up; paper: 1% of an hour), at least two. When the buffer is
full (or half a period has passed with at least one frame), :meth:`Planner.run_period`:

1. profiles the buffered frames through **all** models, one after another
   (:func:`~mlink.scheduler.profiler.profile`, the same code path as ``mlink profile``): first
   the models already loaded (no load at all), then the others, each loaded through the pool
   while the budget holds. To make room the planner unloads, before anything else, models the
   next plan is unlikely to need; a model is never loaded over the budget (the pool refuses, and
   a model that does not fit even alone is skipped and reported). Models likely to be chosen
   (last period's candidate set) are profiled last, so they are still loaded when the plan is
   applied;
2. splits the new tuples: half fine-tune the links (:meth:`LinkSet.fine_tune`, when
   ``links.fine_tune``), half join a sliding evaluation window of held-out tuples (the links
   never trained on them; the window keeps the most recent ``eval_window`` tuples, initially the
   held-out set), on which accuracies are re-measured;
3. re-selects (``scheduler.selector``: ``"paper"`` or ``"objective"``) and applies hysteresis
   (:func:`~mlink.scheduler.selection.keep_or_switch` with ``switch_margin`` and
   ``min_residency_s``, against the current plan re-evaluated with the fresh numbers);
4. applies the plan to the pool once (unload first, then load).

Loads and unloads are counted per model per period (:attr:`PeriodReport.loads`/``unloads``,
from the pool's own records of completed operations) and kept to at most one of each: within a
period, a model that was loaded and unloaded again cannot be chosen for loading (it is
*deferred* to the next period; it can only happen when the budget forced it out during
profiling), and a model that was unloaded and loaded again is kept. Period 0 (:meth:`initial`)
measures every cost; when the budget is a share of the models' cost (``"0.5x"``) it is unknown
until then, so each model is measured alone and unloaded, and a chosen model is loaded a
second time to serve.

Failures: a load that fails (missing asset, out of memory) makes the pool mark the model
unavailable and call back; the planner re-selects without it (selection's ``exclude``) and
applies again, never raising. An unavailable model's outputs are still served, predicted by
its ensembles from whatever is active. ``on_frames`` also re-plans for failures reported
between calls (a failing load from elsewhere).
"""

from __future__ import annotations

import itertools
import logging
import math
import time
from collections import Counter
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Iterator, Mapping, Sequence

from mlink.configs.budget import parse_budget, resolve_budget
from mlink.configs.schema import SiteConfig
from mlink.links import LinkError, LinkSet, TrainConfig, TupleSet, node_model
from mlink.scheduler.pool import BudgetExceeded, ModelNotLoaded, ModelPinned, ModelPool
from mlink.scheduler.profiler import FrameSource, ProfileFrame, profile
from mlink.scheduler.selection import Selection, evaluate, keep_or_switch, objective_select, paper_greedy

log = logging.getLogger(__name__)

Clock = Callable[[], float]


# -- model-level accuracies -------------------------------------------------------------------


class LinkAccuracy:
    """p(h_{A,j}) per model and per node from a link set's node ensembles (module docstring).

    ``served`` is ``{model: outputs}``, the universe F. Callable as ``acc(active, model)``, the
    :data:`~mlink.scheduler.selection.EnsembleAcc` the selectors take.
    """

    def __init__(self, links: LinkSet | None, tuples: TupleSet | None, served: Mapping[str, Sequence[str]]) -> None:
        self.links = links
        self.tuples = tuples
        self.served = {m: tuple(outs) for m, outs in served.items()}
        self.models = tuple(self.served)
        self._cache: dict[tuple[frozenset[str], str], float] = {}
        self.evaluations = 0
        self.seconds = 0.0

    @property
    def n(self) -> int:
        return len(self.tuples) if self.tuples is not None else 0

    def node_nodes(self, model: str) -> list[str]:
        return [f"{model}:{o}" for o in self.served.get(model, ())]

    def predictable(self, node: str) -> bool:
        return self.links is not None and node in self.links.ensembles

    def _key(self, active: frozenset[str], node: str) -> frozenset[str]:
        ens = self.links.ensembles[node]  # type: ignore[union-attr]
        return frozenset(ens.active(active))

    def node(self, active: Iterable[str], node: str) -> float:
        """p(h_{A,node}); 1.0 when the node's model is active, 0.0 for a node without links."""
        act = frozenset(active)
        if node_model(node) in act:
            return 1.0
        if not self.predictable(node) or self.n == 0:
            return 0.0
        key = (self._key(act, node), node)
        hit = self._cache.get(key)
        if hit is None:
            t0 = time.perf_counter()
            hit = float(self.links.ensemble_accuracy(self.tuples, node, key[0]))  # type: ignore[union-attr]
            hit = min(max(hit, 0.0), 1.0) if math.isfinite(hit) else 0.0
            self.seconds += time.perf_counter() - t0
            self.evaluations += 1
            self._cache[key] = hit
        return hit

    def model(self, active: Iterable[str], model: str) -> float:
        """p(h_{A,model}): mean over the model's served nodes."""
        act = frozenset(active)
        if model in act:
            return 1.0
        nodes = self.node_nodes(model)
        if not nodes:
            return 0.0
        return sum(self.node(act, k) for k in nodes) / len(nodes)

    __call__ = model

    def nodes(self, active: Iterable[str]) -> dict[str, float]:
        act = frozenset(active)
        return {k: self.node(act, k) for m in self.models for k in self.node_nodes(m)}

    def single(self) -> dict[tuple[str, str], float]:
        """p(g_ij) = p(h_{{i},j}) for every ordered pair of distinct models."""
        return {(i, j): self.model(frozenset([i]), j) for i in self.models for j in self.models if i != j}

    def sources(self, active: Iterable[str], node: str) -> list[str]:
        """The active models whose links a prediction of ``node`` uses (empty: the trivial output)."""
        act = frozenset(active)
        if not self.predictable(node):
            return []
        return used_sources(self.links, act, node)  # type: ignore[arg-type]

    def table(self, limit: int = 12) -> list[dict[str, Any]]:
        """Every subset A (up to ``limit`` models) with p(h_{A,j}) per model; for reports."""
        if len(self.models) > limit:
            return []
        rows = []
        for r in range(len(self.models) + 1):
            for combo in itertools.combinations(self.models, r):
                act = frozenset(combo)
                rows.append({"active": sorted(act), "accuracy": {m: round(self.model(act, m), 6) for m in self.models}})
        return rows


def used_sources(links: LinkSet, active: frozenset[str], node: str) -> list[str]:
    """Source models the ensemble of ``node`` runs links from for this active set."""
    ens = links.ensembles.get(node)
    if ens is None:
        return []
    try:
        return sorted({node_model(ens.sources[i]) for i, _ in ens.plan(active)})
    except Exception:  # an ensemble without plans: everything active it has links from
        return sorted(ens.active(active))


# -- plans and reports ------------------------------------------------------------------------


@dataclass(frozen=True)
class Plan:
    """What to load and what to expect, for one stretch of time."""

    id: int
    active: frozenset[str]
    served: Mapping[str, tuple[str, ...]]  # {model: outputs}: the universe and its nodes
    expected: Mapping[str, float]  # per model: 1.0 executed, p(h_{A,j}) predicted
    expected_nodes: Mapping[str, float]  # per node "model:output"
    sources: Mapping[str, tuple[str, ...]]  # per predicted node: the active models its links use
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
    """What one period's re-profiling and re-selection did (period 0: :meth:`Planner.initial`)."""

    period: int
    started_at: float  # the period boundary (profiling frames were buffered from here)
    ran_at: float
    frames: int
    profiled: list[str] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)  # model -> why it was not profiled
    fine_tuned: bool = False
    fine_tune_note: str = ""
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
    """What :meth:`Planner.on_frames` decided: the plan to serve these frames with, and more."""

    plan: Plan
    buffered: int = 0  # frames of this call taken for the period's profiling
    collecting: bool = False  # a period's profiling buffer is being filled
    period: PeriodReport | None = None  # set when a period's work ran inside this call
    replanned: bool = False  # a failure led to a new plan in this call


# -- helpers ----------------------------------------------------------------------------------


def site_served(cfg: SiteConfig) -> dict[str, tuple[str, ...]]:
    return {m.name: tuple(m.served) for m in cfg.models}


def model_factory(cfg: SiteConfig, store: Any = None) -> Callable[[str], Any]:
    """A pool factory creating the site's models with their config params and ``store``."""
    from mlink.models.catalog import create_model

    def make(name: str) -> Any:
        try:
            params = cfg.model(name).params
        except KeyError:
            params = {}
        return create_model(name, store=store, **params) if store is not None else create_model(name, **params)

    return make


def budget_is_relative(spec: int | float | str) -> bool:
    """True when the budget is a share of the models' measured cost (``"0.5x"``)."""
    return parse_budget(spec)[0] == "models"


def build_pool(
    cfg: SiteConfig,
    *,
    store: Any = None,
    factory: Callable[[str], Any] | None = None,
    budget: int | float | str | None = None,
    costs: Mapping[str, int] | None = None,
    **kw: Any,
) -> ModelPool:
    """A pool for a site: its device, its models' factory, the serving batch as warm-up batch.

    The budget is resolved when it can be (bytes, a device share, or a share of ``costs`` when
    every model's cost is given); a budget relative to unknown costs starts at the device's
    whole memory and :meth:`Planner.initial` sets it once the costs are measured.
    """
    from mlink.scheduler.memory import MemoryMeter

    spec = cfg.budget if budget is None else budget
    meter = kw.pop("meter", None) or MemoryMeter(cfg.device)
    names = [m.name for m in cfg.models]
    total = meter.total()
    if budget_is_relative(spec):
        have = costs is not None and all(n in costs for n in names)
        b = resolve_budget(spec, total, sum(int(costs[n]) for n in names)) if have else total  # type: ignore[index]
    else:
        b = resolve_budget(spec, total)
    return ModelPool(
        b,
        cfg.device,
        meter=meter,
        factory=factory or model_factory(cfg, store),
        costs=costs,
        warmup_batch=cfg.scheduler.batch_size,
        models=names,
        **kw,
    )


def _restrict(tuples: TupleSet, nodes: Iterable[str]) -> TupleSet:
    keep = [k for k in nodes if k in tuples.specs]
    return TupleSet(
        specs={k: tuples.specs[k] for k in keep},
        values={k: list(tuples.values[k]) for k in keep},
        streams=list(tuples.streams),
        timestamps=list(tuples.timestamps),
    )


def merge_tuples(parts: Mapping[str, TupleSet]) -> TupleSet:
    """One tuple set from per-model ones over the same frames (as :func:`profile` returns them)."""
    items = list(parts.values())
    first = items[0]
    specs: dict = {}
    values: dict = {}
    for ts in items:
        if ts.streams != first.streams or ts.timestamps != first.timestamps:
            raise ValueError("per-model profiles saw different frames")
        specs.update(ts.specs)
        values.update(ts.values)
    return TupleSet(specs=specs, values=values, streams=list(first.streams), timestamps=list(first.timestamps))


def select_models(
    selector: str,
    costs: Mapping[str, int],
    accuracy: Callable[[frozenset[str], str], float],
    budget: int,
    *,
    models: Sequence[str],
    exclude: Iterable[str] = (),
    forced: Iterable[str] = (),
    cost_margin: float = 0.1,
) -> Selection:
    """Run the ``"paper"`` or ``"objective"`` selector as the planner does.

    ``costs`` are measured costs; each is raised by ``cost_margin`` (a load can measure a little
    more than the last time) before it counts against ``budget``. ``exclude``: models that cannot
    be loaded (failed, or already loaded and unloaded this period). ``forced``: models that stay
    loaded whatever is chosen: the selector chooses the rest under the budget they leave, with
    Eq. 1 evaluated over the forced ones plus its choice. ``accuracy`` is p(h_{A,j}) per model
    (:class:`LinkAccuracy`); the paper's greedy takes its single links p(g_ij) = p(h_{{i},j}).
    The objective selector searches every subset (no pruning) up to 8 candidates, since
    measured ensemble accuracies need not grow with the active set.
    """
    f = 1.0 + max(0.0, cost_margin)
    excluded = set(exclude)
    fixed = set(forced) - excluded
    avail = {m: int(math.ceil(c * f)) for m, c in costs.items() if m in set(models) and m not in excluded}
    forced_cost = sum(avail.get(m, 0) for m in fixed)
    if fixed:

        def acc(active: frozenset[str], target: str) -> float:
            return 1.0 if target in fixed else accuracy(active | fixed, target)

    else:
        acc = accuracy  # type: ignore[assignment]
    cand = {m: c for m, c in avail.items() if m not in fixed}
    room = budget - forced_cost
    if selector == "paper":
        single = accuracy.single() if isinstance(accuracy, LinkAccuracy) else {
            (i, j): accuracy(frozenset([i]), j) for i in models for j in models if i != j
        }
        sel = paper_greedy(cand, single, room, ensemble_acc=acc, models=models, exclude=excluded | fixed)
    elif selector == "objective":
        sel = objective_select(cand, acc, room, models=models, exclude=excluded | fixed, prune=len(cand) > 8)
    else:
        raise ValueError(f"selector must be paper or objective, got {selector!r}")
    if not fixed:
        return sel
    full = evaluate(sel.active | fixed, avail, accuracy, budget, models=models, selector=sel.selector)
    return Selection(full.active, full.objective, full.cost, full.budget, sel.selector, full.expected, full.feasible, sel.evaluations)


# -- the planner ------------------------------------------------------------------------------


class Planner:
    """Plans, re-profiles and re-selects; see the module docstring.

    ``links`` None: :meth:`initial` profiles ``links.profile_frames`` frames and trains links
    (``train_config``) on a share of them, holding out ``heldout_share`` for accuracies.
    ``heldout``: tuples the links never trained on; the accuracies are measured on them (and
    later on a window of each period's new tuples). ``budget`` overrides ``cfg.budget``; the
    planner owns the pool's budget and sets it. ``frame_rate`` (frames per second over all
    streams) overrides the site's streams' rates for sizing the profiling buffer.
    """

    def __init__(
        self,
        cfg: SiteConfig,
        pool: ModelPool,
        links: LinkSet | None = None,
        heldout: TupleSet | None = None,
        clock: Clock = time.time,
        *,
        budget: int | float | str | None = None,
        selector: str | None = None,
        train_config: TrainConfig | None = None,
        heldout_share: float = 0.2,
        fine_tune_epochs: int | None = None,
        frame_rate: float | None = None,
        min_profile_frames: int = 2,
        max_profile_frames: int = 2000,
        eval_window: int | None = None,
        seed: int = 0,
        cost_margin: float = 0.1,
        progress: bool = False,
        history: int = 100,
        first_plan_id: int = 1,
    ) -> None:
        self.cfg = cfg
        self.pool = pool
        self.links = links
        self.heldout = heldout
        self.clock = clock
        self.served = site_served(cfg)
        self.universe = tuple(self.served)
        self.budget_spec = cfg.budget if budget is None else budget
        parse_budget(self.budget_spec)
        self.selector = selector or cfg.scheduler.selector
        if self.selector not in ("paper", "objective"):
            raise ValueError(f"selector must be paper or objective, got {self.selector!r}")
        self.train_config = train_config
        self.heldout_share = heldout_share
        self.fine_tune_epochs = fine_tune_epochs
        rate = frame_rate if frame_rate is not None else sum(s.fps for s in cfg.streams)
        self.frame_rate = float(rate) if rate else None
        self.min_profile_frames = max(1, int(min_profile_frames))
        self.max_profile_frames = max(self.min_profile_frames, int(max_profile_frames))
        self.eval_window = eval_window
        self.seed = seed
        self.cost_margin = max(0.0, float(cost_margin))
        self.progress = progress
        self.history_limit = history

        self.budget: int = int(pool.budget)
        self.plan: Plan | None = None
        self.accuracy = LinkAccuracy(links, heldout, self.served)
        self.eval_tuples: TupleSet | None = heldout
        self.reports: list[PeriodReport] = []
        self.period = 0
        self.peak_charged = 0
        self._next_id = int(first_plan_id)  # a daemon that replaces its planner keeps plan ids unique
        self._next_at = math.inf
        self._collect_from: float | None = None
        self._buffer: list[ProfileFrame] = []
        self._frames_seen = 0
        self._frames_last_period = 0
        self._active_since = -math.inf
        self._likely: frozenset[str] = frozenset()
        self._period_loads: Counter[str] = Counter()
        self._period_unloads: Counter[str] = Counter()
        self._loaded_in_period: set[str] = set()
        self._pending_failures: list[tuple[str, str]] = []
        self._report: PeriodReport | None = None
        # Chain the pool's callback; a planner that had this pool before (a reload that kept
        # it) is replaced, not chained, so failures do not pile up in planners no one calls.
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

    def period_counts(self) -> dict[str, dict[str, int]]:
        """Completed loads and unloads per model in the current period."""
        return {m: {"loads": self._period_loads[m], "unloads": self._period_unloads[m]} for m in self.universe}

    def profile_target(self) -> int:
        """How many frames a period's profiling buffers."""
        if self.frame_rate:
            expected = self.frame_rate * self.cfg.scheduler.period_s
        else:
            expected = float(self._frames_last_period or self._frames_seen)
        n = math.ceil(self.cfg.scheduler.profile_share * expected - 1e-9)
        return int(min(max(n, self.min_profile_frames), self.max_profile_frames))

    def status(self) -> dict[str, Any]:
        return {
            "plan": self.plan.to_json() if self.plan else None,
            "period": self.period,
            "collecting": self.collecting,
            "buffered": len(self._buffer),
            "profile_target": self.profile_target(),
            "next_reselect_at": self._next_at,
            "budget_bytes": self.budget,
            "peak_charged_bytes": self.peak_charged,
            "period_counts": self.period_counts(),
            "unavailable": self.pool.unavailable(),
            "eval_tuples": self.accuracy.n,
        }

    # -- pool operations (counted) -------------------------------------------------------------
    def _note_charged(self) -> None:
        charged = int(self.pool.charged())
        self.peak_charged = max(self.peak_charged, charged)
        if self._report is not None:
            self._report.peak_charged = max(self._report.peak_charged, charged)

    def _count_load(self, name: str) -> None:
        self._period_loads[name] += 1
        self._loaded_in_period.add(name)
        self._note_charged()

    def _count_unload(self, name: str) -> None:
        self._period_unloads[name] += 1

    def _unload(self, name: str, reason: str) -> bool:
        try:
            rec = self.pool.unload(name, reason=reason)
        except ModelPinned as exc:
            log.warning("planner: %s", exc)
            return False
        if rec is not None:
            self._count_unload(name)
        return True

    def _spent(self) -> set[str]:
        """Models that may not be loaded again this period (loaded, then unloaded)."""
        loaded = self.pool.loaded()
        return {m for m in self.universe if self._period_loads[m] >= 1 and m not in loaded}

    def _pinned_in(self) -> set[str]:
        """Loaded models that may not be unloaded again this period (unloaded, then loaded)."""
        loaded = self.pool.loaded()
        return {m for m in self.universe if self._period_unloads[m] >= 1 and m in loaded}

    def _evict_order(self, protect: set[str]) -> list[str]:
        loaded = [m for m in self.pool.loaded() if m not in protect]
        temp = self._loaded_in_period

        def rank(m: str) -> tuple[int, int, str]:
            likely = m in self._likely
            if not likely:
                group = 0 if m in temp else 1
            else:
                group = 2 if m not in temp else 3
            return (group, -(self.pool.cost(m) or 0), m)

        # Never unload twice in a period: a model unloaded and reloaded stays.
        return sorted((m for m in loaded if self._period_unloads[m] == 0), key=rank)

    def margin(self, name: str) -> float:
        """The share added to ``name``'s cost: ``cost_margin``, or the spread of its recent
        measurements ((max - min) / max of the last five) when that is larger, at most 50%."""
        hist = [h for h in self.pool.cost_history(name)[-5:] if h > 0]
        spread = (max(hist) - min(hist)) / max(hist) if len(hist) >= 2 else 0.0
        return min(max(self.cost_margin, spread), 0.5)

    def _make_room(self, name: str, cost: int, protect: set[str], report: PeriodReport | None) -> bool:
        # Room for the cost plus the margin (a load can measure more than last time), but
        # never more than the whole budget: a model that fits alone is always loadable.
        need = int(cost * (1.0 + self.margin(name)))
        if need > self.pool.budget:
            log.warning(
                "planner: %s costs %d B, within the budget of %d B only without its margin: its peak may pass the budget",
                name, cost, self.pool.budget,
            )
            need = self.pool.budget
        while self.pool.charged() + need > self.pool.budget:
            order = self._evict_order(protect)
            if not order:
                return False
            victim = order[0]
            if self._unload(victim, "profile"):
                if report is not None:
                    report.evicted.append(victim)
            else:
                protect = protect | {victim}
        return True

    def _ensure_loaded(self, name: str, report: PeriodReport | None) -> str | None:
        """Load ``name`` for profiling within the budget; None when loaded, else why not."""
        if self.pool.is_loaded(name):
            return None
        why = self.pool.unavailable_reason(name)
        if why is not None:
            return f"unavailable: {why}"
        if name in self._spent():
            return "already loaded and unloaded this period"
        for attempt in range(2):
            cost = self.pool.cost(name) or 0
            if cost > self.pool.budget:
                return f"its cost {cost} B exceeds the budget {self.pool.budget} B on its own"
            if not self._make_room(name, cost, {name}, report):
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

    def _profile(
        self, frames: Sequence[ProfileFrame] | FrameSource, order: Sequence[str], report: PeriodReport, keep: bool = True
    ) -> dict[str, TupleSet]:
        """Run ``frames`` through each model of ``order``, one after another, via the pool."""
        parts: dict[str, TupleSet] = {}
        bs = self.cfg.scheduler.batch_size
        for name in order:
            why = self._ensure_loaded(name, report)
            if why is not None:
                report.skipped[name] = why
                continue
            try:
                parts[name] = profile(frames, {name: self.served[name]}, self._use_loaded, batch_size=bs, progress=False)
                report.profiled.append(name)
            except ModelNotLoaded as exc:
                report.skipped[name] = str(exc)
            except Exception as exc:  # the model failed on these frames: it cannot be profiled now
                log.warning("planner: profiling %s failed: %s", name, exc)
                report.skipped[name] = f"{type(exc).__name__}: {exc}"
            if not keep:
                self._unload(name, "profile")
        return parts

    # -- selection -----------------------------------------------------------------------------
    def _costs(self) -> dict[str, int]:
        """Costs as selection sees them: the pool's measured cost plus :meth:`margin`."""
        return {m: int(math.ceil(c * (1.0 + self.margin(m)))) for m, c in self.pool.costs().items() if m in self.served}

    def _select(self) -> Selection:
        """The selector's choice under this period's constraints (unavailable, deferred, kept)."""
        unavailable = set(self.pool.unavailable())
        return select_models(
            self.selector,
            self._costs(),  # margins already added, per model
            self.accuracy,
            self.budget,
            models=self.universe,
            exclude=unavailable | self._spent(),
            forced=self._pinned_in() - unavailable,
            cost_margin=0.0,
        )

    def _evaluate(self, active: Iterable[str], selector: str = "evaluated") -> Selection:
        unavailable = set(self.pool.unavailable())
        costs = {m: c for m, c in self._costs().items() if m not in unavailable}
        return evaluate(active, costs, self.accuracy, self.budget, models=self.universe, selector=selector)

    def _make_plan(self, sel: Selection, reason: str, now: float, candidate: Selection | None = None) -> Plan:
        active = frozenset(sel.active)
        nodes = self.accuracy.nodes(active)
        sources = {
            k: tuple(self.accuracy.sources(active, k)) for m in self.universe if m not in active for k in self.accuracy.node_nodes(m)
        }
        plan = Plan(
            id=self._next_id,
            active=active,
            served=dict(self.served),
            expected={m: (1.0 if m in active else float(sel.expected.get(m, self.accuracy(active, m)))) for m in self.universe},
            expected_nodes=nodes,
            sources=sources,
            objective=float(sel.objective),
            budget=int(self.budget),
            cost=float(sum(self.pool.cost(m) or 0 for m in active)),
            selector=sel.selector,
            created_at=now,
            next_reselect_at=self._next_at,
            reason=reason,
            period=self.period,
            unavailable=self.pool.unavailable(),
            deferred=tuple(sorted(self._spent())),
            candidate_objective=(candidate.objective if candidate is not None and candidate.active != active else None),
        )
        self._next_id += 1
        return plan

    def _apply(self, sel: Selection, reason: str, now: float, report: PeriodReport | None, candidate: Selection | None = None) -> Plan:
        """Make the pool hold ``sel.active``; re-select on failures and refusals; never raises."""
        previous = self.plan.active if self.plan is not None else None
        for _ in range(len(self.universe) + 2):
            keep = self._pinned_in()
            target = frozenset(sel.active) | keep
            rep = self.pool.apply(target, reason=reason)
            for m in rep.unloaded:
                self._count_unload(m)
            for m in rep.loaded:
                self._count_load(m)
            self._drain_failures(report)
            if rep.ok:
                break
            log.warning("planner: applying %s: refused %s, failed %s, pinned %s; re-selecting", sorted(target), rep.refused, rep.failed, rep.pinned)
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
        self._note_charged()
        log.info("planner: plan %d (%s): active %s, objective %.4f, cost %.0f of %d B", plan.id, reason, sorted(plan.active), plan.objective, plan.cost, plan.budget)
        return plan

    def _drain_failures(self, report: PeriodReport | None) -> list[tuple[str, str]]:
        pending, self._pending_failures = self._pending_failures, []
        if report is not None:
            for name, why in pending:
                report.failures[name] = why
        return pending

    # -- the initial phase -----------------------------------------------------------------------
    def initial(self, frames: Sequence[ProfileFrame] | FrameSource | None = None, now: float | None = None) -> Plan:
        """Period 0: measure costs (and profile, train links if there are none), select, apply."""
        now = self.clock() if now is None else now
        t_start = time.perf_counter()
        report = PeriodReport(period=0, started_at=now, ran_at=now, frames=0, budget=self.budget)
        self._report = report
        self._period_loads.clear()
        self._period_unloads.clear()
        self._loaded_in_period.clear()
        relative = budget_is_relative(self.budget_spec)
        total = self.pool.meter.total()
        if relative and self._all_costs_known():
            # Costs known already (seeded from a saved table): the budget is known too.
            relative = False
            self.budget = self.pool.budget = resolve_budget(
                self.budget_spec, total, sum(self.pool.cost(m) or 0 for m in self.universe)
            )
        elif relative:
            # A share of costs nobody has measured yet: measure each model alone (one at a
            # time, unloaded after) under the device's memory, then set the real budget.
            self.pool.budget = max(self.pool.budget, total)
        else:
            self.budget = self.pool.budget = resolve_budget(self.budget_spec, total)
        need_tuples = self.links is None or self.heldout is None
        if need_tuples and frames is None:
            raise ValueError("the initial phase needs frames to profile: no links or no held-out tuples were given")
        tuples: TupleSet | None = None
        t0 = time.perf_counter()
        if frames is not None:
            frames = self._take(frames, self.cfg.links.profile_frames)
            parts = self._profile(frames, self.universe, report, keep=not relative)
            if parts:
                tuples = merge_tuples(parts)
                report.frames = len(tuples)
        for m in self.universe:  # models whose cost is still unknown: measure them now
            if self.pool.cost(m) is None and self.pool.unavailable_reason(m) is None and m not in report.skipped:
                why = self._ensure_loaded(m, report)
                if why is not None:
                    report.skipped[m] = why
                elif relative:
                    self._unload(m, "measure")
        report.profile_s = time.perf_counter() - t0
        if relative:
            # Those loads only measured costs (each model alone, unloaded after); serving
            # starts now, so they do not hold a chosen model back from loading.
            report.measured = {m: self._period_loads[m] for m in self.universe if self._period_loads[m]}
            self._period_loads.clear()
            self._period_unloads.clear()
            self._loaded_in_period.clear()
            costs = {m: c for m, c in self.pool.costs().items() if m in self.served}
            self.budget = resolve_budget(self.budget_spec, total, sum(costs.get(m, 0) for m in self.universe))
            self.pool.budget = self.budget
        report.budget = self.budget
        t0 = time.perf_counter()
        if self.links is None:
            self._train_initial(tuples, report)
        elif self.heldout is None and tuples is not None:
            self.heldout = _restrict(tuples, self.links.specs)
        report.fine_tune_s = time.perf_counter() - t0
        self.eval_tuples = self.heldout
        t0 = time.perf_counter()
        self.accuracy = LinkAccuracy(self.links, self.eval_tuples, self.served)
        report.eval_tuples = self.accuracy.n
        period_s = self.cfg.scheduler.period_s
        self._next_at = now + period_s
        self._drain_failures(report)
        sel = self._select()
        report.measure_s = self.accuracy.seconds
        report.select_s = time.perf_counter() - t0 - self.accuracy.seconds
        report.candidate = sel.to_json()
        self._likely = frozenset(sel.active)
        t0 = time.perf_counter()
        plan = self._apply(sel, "initial", now, report)
        report.apply_s = time.perf_counter() - t0
        report.switched = True
        self._finish(report, plan, t_start)
        return plan

    def _all_costs_known(self) -> bool:
        return all(self.pool.cost(m) is not None for m in self.universe)

    def _take(self, frames: Sequence[ProfileFrame] | FrameSource, n: int) -> Sequence[ProfileFrame] | FrameSource:
        if callable(frames):
            src = frames
            return lambda: itertools.islice(src(), n)
        return list(frames)[:n]

    def _train_initial(self, tuples: TupleSet | None, report: PeriodReport) -> None:
        if tuples is None or len(tuples) < 4 or len(tuples.models) < 2:
            report.fine_tune_note = "no links: fewer than two models or four frames could be profiled"
            log.error("planner: %s", report.fine_tune_note)
            return
        train, test = tuples.split(self.heldout_share, self.seed)
        try:
            self.links = LinkSet.train(train, val_share=0.2, config=self.train_config, progress=self.progress or None)
        except (LinkError, ValueError) as exc:
            report.fine_tune_note = f"links could not be trained: {exc}"
            log.error("planner: %s", report.fine_tune_note)
            return
        self.heldout = test
        report.trained = True

    def _finish(self, report: PeriodReport, plan: Plan, t_start: float) -> None:
        report.plan_id = plan.id
        report.loads = {m: self._period_loads[m] for m in self.universe}
        report.unloads = {m: self._period_unloads[m] for m in self.universe}
        report.total_s = time.perf_counter() - t_start
        self.reports.append(report)
        del self.reports[: max(0, len(self.reports) - self.history_limit)]

    # -- periods -------------------------------------------------------------------------------
    def on_frames(self, frames: Sequence[ProfileFrame], now: float | None = None, *, run: bool = True) -> Tick:
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
        if self._pending_failures:
            self._replan_failures(now)
            tick.replanned = True
        self._frames_seen += len(frames)
        if self._collect_from is None and now >= self._next_at:
            self._collect_from = self._next_at
            while self._next_at <= now:
                self._next_at += self.cfg.scheduler.period_s
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
        stale = bool(self._buffer) and now >= self._collect_from + self.cfg.scheduler.period_s / 2
        return full or stale

    def run_period(self, now: float | None = None) -> PeriodReport:
        """Re-profile the buffered frames, fine-tune and re-measure, re-select, apply once."""
        if self.plan is None:
            raise RuntimeError("call Planner.initial() before run_period()")
        now = self.clock() if now is None else now
        t_start = time.perf_counter()
        frames, self._buffer = self._buffer, []
        started = self._collect_from if self._collect_from is not None else now
        self._collect_from = None
        self.period += 1
        self._period_loads.clear()
        self._period_unloads.clear()
        self._loaded_in_period.clear()
        report = PeriodReport(period=self.period, started_at=started, ran_at=now, frames=len(frames), budget=self.budget)
        self._report = report
        self._drain_failures(report)

        # 1. profile: loaded models first (no load), then the rest, likely ones last.
        loaded = self.pool.loaded()
        rest = [m for m in self.universe if m not in loaded]
        rest.sort(key=lambda m: (m in self._likely, -(self.pool.cost(m) or 0), m))
        order = [m for m in self.universe if m in loaded] + rest
        t0 = time.perf_counter()
        parts = self._profile(frames, order, report) if frames else {}
        report.profile_s = time.perf_counter() - t0

        # 2. fine-tune on half the new tuples, re-measure on a window holding the other half.
        t0 = time.perf_counter()
        self._update_links(parts, report)
        report.fine_tune_s = time.perf_counter() - t0
        self.accuracy = LinkAccuracy(self.links, self.eval_tuples, self.served)
        report.eval_tuples = self.accuracy.n

        # 3. re-select, with hysteresis against the current plan re-evaluated.
        self._drain_failures(report)
        t0 = time.perf_counter()
        candidate = self._select()
        current = self._evaluate(self.plan.active, selector=self.plan.selector)
        residency_ok = now - self._active_since >= self.cfg.scheduler.min_residency_s
        chosen = keep_or_switch(current, candidate, self.cfg.scheduler.switch_margin, residency_ok)
        report.measure_s = self.accuracy.seconds
        report.select_s = time.perf_counter() - t0 - self.accuracy.seconds
        report.candidate = candidate.to_json()
        report.current_objective = current.objective
        report.switched = chosen.active != self.plan.active
        self._likely = frozenset(candidate.active) | frozenset(chosen.active)

        # 4. apply once.
        t0 = time.perf_counter()
        plan = self._apply(chosen, "period", now, report, candidate=candidate)
        report.apply_s = time.perf_counter() - t0
        self._finish(report, plan, t_start)
        return report

    def _update_links(self, parts: Mapping[str, TupleSet], report: PeriodReport) -> None:
        if self.links is None:
            report.fine_tune_note = "no links"
            return
        nodes = list(self.links.specs)
        link_models = set(self.links.models)
        missing = sorted(link_models - set(parts))
        if missing:
            report.fine_tune_note = f"not fine-tuned: {', '.join(missing)} could not be profiled (links need complete tuples)"
            return
        new = _restrict(merge_tuples({m: parts[m] for m in link_models}), nodes)
        if len(new) >= 2:
            tune, held = new.split(0.5, self.seed + self.period)
        else:
            tune, held = new, None
        if self.cfg.links.fine_tune:
            try:
                self.links.fine_tune(tune, epochs=self.fine_tune_epochs)
                report.fine_tuned = True
            except Exception as exc:  # the links' problem must not stop serving
                log.exception("planner: fine-tuning failed")
                report.fine_tune_note = f"fine-tuning failed: {type(exc).__name__}: {exc}"
        else:
            report.fine_tune_note = "fine-tuning off (links.fine_tune: false)"
        if held is not None:
            self._extend_window(held)

    def _extend_window(self, held: TupleSet) -> None:
        window = self.eval_tuples
        if window is None or set(window.specs) != set(held.specs):
            window = held
        else:
            window = TupleSet(
                specs=dict(window.specs),
                values={k: list(v) for k, v in window.values.items()},
                streams=list(window.streams),
                timestamps=list(window.timestamps),
            )
            try:
                window.extend(held)
            except ValueError:
                window = held
        cap = self.eval_window or max(len(self.heldout) if self.heldout is not None else 0, 50)
        if len(window) > cap:
            window = window.subset(range(len(window) - cap, len(window)))
        self.eval_tuples = window

    def _replan_failures(self, now: float) -> Plan:
        failures = self._drain_failures(self._report)
        log.warning("planner: re-planning after failed loads: %s", dict(failures))
        sel = self._select()
        plan = self._apply(sel, "failure", now, self._report)
        if self._report is not None:  # the period's counts include this re-plan's loads
            self._report.loads = {m: self._period_loads[m] for m in self.universe}
            self._report.unloads = {m: self._period_unloads[m] for m in self.universe}
            self._report.replans += 1
        return plan

    # -- serving convenience -------------------------------------------------------------------
    def serve(self, frames: Sequence[Any]) -> list[Any]:
        """:func:`mlink.scheduler.serving.serve` with this planner's plan, pool, links, accuracies."""
        from mlink.scheduler.serving import serve

        if self.plan is None:
            raise RuntimeError("call Planner.initial() before serve()")
        return serve(frames, self.plan, self.pool, self.links, batch_size=self.cfg.scheduler.batch_size, accuracy=self.accuracy.node)
