"""Hybrid plans: which models are resident, rotating or predicted, and where rotation runs.

The paper's plan has two modes: a model is loaded for the whole period (it runs on every
frame) or predicted by links. A camera's next frame looks like its last one, so a third mode
pays: a *rotating* model is loaded in turns over a short buffer of frames (at most
``max_delay_s`` of each camera), runs on the frames where its output matters most, and its real
outputs serve the buffer's other frames through temporal links
(:mod:`mlink.links.temporal`). This module is the decision logic, pure (numbers in, choices
out; no threads, models or frames):

- :func:`mode_options`: every split of the models into resident R, rotating Q and predicted P
  whose memory at *every instant* fits the budget: R stays loaded, the rotating models load one
  at a time into what R leaves, so the peak is cost(R) + max cost(Q);
- :func:`plan_window`: within one buffer, the (model, frame) executions that raise the expected
  accuracy most per millisecond of GPU time, until the buffer's time budget is spent. A
  rotating model's first execution in a buffer also pays its measured load time. The expected
  accuracy of a node on a frame is the best of: its real output (1.0), the reuse of a real output
  of the same camera (the temporal link's figure for that pair), or the cross-model prediction
  from the resident models (the ensemble's held-out accuracy). Picking by gain is the trigger:
  frames that changed most since the last real output (frame difference) and nodes whose
  prediction is least sure (link uncertainty) gain most;
- :func:`choose_modes`: the option with the best expected accuracy whose time fits, from an
  evaluation the caller runs (on data the links did not train on).
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from mlink.links.temporal import ReuseModel

MODES = ("resident", "rotating", "predicted")
EPS = 1e-9


@dataclass(frozen=True)
class Modes:
    """One split of the models into the three modes."""

    resident: frozenset[str]
    rotating: frozenset[str]
    predicted: frozenset[str]

    def mode(self, model: str) -> str:
        if model in self.resident:
            return "resident"
        return "rotating" if model in self.rotating else "predicted"

    def peak_bytes(self, costs: Mapping[str, float]) -> float:
        """Memory held at the worst instant: the resident set plus the dearest rotating model."""
        return sum(costs[m] for m in self.resident) + max((costs[m] for m in self.rotating), default=0.0)

    def label(self) -> str:
        parts = [
            f"{name}: {'+'.join(sorted(group)) or '-'}"
            for name, group in zip(MODES, (self.resident, self.rotating, self.predicted))
        ]
        return "; ".join(parts)

    def to_json(self) -> dict[str, list[str]]:
        return {name: sorted(group) for name, group in zip(MODES, (self.resident, self.rotating, self.predicted))}


def mode_options(models: Sequence[str], costs: Mapping[str, float], budget: float) -> list[Modes]:
    """Every resident set that fits, each with every other model that fits beside it rotating
    (a rotating model that never pays off simply never runs) and the rest predicted."""
    out: list[Modes] = []
    seen: set[tuple[frozenset[str], frozenset[str]]] = set()
    for r in range(len(models) + 1):
        for combo in itertools.combinations(models, r):
            resident = frozenset(combo)
            held = sum(costs[m] for m in resident)
            if held > budget + EPS:
                continue
            rotating = frozenset(m for m in models if m not in resident and held + costs[m] <= budget + EPS)
            if (resident, rotating) in seen:
                continue
            seen.add((resident, rotating))
            predicted = frozenset(models) - resident - rotating
            out.append(Modes(resident, rotating, predicted))
    return out


@dataclass
class WindowPlan:
    """What runs in one buffer and what every (model, frame) is then expected to score."""

    runs: dict[str, list[int]]  # model -> frame indices (in the window) where it executes
    expected: dict[str, np.ndarray]  # model -> (n,) expected accuracy per frame, mean over its nodes
    spent_ms: float  # execution and load time charged
    loads: list[str] = field(default_factory=list)  # rotating models loaded in this window

    def to_json(self) -> dict[str, Any]:
        return {"runs": {m: list(v) for m, v in self.runs.items()}, "spent_ms": self.spent_ms, "loads": self.loads}


def _value(cur: np.ndarray) -> float:
    """A model's expected accuracy summed over frames (mean over its nodes)."""
    return float(cur.mean(axis=0).sum())


def _after(cur: np.ndarray, reuse: np.ndarray, j: int) -> np.ndarray:
    """Per node and frame, the expected accuracy once the model really ran on frame ``j``."""
    new = np.maximum(cur, reuse[:, :, j])
    new[:, j] = 1.0
    return new


def _best_prefix(
    cur: np.ndarray, reuse: np.ndarray, free: np.ndarray, cost: float, load: float, budget: float
) -> tuple[float, list[int], np.ndarray]:
    """For a model not yet loaded in this window: the greedy run of its own executions whose
    (gain / (load + executions' cost)) is best within ``budget``. Returns (ratio, frames, state)."""
    best: tuple[float, list[int], np.ndarray] = (0.0, [], cur)
    state, gain, spent = cur, 0.0, load
    picks: list[int] = []
    avail = free.copy()
    while spent + cost <= budget + EPS and avail.any():
        base = _value(state)
        gains = np.full(len(avail), -1.0)
        for c in np.flatnonzero(avail):
            gains[c] = _value(_after(state, reuse, int(c))) - base
        j = int(np.argmax(gains))
        if gains[j] <= EPS:
            break
        state = _after(state, reuse, j)
        picks = [*picks, j]
        avail[j] = False
        gain += float(gains[j])
        spent += cost
        if gain / spent > best[0]:
            best = (gain / spent, picks, state)
    return best


def plan_window(
    reuse: Mapping[str, np.ndarray],
    prior: Mapping[str, np.ndarray],
    link: Mapping[str, np.ndarray],
    cost_ms: Mapping[str, float],
    load_ms: Mapping[str, float],
    budget_ms: float,
    weight: Mapping[str, float] | None = None,
) -> WindowPlan:
    """Greedy executions for one buffer of ``n`` frames, for the models in ``reuse``.

    Per model (arrays over its served nodes): ``reuse`` (nodes, n, n) is the expected accuracy
    of frame i served from a real output on frame j (0 where j cannot serve i: another camera,
    or the same frame); ``prior`` (nodes, n) that of the last real output before the window (0
    when there is none); ``link`` (nodes,) that of the cross-model prediction. ``load_ms`` is
    charged with a model's first execution in the window (0 for resident or already loaded
    models). ``weight`` scales a model's gains (default 1: every model counts the same, as the
    accuracy averages over models).
    """
    weight = weight or {}
    cur = {m: np.maximum(np.asarray(prior[m], float), np.asarray(link[m], float)[:, None]) for m in reuse}
    n = next(iter(cur.values())).shape[1] if cur else 0
    free = {m: np.ones(n, dtype=bool) for m in reuse}
    runs: dict[str, list[int]] = {m: [] for m in reuse}
    loaded = {m for m in reuse if load_ms.get(m, 0.0) <= 0.0}
    loads: list[str] = []
    spent = 0.0
    while True:
        best: tuple[float, str, list[int], np.ndarray] | None = None
        left = budget_ms - spent
        for m in reuse:
            w = float(weight.get(m, 1.0))
            if m in loaded:
                if cost_ms[m] > left + EPS or not free[m].any():
                    continue
                base = _value(cur[m])
                for j in np.flatnonzero(free[m]):
                    after = _after(cur[m], reuse[m], int(j))
                    ratio = w * (_value(after) - base) / max(cost_ms[m], EPS)
                    if ratio > EPS and (best is None or ratio > best[0]):
                        best = (ratio, m, [int(j)], after)
            else:
                ratio, picks, state = _best_prefix(cur[m], reuse[m], free[m], cost_ms[m], load_ms[m], left)
                ratio *= w
                if picks and ratio > EPS and (best is None or ratio > best[0]):
                    best = (ratio, m, picks, state)
        if best is None:
            break
        _, m, picks, state = best
        if m not in loaded:
            loaded.add(m)
            loads.append(m)
            spent += load_ms[m]
        cur[m] = state
        for pick in picks:
            free[m][pick] = False
            runs[m].append(pick)
        spent += cost_ms[m] * len(picks)
    expected = {m: cur[m].mean(axis=0) for m in reuse}
    return WindowPlan({m: sorted(v) for m, v in runs.items()}, expected, spent, loads)


def window_figures(
    reuse: ReuseModel, nodes: Sequence[str], rows: Sequence[np.ndarray], where: Sequence[tuple[int, int]], n: int
) -> tuple[np.ndarray, np.ndarray]:
    """:func:`plan_window`'s ``reuse`` (nodes, n, n) and ``prior`` (nodes, n) of one model over
    a buffer of ``n`` frames, from the temporal links' inputs ``rows``: ``where[r]`` is (frame
    i, reference j) for ``rows[r]``, j = -1 for the camera's last real output before the buffer.
    Pairs not listed, and nodes the temporal links do not know, stay 0."""
    r = np.zeros((len(nodes), n, n))
    p = np.zeros((len(nodes), n))
    if not rows:
        return r, p
    X = np.stack(rows)
    for ki, k in enumerate(nodes):
        if not reuse.knows(k):
            continue
        for (i, j), v in zip(where, reuse.expected(k, X)):
            if j < 0:
                p[ki, i] = v
            else:
                r[ki, i, j] = v
    return r, p


def choose_modes(
    options: Iterable[Modes], evaluate: Callable[[Modes], tuple[float, float]], time_budget_ms: float
) -> tuple[Modes, float, float]:
    """The option with the best expected accuracy whose per-frame time fits ``time_budget_ms``
    (the fastest option when none fits). ``evaluate(modes)`` returns (expected accuracy,
    ms per frame). Ties go to fewer resident models (less memory held)."""
    scored = [(modes, *evaluate(modes)) for modes in options]
    if not scored:
        raise ValueError("no mode option fits the budget")
    fitting = [s for s in scored if s[2] <= time_budget_ms + EPS]
    if not fitting:
        return min(scored, key=lambda s: s[2])
    return max(fitting, key=lambda s: (round(s[1], 6), -len(s[0].resident), -s[2]))


@dataclass
class LinkAudit:
    """Link accuracies as measured since the links were last scored, to correct the held-out
    figures for drift. Every frame where a model really ran while the links would have
    predicted it (rotation, profiling) is an audit: the node's accuracy of the prediction
    from the models real there against the real output.

    :meth:`corrected` blends the held-out figure (scaled by the drift seen so far, weighted as
    ``prior_weight`` audits) with the audits of that node and set of models. A node audited
    only from other sets gets its held-out figure times the drift over every audit. A node that
    never runs has no audits at all; it gets the held-out figure times the *worst* drift any
    measured node showed: the only evidence is that the links' world has moved, and nothing
    says this node moved less.
    """

    prior_weight: float = 10.0
    sums: dict[tuple[str, frozenset[str]], list[float]] = field(default_factory=dict)  # [expected, measured, n]
    expected_total: float = 0.0
    measured_total: float = 0.0

    def record(self, node: str, active: Iterable[str], expected: float, measured: float) -> None:
        s = self.sums.setdefault((node, frozenset(active)), [0.0, 0.0, 0.0])
        s[0] += float(expected)
        s[1] += float(measured)
        s[2] += 1.0
        self.expected_total += float(expected)
        self.measured_total += float(measured)

    def drift(self) -> float:
        """Measured over expected across every audit, shrunk towards 1.0 by ``prior_weight``
        audits' worth of "as expected" (so a handful of audits cannot zero every link), and
        never above 1.0: luck elsewhere does not raise a held-out figure."""
        return min(1.0, (self.prior_weight + self.measured_total) / (self.prior_weight + self.expected_total))

    def worst_drift(self) -> float:
        """The lowest per-node drift (each shrunk like :meth:`drift`): what a node that was never
        measured is assumed to have, since nothing says it drifted less than the worst one seen."""
        per: dict[str, list[float]] = {}
        for (node, _), (e, m, _n) in self.sums.items():
            acc = per.setdefault(node, [0.0, 0.0])
            acc[0] += e
            acc[1] += m
        ratios = [(self.prior_weight + m) / (self.prior_weight + e) for e, m in per.values()]
        return min(1.0, min(ratios, default=1.0))

    def corrected(self, node: str, active: Iterable[str], held_out: float) -> float:
        s = self.sums.get((node, frozenset(active)))
        if s is None:
            measured = any(k == node for k, _ in self.sums)
            return float(held_out) * (self.drift() if measured else self.worst_drift())
        prior = float(held_out) * self.drift()
        return (self.prior_weight * prior + s[1]) / (self.prior_weight + s[2])

    @property
    def audits(self) -> int:
        return int(sum(s[2] for s in self.sums.values()))
