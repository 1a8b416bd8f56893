"""The configured selector, as the planner and ``mlink schedule plan`` run it.

:func:`select_models` wraps the pure selectors of :mod:`mlink.scheduler.selection` with what a
running site adds: a cost margin on every measured cost, models that cannot be loaded
(``exclude``) and models that must stay loaded (``forced``).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping, Sequence

from mlink.scheduler.accuracy import LinkAccuracy
from mlink.scheduler.selection import Selection, evaluate, objective_select, paper_greedy


def select_models(
    selector: str,
    costs: Mapping[str, float],
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
    avail = {m: math.ceil(c * f) for m, c in costs.items() if m in set(models) and m not in excluded}
    forced_cost = sum(avail.get(m, 0) for m in fixed)
    if fixed:

        def acc(active: frozenset[str], target: str) -> float:
            return 1.0 if target in fixed else accuracy(active | fixed, target)

    else:
        acc = accuracy  # type: ignore[assignment]
    cand = {m: c for m, c in avail.items() if m not in fixed}
    room = budget - forced_cost
    if selector == "paper":
        single = (
            accuracy.single()
            if isinstance(accuracy, LinkAccuracy)
            else {(i, j): accuracy(frozenset([i]), j) for i in models for j in models if i != j}
        )
        sel = paper_greedy(cand, single, room, ensemble_acc=acc, models=models, exclude=excluded | fixed)
    elif selector == "objective":
        sel = objective_select(cand, acc, room, models=models, exclude=excluded | fixed, prune=len(cand) > 8)
    else:
        raise ValueError(f"selector must be paper or objective, got {selector!r}")
    if not fixed:
        return sel
    full = evaluate(sel.active | fixed, avail, accuracy, budget, models=models, selector=sel.selector)
    return Selection(
        full.active, full.objective, full.cost, full.budget, sel.selector, full.expected, full.feasible, sel.evaluations
    )
