"""Selection on synthetic matrices whose optimum is known (pure functions, no models)."""

from __future__ import annotations

import itertools
import json
import math
import random

import pytest

from mlink.scheduler.selection import (
    Selection,
    activation_probabilities,
    best_link_accuracy,
    evaluate,
    keep_or_switch,
    objective,
    objective_select,
    paper_greedy,
    set_cost,
)


def table_acc(table: dict[tuple[frozenset[str], str], float], default: float = 0.0):
    """ensemble_acc from an explicit table; sets not listed fall back to the best subset listed."""

    def acc(active: frozenset[str], target: str) -> float:
        if (active, target) in table:
            return table[(active, target)]
        best = default
        for (src, tgt), v in table.items():
            if tgt == target and src <= active:
                best = max(best, v)
        return best

    return acc


def brute_force(costs, acc, budget, link_costs=None):
    """Best feasible set over *every* subset (no pruning), same tie-break as the selectors."""
    names = sorted(costs)
    best = None
    for r in range(len(names) + 1):
        for combo in itertools.combinations(names, r):
            s = frozenset(combo)
            c = set_cost(s, costs, names, link_costs)
            if c > budget + 1e-12:
                continue
            key = (-round(objective(s, names, acc), 12), c, len(s), tuple(sorted(s)))
            if best is None or key < best[0]:
                best = (key, s)
    return best[1], -best[0][0]


# -- Eq. 1 ------------------------------------------------------------------------------------


def test_objective_is_eq1():
    acc = table_acc({(frozenset({"a"}), "b"): 0.5, (frozenset({"a"}), "c"): 0.8})
    assert objective({"a"}, ["a", "b", "c"], acc) == pytest.approx((1 + 0.5 + 0.8) / 3)
    assert objective({"a", "b", "c"}, ["a", "b", "c"], acc) == pytest.approx(1.0)
    # With nothing active the callable answers the trivial accuracy.
    triv = table_acc({(frozenset(), "a"): 0.2, (frozenset(), "b"): 0.4, (frozenset(), "c"): 0.0})
    assert objective(set(), ["a", "b", "c"], triv) == pytest.approx(0.2)


def test_objective_rejects_accuracy_outside_unit_interval():
    with pytest.raises(ValueError, match="not in"):
        objective({"a"}, ["a", "b"], lambda s, t: 1.5)


def test_set_cost_charges_links_only_when_something_runs():
    costs = {"a": 5.0, "b": 5.0, "c": 5.0}
    links = {"a": 1.0, "b": 2.0, "c": 3.0}
    assert set_cost(set(), costs, link_costs=links) == 0.0
    assert set_cost({"a"}, costs, link_costs=links) == 5.0 + 2.0 + 3.0
    assert set_cost({"a", "b", "c"}, costs, link_costs=links) == 15.0
    assert set_cost({"zzz"}, costs) == math.inf


# -- the paper's greedy -----------------------------------------------------------------------


def test_activation_probabilities_follow_the_formula():
    costs = {"a": 1.0, "b": 5.0, "c": 2.0}
    links = {("b", "a"): 1.0, ("b", "c"): 1.0}
    p = activation_probabilities(costs, links)
    w = 2.0 / 1.0
    assert p["a"] == pytest.approx((1 + 0 - 0.5) / (w * 1))
    assert p["b"] == pytest.approx((1 + 1 - 0) / (w * 5))
    assert p["c"] == pytest.approx((1 + 0 - 0.5) / (w * 2))


def test_paper_greedy_skips_a_model_that_does_not_fit_and_tries_the_next():
    # P order is a (0.25), b (0.2), c (0.125); after a, b does not fit but c does.
    costs = {"a": 1.0, "b": 5.0, "c": 2.0}
    links = {("b", "a"): 1.0, ("b", "c"): 1.0}
    sel = paper_greedy(costs, links, budget=5.0)
    assert sel.active == {"a", "c"}
    assert sel.cost == 3.0 and sel.feasible
    assert sel.selector == "paper"


def big_vs_small():
    """B predicts both small models perfectly; each small one predicts B at 0.7 alone and
    together, and the other small one at 0.2. The budget holds B alone or both small ones."""
    costs = {"B": 10.0, "s1": 5.0, "s2": 5.0}
    links = {
        ("B", "s1"): 1.0,
        ("B", "s2"): 1.0,
        ("s1", "B"): 0.7,
        ("s2", "B"): 0.7,
        ("s1", "s2"): 0.2,
        ("s2", "s1"): 0.2,
    }
    acc = best_link_accuracy(links)
    return costs, links, acc


def test_big_perfect_predictor_beats_two_small_ones_and_the_paper_greedy_misses_it():
    costs, links, acc = big_vs_small()
    greedy = paper_greedy(costs, links, budget=10.0, ensemble_acc=acc)
    best = objective_select(costs, acc, budget=10.0)
    # P(B) = (1 + 1 - 0.7) / (0.4 * 10) = 0.325 < P(s) = (1 + 0.45 - 0.6) / (0.4 * 5) = 0.425
    assert greedy.active == {"s1", "s2"}
    assert greedy.objective == pytest.approx((2 + 0.7) / 3)
    assert best.active == {"B"}
    assert best.objective == pytest.approx(1.0)
    assert best.expected == {"B": 1.0, "s1": 1.0, "s2": 1.0}
    assert best.selector == "objective-exact"


def test_objective_search_finds_mutual_assistance_the_single_links_hide():
    # x and y alone predict t at 0.3, together perfectly (mutual assistance); z predicts t at
    # 0.6 and x, y at 0.2, so the paper's P ranks z first. Budget: two of x, y, z.
    costs = {"x": 1.0, "y": 1.0, "z": 1.0, "t": 10.0}
    links = {("x", "t"): 0.3, ("y", "t"): 0.3, ("z", "t"): 0.6, ("z", "x"): 0.2, ("z", "y"): 0.2}
    single = best_link_accuracy(links)

    def acc(active: frozenset[str], target: str) -> float:
        if target == "t" and {"x", "y"} <= active:
            return 1.0
        return single(active, target)

    p = activation_probabilities(costs, links)
    assert max(p, key=p.get) == "z"
    greedy = paper_greedy(costs, links, budget=2.0, ensemble_acc=acc)
    best = objective_select(costs, acc, budget=2.0)
    assert greedy.active == {"x", "z"}
    assert greedy.objective == pytest.approx((1 + 1 + 0.6 + 0.2) / 4)
    assert best.active == {"x", "y"}
    assert best.objective == pytest.approx((1 + 1 + 1 + 0) / 4)


# -- objective search -------------------------------------------------------------------------


def test_nothing_fits_gives_the_empty_set_with_trivial_accuracies():
    costs = {"a": 5.0, "b": 6.0}
    triv = {"a": 0.25, "b": 0.5}
    acc = best_link_accuracy({("a", "b"): 0.9}, trivial=triv)
    for sel in (objective_select(costs, acc, budget=4.0), paper_greedy(costs, {}, budget=4.0, ensemble_acc=acc)):
        assert sel.active == frozenset()
        assert sel.cost == 0.0 and sel.feasible
        assert sel.objective == pytest.approx((0.25 + 0.5) / 2)
        assert sel.expected == {"a": 0.25, "b": 0.5}


def test_ties_break_deterministically_towards_cheaper_then_by_name():
    acc = lambda s, t: 0.0  # noqa: E731
    # Same objective (one model each), same cost: the name decides, whatever the dict order.
    for costs in ({"b": 5.0, "a": 5.0}, {"a": 5.0, "b": 5.0}):
        assert objective_select(costs, acc, 5.0).active == {"a"}
        assert paper_greedy(costs, {}, 5.0).active == {"a"}
    # Same objective, different cost: the cheaper one.
    assert objective_select({"a": 5.0, "b": 4.0}, acc, 5.0).active == {"b"}


def test_link_costs_count_against_the_budget():
    costs = {"a": 4.0, "b": 4.0, "c": 9.0}
    acc = lambda s, t: 0.5 if s else 0.0  # noqa: E731
    # Without link costs {a, b} fits 10; with c's link (3) it costs 11, so one model + link.
    assert objective_select(costs, acc, 10.0).active == {"a", "b"}
    sel = objective_select(costs, acc, 10.0, link_costs={"c": 3.0})
    # {a} (4 + link c 3 = 7) and {c} (9, links of a and b free) tie on the objective: cheaper wins.
    assert sel.active == {"a"} and sel.cost == pytest.approx(7.0)
    assert set_cost({"a", "b"}, costs, link_costs={"c": 3.0}) == 11.0


def test_exclude_keeps_a_failed_model_in_the_objective_but_never_active():
    costs, links, acc = big_vs_small()
    sel = objective_select(costs, acc, budget=10.0, exclude={"B"})
    assert "B" not in sel.active
    assert set(sel.expected) == {"B", "s1", "s2"}  # B is still served, predicted
    assert sel.active == {"s1", "s2"}
    assert paper_greedy(costs, links, 10.0, exclude={"B", "s1"}).active == {"s2"}


def random_instance(n: int, seed: int, density: float = 0.7):
    rng = random.Random(seed)
    names = [f"m{i:02d}" for i in range(n)]
    costs = {m: rng.uniform(1.0, 10.0) for m in names}
    links = {(i, j): rng.uniform(0.0, 1.0) for i in names for j in names if i != j and rng.random() < density}
    triv = {m: rng.uniform(0.0, 0.3) for m in names}
    return costs, links, best_link_accuracy(links, triv)


@pytest.mark.parametrize("seed", range(6))
def test_exact_search_matches_brute_force_and_beats_the_greedies(seed):
    costs, links, acc = random_instance(8, seed)
    budget = sum(costs.values()) * 0.4
    exact = objective_select(costs, acc, budget)
    unpruned = objective_select(costs, acc, budget, prune=False)
    truth, truth_obj = brute_force(costs, acc, budget)
    assert exact.active == truth and exact.objective == pytest.approx(truth_obj)
    assert unpruned.active == truth
    assert exact.evaluations < unpruned.evaluations  # pruning saved work
    greedy = objective_select(costs, acc, budget, exact_limit=0)
    paper = paper_greedy(costs, links, budget, ensemble_acc=acc)
    for sel in (greedy, paper):
        assert sel.feasible and sel.cost <= budget + 1e-9
        assert sel.objective <= exact.objective + 1e-12


def test_pruning_needs_monotone_accuracies():
    # Adding b makes a's ensemble for c worse (a non-monotone measured accuracy): the best set
    # is {a}, which is not maximal; only the unpruned search can find it.
    costs = {"a": 1.0, "b": 1.0, "c": 10.0}

    def acc(active, target):
        if target == "c":
            return 1.0 if active == {"a"} else 0.0
        return 0.0

    assert objective_select(costs, acc, 2.0, prune=False).active == {"a"}
    assert objective_select(costs, acc, 2.0, prune=True).active == {"a", "b"}


def test_twelve_models_search_exactly_thirteen_use_the_greedy():
    costs, _, acc = random_instance(12, 1)
    assert objective_select(costs, acc, 20.0).selector == "objective-exact"
    costs, _, acc = random_instance(13, 1)
    assert objective_select(costs, acc, 20.0).selector == "objective-greedy"
    # Candidates count, not the universe: excluding one brings 13 back to exact search.
    assert objective_select(costs, acc, 20.0, exclude={"m00"}).selector == "objective-exact"


def test_greedy_path_compares_with_the_best_single_model():
    # 12 cheap models each gain 1/13 for cost 0.5 (ratio 0.154); X predicts everyone and
    # gains 1.0 for cost 10 (ratio 0.1). Gain-per-cost greedy fills up on cheap ones, then X
    # cannot fit; the best single model, X alone, scores 1.0.
    cheap = [f"c{i:02d}" for i in range(12)]
    costs = {**{c: 0.5 for c in cheap}, "X": 10.0}

    def acc(active, target):
        return 1.0 if "X" in active else 0.0

    sel = objective_select(costs, acc, budget=10.0)
    assert sel.selector == "objective-greedy"
    assert sel.active == {"X"} and sel.objective == pytest.approx(1.0)
    exact = objective_select(costs, acc, budget=10.0, exact_limit=13)
    assert exact.active == {"X"}


def test_fifty_model_greedy_is_fast_and_feasible():
    costs, links, acc = random_instance(50, 7, density=0.3)
    budget = sum(costs.values()) * 0.3
    calls = 0

    def counted(active, target):
        nonlocal calls
        calls += 1
        return acc(active, target)

    sel = objective_select(costs, counted, budget)
    paper = paper_greedy(costs, links, budget, ensemble_acc=acc)
    assert sel.selector == "objective-greedy"
    assert sel.feasible and sel.cost <= budget
    assert len(sel.active) >= 2
    best_single = max(objective({m}, costs, acc) for m in costs if costs[m] <= budget)
    assert sel.objective >= best_single - 1e-12
    assert sel.objective >= paper.objective - 0.05  # the marginal-gain greedy is not worse in practice
    assert paper.feasible and paper.cost <= budget
    # Fast, counted in work rather than seconds (the seconds are `make bench`'s, from
    # mlink.bench.scheduler): the greedy evaluates the empty set, then in round r at most the
    # n - r models left, so at most 1 + n(n+1)/2 sets (exact search: 2^50), and it asks for each
    # (set, target) accuracy once.
    n = len(costs)
    assert sel.evaluations <= 1 + n * (n + 1) // 2, sel.evaluations
    assert calls <= n * sel.evaluations, (calls, sel.evaluations)


def test_costs_must_be_finite_and_non_negative():
    with pytest.raises(ValueError):
        objective_select({"a": -1.0}, lambda s, t: 0.0, 5.0)
    with pytest.raises(ValueError):
        paper_greedy({"a": float("inf")}, {}, 5.0)


# -- Selection and hysteresis -----------------------------------------------------------------


def test_selection_to_json_is_serialisable_and_complete():
    costs, _links, acc = big_vs_small()
    sel = objective_select(costs, acc, budget=12.0)
    data = json.loads(json.dumps(sel.to_json()))
    assert data["active"] == ["B"]
    assert data["predicted"] == ["s1", "s2"]
    assert data["budget_used"] == pytest.approx(10.0 / 12.0)
    assert data["expected"]["B"] == 1.0
    assert data["selector"] == "objective-exact" and data["feasible"] is True


def sel(active, obj, feasible=True):
    return Selection(frozenset(active), obj, 1.0, 10.0, "test", {}, feasible)


def test_keep_or_switch_needs_a_margin_and_residency():
    cur, cand = sel({"a"}, 0.80), sel({"b"}, 0.84)
    assert keep_or_switch(None, cand, 0.05, residency_ok=False) is cand
    assert keep_or_switch(cur, cand, margin=0.05, residency_ok=True) is cur  # within margin
    assert keep_or_switch(cur, cand, margin=0.02, residency_ok=True) is cand
    assert keep_or_switch(cur, cand, margin=0.02, residency_ok=False) is cur  # too soon
    worse = sel({"c"}, 0.7)
    assert keep_or_switch(cur, worse, margin=0.0, residency_ok=True) is cur


def test_keep_or_switch_leaves_an_infeasible_plan_even_before_residency():
    cur, cand = sel({"a"}, 0.95, feasible=False), sel({"b"}, 0.60)
    assert keep_or_switch(cur, cand, margin=0.5, residency_ok=False) is cand
    # ...but does not switch to an infeasible candidate.
    assert keep_or_switch(sel({"a"}, 0.5), sel({"b"}, 0.9, feasible=False), 0.0, True).active == {"a"}


def test_reevaluated_current_plan_feeds_the_hysteresis():
    costs, _links, acc = big_vs_small()
    current = objective_select(costs, acc, budget=10.0)  # {B}
    # B's cost grew (re-measured): the current plan no longer fits and must be left.
    grown = {**costs, "B": 11.0}
    again = evaluate(current.active, grown, acc, 10.0)
    assert not again.feasible
    cand = objective_select(grown, acc, 10.0)
    assert keep_or_switch(again, cand, margin=0.5, residency_ok=False).active == {"s1", "s2"}
    # A model that failed to load has no cost: a plan that needs it is infeasible.
    missing = {k: v for k, v in costs.items() if k != "B"}
    assert not evaluate({"B"}, missing, acc, 10.0, models=costs).feasible
