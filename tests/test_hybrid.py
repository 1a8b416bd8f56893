"""The hybrid plan's decision logic (scheduler/hybrid.py) and temporal links (links/temporal.py),
pure: numbers in, choices out. Everything here is deterministic (numpy only, fixed seeds)."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from mlink.links.temporal import N_INPUTS, ReuseModel, change_vector, choose
from mlink.scheduler.hybrid import LinkAudit, Modes, choose_modes, mode_options, plan_window

COSTS = {"a": 10.0, "b": 20.0, "c": 30.0}


def test_every_mode_option_fits_the_budget_at_every_instant() -> None:
    for budget in (10.0, 30.0, 35.0, 50.0, 60.0):
        options = mode_options(list(COSTS), COSTS, budget)
        assert options, budget
        for o in options:
            assert o.peak_bytes(COSTS) <= budget + 1e-9
            assert o.resident | o.rotating | o.predicted == set(COSTS)
            assert not (o.resident & o.rotating) and not (o.rotating & o.predicted)
            # a predicted model could not rotate beside the resident set
            for m in o.predicted:
                assert sum(COSTS[r] for r in o.resident) + COSTS[m] > budget
    # one model at a time: everything that fits alone rotates, nothing else is held with it
    one = mode_options(list(COSTS), COSTS, 25.0)
    assert Modes(frozenset(), frozenset({"a", "b"}), frozenset({"c"})) in one
    assert all(not o.rotating for o in one if o.resident)


def _decay(n: int, cams: list[int], rate: float = 0.8) -> np.ndarray:
    """(1, n, n): frame i served from frame j of the same camera scores rate^|i-j|."""
    r = np.zeros((1, n, n))
    for i, j in itertools.product(range(n), range(n)):
        if i != j and cams[i] == cams[j]:
            r[0, i, j] = rate ** abs(i - j)
    return r


def test_plan_window_spends_within_budget_and_spreads_runs() -> None:
    n = 12
    reuse = {"m": _decay(n, [0] * n)}
    plan = plan_window(reuse, {"m": np.zeros((1, n))}, {"m": np.zeros(1)}, {"m": 10.0}, {"m": 5.0}, budget_ms=36.0)
    runs = plan.runs["m"]
    assert plan.spent_ms <= 36.0 + 1e-9
    assert len(runs) == 3 and plan.loads == ["m"]
    assert min(np.diff(runs)) >= 2  # adjacent runs would waste the second one's reach
    assert np.all(plan.expected["m"][runs] == 1.0)
    assert plan.expected["m"].min() > 0.0


def test_plan_window_runs_nothing_where_nothing_is_gained_or_affordable() -> None:
    n = 6
    reuse = {"m": _decay(n, [0] * n)}
    sure = plan_window(reuse, {"m": np.zeros((1, n))}, {"m": np.ones(1)}, {"m": 1.0}, {"m": 0.0}, budget_ms=100.0)
    assert sure.runs["m"] == [] and sure.spent_ms == 0.0
    broke = plan_window(reuse, {"m": np.zeros((1, n))}, {"m": np.zeros(1)}, {"m": 1.0}, {"m": 5.0}, budget_ms=5.5)
    assert broke.runs["m"] == [] and broke.loads == []


def test_plan_window_prefers_the_model_whose_prediction_is_least_sure() -> None:
    n = 8
    cams = [0, 1] * 4  # two cameras interleaved: a frame never serves the other camera
    reuse = {"sure": _decay(n, cams), "unsure": _decay(n, cams)}
    prior = {m: np.zeros((1, n)) for m in reuse}
    link = {"sure": np.array([0.9]), "unsure": np.array([0.2])}
    plan = plan_window(reuse, prior, link, {"sure": 10.0, "unsure": 10.0}, {"sure": 0.0, "unsure": 0.0}, 20.0)
    assert len(plan.runs["unsure"]) == 2 and plan.runs["sure"] == []
    # one run per camera: the other camera's frames cannot reuse it
    assert {cams[j] for j in plan.runs["unsure"]} == {0, 1}


def test_choose_modes_best_expected_within_time() -> None:
    a = Modes(frozenset({"a"}), frozenset(), frozenset({"b"}))
    b = Modes(frozenset(), frozenset({"a", "b"}), frozenset())
    figures = {a: (0.9, 50.0), b: (0.8, 20.0)}
    assert choose_modes([a, b], figures.__getitem__, 60.0)[0] == a
    assert choose_modes([a, b], figures.__getitem__, 30.0)[0] == b
    assert choose_modes([a, b], figures.__getitem__, 10.0)[0] == b  # nothing fits: the fastest


def _pairs(rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Synthetic pairs: reuse is right with probability exp(-6 * pixel change)."""
    X, y = [], []
    for _ in range(n):
        d = float(rng.uniform(0, 0.5))
        X.append(change_vector([d, d / 2, d / 3, d / 4], age_s=float(rng.uniform(0, 2)), ahead=bool(rng.integers(2))))
        y.append(float(rng.random() < np.exp(-6 * d)))
    return np.stack(X), np.array(y)


def test_reuse_model_is_calibrated_and_falls_with_change() -> None:
    rng = np.random.default_rng(0)
    X, y = _pairs(rng, 3000)
    model = ReuseModel.fit({"n": (X, y)})
    Xt, yt = _pairs(rng, 3000)
    q = model.expected("n", Xt)
    assert abs(q.mean() - yt.mean()) < 0.02  # calibrated on data it did not see
    small, large = (change_vector([d, d / 2, d / 3, d / 4], 0.5, False) for d in (0.01, 0.4))
    assert model.expected("n", small[None])[0] > 0.85 > 0.2 > model.expected("n", large[None])[0]
    # every real execution teaches: pairs saying small changes now break reuse pull it down
    before = model.expected("n", small[None])[0]
    model.learn("n", np.repeat(small[None], 2000, axis=0), np.zeros(2000))
    assert model.n_pairs("n") == 5000
    assert model.expected("n", small[None])[0] < before - 0.3


def test_unknown_node_and_the_gate() -> None:
    model = ReuseModel()
    assert not model.knows("x") and model.expected("x", np.zeros((2, N_INPUTS))).tolist() == [0.0, 0.0]
    assert choose(np.array([0.3, 0.7]), 0.5) == (1, pytest.approx(0.7))
    assert choose(np.array([0.3, 0.4]), 0.5) == (-1, 0.5)
    assert choose(np.array([]), 0.5) == (-1, 0.5)


def test_link_audit_corrects_held_out_figures_by_what_serving_measured() -> None:
    audit = LinkAudit(prior_weight=10.0)
    assert audit.drift() == 1.0 and audit.corrected("m:n", {"a"}, 0.8) == 0.8
    audit.record("m:n", {"a"}, expected=0.8, measured=0.0)
    assert 0.9 < audit.drift() < 1.0  # one audit cannot zero the links
    for _ in range(500):  # the links really score 0.4 where they were expected to score 0.8
        audit.record("m:n", {"a"}, expected=0.8, measured=0.4)
    assert audit.corrected("m:n", {"a"}, 0.8) == pytest.approx(0.4, abs=0.02)
    # a measured node from a set never audited: the drift measured on every audit
    assert audit.corrected("m:n", {"b"}, 0.9) == pytest.approx(0.9 * audit.drift())
    assert audit.drift() == pytest.approx(0.5, abs=0.02)
    # a node never measured at all: the worst drift any node showed
    for _ in range(500):
        audit.record("k:l", {"a"}, expected=0.5, measured=0.5)  # this one did not drift
    assert audit.drift() > 0.6 and audit.worst_drift() == pytest.approx(0.5, abs=0.02)
    assert audit.corrected("x:y", {"a"}, 0.9) == pytest.approx(0.9 * audit.worst_drift())
    lucky = LinkAudit()
    lucky.record("m:n", set(), expected=0.2, measured=1.0)
    assert lucky.drift() == 1.0  # never raised above the held-out figure
    assert audit.audits == 1001
