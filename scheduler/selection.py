"""Which models to run: pure functions of (costs, link accuracies, budget).

Eq. 1 of MLink: choose the activated set A to maximise the average output accuracy

    (1/|F|) * ( |A| + sum_{j in F \\ A} p(h_{A,j}) )
    s.t.  sum_{i in A} c(f_i) + sum_{j not in A} c(h_{A,j}) <= B

where an executed model counts 1 and a predicted one counts the accuracy of its ensemble of
links over the active sources. Selectors here:

- :func:`paper_greedy`: the paper's activation probability P_i = (1 + P1_i - P2_i) / (w c_i),
  w = 2 / min c, added in descending order, skipping a model that does not fit;
- :func:`objective_select`: the real objective with ensemble accuracies, by exact search over
  the feasible sets when there are at most ``exact_limit`` candidates, else by marginal-gain
  greedy (gain per cost) compared with the best single model (the usual knapsack-constrained
  submodular recipe).

Nothing here measures or loads anything: costs come from the pool's measurements, accuracies
from the links package, as plain numbers and a callable.

Conventions: ``ensemble_acc(active, target)`` is p(h_{A,j}) in [0, 1]; with ``active`` empty it
is the target's trivial accuracy (a constant output), which the callable decides. Costs must be
finite and >= 0. A link cost c(h_{A,j}) is charged for each predicted target only when A is not
empty (with nothing active there is nothing to run a link on).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

EnsembleAcc = Callable[[frozenset[str], str], float]

_EPS = 1e-12


@dataclass(frozen=True)
class Selection:
    """A chosen set with what it is expected to achieve."""

    active: frozenset[str]
    objective: float  # Eq. 1: expected mean output accuracy over all models
    cost: float  # models in A plus the links of the predicted targets
    budget: float
    selector: str
    expected: Mapping[str, float] = field(default_factory=dict)  # 1.0 executed, p(h) predicted
    feasible: bool = True
    evaluations: int = 0  # objective evaluations the selector spent

    @property
    def predicted(self) -> frozenset[str]:
        return frozenset(self.expected) - self.active

    def to_json(self) -> dict[str, Any]:
        return {
            "selector": self.selector,
            "active": sorted(self.active),
            "predicted": sorted(self.predicted),
            "objective": round(self.objective, 6),
            "cost": self.cost,
            "budget": self.budget,
            "budget_used": (self.cost / self.budget) if self.budget > 0 else None,
            "feasible": self.feasible,
            "expected": {k: round(v, 6) for k, v in sorted(self.expected.items())},
            "evaluations": self.evaluations,
        }


# -- evaluating a set -------------------------------------------------------------------------


def set_cost(
    active: Iterable[str],
    costs: Mapping[str, float],
    models: Iterable[str] | None = None,
    link_costs: Mapping[str, float] | None = None,
) -> float:
    """sum_{i in A} c_i + sum_{j not in A} c(h_{A,j}) (the latter only when A is not empty).

    A model without a known cost cannot be activated: its set costs ``inf``.
    """
    active = frozenset(active)
    total = 0.0
    for name in active:
        if name not in costs:
            return math.inf
        total += float(costs[name])
    if active and link_costs:
        universe = set(costs) if models is None else set(models)
        total += sum(float(link_costs.get(j, 0.0)) for j in universe - active)
    return total


def objective(
    active: Iterable[str],
    models: Iterable[str],
    ensemble_acc: EnsembleAcc,
) -> float:
    """Eq. 1 for ``active`` over the universe ``models``: (|A| + sum_{j not in A} p(h_{A,j})) / |F|."""
    return _expected_and_objective(frozenset(active), tuple(models), ensemble_acc)[1]


def _expected_and_objective(
    active: frozenset[str], models: tuple[str, ...], ensemble_acc: EnsembleAcc
) -> tuple[dict[str, float], float]:
    if not models:
        return {}, 0.0
    expected: dict[str, float] = {}
    for j in models:
        if j in active:
            expected[j] = 1.0
        else:
            p = float(ensemble_acc(active, j))
            if not (0.0 <= p <= 1.0) or math.isnan(p):
                raise ValueError(f"ensemble accuracy for {j} from {sorted(active)} is {p}, not in [0, 1]")
            expected[j] = p
    return expected, sum(expected.values()) / len(models)


def evaluate(
    active: Iterable[str],
    costs: Mapping[str, float],
    ensemble_acc: EnsembleAcc,
    budget: float,
    *,
    models: Iterable[str] | None = None,
    link_costs: Mapping[str, float] | None = None,
    selector: str = "evaluated",
) -> Selection:
    """A :class:`Selection` for a given set: its objective, cost and feasibility.

    Use it to re-evaluate the current plan with fresh accuracies and costs before
    :func:`keep_or_switch`. Active models missing from ``costs`` make the set infeasible.
    """
    universe = tuple(sorted(set(costs) if models is None else set(models)))
    active = frozenset(active)
    expected, obj = _expected_and_objective(active, universe, ensemble_acc)
    cost = set_cost(active, costs, universe, link_costs)
    return Selection(
        active=active,
        objective=obj,
        cost=cost,
        budget=float(budget),
        selector=selector,
        expected=expected,
        feasible=cost <= budget + _EPS and active <= set(universe),
    )


class _Evaluator:
    """Eq. 1 with every p(h_{A,j}) cached, and the cost of a set, for one selection run."""

    def __init__(
        self,
        universe: tuple[str, ...],
        costs: Mapping[str, float],
        ensemble_acc: EnsembleAcc,
        link_costs: Mapping[str, float] | None,
    ) -> None:
        self.universe = universe
        self.costs = costs
        self.link_costs = link_costs or {}
        self._acc = ensemble_acc
        self._cache: dict[tuple[frozenset[str], str], float] = {}
        self._objectives: dict[frozenset[str], float] = {}

    def acc(self, active: frozenset[str], target: str) -> float:
        key = (active, target)
        if key not in self._cache:
            self._cache[key] = float(self._acc(active, target))
        return self._cache[key]

    def objective(self, active: frozenset[str]) -> float:
        if active not in self._objectives:
            self._objectives[active] = _expected_and_objective(active, self.universe, self.acc)[1]
        return self._objectives[active]

    @property
    def evaluations(self) -> int:
        return len(self._objectives)

    def cost(self, active: frozenset[str]) -> float:
        return set_cost(active, self.costs, self.universe, self.link_costs)

    def selection(self, active: frozenset[str], budget: float, selector: str) -> Selection:
        expected, obj = _expected_and_objective(active, self.universe, self.acc)
        cost = self.cost(active)
        return Selection(active, obj, cost, float(budget), selector, expected, cost <= budget + _EPS, self.evaluations)


def _check(costs: Mapping[str, float], budget: float) -> None:
    for name, c in costs.items():
        if not (c >= 0 and math.isfinite(c)):
            raise ValueError(f"cost of {name} must be finite and >= 0, got {c}")
    if math.isnan(budget):
        raise ValueError("budget is NaN")


def _universe(costs: Mapping[str, float], models: Iterable[str] | None) -> tuple[str, ...]:
    return tuple(sorted(set(costs) if models is None else set(models)))


def _candidates(costs: Mapping[str, float], universe: tuple[str, ...], exclude: Iterable[str]) -> list[str]:
    excluded = set(exclude)
    return [m for m in universe if m in costs and m not in excluded]


def _better(a: tuple[float, float, tuple[str, ...]], b: tuple[float, float, tuple[str, ...]] | None) -> bool:
    """Higher objective; on a tie (1e-12) lower cost; then fewer models; then names."""
    if b is None:
        return True
    if a[0] > b[0] + _EPS:
        return True
    if a[0] < b[0] - _EPS:
        return False
    return (a[1], len(a[2]), a[2]) < (b[1], len(b[2]), b[2])


# -- the paper's greedy -----------------------------------------------------------------------


def activation_probabilities(costs: Mapping[str, float], link_acc: Mapping[tuple[str, str], float]) -> dict[str, float]:
    """P_i = (1 + P1_i - P2_i) / (w c_i), w = 2 / min c; a missing link counts as accuracy 0.

    P1_i = mean_{j != i} p(g_ij) (how well i predicts the others), P2_i = mean_{j != i} p(g_ji)
    (how well the others predict i). A zero-cost model gets +inf (it always comes first).
    """
    names = sorted(costs)
    positive = [c for c in costs.values() if c > 0]
    w = 2.0 / min(positive) if positive else 1.0
    out: dict[str, float] = {}
    for i in names:
        others = [j for j in names if j != i]
        p1 = sum(float(link_acc.get((i, j), 0.0)) for j in others) / len(others) if others else 0.0
        p2 = sum(float(link_acc.get((j, i), 0.0)) for j in others) / len(others) if others else 0.0
        out[i] = (1.0 + p1 - p2) / (w * costs[i]) if costs[i] > 0 else math.inf
    return out


def best_link_accuracy(
    link_acc: Mapping[tuple[str, str], float], trivial: Mapping[str, float] | None = None
) -> EnsembleAcc:
    """A stand-in for ensemble accuracies from single links: p(h_{A,j}) ~ max_{i in A} p(g_ij).

    That is the dominance regime of the papers (an ensemble is at least as good as its best
    source, which a trained ensemble can learn to be). With A empty: ``trivial[j]`` or 0.
    """
    triv = dict(trivial or {})

    def acc(active: frozenset[str], target: str) -> float:
        best = triv.get(target, 0.0)
        for i in active:
            best = max(best, float(link_acc.get((i, target), 0.0)))
        return best

    return acc


def paper_greedy(
    costs: Mapping[str, float],
    link_acc: Mapping[tuple[str, str], float],
    budget: float,
    *,
    ensemble_acc: EnsembleAcc | None = None,
    link_costs: Mapping[str, float] | None = None,
    models: Iterable[str] | None = None,
    exclude: Iterable[str] = (),
) -> Selection:
    """The paper's activation-probability greedy; a model that does not fit is skipped.

    The objective reported is Eq. 1 with ``ensemble_acc`` when given, else with
    :func:`best_link_accuracy` over ``link_acc``. ``models`` is the universe F (default: the
    models with costs); ``exclude`` names models that cannot run now (e.g. failed loads).
    """
    _check(costs, budget)
    universe = _universe(costs, models)
    cands = _candidates(costs, universe, exclude)
    probs = activation_probabilities({m: costs[m] for m in universe if m in costs}, link_acc)
    ev = _Evaluator(universe, costs, ensemble_acc or best_link_accuracy(link_acc), link_costs)
    active: frozenset[str] = frozenset()
    for name in sorted(cands, key=lambda m: (-probs[m], costs[m], m)):
        trial = active | {name}
        if ev.cost(trial) <= budget + _EPS:
            active = trial
    return ev.selection(active, budget, "paper")


# -- the objective-driven selector ------------------------------------------------------------


def objective_select(
    costs: Mapping[str, float],
    ensemble_acc: EnsembleAcc,
    budget: float,
    exact_limit: int = 12,
    *,
    link_costs: Mapping[str, float] | None = None,
    models: Iterable[str] | None = None,
    exclude: Iterable[str] = (),
    prune: bool = True,
) -> Selection:
    """Maximise Eq. 1 under the budget: exact search up to ``exact_limit`` candidates, else greedy.

    Exact search enumerates every feasible set. With ``prune`` (default) only the *maximal*
    ones (no single further model fits) are evaluated: adding a model to A turns its own
    term from p(h_{A,k}) into 1, so a superset is at least as good **provided** the ensemble
    accuracy of the other targets does not drop when a source is added (true of ensembles that
    may ignore a source, e.g. trained with dropped sources, and of :func:`best_link_accuracy`;
    pass ``prune=False`` when the accuracies come from measurements that may violate it).

    Beyond ``exact_limit``: marginal-gain greedy, adding the model with the largest gain per
    unit cost while one fits and gains, then compared with the best feasible single model.
    """
    _check(costs, budget)
    universe = _universe(costs, models)
    cands = _candidates(costs, universe, exclude)
    ev = _Evaluator(universe, costs, ensemble_acc, link_costs)
    if len(cands) <= exact_limit:
        return _exact(ev, cands, budget, prune)
    return _greedy(ev, cands, budget)


def _exact(ev: _Evaluator, cands: list[str], budget: float, prune: bool) -> Selection:
    n = len(cands)
    feasible: list[frozenset[str]] = []
    for r in range(n + 1):
        for combo in itertools.combinations(cands, r):
            s = frozenset(combo)
            if ev.cost(s) <= budget + _EPS:
                feasible.append(s)
    if not feasible:
        # Even the empty set is over budget (can only happen with negative budgets).
        return replace(ev.selection(frozenset(), budget, "objective-exact"), feasible=False)
    if prune:
        fset = set(feasible)
        feasible = [s for s in feasible if not any((s | {m}) in fset for m in cands if m not in s)]
    best: tuple[float, float, tuple[str, ...]] | None = None
    best_set: frozenset[str] = frozenset()
    for s in feasible:
        key = (ev.objective(s), ev.cost(s), tuple(sorted(s)))
        if _better(key, best):
            best, best_set = key, s
    return ev.selection(best_set, budget, "objective-exact")


def _greedy(ev: _Evaluator, cands: list[str], budget: float) -> Selection:
    active: frozenset[str] = frozenset()
    current = ev.objective(active)
    remaining = set(cands)
    while remaining:
        pick: tuple[float, float, str] | None = None
        for m in sorted(remaining):
            trial = active | {m}
            extra = ev.cost(trial) - ev.cost(active)
            if ev.cost(trial) > budget + _EPS:
                continue
            gain = ev.objective(trial) - current
            if gain <= _EPS:
                continue
            ratio = gain / extra if extra > 0 else math.inf
            if pick is None or ratio > pick[0] + _EPS or (abs(ratio - pick[0]) <= _EPS and gain > pick[1]):
                pick = (ratio, gain, m)
        if pick is None:
            break
        active = active | {pick[2]}
        current = ev.objective(active)
        remaining.discard(pick[2])
        remaining = {m for m in remaining if ev.cost(active | {m}) <= budget + _EPS}
    best_key = (current, ev.cost(active), tuple(sorted(active)))
    best_set = active
    for m in cands:
        single = frozenset([m])
        if ev.cost(single) <= budget + _EPS:
            key = (ev.objective(single), ev.cost(single), (m,))
            if _better(key, best_key):
                best_key, best_set = key, single
    return ev.selection(best_set, budget, "objective-greedy")


# -- hysteresis -------------------------------------------------------------------------------


def keep_or_switch(current: Selection | None, candidate: Selection, margin: float, residency_ok: bool) -> Selection:
    """The plan to use: keep ``current`` unless switching is clearly worth it.

    ``current`` should be re-evaluated (:func:`evaluate`) with the same accuracies, costs and
    budget as ``candidate``. Switch when there is no current plan; when the current plan is
    infeasible (over budget, or a model without a cost, e.g. one that failed to load) —
    regardless of residency, since keeping it breaks the budget or serves nothing; or when the
    minimum residency has passed (``residency_ok``) and the candidate's objective beats the
    current one by more than ``margin``. A candidate with the same set replaces the current one
    (fresher numbers, no load or unload).
    """
    if current is None or not current.feasible:
        return candidate
    if candidate.active == current.active:
        return candidate
    if not candidate.feasible:
        return current
    if residency_ok and candidate.objective > current.objective + margin:
        return candidate
    return current
